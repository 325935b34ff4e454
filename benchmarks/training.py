"""Training throughput (samples/s) of each stage, lean vs reference networks, in the same run.

Run: ``python benchmarks/training.py [--steps 20]``. Writes ``results/training.{json,md}``.
Random stamps stand in for data (throughput does not depend on pixel values); the first step of
each stage (compilation) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import write_results

from madness_ppl.nn import FlowConfig, NetworkConfig, encode, flow_log_prob, init_flow
from madness_ppl.prior import GalaxyPrior, PriorConfig
from madness_ppl.survey import Survey
from madness_ppl.train.stages import vae_loss


def _time(step, state, batch, steps: int) -> float:
    key = jax.random.key(0)
    state, loss = step(state, batch, key)  # compile
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, batch, key)
    jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / steps


def _stepper(loss_fn, params):
    opt = optax.adam(1e-3)

    @jax.jit
    def step(state, batch, key):
        p, s = state
        loss, g = jax.value_and_grad(loss_fn)(p, batch, key)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    return step, (params, opt.init(params))


def measure(preset: str, steps: int, batch_size: int) -> dict:
    survey = Survey.lsst()
    network = getattr(NetworkConfig, preset)(bands=6, stamp_size=45, latent_dim=16)
    config = PriorConfig(network=network, flow=FlowConfig(latent_dim=16, hidden=(64, 64)))
    prior = GalaxyPrior.init(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.gamma(1.0, 300.0, (batch_size, 6, 45, 45)).astype(np.float32))
    sky = jnp.asarray(survey.sky_variance, jnp.float32)

    vae_step, vae_state = _stepper(
        lambda p, b, k: vae_loss(p, prior, b, k, sky_variance=sky, beta=0.1),
        {"encoder": prior.encoder_params, "decoder": prior.decoder_params},
    )
    t_vae = _time(vae_step, vae_state, {"noisy": images, "noiseless": images}, steps)

    flow_cfg = config.flow
    z = jnp.asarray(rng.standard_normal((256, 16)).astype(np.float32))
    flow_step, flow_state = _stepper(
        lambda p, b, k: -jnp.mean(flow_log_prob(p, flow_cfg, b["z"])),
        init_flow(jax.random.key(1), flow_cfg),
    )
    t_flow = _time(flow_step, flow_state, {"z": z}, steps)

    target = jnp.zeros((batch_size, 16))
    deb_step, deb_state = _stepper(
        lambda p, b, k: jnp.mean((encode(p, network, b["x"] / 1e4).mean - b["t"]) ** 2),
        prior.encoder_params,
    )
    t_deb = _time(deb_step, deb_state, {"x": images, "t": target}, steps)
    return {
        "preset": preset,
        "batch_size": batch_size,
        "vae_samples_per_s": batch_size / t_vae,
        "flow_samples_per_s": 256 / t_flow,
        "deblender_samples_per_s": batch_size / t_deb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    rows = [measure(p, args.steps, args.batch_size) for p in ("lean", "reference")]
    for r in rows:
        print(r)
    table = "| preset | VAE samples/s | flow samples/s | deblender samples/s |\n|---|---|---|---|\n"
    table += "\n".join(
        f"| {r['preset']} | {r['vae_samples_per_s']:.0f} | {r['flow_samples_per_s']:.0f} | "
        f"{r['deblender_samples_per_s']:.0f} |"
        for r in rows
    )
    ratio = rows[0]["vae_samples_per_s"] / rows[1]["vae_samples_per_s"]
    table += f"\n\nLean VAE trains {ratio:.1f}x faster than the reference VAE on this machine."
    write_results("training", {"rows": rows, "lean_over_reference_vae": ratio}, table)
    print(table)


if __name__ == "__main__":
    main()
