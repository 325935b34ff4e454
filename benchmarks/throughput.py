"""Batch deblending throughput: galaxies per second vs batch size and workers, worker memory,
and a projection of the cost of the LSST 10-year wide survey.

Run: ``python -m benchmarks throughput [--tiles 4] [--tile-size 252] [--batch-sizes 1 2 4 8]
[--workers 1 2] [--memory-rounds 6]``; ``--from-json`` rewrites the markdown and the projection
from the runs already in ``results/throughput.json`` (nothing is rerun). Writes
``results/throughput.{json,md}``.

* **Data**: ``tiles`` simulated LSST 10-year tiles of ``tile_size`` pixels (default 252: 3 x 3 patch
  cores of 84 pixels) at ``expected_density()`` (the project's catalog model, ~56 galaxies per
  arcmin² for i < 25.3), written as FITS with their true positions (so every configuration fits
  exactly the same galaxies). Runs recorded before issue 16 used 16 galaxies per 41" x 41"
  (34 per arcmin²); the JSON keeps the density each run used.
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
* **Projection**: LSST wide-fast-deep 18,000 deg^2 at ``expected_density()`` galaxies per
  arcmin² (i < 25.3), divided by the steady throughput *per core with every core busy*: the
  run with one worker per core (2 workers on this 2-core machine), its galaxies per second
  divided by its workers. A one-core run with the other core idle is faster per core (shared
  memory bandwidth and caches), so it would understate the cost.
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

from benchmarks._common import RESULTS, write_results

LSST_WIDE_DEG2 = 18_000.0
#: provenance of runs stored before the JSON recorded it (git log of results/throughput.json)
LEGACY_RECORDED_WITH = (
    "commit 177a704 (2026-11-25): prior v0.1.0 and the MAP code before issue 14 (Adam)"
)


def make_tiles(n: int, size: int, directory: Path) -> tuple[list[tuple[Path, Path]], float]:
    """Simulate ``n`` tiles; return (fits, positions) paths and galaxies per arcmin^2."""
    from astropy.table import Table

    from madness_ppl.io import write_field
    from madness_ppl.simulate import BlendConfig, expected_density, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    count = round(expected_density() * (size * survey.pixel_scale / 60.0) ** 2)
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


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    "--tiles",
    "1",
    "--tile-size",
    "84",
    "--batch-sizes",
    "1",
    "--workers",
    "1",
    "--memory-rounds",
    "1",
]


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument(
        "--rebuild",
        "--from-json",
        dest="from_json",
        action="store_true",
        help="rerun nothing: rewrite the projection and the markdown from results/throughput.json",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        payload = json.loads((RESULTS / "throughput.json").read_text())
        # runs recorded before issue 16 kept their tiles' density in the old projection
        payload.setdefault("tile_density", payload["projection"]["galaxies_per_arcmin2"])
        payload.setdefault("recorded_with", LEGACY_RECORDED_WITH)
        payload["projection"] = projection(payload["runs"], payload["tile_density"])
        machine = payload.pop("machine")
        write_results("throughput", payload, table(payload), machine=machine)
        print(table(payload))
        return
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
    for r in runs:
        r.pop("records", None)
    payload = {
        # the reused runs' machine (a memory-only rerun may be pinned to fewer cores)
        **({"machine": previous["machine"]} if previous else {}),
        "tiles": args.tiles,
        "tile_size": args.tile_size,
        "tile_density": density if previous is None else previous["tile_density"],
        "recorded_with": _git_describe() if previous is None else previous.get("recorded_with"),
        "runs": runs,
        "scaling_efficiency_1_to_2": efficiency,
        "memory": memory,
    }
    payload["projection"] = projection(runs, payload["tile_density"])
    machine = payload.pop("machine", None)
    write_results("throughput", payload, table(payload), machine=machine)
    print(table(payload))


def _git_describe() -> str:
    from madness_ppl.prior import GalaxyPrior

    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS
    ).stdout.strip()
    return f"commit {head or 'unknown'}: prior v{GalaxyPrior.load('lsst').config.version}"


def projection(runs: list[dict], tile_density: float) -> dict:
    """LSST wide cost at ``expected_density()`` and the per-core rate with every core busy."""
    from madness_ppl.simulate import expected_density

    busy = max(runs, key=lambda r: (r["workers"], r["steady_galaxies_per_s"]))
    per_core = busy["steady_galaxies_per_s"] / busy["workers"]
    idle = next((r for r in runs if r["cores"] == "0"), None)
    density = expected_density()
    n_lsst = density * 3600.0 * LSST_WIDE_DEG2
    return {
        "area_deg2": LSST_WIDE_DEG2,
        "galaxies_per_arcmin2": density,
        "density_source": "madness_ppl.simulate.expected_density() (i < 25.3)",
        "tile_galaxies_per_arcmin2": tile_density,
        "galaxies": n_lsst,
        "rate_run": {k: busy[k] for k in ("workers", "cores", "batch_size")},
        "steady_galaxies_per_s_per_core_all_busy": per_core,
        "steady_galaxies_per_s_one_core_other_idle": idle["steady_galaxies_per_s"]
        if idle
        else None,
        # no steady batch (every batch compiled: too few tiles): no rate to project from
        "cpu_core_hours": n_lsst / per_core / 3600.0 if per_core > 0 else float("nan"),
        "note": "one worker = one CPU core of this machine, every core busy; detection, I/O and "
        "the margin sources fitted twice are included in the measured rate",
    }


def table(payload: dict) -> str:
    runs, memory, proj = payload["runs"], payload["memory"], payload["projection"]
    lines = [
        f"Tiles: {payload['tiles']} of {payload['tile_size']} px at "
        f"{payload['tile_density']:.0f} galaxies per arcmin² (true positions); runs recorded "
        f"with {payload.get('recorded_with') or 'unknown code'}.",
        "",
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
    efficiency = payload["scaling_efficiency_1_to_2"]
    if efficiency is not None:
        lines.append(
            f"Scaling efficiency, 1 worker on 1 core -> 2 workers (1 core each), steady: "
            f"{efficiency:.2f}"
        )
    lines.append(
        f"Memory: one worker deblending the {payload['tiles']} tiles {memory['rounds']} times "
        f"({memory['batches_per_round']} batches each): RSS "
        + ", ".join(f"{m:.0f}" for m in memory["rss_mb_end_of_round"])
        + f" MB at the end of each round ({100 * memory['growth_after_first_round']:+.1f} % after "
        "the first, which compiles every program)."
    )
    run = proj["rate_run"]
    idle = proj["steady_galaxies_per_s_one_core_other_idle"]
    lines.append(
        f"\nProjection: LSST wide {proj['area_deg2']:.0f} deg² x "
        f"{proj['galaxies_per_arcmin2']:.1f} galaxies/arcmin² (`expected_density()`) = "
        f"{proj['galaxies']:.2e} galaxies; at {proj['steady_galaxies_per_s_per_core_all_busy']:.2f}"
        f" galaxies/s per core with every core busy ({run['workers']} workers on "
        f"{run['workers']} cores, batch {run['batch_size']}, steady) -> "
        f"{proj['cpu_core_hours']:.2e} CPU core-hours."
        + (
            f" (One core with the other idle runs at {idle:.2f} galaxies/s: "
            f"{proj['galaxies'] / idle / 3600.0:.2e} core-hours, an underestimate.)"
            if idle
            else ""
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
