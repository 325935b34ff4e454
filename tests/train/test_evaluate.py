"""The held-out metrics of a prior are measured in the prior's own frame."""

import numpy as np
import pytest

from madness_ppl.prior import GalaxyPrior
from madness_ppl.simulate import draw_isolated, make_catalog
from madness_ppl.simulate.stamps import dataset_psf
from madness_ppl.survey import Survey
from madness_ppl.train import evaluate


def _stamps(frame: str, n: int = 40, seed: int = 5):
    survey = Survey.lsst()
    rng = np.random.default_rng(seed)
    catalog = make_catalog(n, survey, rng=rng)
    return survey, draw_isolated(catalog, survey, rng=rng, psf=dataset_psf(frame, survey))


def test_a_psf_aware_prior_is_measured_through_observed_psfs():
    """The shipped PSF-aware prior on model-frame stamps: the median-PSF reconstruction fits
    its noisy stamps to chi2 ~ 1, and a wider PSF costs flux precision (the reason the card
    reports each PSF)."""
    prior = GalaxyPrior.load("lsst")
    assert prior.psf_aware
    survey, stamps = _stamps("reference")
    metrics, noisy, recon = evaluate.held_out_reconstruction(
        prior, None, stamps.noiseless, survey, seed=3
    )
    assert noisy.shape == recon.shape == stamps.noiseless.shape[:2] + noisy.shape[-2:]
    assert abs(metrics["chi2_per_pixel"] - metrics["chi2_per_pixel_truth"]) < 0.05
    widths = {k: v["r_flux_width68"] for k, v in metrics["by_psf"].items()}
    assert set(widths) == set(evaluate.PSF_CONDITIONS)
    assert widths["wide"] > widths["median"]


def test_a_plain_prior_needs_its_noisy_survey_stamps():
    prior = GalaxyPrior.load("lsst-v0.2")
    assert not prior.psf_aware
    survey, stamps = _stamps("survey", n=20)
    with pytest.raises(ValueError, match="noisy"):
        evaluate.held_out_reconstruction(prior, None, stamps.noiseless, survey)
    metrics, noisy, _ = evaluate.held_out_reconstruction(
        prior, stamps.noisy, stamps.noiseless, survey
    )
    assert noisy is stamps.noisy
    assert abs(metrics["chi2_per_pixel"] - metrics["chi2_per_pixel_truth"]) < 0.1
