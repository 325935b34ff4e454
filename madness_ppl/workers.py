"""The work of :func:`madness_ppl.batch.deblend_many`: one batch fitted and written, in this
process (:func:`run_local`) or on ``dask.distributed`` workers (:func:`run_dask`).

:func:`run_batch` is what a worker runs: it loads the prior once per process
(:func:`worker_prior`), fits the batch's patches (one :func:`~madness_ppl.deblend.deblend_batch`
call per distinct tile PSF), and writes the owned rows atomically to ``batches/<id>.ecsv``, or
its failure to ``batches/<id>.error.json``. It never raises: the run goes on.
"""

from __future__ import annotations

import functools
import io
import json
import os
import resource
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import vstack

from madness_ppl.atomic import atomic_write_text
from madness_ppl.options import BatchConfig
from madness_ppl.scene import bucket_size
from madness_ppl.tiling import BatchSpec

if TYPE_CHECKING:  # the prior module is imported where a prior is loaded
    from madness_ppl.prior import GalaxyPrior

__all__ = ["BATCH_DIR", "run_batch", "run_dask", "run_local", "worker_prior"]

#: Sub-directory of a run's output that holds one file per finished (or failed) batch.
BATCH_DIR = "batches"
#: XLA flags of a one-core dask worker.
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@functools.cache
def worker_prior(name: str) -> GalaxyPrior:
    """The prior ``name``, loaded once per process (the compiled programs are cached by jax)."""
    from madness_ppl.prior import GalaxyPrior

    return GalaxyPrior.load(name)


def _rss_mb() -> float:
    """Current resident memory of this process in MB (peak on systems without /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_batch(spec: BatchSpec, config: BatchConfig, out: str) -> dict[str, Any]:
    """Fit one batch and write its owned catalog rows atomically (runs on a worker).

    Never raises: a failure is written to ``batches/<id>.error.json`` and returned.

    Returns
    -------
    dict
        ``id``, ``status`` (``"done"`` or ``"failed"``), ``n_galaxies``, ``seconds``, ``pid``,
        ``rss_mb`` (after the batch) and ``error`` (on failure).
    """

    t0 = time.perf_counter()
    path = Path(out) / BATCH_DIR / f"{spec.id:06d}"
    plate = bucket_size(max(len(p) for p in spec.positions))
    info = {"id": spec.id, "pid": os.getpid(), "plate": plate}
    try:
        results = _fit_by_psf(spec, worker_prior(config.prior), config)
        rows = []
        for meta, result in zip(spec.patches, results, strict=True):
            if not meta.report:
                continue
            table = result.catalog[: meta.n_owned]
            table["id"] = np.asarray(meta.sources[: meta.n_owned], np.int64)
            table["x"] += meta.x0
            table["y"] += meta.y0
            table.add_column(meta.input, name="input", index=0)
            table["patch"] = meta.patch
            table["batch"] = spec.id
            rows.append(table)
        catalog = vstack(rows, metadata_conflicts="silent")
        text = io.StringIO()
        catalog.write(text, format="ascii.ecsv")
        atomic_write_text(path.with_suffix(".ecsv"), text.getvalue())
        path.with_suffix(".error.json").unlink(missing_ok=True)
        info.update(status="done", n_galaxies=len(catalog))
    except Exception as err:  # recorded and reported, the run goes on
        error = {
            "id": spec.id,
            "patches": [m.patch for m in spec.patches],
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        atomic_write_text(path.with_suffix(".error.json"), json.dumps(error, indent=1))
        info.update(status="failed", n_galaxies=0, error=error["error"])
    info.update(seconds=time.perf_counter() - t0, rss_mb=_rss_mb())
    return info


def _fit_by_psf(spec: BatchSpec, prior: GalaxyPrior, cfg: BatchConfig) -> list:
    """``deblend_batch`` over the batch's patches, one call per distinct tile PSF (patches of
    one tile share its difference kernels); results in the batch's order."""
    import warnings

    from madness_ppl.deblend import deblend_batch
    from madness_ppl.errors import MadnessInputWarning
    from madness_ppl.psf import field_kernel

    psfs = spec.psfs if spec.psfs is not None else [None] * len(spec.positions)
    groups: dict[int, list[int]] = {}
    keys: dict[int, Any] = {}
    for k, psf in enumerate(psfs):
        key = None if psf is None else hash(np.ascontiguousarray(psf).tobytes())
        groups.setdefault(key, []).append(k)
        keys[key] = psf
    results: list = [None] * len(psfs)
    for key, members in groups.items():
        with warnings.catch_warnings():  # deblend_many warns once about tiles without a PSF
            warnings.simplefilter("ignore", MadnessInputWarning)
            kernel = field_kernel(prior, keys[key], source="a tile")
        out = deblend_batch(
            spec.fields[members],
            spec.variances[members],
            [spec.positions[k] for k in members],
            prior=prior,
            psf=kernel,
            point_sources=None
            if spec.point_sources is None
            else [spec.point_sources[k] for k in members],
            options=cfg.options.replace(shear_seed=zlib.crc32(f"{spec.id}/{key}".encode())),
        )
        for k, result in zip(members, out, strict=True):
            results[k] = result
    return results


def run_local(jobs: Iterable[tuple], on_done: Callable[[dict], None]) -> None:
    """Run the jobs ``(spec, config, out)`` one after the other in this process."""
    for spec, config, out in jobs:
        on_done(run_batch(spec, config, out))


def run_dask(
    jobs: Iterable[tuple],
    on_done: Callable[[dict], None],
    workers: int,
    scheduler: str | None,
) -> None:
    """Submit the jobs to a dask cluster, at most two per worker in flight (bounded memory)."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        # one core per worker: XLA's CPU thread pool would otherwise use every core in each
        # worker process and oversubscribe the machine
        flags = os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"XLA_FLAGS": flags.strip()},
        )
    client = Client(scheduler if scheduler else cluster)
    try:
        window = 2 * max(len(client.scheduler_info()["workers"]), 1)
        pending = iter(jobs)
        running = as_completed()
        for job in pending:
            running.add(client.submit(run_batch, *job, pure=False))
            if running.count() >= window:
                break
        for future in running:
            try:
                on_done(future.result())
            except Exception as err:  # a lost worker: record, go on
                on_done({"id": None, "status": "failed", "error": f"{type(err).__name__}: {err}"})
            future.release()
            nxt = next(pending, None)
            if nxt is not None:
                running.add(client.submit(run_batch, *nxt, pure=False))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
