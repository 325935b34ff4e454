"""Shape-learning experiments: how fast a VAE variant learns galaxy ellipticities.

Run one variant (minutes on one core)::

    python -m benchmarks shape_learning --variant H_scale --train DATA/iso_train --val DATA/iso_val

(or ``--simulate N`` in place of ``--train``/``--val``: N training and min(N, 1500) held-out
stamps are simulated into ``results/shape_learning/data/`` with seeds 101 and 102), then
``python -m benchmarks shape_learning --table`` to write ``results/shape_learning.md`` from
the per-variant logs ``results/shape_learning/<variant>.jsonl``.

Each variant trains encoder + decoder (lean sizes, Adam 1e-3 with cosine decay, batch 64) on the
noiseless stamps of the first ``--n-train`` galaxies of an isolated dataset, with fresh noise per
minibatch, and every ``--eval-every`` samples reconstructs 1500 held-out noisy stamps (decoded
encoder mean) and measures, on the brighter half in r-band flux, the RMS of the HSM ellipticity
difference to the noiseless truth (0.26 = the error of drawing every galaxy round), the median
reconstructed and true \\|e\\|, the 68 % width of the size error, and the r-band aperture-flux
68 % width on all stamps.  Variants (each changes one thing from the one before, except where said):

* ``A_sub``: sub-pixel decoder, linear input, no amplitude head, posterior softplus start;
* ``B_new``: + amplitude head and asinh input;  ``C_new_snr``: + SNR-capped loss weights (100);
* ``D_beta001``: C with KL weight 0.001;  ``E_gamma05``: C + flux-weighted sampling (power 0.5);
* ``F_warp``: E + shear-and-scale warp;  ``G_noaug``: C without symmetry augmentation;
* ``H_scale``: F + encoder posterior starting at scale 0.05 (the shipped default).

All variants train with D4 augmentation except G.  Runs are single seeds, several at once on a
2-core machine: compare curves at equal samples seen, not times.  The committed logs were made on
2026-12-01 by the first version of this script (same settings; with flux power 0 it drew epochs
without replacement instead of uniform draws with replacement), on a 56k-stamp pool of
``simulate isolated --seed 101`` (first 30k used) and ``--seed 102`` held out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, write_results

LOGS = RESULTS / "shape_learning"
_BASE = {"warp": False, "posterior_scale_init": None}
VARIANTS = {
    "A_sub": {"net": {"amplitude": False, "input_transform": "linear"}},
    "B_new": {"net": {}},
    "C_new_snr": {"net": {}, "snr_cap": 100.0},
    "D_beta001": {"net": {}, "snr_cap": 100.0, "beta": 0.001},
    "E_gamma05": {"net": {}, "snr_cap": 100.0, "gamma": 0.5},
    "F_warp": {"net": {"warp": True}, "snr_cap": 100.0, "gamma": 0.5},
    "G_noaug": {"net": {}, "snr_cap": 100.0, "augment": False},
    "H_scale": {
        "net": {"warp": True, "posterior_scale_init": 0.05},
        "snr_cap": 100.0,
        "gamma": 0.5,
    },
}


def run(args) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from madness_ppl.nn import NetworkConfig
    from madness_ppl.prior import GalaxyPrior, PriorConfig
    from madness_ppl.simulate import load_dataset
    from madness_ppl.survey import Survey
    from madness_ppl.train.augment import add_noise, random_dihedral
    from madness_ppl.train.evaluate import (
        brighter_half,
        central_aperture_flux,
        reconstruct,
        shape_error,
        summarise_relative_error,
    )
    from madness_ppl.train.pipeline import per_band_peak
    from madness_ppl.train.stages import vae_loss, with_data_amplitude

    spec = VARIANTS[args.variant]
    if args.simulate:
        args.train, args.val = _simulated_datasets(args.simulate)
    pool = load_dataset(args.train, ("noiseless",))["noiseless"][: args.n_train]
    val = {k: v[:1500] for k, v in load_dataset(args.val, ("noisy", "noiseless")).items()}
    sky = jnp.asarray(Survey.lsst().sky_variance, jnp.float32)
    network = NetworkConfig(**{**_BASE, **spec["net"]})
    prior = GalaxyPrior.init(
        jax.random.key(0), PriorConfig(normalisation=per_band_peak(pool), network=network)
    )
    prior = with_data_amplitude(prior, pool)
    steps = args.samples // 64
    opt = optax.chain(
        optax.clip_by_global_norm(10.0), optax.adam(optax.cosine_decay_schedule(1e-3, steps, 0.01))
    )
    params = {"encoder": prior.encoder_params, "decoder": prior.decoder_params}
    state = (params, opt.init(params))
    augment = spec.get("augment", True)

    @jax.jit
    def step(state, y, key):
        k1, k2, k3 = jax.random.split(key, 3)
        y = random_dihedral(k1, y) if augment else y
        batch = {"noisy": add_noise(k2, y, sky), "noiseless": y}

        def loss(p):
            return vae_loss(
                p, prior, batch, k3, sky_variance=sky, beta=spec.get("beta", 0.1),
                snr_cap=spec.get("snr_cap"),
            )  # fmt: skip

        value, grads = jax.value_and_grad(loss)(state[0])
        updates, opt_state = opt.update(grads, state[1], state[0])
        return (optax.apply_updates(state[0], updates), opt_state), value

    r = 2
    bright = brighter_half(val["noiseless"], r)
    flux = pool[:, 3].sum((-2, -1))
    weights = np.minimum((np.maximum(flux, 1) / np.median(flux)) ** spec.get("gamma", 0.0), 30.0)
    weights /= weights.sum()
    rng, key = np.random.default_rng(0), jax.random.key(1)
    LOGS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(LOGS / f"{args.variant}.jsonl", "w") as log:
        for i in range(steps):
            idx = np.sort(rng.choice(len(pool), 64, p=weights))
            key, sub = jax.random.split(key)
            state, _ = step(state, pool[idx], sub)
            seen = (i + 1) * 64
            if seen % args.eval_every < 64 or i == steps - 1:
                p = state[0]
                rec = reconstruct(
                    prior.replace(encoder_params=p["encoder"], decoder_params=p["decoder"]),
                    val["noisy"],
                )
                out = {
                    "seen": seen,
                    "t": time.time() - t0,
                    "bright": shape_error(rec[bright, r], val["noiseless"][bright, r], 0.2),
                    "flux_w68": summarise_relative_error(
                        central_aperture_flux(rec[:, r]),
                        central_aperture_flux(val["noiseless"][:, r]),
                    )["width68"],
                }
                print(args.variant, json.dumps(out), flush=True)
                log.write(json.dumps(out) + "\n")
                log.flush()


def _simulated_datasets(n: int) -> tuple[Path, Path]:
    """Training (seed 101, ``n`` stamps) and held-out (seed 102, min(n, 1500)) isolated LSST
    datasets under ``results/shape_learning/data/``; a partial one (an interrupted run) is
    resumed, a complete one reused."""
    from madness_ppl.simulate import simulate_dataset

    paths = []
    for name, seed, count in (("train", 101, n), ("val", 102, min(n, 1500))):
        out = RESULTS / "shape_learning" / "data" / f"{name}_{count}_{seed}"
        simulate_dataset(out, kind="isolated", n=count, seed=seed, resume=out.exists())
        paths.append(out)
    return paths[0], paths[1]


def table() -> None:
    lines = [
        "Brighter half of 1500 held-out stamps; ellipticity RMS error (0.26 = drawing every "
        "galaxy round) / median reconstructed |e| (truth 0.19) / r-band flux 68 % width, "
        "at equal training samples seen.",
        "",
        "| variant | 12.5k samples | 25k samples | last logged |",
        "|---|---|---|---|",
    ]
    payload = {}
    for name in VARIANTS:
        path = LOGS / f"{name}.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        payload[name] = rows

        def cell(row):
            if row is None:
                return "-"
            b = row["bright"]
            return f"{b['e_rms']:.3f} / {b['e_median_recon']:.3f} / {row['flux_w68']:.3f}"

        at = {row["seen"] // 100 * 100: row for row in rows}
        last = rows[-1]
        lines.append(
            f"| {name} | {cell(at.get(12500))} | {cell(at.get(25000))} "
            f"| {cell(last)} ({last['seen'] // 1000}k) |"
        )
    write_results("shape_learning", {"variants": payload}, "\n".join(lines))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    [
        "--variant",
        "H_scale",
        "--simulate",
        "64",
        "--n-train",
        "64",
        "--samples",
        "128",
        "--eval-every",
        "64",
    ],
    ["--table"],
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--train", help="isolated training dataset")
    parser.add_argument("--val", help="isolated held-out dataset")
    parser.add_argument("--simulate", type=int, help="simulate N training stamps instead")
    parser.add_argument("--n-train", type=int, default=30000)
    parser.add_argument("--samples", type=int, default=160000)
    parser.add_argument("--eval-every", type=int, default=12500)
    parser.add_argument(
        "--rebuild", "--table", dest="table", action="store_true", help="table from the logs only"
    )
    args = parser.parse_args(argv)
    if args.table:
        table()
    elif args.variant and (args.simulate or (args.train and args.val)):
        run(args)
    else:
        parser.error("give --variant (with --train and --val, or --simulate) or --table")


if __name__ == "__main__":
    main()
