"""MAP speed against scarlet2 and against the code before issue #14, on the same LSST blends.

Run: ``python -m benchmarks map_speed [--fields 8] [--before /path/to/old/checkout]``
(scarlet2 from the ``bench`` extra). Writes ``results/map_speed.{json,md}``.

Protocol
--------
* Fields: those of ``deblend_vs_scarlet2.py`` (LSST 10-year depth, 205 x 205 pixels = 41",
  "low" 8-15 and "high" 12-20 galaxies, seeds ``0..fields-1`` and ``1000+k``), true positions
  and variance for every method; the shipped prior for madness_ppl (in distribution: the same
  simulator as its training set).
* Every configuration runs as its own process (``deblend_vs_scarlet2.py --worker``), one after
  the other, **pinned to one core** (``taskset -c <core>``); fields in the same order; wall time per
  field includes compilation on the first field of each shape, "steady" excludes the first field.
* Configurations: ``before`` = the code before issue #14 (``--before``: a checkout of commit
  2c60091: deblending-encoder start, reference Adam, a batch of one fitted through ``vmap``),
  ``svi`` = the same start and optimiser on the code now, ``default`` = ``deblend`` now
  (refined encoder start, per-source preconditioned L-BFGS, absolute stopping rule),
  ``map`` = ``deblend`` now without its Laplace flux errors (``errors=False``: what scarlet2
  computes, the like-for-like row), ``scarlet2`` at its documented settings (``max_iter=1000, e_rel=1e-4``; "converged" =
  stopped by ``e_rel`` before the cap).
* Time per field: process CPU time (``time.process_time``, all threads) by default, wall time
  with ``--clock wall``. A process pinned to one core runs one XLA thread, so its CPU time is
  the work it did, whatever else shares the core (this 2-core machine is shared by other
  jobs: wall times of configurations run one after the other then differ by up to 1.5x).
* "Steady" fields: for madness_ppl those whose source-count bucket was already compiled by an
  earlier field of the run (the first field of each bucket pays its compilation); for scarlet2
  every field after the first.
* Accuracy: r-band aperture flux residual of the model against the noiseless isolated truth
  (as in ``deblend_vs_scarlet2.py``); 68 % width = half the 16-84 % range; 95 % intervals by
  bootstrap over fields (2000 resamples); ratios of times per galaxy are bootstrapped the same
  way, the resampled fields shared by both methods.
* Compilation across processes: ``madness-ppl deblend`` of one high-density field written as
  FITS, three fresh processes on one core: no cache, then twice with a new empty cache
  directory (the second finds every program there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, ROOT, study_command, write_results
from madness_ppl.stats import field_bootstrap, width68

CONFIGS = {
    "before": ("madness", {"method": "svi"}),
    "svi": ("madness", {"method": "svi", "start": "deblender"}),
    "default": ("madness", {}),
    "map": ("madness", {"errors": False}),
    "scarlet2": ("scarlet2", {}),
}
BLEND_BINS = (0.0, 0.01, 0.1, 0.5, 1.0)
N_BOOT = 2000


def _run_worker(
    name: str, density: str, n_fields: int, out: Path, before: Path | None, core: int
) -> dict:
    method, options = CONFIGS[name]
    root = before if name == "before" else ROOT
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MADNESS_PPL_NO_COMPILE_CACHE": "1"}
    env["PYTHONPATH"] = str(root)
    # the checkout from before issue 14 predates the benchmarks package: run its script by path
    study = (
        [sys.executable, str(root / "benchmarks" / "deblend_vs_scarlet2.py")]
        if name == "before"
        else study_command("deblend_vs_scarlet2")
    )
    cmd = ["taskset", "-c", str(core), *study, "--fields", str(n_fields)]
    cmd += ["--madness-options", json.dumps(options), "--worker", method, density, str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=root)
    return json.loads(out.read_text())


def _by_field(rows: list[dict]) -> dict[int, list[dict]]:
    fields: dict[int, list[dict]] = {}
    for r in rows:
        fields.setdefault(r["seed"], []).append(r)
    return fields


def _steady(fields: dict[int, list[dict]], name: str) -> list[int]:
    """Fields timed without compilation (see the protocol)."""
    seeds = list(fields)
    if name == "scarlet2":
        return seeds[1:]
    from madness_ppl.scene import bucket_size

    seen, steady = set(), []
    for seed in seeds:
        bucket = bucket_size(len(fields[seed]))
        if bucket in seen:
            steady.append(seed)
        seen.add(bucket)
    return steady


def _boot(stat, seeds: list[int]) -> tuple[float, float]:
    """95 % interval of ``stat(seeds)`` from resampling fields (:func:`field_bootstrap`)."""
    return field_bootstrap(seeds, stat, n=N_BOOT, seed=0)[1:]


def _field_times(res: dict, clock: str) -> list[float]:
    """Per-field seconds on ``clock``: ``"cpu"`` (process CPU time, all threads: what a process
    pinned to one core spent on its own work, insensitive to other processes sharing that
    core) or ``"wall"``; a worker that recorded no CPU time (the ``before`` checkout) gives
    its wall time."""
    if clock == "cpu" and "field_cpu_seconds" in res:
        return res["field_cpu_seconds"]
    return res["field_seconds"]


def _summaries(runs: dict, densities: list[str], clock: str = "cpu") -> dict:
    out: dict = {}
    for density in densities:
        for name, run in runs.items():
            if run.get(density) is None:
                continue
            res = run[density]
            fields = _by_field(res["rows"])
            seeds = list(fields)
            times = dict(zip(seeds, _field_times(res, clock), strict=True))
            steady = _steady(fields, name) or seeds

            def per_galaxy(sel, fields=fields, times=times):
                return sum(times[s] for s in sel) / sum(len(fields[s]) for s in sel)

            def width(sel, fields=fields, lo=0.0, hi=1.01):
                rows = [r for s in sel for r in fields[s] if lo <= r["blendedness"] < hi]
                rel = [(r["flux_r"] - r["true_flux_r"]) / r["true_flux_r"] for r in rows]
                return width68(np.array(rel)) if len(rel) >= 3 else np.nan

            first = [fields[s][0] for s in seeds]
            entry = {
                "clock": clock if clock == "wall" or "field_cpu_seconds" in res else "wall",
                "galaxies": sum(len(v) for v in fields.values()),
                "fields": len(seeds),
                "s_per_galaxy_steady": per_galaxy(steady),
                "s_per_galaxy_steady_ci": _boot(per_galaxy, steady),
                "s_per_galaxy_first_field": per_galaxy(seeds[:1]),
                "flux_width68": width(seeds),
                "flux_width68_ci": _boot(width, seeds),
                "by_blendedness": {},
                "converged_fraction": float(np.mean([bool(r.get("converged")) for r in first])),
            }
            for lo, hi in itertools.pairwise(BLEND_BINS):
                top = hi + 0.01 if hi == 1.0 else hi

                def w(sel, lo=lo, top=top):
                    return width(sel, lo=lo, hi=top)

                n = sum(1 for r in res["rows"] if lo <= r["blendedness"] < top)
                entry["by_blendedness"][f"{lo}-{hi}"] = {
                    "n": n,
                    "width68": w(seeds),
                    "ci": _boot(w, seeds) if n >= 3 else (np.nan, np.nan),
                }
            if "steps" in first[0]:
                steps = np.array([r["steps"] for r in first])
                entry["steps"] = {
                    "median": float(np.median(steps)),
                    "p10": float(np.percentile(steps, 10)),
                    "p90": float(np.percentile(steps, 90)),
                    "max": int(steps.max()),
                }
            timed = [s for s in steady if fields[s][0].get("timings")]
            if timed:
                n_timed = sum(len(fields[s]) for s in timed)
                phases = fields[timed[0]][0]["timings"]
                entry["timings_per_galaxy"] = {
                    k: float(sum(fields[s][0]["timings"][k] for s in timed) / n_timed)
                    for k in phases
                }
            out.setdefault(density, {})[name] = entry
        ref = runs.get("scarlet2", {}).get(density)
        if ref is None:
            continue
        for name, run in runs.items():
            if name == "scarlet2" or run.get(density) is None:
                continue
            a, b = run[density], ref
            fa, fb = _by_field(a["rows"]), _by_field(b["rows"])
            ta = dict(zip(fa, _field_times(a, clock), strict=True))
            tb = dict(zip(fb, _field_times(b, clock), strict=True))
            steady = _steady(fa, name)

            def ratio(sel, fa=fa, ta=ta, tb=tb):
                n = sum(len(fa[s]) for s in sel)
                return (sum(ta[s] for s in sel) / n) / (sum(tb[s] for s in sel) / n)

            out[density][name]["time_ratio_vs_scarlet2"] = ratio(steady)
            out[density][name]["time_ratio_vs_scarlet2_ci"] = _boot(ratio, steady)
    return out


def _compile_check(tmp: Path, core: int) -> dict:
    """Wall time of ``madness-ppl deblend`` in fresh processes: no cache, cold cache, warm cache."""
    from benchmarks.deblend_vs_scarlet2 import _fields
    from madness_ppl.io import write_field
    from madness_ppl.survey import Survey

    _, blend = next(iter(_fields("high", 1, 205)))
    path = tmp / "field.fits"
    write_field(path, blend.field, Survey.lsst().band_names, variance=blend.variance)
    cache = tmp / "cache"
    out: dict = {}
    for label, extra_env in (
        ("no cache", {"MADNESS_PPL_NO_COMPILE_CACHE": "1"}),
        ("first process, empty cache", {"MADNESS_PPL_CACHE_DIR": str(cache)}),
        ("second process, same cache", {"MADNESS_PPL_CACHE_DIR": str(cache)}),
    ):
        env = {k: v for k, v in os.environ.items() if k != "MADNESS_PPL_NO_COMPILE_CACHE"}
        env.update(extra_env)
        target = tmp / f"out-{len(out)}"
        cmd = ["taskset", "-c", str(core), sys.executable, "-m", "madness_ppl", "deblend"]
        cmd.append(str(path))
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--out", str(target)], check=True, env=env, capture_output=True)
        out[label] = time.perf_counter() - t0
    out["cache_entries"] = len(list(cache.iterdir()))
    out["galaxies"] = len(blend.positions)
    return out


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--densities", "low", "--configs", "default"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=8, help="fields per density")
    parser.add_argument("--densities", nargs="+", default=["low", "high"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--before", type=Path, help="checkout of the code before issue #14")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the worker outputs of an interrupted run"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rewrite the tables from results/map_speed.json"
    )
    parser.add_argument("--core", type=int, default=0, help="CPU core every run is pinned to")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time per field: process CPU time (default; robust on a shared machine) or wall",
    )
    args = parser.parse_args(argv)
    configs = [c for c in args.configs if c != "before" or args.before is not None]

    RESULTS.mkdir(exist_ok=True)
    stored = RESULTS / "map_speed.json"
    machine = None
    if args.rebuild:  # the tables of the stored run
        previous = json.loads(stored.read_text())
        summary, compile_times = previous["summary"], previous["compile"]
        configs, args.fields = list(previous["configs"]), previous["fields_per_density"]
        args.clock, machine = previous.get("clock", "cpu"), previous["machine"]
    else:
        runs: dict = {}
        for name in configs:
            runs[name] = {}
            for density in args.densities:
                out = RESULTS / f".speed_{name}_{density}.json"
                if args.reuse and out.exists():
                    runs[name][density] = json.loads(out.read_text())
                else:
                    runs[name][density] = _run_worker(
                        name, density, args.fields, out, args.before, args.core
                    )
        summary = _summaries(runs, args.densities, args.clock)
        with tempfile.TemporaryDirectory() as tmp:
            compile_times = _compile_check(Path(tmp), args.core)

    lines = [
        "Each configuration in its own process pinned to one core; same fields, true positions. "
        f"Times: {'process CPU time' if args.clock == 'cpu' else 'wall time'} per field "
        "(column 'clock': a worker without CPU times, the before checkout, gives wall time).",
        "",
        "| config | density | galaxies | clock | s / galaxy (steady) [95 %] | vs scarlet2 [95 %] | "
        "first field s / galaxy | r flux 68 % width [95 %] | converged | steps median (p10-p90, max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for density, entries in summary.items():
        for name, e in entries.items():
            ci = e["s_per_galaxy_steady_ci"]
            ratio = (
                f"{e['time_ratio_vs_scarlet2']:.3f} [{e['time_ratio_vs_scarlet2_ci'][0]:.3f}, "
                f"{e['time_ratio_vs_scarlet2_ci'][1]:.3f}]"
                if "time_ratio_vs_scarlet2" in e
                else "-"
            )
            st = e.get("steps")
            steps = (
                f"{st['median']:.0f} ({st['p10']:.0f}-{st['p90']:.0f}, {st['max']})" if st else "-"
            )
            wc = e["flux_width68_ci"]
            lines.append(
                f"| {name} | {density} | {e['galaxies']} | {e['clock']} | "
                f"{e['s_per_galaxy_steady']:.3f} "
                f"[{ci[0]:.3f}, {ci[1]:.3f}] | {ratio} | {e['s_per_galaxy_first_field']:.3f} | "
                f"{e['flux_width68']:.3f} [{wc[0]:.3f}, {wc[1]:.3f}] | "
                f"{e['converged_fraction']:.2f} | {steps} |"
            )
    bins = [f"{lo}-{hi}" for lo, hi in itertools.pairwise(BLEND_BINS)]
    lines += [
        "",
        "r flux 68 % width by blendedness [95 % bootstrap over fields] (n):",
        "",
        "| config | density | " + " | ".join(f"β {b}" for b in bins) + " |",
        "|---|---|" + "---|" * len(bins),
    ]
    for density, entries in summary.items():
        for name, e in entries.items():
            cells = []
            for b in bins:
                c = e["by_blendedness"][b]
                cells.append(
                    f"{c['width68']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] ({c['n']})"
                    if c["n"] >= 3
                    else f"- ({c['n']})"
                )
            lines.append(f"| {name} | {density} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Time per galaxy by phase (steady fields, wall seconds from `DeblendResult.timings`):",
        "",
    ]
    lines += [
        "| config | density | noise | encoder | fit | refine | errors | catalog |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for density, entries in summary.items():
        for name, e in entries.items():
            t = e.get("timings_per_galaxy")
            if t:
                lines.append(
                    f"| {name} | {density} | {t.get('noise', 0):.4f} | {t['encoder']:.4f} | "
                    f"{t['fit']:.3f} | {t.get('refine', 0):.3f} | {t.get('errors', 0):.4f} | "
                    f"{t['catalog']:.4f} |"
                )
    lines += [
        "",
        f"`madness-ppl deblend` of one field ({compile_times['galaxies']} galaxies), fresh "
        "process on one core, wall time including imports and prior loading:",
        "",
        "| process | seconds |",
        "|---|---|",
    ]
    for label in ("no cache", "first process, empty cache", "second process, same cache"):
        lines.append(f"| {label} | {compile_times[label]:.1f} |")
    lines.append(f"\nCache entries written by the first process: {compile_times['cache_entries']}.")
    payload = {
        "protocol": __doc__,
        "fields_per_density": args.fields,
        "clock": args.clock,
        "configs": {k: CONFIGS[k] for k in configs},
        "summary": summary,
        "compile": compile_times,
    }
    write_results("map_speed", payload, "\n".join(lines), machine=machine)
    for name in configs:
        for density in args.densities:
            (RESULTS / f".speed_{name}_{density}.json").unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
