"""Batch deblending throughput: galaxies per second vs batch size and workers, worker memory,
and a projection of the cost of the LSST 10-year wide survey.

Run: ``python benchmarks/throughput.py [--tiles 4] [--tile-size 256] [--batch-sizes 1 2 4 8]
[--workers 1 2] [--memory-rounds 6]``. Writes ``results/throughput.{json,md}``.

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
* **Memory**: one worker process deblends the same tiles ``memory_rounds`` times into fresh
  outputs; the first round compiles every program, so growth after it would be a leak.
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

from _common import RESULTS, write_results

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


MEMORY_ROUNDS = """
import json, sys
from madness_ppl.batch import BatchConfig, deblend_many
tiles, positions = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out, rounds, batch, prior = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
config = BatchConfig(prior=prior, batch_size=batch)
rss = []
for k in range(rounds):
    report = deblend_many(tiles, f"{out}/round{k}", config=config, positions=positions,
                          progress=False)
    rss.append([r["rss_mb"] for r in report.manifest["this_run"]["records"]])
print("ROUNDS", json.dumps(rss))
"""


def memory_rounds(tiles, out: Path, rounds: int, batch_size: int, prior: str) -> dict:
    """One process deblends the same tiles ``rounds`` times (fresh outputs each time): after the
    first round every program is compiled, so any later growth of the RSS is a leak."""
    cmd = [sys.executable, "-c", MEMORY_ROUNDS]
    cmd += [json.dumps([str(p) for p, _ in tiles]), json.dumps([str(q) for _, q in tiles])]
    cmd += [str(out), str(rounds), str(batch_size), prior]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("ROUNDS "))
    rss = json.loads(line[len("ROUNDS ") :])
    after_first = rss[0][-1]
    last = rss[-1][-1]
    result = {
        "rounds": rounds,
        "batches_per_round": len(rss[0]),
        "rss_mb_end_of_round": [r[-1] for r in rss],
        "rss_mb": rss,
        "after_first_round_mb": after_first,
        "last_mb": last,
        "growth_after_first_round": last / after_first - 1.0,
    }
    print(
        f"memory: {rounds} rounds x {len(rss[0])} batches, RSS {after_first:.0f} MB after round 1,"
        f" {last:.0f} MB after round {rounds}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=252, help="3 cores of 84 px")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-rounds", type=int, default=6)
    parser.add_argument("--prior", default="lsst")
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="keep the throughput runs of results/throughput.json, redo only the memory rounds",
    )
    args = parser.parse_args()
    previous = json.loads((RESULTS / "throughput.json").read_text()) if args.reuse_runs else None

    with tempfile.TemporaryDirectory(prefix="madness-throughput-") as tmp:
        tmp = Path(tmp)
        tiles, density = make_tiles(args.tiles, args.tile_size, tmp)
        runs = [] if previous is None else previous["runs"]
        for batch in args.batch_sizes if previous is None else []:
            runs.append(run(tiles, tmp / f"b{batch}", 1, batch, args.prior))
        best = max(runs, key=lambda r: r["steady_galaxies_per_s"])["batch_size"]
        if previous is None:
            runs.append(run(tiles, tmp / "core0", 1, best, args.prior, pin="0"))
        for workers in args.workers if previous is None else []:
            if workers == 1:
                continue
            runs.append(run(tiles, tmp / f"w{workers}", workers, best, args.prior))
        memory = memory_rounds(tiles, tmp / "memory", args.memory_rounds, best, args.prior)

    one = next(r for r in runs if r["cores"] == "0")
    two = next((r for r in runs if r["workers"] == 2), None)
    efficiency = None
    if two and one["steady_galaxies_per_s"] > 0:
        efficiency = two["steady_galaxies_per_s"] / (2 * one["steady_galaxies_per_s"])
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
        r.pop("records", None)
    payload = {
        # the reused runs' machine (a memory-only rerun may be pinned to fewer cores)
        **({"machine": previous["machine"]} if previous else {}),
        "tiles": args.tiles,
        "tile_size": args.tile_size,
        "runs": runs,
        "scaling_efficiency_1_to_2": efficiency,
        "memory": memory,
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
    lines.append(
        f"Memory: one worker deblending the {args.tiles} tiles {memory['rounds']} times "
        f"({memory['batches_per_round']} batches each): RSS "
        + ", ".join(f"{m:.0f}" for m in memory["rss_mb_end_of_round"])
        + f" MB at the end of each round ({100 * memory['growth_after_first_round']:+.1f} % after "
        "the first, which compiles every program)."
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
