"""Bias of MAP fluxes on isolated galaxies: with the survey's noise, and without it.

For ``--galaxies`` isolated galsim galaxies of the prior's own simulator (one per 71 x 71
field, LSST 10-year depth, seeds 8100...: held out from training and from the model-error
calibration), the shipped prior's MAP (``deblend``, true position) is fitted twice: to the noisy
field, and to the noiseless one with the variance divided by 1000 (a near-exact fit: what the
decoder can draw). Per band we report the median relative error :math:`(F - F_\\mathrm{true}) /
F_\\mathrm{true}` and the median standardised error :math:`(F - F_\\mathrm{true}) /
\\sigma_\\mathrm{Laplace}` (the noisy fit's Laplace error, no model-error terms), with 95 %
bootstrap intervals. A bias present with noise but not without is a noise bias of the fit (the
model can only add light); one present in both is the decoder's. A third fit to the noisy field
drops the prior (its log density weighted 0: the maximum-likelihood latents, started at the MAP,
L-BFGS to ``tol = 1e-5``): a bias that grows without the prior is the likelihood's (the decoder
fitting positive noise), one that vanishes is the prior's pull.

Run: ``python -m benchmarks flux_bias [--galaxies 60]``. Writes ``results/flux_bias.{json,md}``.
"""

from __future__ import annotations

import argparse

import numpy as np
from numpyro.primitives import Messenger

from benchmarks._common import write_results
from madness_ppl.deblend import deblend
from madness_ppl.infer import fit_map
from madness_ppl.prior import GalaxyPrior
from madness_ppl.progress import progress_bar
from madness_ppl.scene import blend_model, prepare_blend
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.stats import field_bootstrap
from madness_ppl.survey import Survey
from madness_ppl.uncertainty import laplace_flux_errors

SEED = 8100
NOISELESS_VARIANCE_SCALE = 1e-3
FITS = {
    "noisy": "noisy field",
    "likelihood_only": "noisy field, prior weight 0",
    "noiseless": "noiseless, variance / 1000",
}


class _WithoutPrior(Messenger):
    """Weights the log density of the latent site ``z`` by 0 (the likelihood alone)."""

    def process_message(self, msg):
        if msg["name"] == "z":
            msg["scale"] = 0.0


def likelihood_only_model(*args, **kwargs) -> None:
    """:func:`~madness_ppl.scene.blend_model` without its prior term (maximum likelihood)."""
    with _WithoutPrior():
        blend_model(*args, **kwargs)


def fit_pair(prior, seed: int) -> dict:
    """True, noisy-fit, likelihood-only and noiseless-fit fluxes ``(B,)`` and the noisy fit's
    Laplace error."""
    config = BlendConfig(field_size=71, n_galaxies=(1, 1), margin=30)
    blend = make_blend(Survey.lsst(), config=config, rng=np.random.default_rng(seed))
    noisy = deblend(blend.field, blend.variance, blend.positions, prior=prior, errors=False)
    z = np.asarray(noisy.fit.params["z"])[:1]
    # the kernels the fit observed the galaxy through, in the errors and the likelihood-only fit
    psf = noisy.psf
    sd = laplace_flux_errors(prior, z, blend.positions, blend.variance, psf=psf).flux_err[0]
    inputs = prepare_blend(blend.field, blend.positions, blend.variance, prior)
    ml = fit_map(
        likelihood_only_model,
        *inputs.args,
        **inputs.kwargs,
        psf=psf,
        init={"z": z},
        method="lbfgs",
        max_steps=600,
        tol=1e-5,
    )
    clean = deblend(
        blend.noiseless,
        blend.variance * NOISELESS_VARIANCE_SCALE,
        blend.positions,
        prior=prior,
        errors=False,
    )
    return {
        "truth": blend.isolated.sum(axis=(-1, -2))[0].astype(np.float64),
        "noisy": noisy.sources.sum(axis=(-1, -2))[0].astype(np.float64),
        "likelihood_only": np.asarray(ml.deterministics["flux"], np.float64)[0],
        "noiseless": clean.sources.sum(axis=(-1, -2))[0].astype(np.float64),
        "sd": np.asarray(sd, np.float64),
    }


def median_interval(x: np.ndarray, n_boot: int = 2000) -> list[float]:
    """Median of ``x`` along axis 0 and its 95 % interval from resampling the galaxies (each
    its own field: :func:`field_bootstrap`), ``(3, B)`` as lists."""
    value, lo, hi = field_bootstrap(list(x), lambda rows: np.median(rows, axis=0), n=n_boot)
    return [value.tolist(), lo.tolist(), hi.tolist()]


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--galaxies", "2"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galaxies", type=int, default=60)
    a = parser.parse_args(argv)
    prior = GalaxyPrior.load("lsst")
    fits = []
    with progress_bar(True) as bar:
        task = bar.add_task("isolated galaxies", total=a.galaxies)
        for k in range(a.galaxies):
            fits.append(fit_pair(prior, SEED + k))
            bar.advance(task)
    truth, sd = (np.array([f[k] for f in fits]) for k in ("truth", "sd"))
    stats = {
        fit: {
            "relative": median_interval((np.array([f[fit] for f in fits]) - truth) / truth),
            "standardised": median_interval((np.array([f[fit] for f in fits]) - truth) / sd),
        }
        for fit in FITS
    }
    bands = list(prior.bands)
    lines = [
        f"MAP flux bias on {a.galaxies} isolated galsim galaxies (seeds {SEED}..{SEED + a.galaxies - 1}, "
        "in distribution), shipped LSST prior; median and 95 % bootstrap interval.",
        "",
        "| fit | statistic | " + " | ".join(bands) + " |",
        "|---|---|" + "---|" * len(bands),
    ]
    for fit, label in FITS.items():
        for stat, name, scale, fmt in (
            ("relative", "(F - F_true) / F_true, %", 100.0, "{:+.2f}"),
            ("standardised", "(F - F_true) / sigma_Laplace", 1.0, "{:+.2f}"),
        ):
            med, lo, hi = (np.asarray(v) * scale for v in stats[fit][stat])
            cells = [
                f"{fmt.format(m)} [{fmt.format(low)}, {fmt.format(high)}]"
                for m, low, high in zip(med, lo, hi, strict=True)
            ]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    payload = {
        "protocol": __doc__,
        "galaxies": a.galaxies,
        "seeds": f"{SEED}..{SEED + a.galaxies - 1}",
        "bands": bands,
        "stats": stats,
        "fits": [{k: v.tolist() for k, v in f.items()} for f in fits],
    }
    write_results("flux_bias", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
