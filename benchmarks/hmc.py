"""NUTS throughput: effective samples per second, numpyro vs blackjax, 1- and 10-galaxy fields.

Fields are simulated from the galaxy prior itself (latents drawn from the flow, decoded,
placed, LSST sky + Poisson variance, Gaussian noise), so the sampled posterior is the one the
model defines. Each sampler starts at the true latents (a stand-in for the MAP) and runs
``--warmup`` adaptation steps and ``--samples`` draws in one chain (``--warmup-many``,
``--samples-many`` for multi-galaxy fields). ESS/s divides the bulk ESS
(min and median over the scalar latent components, and for the r-band fluxes) by the whole
wall time of ``sample_posterior``'s sampler (warm-up + draws, compilation included).

The script also measures the cost of one gradient of the potential (``value_and_grad``)
compiled in straight-line code, inside a ``lax.fori_loop`` (as NUTS runs it), and inside the
loop through the host callback of ``sample_posterior(gradient="callback")``: XLA:CPU runs the
decoder's convolutions several times slower inside loops.

Run: ``python -m benchmarks hmc [--warmup 100 --samples 100 --warmup-many 40 --samples-many 40
--galaxies 1 10 --inline]`` (the multi-galaxy defaults are small to keep the run to minutes on
a 2-core CPU: their ESS are rough).
Writes ``results/hmc.{json,md}``. Uses ``GalaxyPrior.load("lsst")`` if shipped, else a
randomly initialised lean prior (said so in the output).
"""

from __future__ import annotations

import argparse
import os
import time

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro.infer.util import potential_energy

from benchmarks._common import write_results
from madness_ppl.infer import callback_potential, sample_posterior
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.survey import Survey


def load_prior() -> tuple[GalaxyPrior, str]:
    try:
        return GalaxyPrior.load("lsst"), "shipped LSST prior (madness_ppl/weights/lsst)"
    except (FileNotFoundError, ValueError) as err:
        print(f"note: no shipped LSST prior ({err}); using GalaxyPrior.init(jax.random.key(0))")
        return GalaxyPrior.init(jax.random.key(0)), "random lean prior (GalaxyPrior.init(key(0)))"


def make_field(prior: GalaxyPrior, n: int, seed: int):
    """``n`` galaxies drawn from the prior in a field sized for them (some blended)."""
    rng = np.random.default_rng(seed)
    size = 61 if n == 1 else 45 + 12 * int(np.ceil(np.sqrt(n)))
    margin = 12.0
    positions = (
        np.full((1, 2), size // 2, float)
        if n == 1
        else rng.uniform(margin, size - 1 - margin, size=(n, 2))
    )
    positions = jnp.asarray(positions, jnp.float32)
    z = prior.latent_distribution().sample(jax.random.key(seed), (n,))
    image = place_stamps(prior.decode(z), positions, (size, size))
    sky = Survey.lsst().select_bands(prior.bands).sky_variance
    variance = default_variance(image, jnp.asarray(sky, jnp.float32))
    field = image + jnp.sqrt(variance) * rng.normal(size=image.shape).astype(np.float32)
    return (field, positions, variance, prior), z


def gradient_costs(args: tuple, z: jax.Array, reps: int = 10) -> dict:
    """ms per value_and_grad: straight-line, inside fori_loop, inside fori_loop via callback."""

    def potential(u):
        return potential_energy(blend_model, args, {}, u)

    u = {"z": z}
    straight = jax.jit(jax.value_and_grad(potential))
    wrapped = callback_potential(jax.jit(potential))

    def looped(fn):
        @jax.jit
        def run(u):
            def body(_, carry):
                u, acc = carry
                v, g = jax.value_and_grad(fn)(u)
                return jax.tree.map(lambda a, b: a - 1e-9 * b, u, g), acc + v

            return lax.fori_loop(0, reps, body, (u, jnp.zeros((), z.dtype)))

        return run

    def timed(fn, count):
        jax.block_until_ready(fn(u))
        start = time.perf_counter()
        jax.block_until_ready(fn(u))
        return 1e3 * (time.perf_counter() - start) / count

    def straight_many(u):
        for _ in range(reps):
            out = straight(u)
        return out

    return {
        "straight_ms": timed(straight_many, reps),
        "in_loop_ms": timed(looped(potential), reps),
        "in_loop_callback_ms": timed(looped(wrapped), reps),
    }


def run_one(args, z, backend: str, gradient: str, warmup: int, samples: int) -> dict:
    idata = sample_posterior(
        blend_model,
        *args,
        init={"z": z},
        backend=backend,
        gradient=gradient,
        num_warmup=warmup,
        num_samples=samples,
        seed=1,
        diagnose=False,
    )
    seconds = float(idata.posterior.attrs["sampling_time"])
    ess_z = np.asarray(az.ess(idata, var_names=["z"], method="bulk")["z"]).ravel()
    bands = args[3].bands
    flux = np.asarray(az.ess(idata, var_names=["flux"], method="bulk")["flux"])
    ess_flux = flux[..., bands.index("r") if "r" in bands else 0].ravel()
    stats = idata.sample_stats
    return {
        "backend": backend,
        "gradient": idata.posterior.attrs["gradient"],
        "seconds": seconds,
        "ess_min": float(ess_z.min()),
        "ess_median": float(np.median(ess_z)),
        "ess_flux_r_min": float(ess_flux.min()),
        "ess_min_per_s": float(ess_z.min() / seconds),
        "ess_median_per_s": float(np.median(ess_z) / seconds),
        "ess_flux_r_min_per_s": float(ess_flux.min() / seconds),
        "mean_tree_depth": float(stats["tree_depth"].mean()),
        "mean_leapfrogs": float(stats["n_steps"].mean()),
        "step_size": float(stats["step_size"].values[0, -1]),
        "divergences": int(stats["diverging"].sum()),
    }


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    "--warmup",
    "10",
    "--samples",
    "10",
    "--warmup-many",
    "5",
    "--samples-many",
    "5",
    "--galaxies",
    "1",
    "2",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warmup", type=int, default=100, help="1-galaxy field")
    parser.add_argument("--samples", type=int, default=100, help="1-galaxy field")
    parser.add_argument("--warmup-many", type=int, default=40, help="multi-galaxy fields")
    parser.add_argument("--samples-many", type=int, default=40, help="multi-galaxy fields")
    parser.add_argument("--galaxies", type=int, nargs="+", default=[1, 10])
    parser.add_argument(
        "--inline", action="store_true", help="also run numpyro with gradient='inline'"
    )
    opts = parser.parse_args(argv)
    prior, prior_note = load_prior()
    rows, costs = [], {}
    for n in opts.galaxies:
        args, z = make_field(prior, n, seed=n)
        costs[n] = gradient_costs(args, z)
        print(n, "galaxies, gradient cost (ms):", costs[n], flush=True)
        runs = [("numpyro", "auto"), ("blackjax", "auto")]
        if opts.inline:
            runs.append(("numpyro", "inline"))
        warmup, samples = (
            (opts.warmup, opts.samples) if n == 1 else (opts.warmup_many, opts.samples_many)
        )
        for backend, gradient in runs:
            row = {"galaxies": n, "dims": int(z.size), "warmup": warmup, "samples": samples}
            row |= run_one(args, z, backend, gradient, warmup, samples)
            rows.append(row)
            print(row, flush=True)

    table = (
        "| galaxies | dims | backend | gradient | warm-up + draws | seconds | min ESS | "
        "median ESS | min ESS/s | median ESS/s | r-flux min ESS/s | mean leapfrogs | "
        "divergences |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table += "\n".join(
        f"| {r['galaxies']} | {r['dims']} | {r['backend']} | {r['gradient']} | "
        f"{r['warmup']} + {r['samples']} | {r['seconds']:.1f} | {r['ess_min']:.0f} | {r['ess_median']:.0f} | "
        f"{r['ess_min_per_s']:.2f} | {r['ess_median_per_s']:.2f} | "
        f"{r['ess_flux_r_min_per_s']:.2f} | {r['mean_leapfrogs']:.1f} | {r['divergences']} |"
        for r in rows
    )
    table += (
        "\n\nCost of one value_and_grad of the potential (ms): straight-line jit, inside "
        "`lax.fori_loop` (as NUTS runs it), inside the loop through the host callback.\n\n"
        "| galaxies | straight | in loop | in loop, callback | loop penalty |\n|---|---|---|---|---|\n"
    )
    table += "\n".join(
        f"| {n} | {c['straight_ms']:.2f} | {c['in_loop_ms']:.2f} | "
        f"{c['in_loop_callback_ms']:.2f} | {c['in_loop_ms'] / c['straight_ms']:.1f}x |"
        for n, c in costs.items()
    )
    load = os.getloadavg()[0]
    table += (
        f"\n\nPrior: {prior_note}. One chain started at the true latents; ESS/s over the "
        f"whole sampler wall time "
        f"(warm-up + draws + compilation). Load average at the end: {load:.1f}."
    )
    payload = {
        "benchmark": "NUTS effective samples per second on fields simulated from the prior",
        "prior": prior_note,
        "rows": rows,
        "gradient_costs_ms": {str(k): v for k, v in costs.items()},
        "load_average": load,
    }
    write_results("hmc", payload, table)
    print(table)


if __name__ == "__main__":
    main()
