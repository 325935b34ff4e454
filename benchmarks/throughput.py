"""Batch deblending throughput: galaxies per second vs batch size and workers, worker memory,
and a projection of the cost of the LSST 10-year wide survey.

Run: ``python benchmarks/throughput.py [--tiles 4] [--tile-size 256] [--batch-sizes 1 2 4 8]
[--workers 1 2] [--memory-tiles 12]``. Writes ``results/throughput.{json,md}``.

* **Data**: ``tiles`` simulated LSST 10-year tiles of ``tile_size`` pixels (default 252: 3 x 3 patch
  cores of 84 pixels) at the "high" density
  of ``deblend_vs_scarlet2`` (16 galaxies per 41" x 41" on average, i < 25.3), written as FITS
  with their true positions (so every configuration fits exactly the same galaxies).
* **Runs**: each configuration is one fresh ``madness-ppl deblend-many`` process (compilation
  included, as a user sees it) with the shipped prior and 128-pixel patches. Reported: galaxies
  per second over the whole run (``overall``) and without each worker's first batch per source
  bucket (``steady``, no compilation; see ``madness_ppl.batch``).
* **Scaling efficiency** from 1 to 2 workers: ``steady(2) / (2 x steady(1))`` at the batch
  size with the best single-worker throughput, where the 1-worker run is pinned to one core
  (``taskset``) like each dask worker (one XLA thread); the unpinned 1-worker runs use every core
  through XLA's thread pool.
* **Memory**: resident memory of each worker after every batch of a longer run
  (``memory_tiles`` tiles); batches run bucket by bucket, each new bucket compiles a program,
  so growth is measured from the first batch of the last bucket to the end.
* **Projection**: LSST wide-fast-deep 18,000 deg^2 at the simulated density of galaxies
  (i < 25.3), divided by the measured steady throughput of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import write_results

LSST_WIDE_DEG2 = 18_000.0
DENSITY_PER_41ARCSEC = 16.0  # mean of 12-20 galaxies in 41" x 41" ("high" density)


def make_tiles(n: int, size: int, directory: Path) -> tuple[list[tuple[Path, Path]], float]:
    """Simulate ``n`` tiles; return (fits, positions) paths and galaxies per arcmin^2."""
    from astropy.table import Table

    from madness_ppl.io import write_field
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    count = round(DENSITY_PER_41ARCSEC * (size / 205) ** 2)
    config = BlendConfig(field_size=size, n_galaxies=(count, count), margin=5)
    paths, total = [], 0
    for k in range(n):
        blend = make_blend(survey, config=config, rng=np.random.default_rng(5000 + k))
        image, pos = directory / f"tile{k}.fits", directory / f"tile{k}.ecsv"
        write_field(image, blend.field, survey.band_names, variance=blend.variance)
        Table({"x": blend.positions[:, 0], "y": blend.positions[:, 1]}).write(pos)
        paths.append((image, pos))
        total += len(blend.positions)
    area_arcmin2 = n * (size * survey.pixel_scale / 60.0) ** 2
    return paths, total / area_arcmin2


def run(
    tiles, out: Path, workers: int, batch_size: int, prior: str, pin: str | None = None
) -> dict:
    """One ``deblend-many`` process (pinned to the cores ``pin`` with taskset); return its
    manifest's ``this_run`` numbers."""
    cmd = ["taskset", "-c", pin] if pin else []
    cmd += [sys.executable, "-m", "madness_ppl", "deblend-many"]
    cmd += [str(p) for p, _ in tiles]
    for _, pos in tiles:
        cmd += ["--positions", str(pos)]
    cmd += ["--out", str(out), "--workers", str(workers), "--batch-size", str(batch_size)]
    cmd += ["--prior", prior, "--no-progress"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    this = manifest["this_run"]
    print(
        f"workers {workers} batch {batch_size} cores {pin or 'all'}: {this['galaxies']} galaxies, "
        f"{this['galaxies_per_s']:.2f}/s overall, {this['steady_galaxies_per_s']:.2f}/s steady",
        flush=True,
    )
    return {
        "workers": workers,
        "cores": pin or "all",
        "batch_size": batch_size,
        "galaxies": this["galaxies"],
        "wall_s": this["wall_s"],
        "overall_galaxies_per_s": this["galaxies_per_s"],
        "steady_galaxies_per_s": this["steady_galaxies_per_s"],
        "records": this["records"],
    }


def memory_profile(records: list[dict]) -> dict:
    """Per worker: RSS after each batch (completion order) and its growth once every source
    bucket has been compiled (from the first batch of the last new bucket to the end)."""
    per: dict[int, list[dict]] = {}
    for r in records:
        per.setdefault(r["pid"], []).append(r)
    out = {}
    for pid, rs in per.items():
        rss = [r["rss_mb"] for r in rs]
        seen, last_new = set(), 0
        for k, r in enumerate(rs):
            if r["plate"] not in seen:
                seen.add(r["plate"])
                last_new = k
        base = rss[last_new]
        out[str(pid)] = {
            "batches": len(rss),
            "rss_mb": rss,
            "plates": [r["plate"] for r in rs],
            "compiled_all_after_batch": last_new + 1,
            "after_last_compile_mb": base,
            "last_mb": rss[-1],
            "growth_after_compiles": rss[-1] / base - 1.0,
            "batches_after_compiles": len(rss) - last_new - 1,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=252, help="3 cores of 84 px")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-tiles", type=int, default=12)
    parser.add_argument("--prior", default="lsst")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="madness-throughput-") as tmp:
        tmp = Path(tmp)
        tiles, density = make_tiles(max(args.tiles, args.memory_tiles), args.tile_size, tmp)
        runs = []
        for batch in args.batch_sizes:
            runs.append(run(tiles[: args.tiles], tmp / f"b{batch}", 1, batch, args.prior))
        best = max(runs, key=lambda r: r["steady_galaxies_per_s"])["batch_size"]
        runs.append(run(tiles[: args.tiles], tmp / "core0", 1, best, args.prior, pin="0"))
        for workers in args.workers:
            if workers == 1:
                continue
            runs.append(run(tiles[: args.tiles], tmp / f"w{workers}", workers, best, args.prior))
        long_run = run(tiles[: args.memory_tiles], tmp / "memory", 1, best, args.prior)

    one = next(r for r in runs if r["cores"] == "0")
    two = next((r for r in runs if r["workers"] == 2), None)
    efficiency = None
    if two and one["steady_galaxies_per_s"] > 0:
        efficiency = two["steady_galaxies_per_s"] / (2 * one["steady_galaxies_per_s"])
    memory = memory_profile(long_run["records"])
    per_worker = one["steady_galaxies_per_s"]
    n_lsst = density * 3600.0 * LSST_WIDE_DEG2
    core_hours = n_lsst / per_worker / 3600.0
    projection = {
        "area_deg2": LSST_WIDE_DEG2,
        "galaxies_per_arcmin2": density,
        "galaxies": n_lsst,
        "steady_galaxies_per_s_per_worker": per_worker,
        "cpu_core_hours": core_hours,
        "note": "one worker = one CPU core of this machine; detection, I/O and the margin "
        "sources fitted twice are included in the measured rate",
    }
    for r in runs:
        r.pop("records")
    payload = {
        "tiles": args.tiles,
        "tile_size": args.tile_size,
        "runs": runs,
        "scaling_efficiency_1_to_2": efficiency,
        "memory_run": {k: v for k, v in long_run.items() if k != "records"},
        "memory_per_worker": memory,
        "projection": projection,
    }
    lines = [
        "| workers | cores | batch size | galaxies | wall s | galaxies/s overall | "
        "galaxies/s steady |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workers']} | {r['cores']} | {r['batch_size']} | {r['galaxies']} | "
            f"{r['wall_s']:.1f} | "
            f"{r['overall_galaxies_per_s']:.2f} | {r['steady_galaxies_per_s']:.2f} |"
        )
    lines.append("")
    if efficiency is not None:
        lines.append(
            f"Scaling efficiency, 1 worker on 1 core -> 2 workers (1 core each), steady: "
            f"{efficiency:.2f}"
        )
    for pid, m in memory.items():
        lines.append(
            f"Worker {pid}: RSS {m['rss_mb'][0]:.0f} MB after its first batch; "
            f"{m['after_last_compile_mb']:.0f} MB once its last source bucket was compiled "
            f"(batch {m['compiled_all_after_batch']} of {m['batches']}), {m['last_mb']:.0f} MB "
            f"after {m['batches_after_compiles']} more batches "
            f"({100 * m['growth_after_compiles']:+.1f} %)"
        )
    lines.append(
        f"\nProjection: LSST wide {LSST_WIDE_DEG2:.0f} deg² x {density:.0f} galaxies/arcmin² = "
        f"{n_lsst:.2e} galaxies; at {per_worker:.2f} galaxies/s per core -> "
        f"{core_hours:.2e} CPU core-hours."
    )
    table = "\n".join(lines)
    write_results("throughput", payload, table)
    print(table)


if __name__ == "__main__":
    main()
