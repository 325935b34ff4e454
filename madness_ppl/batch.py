r"""Survey-scale deblending: many fields or large tiles, fixed-shape vmapped batches, resumable.

:func:`deblend_many` (CLI ``madness-ppl deblend-many``) runs in four steps.

1. **Plan** (on the driver). Each input (a FITS field of any size) is read, its per-band noise
   is estimated from it, and sources are detected on the whole tile (or positions are given).
   The tile is covered by a regular grid of *cores* of side :math:`C = P - 2m` (``patch_size``
   :math:`P`, ``margin`` :math:`m`); the *patch* of a core extends it by :math:`m` pixels on
   every side, pixels beyond the tile being NaN (masked). A source is **owned** by the one core
   that contains its position and **modelled** in every patch that contains it: a galaxy near a
   core edge is fitted together with its neighbours across the edge, and reported once. Patches
   owning no source are skipped. With the default :math:`m = S/2` (``S`` the stamp size) an owned
   galaxy's stamp never leaves its patch.
2. **Batches**. Patches are grouped by the source bucket (:func:`~madness_ppl.scene.bucket_size`)
   of their modelled count and cut into batches of ``batch_size`` (a short last batch repeats its
   final patch). Every batch of a bucket has one shape, so each worker compiles one program per
   bucket. The batch list depends only on the inputs and the configuration: not on the number of
   workers, nor on what is already finished.
3. **Work**. Each batch is one vmapped MAP fit (:func:`~madness_ppl.deblend.deblend_batch`), in
   this process or on ``dask.distributed`` workers (each loads the prior and compiles once). Its
   owned rows are written atomically to ``batches/<id>.ecsv``: a file there *is* the record that
   the batch is finished. A failing batch writes ``batches/<id>.error.json`` and the run goes on.
4. **Stitch**. The finished batches become ``catalog.fits`` and ``catalog.ecsv`` (one row per
   source, sorted by input and source id) and ``manifest.json`` records the plan, finished and
   failed batches, throughput and worker memory; all written atomically.

Running the same command again on the same output directory skips finished batches, retries
failed ones, and produces the catalog an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from astropy.table import Table, vstack

from madness_ppl.atomic import atomic_write_text, read_json
from madness_ppl.errors import FieldFormatError, MadnessInputError, OutputDirectoryError
from madness_ppl.options import BatchConfig
from madness_ppl.progress import progress_bar
from madness_ppl.tiling import (
    BatchSpec,
    Patch,
    PatchRef,
    Tile,
    batch_spec,
    load_tile,
    plan_batches,
    plan_patches,
)
from madness_ppl.workers import BATCH_DIR, run_batch, run_dask, run_local, worker_prior

if TYPE_CHECKING:  # the prior module is imported where a prior is loaded
    pass

__all__ = [
    "BatchConfig",
    "BatchReport",
    "BatchSpec",
    "Patch",
    "PatchRef",
    "Tile",
    "deblend_many",
    "load_tile",
    "plan_batches",
    "plan_patches",
    "run_batch",
]

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"


class BatchReport(NamedTuple):
    """What :func:`deblend_many` did: the stitched ``catalog``, the output directory, and the
    ``manifest`` (plan, finished and failed batches, throughput, worker memory)."""

    catalog: Table
    out: Path
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------- driver


def _fingerprint(paths: Sequence[str], config: BatchConfig, positions: Any) -> dict[str, Any]:
    files = []
    for p in paths:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
        files.append({"path": str(p), "sha256": digest.hexdigest()})
    return {
        "inputs": files,
        "config": config.settings(),
        "positions": None if positions is None else [str(p) for p in positions],
    }


def deblend_many(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    config: BatchConfig | None = None,
    positions: Sequence[str | os.PathLike] | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> BatchReport:
    """Deblend many fields or large tiles into one catalog (see the module docstring).

    Parameters
    ----------
    inputs
        FITS fields (any size; see :func:`madness_ppl.fields.read_field`).
    out
        Output directory; created, or resumed when it holds a run of the same inputs and
        configuration.
    config
        Patch, batch and fit settings (default ``BatchConfig()``).
    positions
        One positions table per input (default: detection on each tile).
    workers
        ``1``: run in this process; more: a ``dask.distributed`` ``LocalCluster`` of that many
        worker processes, one CPU core each (XLA's CPU thread pool limited to one thread).
    scheduler
        Address of a running dask scheduler (e.g. ``"tcp://host:8786"``); overrides ``workers``.
    progress
        Show a progress bar with the throughput.
    max_batches
        Stop after submitting this many unfinished batches (to bound a run; the rest is done by
        the next call).

    Returns
    -------
    BatchReport

    Raises
    ------
    ValueError
        No inputs, a positions list of the wrong length, an unreadable input, or an output
        directory holding a different run.
    """
    config = BatchConfig() if config is None else config
    paths = _checked_inputs(inputs, positions, workers)
    out = Path(out)
    fingerprint = _fingerprint(paths, config, positions)
    _check_run_directory(out, fingerprint)
    (out / BATCH_DIR).mkdir(parents=True, exist_ok=True)
    tiles, patches, batches = _plan(paths, positions, config, out / PLAN_FILE, fingerprint)

    def done(b: int) -> bool:
        return _read_batch(out / BATCH_DIR / f"{b:06d}.ecsv") is not None

    todo = [b for b in range(len(batches)) if not done(b)]
    if max_batches is not None:
        todo = todo[:max_batches]
    size = config.patch_size
    jobs = ((batch_spec(b, batches[b], patches, tiles, size), config, str(out)) for b in todo)
    records: list[dict] = []
    t0 = time.perf_counter()
    with progress_bar(progress, "{task.fields[rate]}", remaining=True) as bar:
        task = bar.add_task("deblending batches", total=len(todo), rate="")

        def on_done(info: dict) -> None:
            records.append(info)
            n_gal = sum(r.get("n_galaxies", 0) for r in records)
            rate = n_gal / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.2f} galaxies/s")

        if workers == 1 and scheduler is None:
            run_local(jobs, on_done)
        else:
            run_dask(jobs, on_done, workers, scheduler)
    wall = time.perf_counter() - t0
    return _stitch(out, paths, batches, records, wall, [t.wcs for t in tiles])


def _checked_inputs(
    inputs: Sequence[str | os.PathLike],
    positions: Sequence[str | os.PathLike] | None,
    workers: int,
) -> list[str]:
    """The input paths, after checking that they exist, match ``positions`` and ``workers``."""
    paths = [str(p) for p in inputs]
    if not paths:
        raise MadnessInputError("no input fields given", paths)
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} does not exist")
        if Path(p).is_dir():
            raise FieldFormatError(f"{p} is a directory; give the FITS files (e.g. {p}/*.fits)", p)
    if positions is not None and len(positions) != len(paths):
        raise MadnessInputError(
            f"{len(positions)} positions files for {len(paths)} inputs", len(positions)
        )
    seen: dict[Path, str] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:  # its sources would be fitted and catalogued twice
            raise MadnessInputError(f"the input {p} is given twice (also as {seen[key]})", p)
        seen[key] = p
    if workers < 1:
        raise MadnessInputError(f"workers must be >= 1, got {workers}", workers)
    return paths


def _check_run_directory(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse an output directory that is a file, holds another run, or is not ours."""
    if out.exists() and not out.is_dir():
        raise OutputDirectoryError(f"output directory {out} is a file", str(out))
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        previous = read_json(plan_path)
        if previous["fingerprint"] != fingerprint:
            raise OutputDirectoryError(
                f"{out} holds a run of other inputs or settings; use a new output directory",
                str(out),
            )
    elif out.exists() and any(
        p.name != BATCH_DIR or any(p.iterdir()) for p in out.iterdir()
    ):  # an empty batches/ is what a run killed while planning leaves
        raise OutputDirectoryError(
            f"{out} exists and is not a deblend-many output directory", str(out)
        )


def _plan(
    paths: list[str],
    positions: Sequence[str | os.PathLike] | None,
    config: BatchConfig,
    plan_path: Path,
    fingerprint: dict[str, Any],
) -> tuple[list[Tile], list[Patch], list[list[int]]]:
    """Load every tile, cut them into patches, group those into batches; write the plan."""
    import warnings

    from madness_ppl.errors import MadnessInputWarning
    from madness_ppl.psf import field_kernel

    prior = worker_prior(config.prior)
    core, margin = config.core_and_margin(prior.stamp_size)
    tiles, patches = [], []
    for k, path in enumerate(paths):
        tile = load_tile(
            path,
            prior,
            positions=None if positions is None else positions[k],
            detection=config.options.detection,
            check_sky=not config.options.fit_sky,
            bad_bits=config.bad_bits,
            zeropoint=config.zeropoint,
        )
        if tile.psf is not None:  # a bad PSF is refused now, not in every batch
            field_kernel(prior, tile.psf, source=str(path))
        tiles.append(tile)
        patches += plan_patches(tile.field.shape[-2:], tile.positions, core, margin, input=k)
    no_psf = [t.name for t in tiles if t.psf is None]
    if no_psf:
        warnings.warn(
            f"{len(no_psf)} input(s) without a PSF plane ({', '.join(no_psf[:3])}"
            f"{', ...' if len(no_psf) > 3 else ''}): their fits use the survey's default PSF; "
            "add a PSF cube (EXTNAME PSF, BANDS in its header) to each file",
            MadnessInputWarning,
            stacklevel=3,
        )
    batches = plan_batches(patches, config.batch_size)
    atomic_write_text(
        plan_path,
        json.dumps(
            {
                "fingerprint": fingerprint,
                "n_sources": [len(t.positions) for t in tiles],
                "n_patches": len(patches),
                "batches": batches,
            },
            indent=1,
        ),
    )
    return tiles, patches, batches


def _steady_rate(records: list[dict]) -> float:
    r"""Throughput without compilation: :math:`\sum_w \sum_{k>1} n_{w,k} / \sum_{k>1} t_{w,k}`,
    over workers :math:`w`, leaving out the first batch :math:`k = 1` of each worker and source
    bucket (the one that compiles)."""
    per_worker: dict[int, list[dict]] = {}
    first: set[tuple[int, int]] = set()
    for r in records:
        key = (r["pid"], r["plate"])
        per_worker.setdefault(r["pid"], [])
        if key in first:
            per_worker[r["pid"]].append(r)
        first.add(key)
    rate = 0.0
    for later in per_worker.values():
        seconds = sum(r["seconds"] for r in later)
        if seconds > 0:
            rate += sum(r["n_galaxies"] for r in later) / seconds
    return rate


def _read_batch(path: Path) -> Table | None:
    """The rows of a finished batch file, or ``None`` if it is missing or unreadable (a file
    damaged after it was written is not a finished batch: it is fitted again)."""
    if not path.exists():
        return None
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception:  # astropy raises many types for a damaged file
        return None
    if not {"input", "id", "x", "y"} <= set(table.colnames):
        return None
    return table


def _stitch(
    out: Path,
    paths: list[str],
    batches: list[list[int]],
    records: list[dict],
    wall: float,
    wcs: Sequence[Any] | None = None,
) -> BatchReport:
    """Concatenate the finished batches into the catalog and write the manifest."""
    from madness_ppl.io import add_sky_coordinates, write_table

    read = {b: _read_batch(out / BATCH_DIR / f"{b:06d}.ecsv") for b in range(len(batches))}
    finished = [b for b, table in read.items() if table is not None]
    failed = []
    for b in range(len(batches)):
        err = out / BATCH_DIR / f"{b:06d}.error.json"
        if err.exists() and b not in finished:
            try:
                failed.append(read_json(err))
            except MadnessInputError as damaged:  # a damaged error record is still a failure
                failed.append({"id": b, "patches": batches[b], "error": str(damaged)})
    tables = [read[b] for b in finished]
    catalog = vstack(tables, metadata_conflicts="silent") if tables else Table()
    if len(catalog):
        catalog.sort(["input", "id"])
        from madness_ppl.deblend import check_fit_quality

        check_fit_quality(catalog, source=f"deblend-many {out}")  # unmasked artefacts warn
        if wcs is not None and any(w is not None for w in wcs):
            catalog = add_sky_coordinates(catalog, wcs, input_column="input")
        catalog.meta["INPUTS"] = ",".join(os.path.basename(p) for p in paths)
        catalog.meta["FLUXUNIT"] = "electron"
    write_table(catalog, out / "catalog")
    done_now = [r for r in records if r["status"] == "done"]
    n_gal = sum(r["n_galaxies"] for r in done_now)
    workers: dict[int, list[float]] = {}
    for r in done_now:
        workers.setdefault(r["pid"], []).append(r["rss_mb"])
    manifest = {
        "inputs": paths,
        "n_batches": len(batches),
        "finished": finished,
        "failed": [{k: f[k] for k in ("id", "patches", "error")} for f in failed],
        "complete": len(finished) == len(batches),
        "n_sources": len(catalog),
        "this_run": {
            "batches": len(records),
            "galaxies": n_gal,
            "wall_s": wall,
            "galaxies_per_s": n_gal / wall if wall > 0 else 0.0,
            "worker_rss_mb": {str(pid): rss for pid, rss in workers.items()},
            "steady_galaxies_per_s": _steady_rate(done_now),
            "records": records,
        },
    }
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return BatchReport(catalog, out, manifest)
