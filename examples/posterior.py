"""Error bars on a deblend: NUTS posterior of a blend, flux/colour intervals, pixel uncertainty.

MAP (``fit_map``) gives one answer; ``sample_posterior`` runs NUTS on the same NumPyro scene,
started at the MAP, and returns an ``arviz.InferenceData``. From it:

* ``summarize_diagnostics``: R-hat, effective sample sizes, divergences (warns when bad);
* ``flux_table``: per-source posterior mean, sd and credible intervals of fluxes and colours;
* ``pixel_std_maps``: per-source, per-pixel posterior sd of the deblended stamps, streamed
  over the draws in batches.

The toy linear prior stands in for a trained ``GalaxyPrior`` (same interface) so that the
posterior is known exactly (``linear_gaussian_posterior``) and the script runs in well under a
minute on a laptop CPU; swap in ``GalaxyPrior.load("lsst")`` for real data (on CPU,
``sample_posterior`` then evaluates the convolutional decoder's gradient through a host
callback, because XLA:CPU runs convolutions slower inside the sampler's loops; how much
faster the callback is depends on the model: 1.3x in a like-for-like try with the shipped
prior, more in older measurements, so time both with ``gradient=`` on your fields).

Run with ``python examples/posterior.py``; writes ``examples/output/posterior.png``.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from madness_ppl.infer import (
    fit_map,
    flux_table,
    pixel_std_maps,
    sample_posterior,
    summarize_diagnostics,
)
from madness_ppl.scene import blend_model, default_variance, place_stamps, prepare_blend
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

BANDS, STAMP, FIELD = ("g", "r", "i"), 21, 48
OUTPUT = Path(__file__).parent / "output"


def main() -> None:
    start = time.perf_counter()
    rng = np.random.default_rng(2)
    prior = LinearGaussianPrior.random(
        jax.random.key(0), n_bands=3, stamp_size=STAMP, latent_dim=6, flux=5e3, size=2.5,
        bands=BANDS,
    )  # fmt: skip

    # Three blended galaxies drawn from the prior, sky + Poisson noise.
    positions = np.array([[19.0, 22.0], [25.0, 25.0], [21.0, 29.0]])
    true_z = jnp.asarray(rng.normal(size=(3, prior.latent_dim)), jnp.float32)
    truth = place_stamps(prior.decode(true_z), positions, (FIELD, FIELD))
    variance = default_variance(truth, 200.0)
    field = truth + jnp.sqrt(variance) * rng.normal(size=truth.shape).astype(np.float32)
    blend = prepare_blend(field, positions, variance, prior)

    # 1. MAP, then 2. NUTS started there (two chains, so that R-hat can be computed; up to
    # two more blocks of 500 draws per chain while some flux has R-hat > 1.01 or ESS < 200).
    result = fit_map(blend_model, *blend.args, **blend.kwargs, method="lbfgs")
    idata = sample_posterior(
        blend_model,
        *blend.args,
        **blend.kwargs,
        init=result,
        num_warmup=300,
        num_samples=500,
        num_chains=2,
        max_extensions=2,
        converge_on=("flux",),
        coords={"band": list(BANDS)},
    )
    diag = summarize_diagnostics(idata)
    print(
        f"NUTS: {diag.num_chains} x {diag.num_draws} draws "
        f"({idata.posterior.attrs['blocks']} block(s)), R-hat <= {diag.max_rhat:.3f}, "
        f"bulk ESS >= {diag.min_ess_bulk:.0f}, {diag.divergences} divergences "
        f"({idata.posterior.attrs['sampling_time']:.1f} s)"
    )

    # 3. Fluxes and colours with credible intervals; the truth for comparison. (The toy
    # model is exact; with a trained GalaxyPrior, add the decoder's calibrated systematic
    # errors the likelihood lacks: flux_table(..., systematic=systematic_flux_errors(prior,
    # stamps_at_the_map, positions, field.shape)), see madness_ppl.uncertainty.)
    table = flux_table(idata, BANDS, intervals=(0.68, 0.9))
    table["flux_r_true"] = np.asarray(prior.decode(true_z).sum(axis=(-1, -2)))[:, 1]
    table[["source", "flux_r", "flux_r_sd", "flux_r_lo68", "flux_r_hi68", "flux_r_true"]].pprint()
    table[["source", "g-r", "g-r_sd", "g-r_lo90", "g-r_hi90"]].pprint()

    # The toy posterior is Gaussian and known: NUTS agrees within Monte Carlo error.
    exact = linear_gaussian_posterior(*blend.args)
    z = idata.posterior["z"].values.reshape(-1, 3 * prior.latent_dim)
    sd = np.sqrt(np.diag(exact.covariance))
    err = np.abs(z.mean(0) - np.asarray(exact.mean).ravel()) / sd
    print(f"max |NUTS mean - exact mean| = {err.max():.3f} posterior sd")

    # 4. Per-pixel posterior sd of each deblended galaxy (r band), streamed in batches.
    maps = pixel_std_maps(idata, prior, batch_size=100)
    fig, axes = plt.subplots(2, 4, figsize=(11, 5.6))
    axes[0, 0].imshow(np.asarray(field[1]), origin="lower", cmap="gray_r")
    axes[0, 0].plot(*positions.T, "r+", ms=10)
    axes[0, 0].set_title("field (r)")
    axes[1, 0].imshow(np.asarray(result.residual[1] / jnp.sqrt(variance[1])), origin="lower",
                      cmap="RdBu_r", vmin=-4, vmax=4)  # fmt: skip
    axes[1, 0].set_title("MAP residual / sigma")
    for i in range(3):
        im = axes[0, i + 1].imshow(maps.mean[i, 1], origin="lower", cmap="gray_r")
        axes[0, i + 1].set_title(f"source {i}: posterior mean (r)")
        fig.colorbar(im, ax=axes[0, i + 1], shrink=0.8)
        im = axes[1, i + 1].imshow(maps.std[i, 1], origin="lower", cmap="magma")
        axes[1, i + 1].set_title(f"source {i}: pixel sd (r)")
        fig.colorbar(im, ax=axes[1, i + 1], shrink=0.8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    OUTPUT.mkdir(exist_ok=True)
    fig.savefig(OUTPUT / "posterior.png", dpi=90)
    print(f"wrote {OUTPUT / 'posterior.png'}; total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
