"""Simulated datasets on disk: seeded ``.npz`` shards written in parallel, atomically.

Layout of a dataset directory::

    out/
      config.json          what generated it (kind, survey, configs, seed, sizes, version)
      shard_00000.npz      arrays of shard 0 (see below)
      shard_00001.npz
      ...

Shard *k* is generated from ``numpy.random.SeedSequence(seed).spawn(n_shards)[k]``, so the data do
not depend on the number of worker processes, and a shard is bit-identical whenever it is rebuilt.
Each shard is written to a temporary file and renamed into place (``os.replace``), so an interrupted
run (Ctrl-C, a killed worker) never leaves a half-written shard under its final name; ``resume=True``
keeps the finished shards of an interrupted run with the same configuration.

Isolated shards hold ``noisy`` and ``noiseless`` ``(n, B, S, S)``, ``offsets`` ``(n, 2)`` and
``cat_<column>`` ``(n,)``. Blend shards hold ``field`` ``(n, B, H, W)``, ``variance`` and ``noiseless`` (same),
``isolated`` ``(n, N_max, B, S, S)``, ``positions`` ``(n, N_max, 2)`` (NaN padded), ``n_sources``
``(n,)`` and ``cat_<column>`` ``(n, N_max)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from madness_ppl.atomic import (
    _PENDING,
    OUTPUT_MARKER,
    atomic_savez,
    atomic_write_text,
    check_output_path,
    new_output_dir,
    read_json,
    swap_into_place,
)
from madness_ppl.errors import MadnessInputError, OutputDirectoryError
from madness_ppl.progress import progress_bar
from madness_ppl.simulate.blends import BlendConfig, make_blend, mean_galaxy_count, sample_positions
from madness_ppl.simulate.catalog import CatalogConfig, make_catalog
from madness_ppl.simulate.stamps import DATASET_PSFS, check_stamp_size, dataset_psf, draw_isolated
from madness_ppl.survey import Survey

__all__ = ["DATASET_VERSION", "iter_shards", "load_dataset", "read_config", "simulate_dataset"]

DATASET_VERSION = 1
Kind = Literal["isolated", "blends"]


class ShardTask(NamedTuple):
    """One shard to generate and write (picklable: it runs in a worker process)."""

    kind: Kind
    survey: str
    bands: list[str] | None  # None: every band of the survey
    stamp_size: int
    seed: int
    n_shards: int
    index: int  # the shard's seed is spawn(n_shards)[index] of SeedSequence(seed)
    size: int
    path: str
    catalog_config: dict[str, Any]
    blend_config: dict[str, Any]
    psf: str = "survey"  # madness_ppl.simulate.stamps.dataset_psf


def _isolated_shard(n: int, survey: Survey, rng: np.random.Generator, task: ShardTask) -> dict:
    catalog = make_catalog(n, survey, rng=rng, config=CatalogConfig(**task.catalog_config))
    psf = dataset_psf(task.psf, survey)
    stamps = draw_isolated(catalog, survey, rng=rng, stamp_size=task.stamp_size, psf=psf)
    out = {"noisy": stamps.noisy, "noiseless": stamps.noiseless, "offsets": stamps.offsets}
    for name in catalog.colnames:
        out[f"cat_{name}"] = np.asarray(catalog[name])
    return out


def _blend_shard(n: int, survey: Survey, rng: np.random.Generator, task: ShardTask) -> dict:
    config = BlendConfig(**task.blend_config)
    catalog_config = CatalogConfig(**task.catalog_config)
    psf = dataset_psf(task.psf, survey)
    blends = [
        make_blend(survey, rng=rng, config=config, catalog_config=catalog_config, psf=psf)
        for _ in range(n)
    ]
    n_max = max([len(b.positions) for b in blends] + [1])
    b_, s = survey.n_bands, config.stamp_size
    isolated = np.zeros((n, n_max, b_, s, s), np.float32)
    positions = np.full((n, n_max, 2), np.nan)
    columns = blends[0].catalog.colnames if blends else []
    cat = {name: np.full((n, n_max), np.nan) for name in columns}
    for i, blend in enumerate(blends):
        k = len(blend.positions)
        isolated[i, :k] = blend.isolated
        positions[i, :k] = blend.positions
        for name in columns:
            cat[name][i, :k] = np.asarray(blend.catalog[name], dtype=float)
    out = {
        "field": np.stack([b.field for b in blends]),
        "variance": np.stack([b.variance for b in blends]),
        "noiseless": np.stack([b.noiseless for b in blends]),
        "isolated": isolated,
        "positions": positions,
        "n_sources": np.array([len(b.positions) for b in blends], dtype=np.int32),
    }
    out.update({f"cat_{name}": values for name, values in cat.items()})
    return out


def _write_shard(task: ShardTask) -> str:
    """Generate one shard and write it atomically (runs in a worker process)."""
    survey = Survey.named(task.survey)
    if task.bands:
        survey = survey.select_bands(task.bands)
    rng = np.random.default_rng(np.random.SeedSequence(task.seed).spawn(task.n_shards)[task.index])
    make = _isolated_shard if task.kind == "isolated" else _blend_shard
    arrays = make(task.size, survey, rng, task)
    return str(atomic_savez(task.path, **arrays))


def simulate_dataset(
    out_dir: str | os.PathLike,
    *,
    kind: Kind,
    n: int,
    survey: str = "lsst",
    bands: tuple[str, ...] | None = None,
    stamp_size: int = 45,
    blend_config: BlendConfig | None = None,
    catalog_config: CatalogConfig | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    psf: str = "survey",
) -> list[Path]:
    """Simulate a dataset of isolated stamps or blended fields and write it as shards.

    Parameters
    ----------
    out_dir
        Output directory. It must not exist (or be empty) unless ``overwrite`` or ``resume``.
    kind
        ``"isolated"`` (one galaxy per stamp) or ``"blends"`` (fields laid out by ``blend_config``).
    n
        Number of stamps or fields (``> 0``).
    survey
        Survey name understood by :meth:`madness_ppl.survey.Survey.named`.
    bands
        Optional subset of the survey's bands.
    stamp_size
        Odd stamp side in pixels (isolated stamps; blends use ``blend_config.stamp_size``).
    shard_size
        Items per shard file.
    workers
        Worker processes (``spawn`` context; the output does not depend on it).
    seed
        Master seed.
    overwrite
        Replace an existing dataset at ``out_dir``: the new one is written beside it and
        swapped in when complete. Only a directory madness-ppl wrote (marker file
        ``.madness-ppl-output`` or a dataset ``config.json``, and only dataset files) is
        replaced; anything else raises :class:`~madness_ppl.errors.OutputDirectoryError`.
    resume
        Keep finished shards of an earlier run with the same configuration.
    progress
        Show a rich progress bar.
    psf
        The PSF the galaxies are drawn with: ``"survey"`` (default, the survey's PSF per band)
        or ``"reference"`` (the model frame of PSF-aware priors, a circular Gaussian of FWHM
        :data:`madness_ppl.psf.REFERENCE_FWHM_PIXELS` pixels; training convolves it to random
        observed PSFs, :mod:`madness_ppl.train.psfs`). Recorded as ``"psf"`` in
        ``config.json``; datasets written before it have no key and mean ``"survey"``.

    Returns
    -------
    list of pathlib.Path
        The shard files, in order.
    """
    if kind not in ("isolated", "blends"):
        raise MadnessInputError(f"kind must be 'isolated' or 'blends', got {kind!r}")
    if n <= 0:
        raise MadnessInputError(f"n must be a positive number of items, got {n}")
    if shard_size <= 0:
        raise MadnessInputError(f"shard_size must be positive, got {shard_size}")
    if workers <= 0:
        raise MadnessInputError(f"workers must be positive, got {workers}")
    check_stamp_size(stamp_size)
    if psf not in DATASET_PSFS:
        raise MadnessInputError(f"psf must be one of {DATASET_PSFS}, got {psf!r}", psf)
    resolved = Survey.named(survey)
    if bands:
        resolved.select_bands(bands)  # validates the names
    blend_config = blend_config or BlendConfig(stamp_size=stamp_size)
    catalog_config = catalog_config or CatalogConfig()
    if kind == "blends" and blend_config.density is not None:
        mean_galaxy_count(blend_config, resolved.pixel_scale)  # refuse absurd densities now
    if kind == "blends" and blend_config.density is None:
        # fail before touching the disk when the largest field cannot be laid out
        sample_positions(
            blend_config.n_galaxies[1], blend_config, resolved.pixel_scale, np.random.default_rng(0)
        )

    out = Path(out_dir)
    n_shards = -(-n // shard_size)
    config = {
        "version": DATASET_VERSION,
        "kind": kind,
        "n": n,
        "survey": survey,
        "bands": list(bands or resolved.band_names),
        "stamp_size": stamp_size if kind == "isolated" else blend_config.stamp_size,
        "shard_size": shard_size,
        "n_shards": n_shards,
        "seed": seed,
        "catalog_config": dataclasses.asdict(catalog_config),
        "blend_config": dataclasses.asdict(blend_config) if kind == "blends" else None,
        "psf": psf,
    }
    config = json.loads(json.dumps(config))  # the form it takes on disk (tuples -> lists)
    final = out
    if _prepare_directory(out, config, overwrite=overwrite, resume=resume):
        out = new_output_dir(final)  # the new dataset is built beside the old one, then swapped
        atomic_write_text(out / "config.json", json.dumps(config, indent=2))

    tasks: list[ShardTask] = []
    for k in range(n_shards):
        path = out / f"shard_{k:05d}.npz"
        if resume and path.exists():
            continue
        tasks.append(
            ShardTask(
                kind=config["kind"],
                survey=config["survey"],
                bands=list(bands) if bands else None,
                stamp_size=config["stamp_size"],
                seed=config["seed"],
                n_shards=config["n_shards"],
                index=k,
                size=min(shard_size, n - k * shard_size),
                path=str(path),
                catalog_config=config["catalog_config"],
                blend_config=dataclasses.asdict(blend_config),
                psf=psf,
            )
        )
    try:
        _run_tasks(tasks, workers=workers, progress=progress, total=n)
        if out != final:
            swap_into_place(out, final)
    finally:
        if out != final and out.exists():
            shutil.rmtree(out, ignore_errors=True)  # interrupted: the old dataset is intact
            _PENDING.discard(out)
        elif out.exists():
            for leftover in out.glob("*.tmp"):
                leftover.unlink(missing_ok=True)
    return [final / f"shard_{k:05d}.npz" for k in range(n_shards)]


def _dataset_files(out: Path) -> set[str]:
    """Names in ``out`` that a dataset directory may hold (ours); anything else is foreign."""
    return {
        p.name
        for p in out.iterdir()
        if p.name in (OUTPUT_MARKER, "config.json", "preview.png")
        or (p.name.startswith("shard_") and p.name.endswith((".npz", ".npz.tmp")))
    }


def _prepare_directory(out: Path, config: dict, *, overwrite: bool, resume: bool) -> bool:
    """Check ``out``; create it (with the marker and config) unless it is to be replaced.

    Returns ``True`` when ``out`` holds an earlier dataset to be replaced (``overwrite``): the
    new one is then written beside it and swapped in at the end. Only a directory this program
    wrote (marker file or dataset ``config.json``, and nothing but dataset files) is replaced.
    """
    config_path = out / "config.json"
    check_output_path(out)  # not a file, not under a file
    if out.exists() and any(out.iterdir()):
        if resume and config_path.exists():
            previous = {"psf": "survey", **read_json(config_path)}  # no key: the survey's PSF
            if previous != config:
                raise MadnessInputError(
                    f"cannot resume into {out}: it was generated with a different configuration",
                    str(out),
                )
            return False
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already exists and is not empty; "
                "pass overwrite=True (--overwrite) to replace it or resume=True (--resume)"
            )
        entries = {p.name for p in out.iterdir()}
        foreign = sorted(entries - _dataset_files(out))
        if foreign or not ({OUTPUT_MARKER, "config.json"} & entries):
            detail = f"it holds {foreign[:5]}" if foreign else "it has no dataset config.json"
            raise OutputDirectoryError(
                f"refusing to replace {out}: it is not a dataset written by madness-ppl "
                f"({detail}); choose a new output directory",
                str(out),
            )
        return True
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("written by madness-ppl; safe to replace with --overwrite\n")
    atomic_write_text(config_path, json.dumps(config, indent=2))
    return False


def _run_tasks(tasks: list[ShardTask], *, workers: int, progress: bool, total: int) -> None:
    with progress_bar(progress, remaining=True) as bar:
        job = bar.add_task(f"simulating {total} items", total=sum(t.size for t in tasks))
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _write_shard(task)
                bar.advance(job, task.size)
            return
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_write_shard, task): task for task in tasks}
            try:
                for future in cf.as_completed(futures):
                    future.result()
                    bar.advance(job, futures[future].size)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The generating configuration of a dataset directory (``"psf"`` is filled in as
    ``"survey"`` for datasets written before it was recorded)."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not a madness_ppl dataset (no config.json)")
    config = read_json(config_path)
    if config.get("version") != DATASET_VERSION:
        raise MadnessInputError(
            f"dataset {path} has version {config.get('version')}, expected {DATASET_VERSION}"
        )
    config.setdefault("psf", "survey")
    return config


def iter_shards(path: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Yield the arrays of each shard of a dataset, in order (one shard in memory at a time)."""
    config = read_config(path)
    for k in range(config["n_shards"]):
        shard = Path(path) / f"shard_{k:05d}.npz"
        if not shard.exists():
            raise FileNotFoundError(f"{shard} is missing: the dataset is incomplete (use resume)")
        with np.load(shard) as data:
            yield {name: data[name] for name in data.files}


def load_dataset(
    path: str | os.PathLike, keys: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Load (the given keys of) every shard of an *isolated* dataset, concatenated along axis 0."""
    config = read_config(path)
    if config["kind"] != "isolated":
        raise MadnessInputError(
            "load_dataset concatenates isolated datasets; iterate blends with iter_shards"
        )
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(path):
        for name in keys or tuple(shard):
            parts.setdefault(name, []).append(shard[name])
    return {name: np.concatenate(values) for name, values in parts.items()}
