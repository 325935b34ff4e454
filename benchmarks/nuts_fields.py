"""NUTS over many fields in one process: programs compiled once per shape, no growth in memory maps.

``sample_posterior`` binds the model to its data as a hashable target (data traced), so a field
with the same shapes as an earlier one reuses every compiled program (start check, sampler,
post-processing, the callback's gradient). This script samples ``--fields`` galsim blends of
91 x 91 pixels with 2-4 LSST galaxies (those of ``calibration_galsim.py``, seeds 7000...) one after the
other and records for each field the CPU seconds of ``sample_posterior``, the seconds XLA spent
compiling (``jax.monitoring``'s backend-compile events), the number of compilations and the
memory mappings the process gained (``/proc/self/maps``; Linux caps a process at
``vm.max_map_count``, 65,530 by default, and every compiled CPU program holds some).

The comparison is within the run: a field whose source count (hence shapes) came earlier
against the first field of that count. Before this design every field compiled anew (about
10 CPU s and 1,000-2,000 mappings per 91 x 91 field; the calibration run of 2026-12-02 died
after ~33 fields with "LLVM compilation error: Cannot allocate memory").

Run: ``python -m benchmarks nuts_fields [--fields 8 --warmup 40 --samples 60 --chains 2]``.
Writes ``results/nuts_fields.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks._common import write_results
from benchmarks.calibration_galsim import galsim_blend
from madness_ppl.infer import sample_posterior
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model, prepare_blend

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles: list[float] = []


def _on_duration(event: str, seconds: float, **_: object) -> None:
    if event == COMPILE_EVENT:
        _compiles.append(seconds)


def memory_maps() -> int:
    """Memory mappings of this process (Linux)."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def sample_field(prior, seed: int, warmup: int, samples: int, chains: int) -> dict:
    """``sample_posterior`` on the galsim field of ``seed`` from its MAP: cost and compilations."""
    field = galsim_blend(prior, seed)
    blend = field["blend"]
    inputs = prepare_blend(
        blend.field, blend.positions, blend.variance, prior, pixel_mask=np.isfinite(blend.field)
    )
    maps0, compiles0 = memory_maps(), len(_compiles)
    t0, w0 = time.process_time(), time.perf_counter()
    idata = sample_posterior(
        blend_model,
        *inputs.args,
        **inputs.kwargs,
        init={"z": field["z_map"]},
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        seed=seed,
        diagnose=False,
    )
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    new = _compiles[compiles0:]
    return {
        "seed": seed,
        "sources": field["n"],
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "compilations": len(new),
        "compile_seconds": float(sum(new)),
        "new_memory_maps": memory_maps() - maps0,
        "leapfrog_steps": int(idata.sample_stats["n_steps"].sum()),
        "gradient": idata.posterior.attrs["gradient"],
    }


def table(runs: list[dict], settings: dict) -> str:
    lines = [
        f"NUTS on {len(runs)} galsim fields (91 x 91 px) in one process, "
        f"{settings['chains']} chains x ({settings['warmup']} warm-up + {settings['samples']} "
        "draws) from the MAP, shipped LSST prior; CPU seconds of `sample_posterior`.",
        "",
        "| field | sources | shapes seen before | CPU s | XLA compilations | compile s "
        "| new memory maps | kept leapfrog steps | CPU ms per kept step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in runs:
        before = r["sources"] in seen
        seen.add(r["sources"])
        lines.append(
            f"| {r['seed']} | {r['sources']} | {'yes' if before else 'no'} "
            f"| {r['cpu_seconds']:.1f} | {r['compilations']} | {r['compile_seconds']:.1f} "
            f"| {r['new_memory_maps']} | {r['leapfrog_steps']} "
            f"| {1e3 * r['cpu_seconds'] / r['leapfrog_steps']:.1f} |"
        )
    s = summary(runs)
    lines += [
        "",
        f"First field of a source count: {s['first']['compilations']:.0f} compilations, "
        f"{s['first']['compile_seconds']:.1f} s compiling, {s['first']['new_memory_maps']:.0f} "
        f"new maps (means). Later fields of a count seen before: "
        f"{s['repeat']['compilations']:.1f} compilations, {s['repeat']['compile_seconds']:.2f} s, "
        f"{s['repeat']['new_memory_maps']:.0f} new maps.",
    ]
    return "\n".join(lines)


def summary(runs: list[dict]) -> dict:
    """Means over first-of-shape fields and over repeats."""
    seen, groups = set(), {"first": [], "repeat": []}
    for r in runs:
        groups["repeat" if r["sources"] in seen else "first"].append(r)
        seen.add(r["sources"])
    keys = ("compilations", "compile_seconds", "new_memory_maps", "cpu_seconds")
    return {
        g: {k: float(np.mean([r[k] for r in rs])) if rs else float("nan") for k in keys}
        | {"fields": len(rs)}
        for g, rs in groups.items()
    }


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "2", "--warmup", "5", "--samples", "5", "--chains", "1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--chains", type=int, default=2)
    a = parser.parse_args(argv)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    prior = GalaxyPrior.load("lsst")
    settings = {"warmup": a.warmup, "samples": a.samples, "chains": a.chains}
    runs = []
    for k in range(a.fields):
        runs.append(sample_field(prior, 7000 + k, a.warmup, a.samples, a.chains))
        print(runs[-1], flush=True)
    payload = {"settings": settings, "runs": runs, "summary": summary(runs)}
    write_results("nuts_fields", payload, table(runs, settings))


if __name__ == "__main__":
    main()
