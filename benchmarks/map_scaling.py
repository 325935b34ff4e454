"""MAP fit scaling: time per optimisation step vs galaxies and fields per batch; memory over a
long run; the fraction of the machine's matmul throughput the step reaches.

Run: ``python -m benchmarks map_scaling [--prior lsst] [--memory-fields 500]``.
Writes ``results/map_scaling.{json,md}``.

* **galaxies**: one 205x205 LSST field with n = 1..64 galaxies (random latents decoded and placed,
  plus noise), ``fit_map`` with a fixed number of steps (stopping disabled); time per step
  (after compilation) and per galaxy-step.
* **batch**: 1..32 fields of 81x81 pixels with 4 galaxies each, fitted by one vmapped program
  (``batched=True``); time per step per field.
* **memory**: resident set size across ``memory_fields`` consecutive fits of fields with a varied
  number of galaxies (1-12, padded to buckets), sampled every 50 fields; growth after warm-up.
* **roofline**: XLA's FLOP count of one step (``cost_analysis``) over its measured time, against
  the measured throughput of a large float32 matmul on this machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import write_results
from madness_ppl.infer import fit_map
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model, place_stamps, prepare_blend
from madness_ppl.survey import Survey


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def _field(prior: GalaxyPrior, n: int, size: int, rng: np.random.Generator):
    survey = Survey.named(prior.config.survey).select_bands(prior.bands)
    z = prior.latent_distribution().sample(jax.random.key(int(rng.integers(1 << 30))), (n,))
    positions = rng.uniform(5, size - 6, (n, 2)).astype(np.float32)
    image = np.asarray(place_stamps(prior.decode(z), positions, (size, size), subpixel=False))
    variance = survey.sky_variance[:, None, None] + np.maximum(image, 0)
    field = image + rng.standard_normal(image.shape) * np.sqrt(variance)
    return field.astype(np.float32), positions, variance.astype(np.float32), np.asarray(z)


def _time_fit(args, kwargs, init, steps: int, batched: bool = False) -> float:
    """Seconds per step of a fixed-length fit, compilation excluded (second call timed)."""
    options = dict(init=init, max_steps=steps, min_steps=steps, batched=batched, **kwargs)
    jax.block_until_ready(fit_map(blend_model, *args, **options).loss)
    t0 = time.perf_counter()
    jax.block_until_ready(fit_map(blend_model, *args, **options).loss)
    return (time.perf_counter() - t0) / steps


def _matmul_gflops() -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def _step_flops(prior: GalaxyPrior, n: int) -> float:
    """FLOPs of the decoder forward + backward for n galaxies (XLA cost analysis)."""
    z = jnp.zeros((n, prior.latent_dim))
    loss = jax.jit(jax.grad(lambda z: jnp.sum(prior.decode(z) ** 2)))
    cost = loss.lower(z).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--steps", "3", "--galaxies", "1", "2", "--batches", "1", "2", "--memory-fields", "4"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prior", default="lsst")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--galaxies", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--memory-fields", type=int, default=500)
    args = parser.parse_args(argv)
    prior = GalaxyPrior.load(args.prior)
    rng = np.random.default_rng(0)
    gflops = _matmul_gflops()

    galaxy_rows = []
    for n in args.galaxies:
        field, positions, variance, _ = _field(prior, n, 205, rng)
        inputs = prepare_blend(field, positions, variance, prior, pad=True)
        init = {"z": np.zeros((len(inputs.positions), prior.latent_dim), np.float32)}
        per_step = _time_fit(inputs.args, inputs.kwargs, init, args.steps)
        flops = _step_flops(prior, len(inputs.positions))
        galaxy_rows.append(
            {
                "galaxies": n,
                "plate": len(inputs.positions),
                "ms_per_step": 1e3 * per_step,
                "ms_per_galaxy_step": 1e3 * per_step / n,
                "decoder_gflop_per_step": flops / 1e9,
                "fraction_of_matmul_peak": flops / per_step / 1e9 / gflops,
            }
        )
        print(galaxy_rows[-1], flush=True)

    batch_rows = []
    for b in args.batches:
        fields = [_field(prior, 4, 81, rng) for _ in range(b)]
        field = np.stack([f[0] for f in fields])
        positions = np.stack([f[1] for f in fields])
        variance = np.stack([f[2] for f in fields])
        init = {"z": np.zeros((b, 4, prior.latent_dim), np.float32)}
        per_step = _time_fit(
            (field, positions, variance, prior), {}, init, args.steps, batched=True
        )
        batch_rows.append(
            {"fields": b, "ms_per_step": 1e3 * per_step, "ms_per_field_step": 1e3 * per_step / b}
        )
        print(batch_rows[-1], flush=True)

    memory = []
    for k in range(args.memory_fields):
        n = int(rng.integers(1, 13))
        field, positions, variance, _ = _field(prior, n, 81, rng)
        inputs = prepare_blend(field, positions, variance, prior, pad=True)
        fit_map(
            blend_model,
            *inputs.args,
            init={"z": np.zeros((len(inputs.positions), prior.latent_dim), np.float32)},
            max_steps=20,
            **inputs.kwargs,
        )
        if k % 50 == 0 or k == args.memory_fields - 1:
            memory.append({"field": k, "rss_mb": _rss_mb()})
            print(memory[-1], flush=True)
    warm = memory[1]["rss_mb"] if len(memory) > 1 else memory[0]["rss_mb"]
    growth = memory[-1]["rss_mb"] / warm - 1

    table = [
        f"Large float32 matmul: {gflops:.1f} GFLOP/s on this machine.",
        "",
        "| galaxies | plate | ms / step | ms / galaxy-step | decoder GFLOP / step | fraction of matmul peak |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['galaxies']} | {r['plate']} | {r['ms_per_step']:.1f} | {r['ms_per_galaxy_step']:.2f} | "
        f"{r['decoder_gflop_per_step']:.3f} | {r['fraction_of_matmul_peak']:.2f} |"
        for r in galaxy_rows
    ]
    table += [
        "",
        "| fields per batch (4 galaxies each) | ms / step | ms / field-step |",
        "|---|---|---|",
    ]
    table += [
        f"| {r['fields']} | {r['ms_per_step']:.1f} | {r['ms_per_field_step']:.2f} |"
        for r in batch_rows
    ]
    table += [
        "",
        f"Resident memory over {args.memory_fields} fields (1-12 galaxies, 20 steps each): "
        f"{memory[0]['rss_mb']:.0f} MB after the first, {warm:.0f} MB after warm-up (field 50), "
        f"{memory[-1]['rss_mb']:.0f} MB at the end: growth {growth:+.1%} after warm-up; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB.",
    ]
    write_results(
        "map_scaling",
        {
            "prior": args.prior,
            "steps": args.steps,
            "matmul_gflops": gflops,
            "galaxies": galaxy_rows,
            "batch": batch_rows,
            "memory": memory,
            "memory_growth_after_warmup": growth,
        },
        "\n".join(table),
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
