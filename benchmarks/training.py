"""Training throughput of each stage, v0.1.0 networks vs the current ones, against the matmul rate.

Run: ``python -m benchmarks training [--steps 10] [--batch-sizes 32,64,128]`` on an idle machine.
Writes ``results/training.{json,md}``.

For each network (``v0.1.0``: transposed-convolution decoder, linear input; ``lean``: the current
default; ``reference``: MADNESS sizes with the current layers) and each batch size the script times
one jitted training step (forward + backward + Adam) of the VAE stage and of the deblending-encoder
stage, and one flow step.  XLA's own cost analysis of the compiled step gives its floating-point
operations, so ``achieved GFLOP/s = flops / step time``; the same process times a large float32
matmul to give the rate this CPU reaches on the best-case kernel, and the table reports each step
as a percentage of it.  Random stamps stand in for data (throughput does not depend on pixel
values); the first (compiling) step is excluded.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import write_results
from madness_ppl.nn import FlowConfig, NetworkConfig, encode, flow_log_prob, init_flow
from madness_ppl.prior import GalaxyPrior, PriorConfig
from madness_ppl.survey import Survey
from madness_ppl.train.stages import vae_loss

NETWORKS = {
    "v0.1.0": NetworkConfig.v010,
    "lean": NetworkConfig.lean,
    "reference": NetworkConfig.reference,
}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", np.nan))


def _time_step(step, state, batch, steps: int) -> tuple[float, float]:
    """Median seconds per step over ``steps`` timed calls, and XLA's flop count of one step."""
    key = jax.random.key(0)
    compiled = step.lower(state, batch, key).compile()
    state, loss = compiled(state, batch, key)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = compiled(state, batch, key)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), _flops(compiled)


def _stepper(loss_fn, params):
    opt = optax.adam(1e-3)

    @jax.jit
    def step(state, batch, key):
        p, s = state
        loss, g = jax.value_and_grad(loss_fn)(p, batch, key)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    return step, (params, opt.init(params))


def matmul_rate(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a float32 ``n x n`` matmul (best of ``repeats``), the CPU's practical peak."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def measure(name: str, batch_size: int, steps: int) -> dict:
    """Samples/s and GFLOP/s of the VAE and deblender steps of one network at one batch size."""
    survey = Survey.lsst()
    network = NETWORKS[name](bands=6, stamp_size=45, latent_dim=16)
    config = PriorConfig(network=network, flow=FlowConfig(latent_dim=16, hidden=(64, 64)))
    prior = GalaxyPrior.init(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.gamma(1.0, 300.0, (batch_size, 6, 45, 45)).astype(np.float32))
    sky = jnp.asarray(survey.sky_variance, jnp.float32)

    vae_step, vae_state = _stepper(
        lambda p, b, k: vae_loss(p, prior, b, k, sky_variance=sky, beta=0.1),
        {"encoder": prior.encoder_params, "decoder": prior.decoder_params},
    )
    t_vae, f_vae = _time_step(vae_step, vae_state, {"noisy": images, "noiseless": images}, steps)

    target = jnp.zeros((batch_size, 16))
    deb_step, deb_state = _stepper(
        lambda p, b, k: jnp.mean((encode(p, network, b["x"] / 1e4).mean - b["t"]) ** 2),
        prior.encoder_params,
    )
    t_deb, f_deb = _time_step(deb_step, deb_state, {"x": images, "t": target}, steps)
    return {
        "network": name,
        "batch_size": batch_size,
        "vae_samples_per_s": batch_size / t_vae,
        "vae_gflop_per_step": f_vae / 1e9,
        "vae_gflop_per_s": f_vae / t_vae / 1e9,
        "deblender_samples_per_s": batch_size / t_deb,
        "deblender_gflop_per_step": f_deb / 1e9,
        "deblender_gflop_per_s": f_deb / t_deb / 1e9,
    }


def measure_flow(steps: int, batch_size: int = 256) -> dict:
    """Samples/s of one flow step (tiny next to the VAE)."""
    cfg = FlowConfig(latent_dim=16, hidden=(64, 64))
    z = jnp.asarray(np.random.default_rng(0).standard_normal((batch_size, 16)), jnp.float32)
    step, state = _stepper(
        lambda p, b, k: -jnp.mean(flow_log_prob(p, cfg, b["z"])), init_flow(jax.random.key(1), cfg)
    )
    t, f = _time_step(step, state, {"z": z}, steps)
    return {"batch_size": batch_size, "samples_per_s": batch_size / t, "gflop_per_s": f / t / 1e9}


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--steps", "2", "--batch-sizes", "8"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-sizes", default="32,64,128")
    parser.add_argument("--reference", action="store_true", help="also time the reference sizes")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = ["v0.1.0", "lean"] + (["reference"] if args.reference else [])

    peak_before = matmul_rate()
    rows = []
    for batch_size in batch_sizes:
        for name in names:
            rows.append(measure(name, batch_size, args.steps))
            print(rows[-1], flush=True)
    flow = measure_flow(args.steps)
    peak_after = matmul_rate()
    peak = max(peak_before, peak_after)
    for r in rows:
        r["vae_percent_of_matmul"] = 100 * r["vae_gflop_per_s"] / peak
        r["deblender_percent_of_matmul"] = 100 * r["deblender_gflop_per_s"] / peak

    by = {(r["network"], r["batch_size"]): r for r in rows}
    speedups = {
        str(b): by[("lean", b)]["vae_samples_per_s"] / by[("v0.1.0", b)]["vae_samples_per_s"]
        for b in batch_sizes
    }
    lines = [
        f"float32 matmul rate in this process: {peak:.0f} GFLOP/s "
        f"(before {peak_before:.0f}, after {peak_after:.0f}); step times are medians of "
        f"{args.steps} steps after compilation.",
        "",
        "| network | batch | VAE samples/s | VAE GFLOP/step | VAE GFLOP/s | VAE % of matmul "
        "| deblender samples/s | deblender % of matmul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['batch_size']} | {r['vae_samples_per_s']:.0f} "
            f"| {r['vae_gflop_per_step']:.2f} | {r['vae_gflop_per_s']:.1f} "
            f"| {r['vae_percent_of_matmul']:.1f} % | {r['deblender_samples_per_s']:.0f} "
            f"| {r['deblender_percent_of_matmul']:.1f} % |"
        )
    lines += [
        "",
        "VAE training speed-up of the current lean network over v0.1.0 (same batch, same run): "
        + ", ".join(f"batch {b}: {s:.1f}x" for b, s in speedups.items())
        + ".",
        f"Flow step: {flow['samples_per_s']:.0f} samples/s at batch {flow['batch_size']}.",
    ]
    table = "\n".join(lines)
    payload = {
        "matmul_gflop_per_s": peak,
        "matmul_before_after": [peak_before, peak_after],
        "rows": rows,
        "flow": flow,
        "lean_over_v010_vae": speedups,
    }
    write_results("training", payload, table)
    print(table)


if __name__ == "__main__":
    main()
