"""Cold-start cost of ``deblend`` (issue #31): what the first field of a source count compiles.

Run: ``python -m benchmarks compile_time [--sources 2 6] [--seeds 3 4]``. Writes
``results/compile_time.{json,md}``.

Each (source count, seed) runs in a fresh Python process with no persistent compilation cache
(``jax_enable_compilation_cache=False``; a last column repeats the row in a process whose
persistent cache a previous one filled), on a tight LSST field (80 x 80 pixels, the galaxies'
centres in the central 40 x 40, ``benchmarks/tight.py``'s set) with the shipped prior and
true positions: ``deblend`` is called twice on the same field. The first call pays tracing,
lowering and XLA compilation of every program; the second is warm. JAX's compile log
(``jax_log_compiles``) gives each program's XLA compilation time, summed per program name.
Wall and CPU (process) seconds; the machine is stated in the header.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks._common import write_results

_PATTERNS = {
    "trace": re.compile(r"Finished tracing (.*) for jit in ([0-9.e-]+) sec"),
    "lower": re.compile(r"Finished jaxpr to MLIR module conversion (.*) in ([0-9.e-]+) sec"),
    "xla": re.compile(r"Finished XLA compilation of (.*) in ([0-9.e-]+) sec"),
}

_CHILD = r"""
import json, logging, re, sys, time, warnings
import numpy as np
import jax
if len(sys.argv) > 3:  # a persistent cache directory: store / reuse compiled programs
    from madness_ppl.cache import use_compilation_cache
    use_compilation_cache(sys.argv[3])
else:
    jax.config.update("jax_enable_compilation_cache", False)
jax.config.update("jax_log_compiles", True)
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
handler = Keep(level=logging.DEBUG)
for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler"):
    log = logging.getLogger(name)
    log.addHandler(handler); log.setLevel(logging.DEBUG); log.propagate = False
warnings.simplefilter("ignore")
from madness_ppl.deblend import deblend
from madness_ppl.prior import GalaxyPrior
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey
n, seed = int(sys.argv[1]), int(sys.argv[2])
prior = GalaxyPrior.load("lsst")
config = BlendConfig(field_size=80, n_galaxies=(n, n), margin=20)
blend = make_blend(Survey.lsst(), config=config, rng=np.random.default_rng(seed))
lines.clear()
calls = []
for _ in range(2):
    wall, cpu = time.perf_counter(), time.process_time()
    result = deblend(blend.field, blend.variance, blend.positions, prior=prior)
    calls.append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "steps": int(result.fit.n_steps), "timings": result.timings})
    if not _:
        first_lines = list(lines)
print("RESULT" + json.dumps({"calls": calls, "log": first_lines}))
"""


def run_one(n: int, seed: int, cache: Path | None = None) -> dict:
    """One fresh process: two ``deblend`` calls on the field, and the first call's compile log
    (``cache``: with that persistent compilation cache)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(seed), *([str(cache)] if cache else [])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    payload = json.loads(out[out.rindex("RESULT") + len("RESULT") :])
    phases: dict[str, float] = defaultdict(float)
    programs: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for line in payload.pop("log"):
        for kind, pattern in _PATTERNS.items():
            match = pattern.search(line)
            if match:
                seconds = float(match.group(2))
                phases[kind] += seconds
                if kind == "xla":
                    name = match.group(1).split(" with")[0]
                    programs[name][0] += 1
                    programs[name][1] += seconds
    return {"sources": n, "seed": seed, **payload, "phases": dict(phases), "programs": programs}


def table(runs: list[dict]) -> str:
    lines = [
        "First and second `deblend` call on a tight LSST field in a fresh process (no persistent "
        "compilation cache), shipped prior, true positions; seconds.",
        "",
        "| sources | seed | first call wall / CPU | second call wall / CPU | cold overhead (wall) "
        "| tracing | lowering | XLA compilation | programs compiled "
        "| first call wall, warm persistent cache |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        first, second = r["calls"]
        p = r["phases"]
        lines.append(
            f"| {r['sources']} | {r['seed']} | {first['wall']:.1f} / {first['cpu']:.1f} "
            f"| {second['wall']:.1f} / {second['cpu']:.1f} | {first['wall'] - second['wall']:.1f} "
            f"| {p.get('trace', 0):.1f} | {p.get('lower', 0):.1f} | {p.get('xla', 0):.1f} "
            f"| {sum(c for c, _ in r['programs'].values())} "
            f"| {r['warm_cache']['calls'][0]['wall']:.1f} |"
        )
    totals: dict[str, list] = defaultdict(list)
    for r in runs:
        for name, (_, seconds) in r["programs"].items():
            totals[name].append(seconds)
    lines += [
        "",
        f"XLA compilation per program, mean over the {len(runs)} runs (programs above 0.1 s):",
        "",
        "| program | XLA seconds |",
        "|---|---|",
    ]
    for name, values in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        mean = sum(values) / len(runs)
        if mean >= 0.1:
            lines.append(f"| `{name}` | {mean:.2f} |")
    lines += [
        "",
        "Target (#31): <= 5 s cold for a 6-source field on this CPU. The cold overhead is the "
        "first call's wall time minus the second's (it includes first-use costs outside XLA). "
        "Warm persistent cache: a third process, after a second one filled a fresh cache "
        "directory (`madness_ppl.cache.use_compilation_cache`) on the same field.",
    ]
    return "\n".join(lines)


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--sources", "2", "--seeds", "3"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args(argv)
    runs = []
    for n in args.sources:
        for seed in args.seeds:
            run = run_one(n, seed)
            with tempfile.TemporaryDirectory() as cache:
                run_one(n, seed, Path(cache))  # fills the cache
                run["warm_cache"] = run_one(n, seed, Path(cache))
            runs.append(run)
            print(f"{n} sources, seed {seed}: first call {runs[-1]['calls'][0]['wall']:.1f} s")
    write_results("compile_time", {"runs": runs}, table(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
