"""The field's PSF in the pipeline: known answers on galsim galaxies, warnings and errors."""

from __future__ import annotations

import warnings

import galsim
import numpy as np
import pytest

from madness_ppl.deblend import deblend
from madness_ppl.errors import MadnessInputWarning
from madness_ppl.prior import GalaxyPrior
from madness_ppl.psf import PSFError, psf_images
from madness_ppl.simulate.stamps import add_noise
from madness_ppl.survey import Survey

SURVEY = Survey.lsst()
MEDIAN = np.array([SURVEY.band(b).psf_fwhm for b in SURVEY.band_names])


def _galaxy_field(fwhm: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright bulge+disk galaxy (i ~ 21.5) at the centre of a 61-px field, drawn by galsim
    with a Kolmogorov PSF of ``fwhm`` per band; returns (noisy, variance, true flux)."""
    rng = np.random.default_rng(seed)
    mags = np.array([22.6, 22.2, 21.8, 21.5, 21.4, 21.3])
    flux = np.array(
        [SURVEY.mag_to_electrons(m, b) for m, b in zip(mags, SURVEY.band_names, strict=True)]
    )
    field = np.zeros((6, 61, 61))
    for k, f in enumerate(flux):
        galaxy = galsim.Add(
            [
                galsim.Exponential(half_light_radius=0.6, flux=0.7 * f).shear(e1=0.2, e2=0.1),
                galsim.DeVaucouleurs(half_light_radius=0.25, flux=0.3 * f),
            ]
        )
        psf = galsim.Kolmogorov(fwhm=fwhm[k])
        field[k] = galsim.Convolve(galaxy, psf).drawImage(nx=61, ny=61, scale=0.2).array
    noisy, variance = add_noise(field.astype(np.float32), SURVEY.sky_variance, rng)
    return noisy, variance, flux


@pytest.fixture(scope="module")
def lsst() -> GalaxyPrior:
    return GalaxyPrior.load("lsst")


@pytest.mark.parametrize("factor", [1.0, 1.3, 1.6])
def test_flux_within_errors_when_the_psf_is_given(lsst, factor):
    fwhm = factor * MEDIAN
    noisy, variance, flux = _galaxy_field(fwhm, seed=int(10 * factor))
    psf = psf_images(fwhm, pixel_scale=SURVEY.pixel_scale, size=75)
    result = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=psf)
    row = result.catalog[0]
    for b, band in enumerate(("g", "r", "i", "z")):
        pull = (row[f"flux_{band}"] - flux[b + 1]) / row[f"flux_{band}_err"]
        assert abs(pull) < 3, (band, row[f"flux_{band}"] / flux[b + 1])
    assert abs(row["flux_r"] / flux[2] - 1) < 0.05
    if factor != 1.0:
        assert result.model_frame is not None
        assert result.sources.shape[-1] > lsst.stamp_size  # observed stamps hold the wings


def test_fwhm_only_gives_the_same_answer_as_images(lsst):
    fwhm = 1.3 * MEDIAN
    noisy, variance, _ = _galaxy_field(fwhm, seed=3)
    images = psf_images(fwhm, pixel_scale=SURVEY.pixel_scale, size=lsst.stamp_size)
    by_image = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=images)
    by_fwhm = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=fwhm)
    assert by_fwhm.catalog["flux_r"][0] == pytest.approx(by_image.catalog["flux_r"][0], rel=1e-4)


def test_no_psf_warns_and_uses_the_survey_default(lsst):
    noisy, variance, _ = _galaxy_field(MEDIAN, seed=4)
    with pytest.warns(MadnessInputWarning, match="no PSF given; using the LSST default PSF"):
        result = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, max_steps=5)
    default_psf = SURVEY.psf_images(lsst.stamp_size)
    given = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=default_psf, max_steps=5)
    assert result.catalog["flux_r"][0] == pytest.approx(given.catalog["flux_r"][0], rel=1e-4)


def test_a_prior_whose_frame_is_the_default_psf_fits_without_convolving():
    """v0.2 draws galaxies at the LSST median PSF: no PSF given means no difference kernel."""
    prior = GalaxyPrior.load("lsst-v0.2")
    noisy, variance, _ = _galaxy_field(MEDIAN, seed=4)
    with pytest.warns(MadnessInputWarning, match="no PSF given"):
        result = deblend(noisy, variance, [[30.0, 30.0]], prior=prior, max_steps=5)
    assert result.model_frame is None and result.sources.shape[-1] == prior.stamp_size


@pytest.mark.parametrize("name", ["lsst", "lsst-v0.2"])
def test_psf_narrower_than_the_model_frame_is_refused_naming_the_band(name):
    prior = GalaxyPrior.load(name)
    noisy, variance, _ = _galaxy_field(MEDIAN, seed=5)
    fwhm = MEDIAN.copy()
    fwhm[3] = 0.2  # band i, arcsec: narrower than either prior's frame (v0.3 0.3", v0.2 the median)
    with pytest.raises(
        PSFError, match=r"band 'i'.*narrower than the prior's model-frame PSF"
    ) as err:
        deblend(noisy, variance, [[30.0, 30.0]], prior=prior, psf=fwhm)
    # the widths it quotes agree with what it says (moments of a Kolmogorov core would not)
    import re

    given, frame = map(float, re.findall(r"~([0-9.]+) px", str(err.value))[:2])
    assert given < frame and abs(given - 0.2 / SURVEY.pixel_scale) < 0.3, str(err.value)


def test_psf_in_the_field_band_order_follows_bands(lsst):
    noisy, variance, _ = _galaxy_field(1.3 * MEDIAN, seed=6)
    fwhm = 1.3 * MEDIAN
    order = [5, 4, 3, 2, 1, 0]
    bands = [SURVEY.band_names[i] for i in order]
    ref = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=fwhm, max_steps=20)
    flipped = deblend(
        noisy[order],
        variance[order],
        [[30.0, 30.0]],
        prior=lsst,
        psf=fwhm[order],
        bands=bands,
        max_steps=20,
    )
    assert flipped.catalog["flux_r"][0] == pytest.approx(ref.catalog["flux_r"][0], rel=1e-4)


@pytest.mark.parametrize("bad", ["nan", "zero", "bands"])
def test_bad_psf_through_deblend_is_a_typed_error(lsst, bad):
    noisy, variance, _ = _galaxy_field(MEDIAN, seed=7)
    psf = psf_images(1.2 * MEDIAN, pixel_scale=SURVEY.pixel_scale, size=45)
    if bad == "nan":
        psf[2, 5, 5] = np.nan
    elif bad == "zero":
        psf[1] = 0.0
    else:
        psf = psf[:5]
    with pytest.raises(PSFError):
        deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=psf)


@pytest.mark.parametrize("factor", [0.6, 0.8, 1.3])
def test_psf_aware_prior_takes_seeing_better_than_the_median(lsst, factor):
    """The default prior (v0.3, model frame: a 0.3" Gaussian) deblends a galaxy observed in
    better seeing than the LSST median, which v0.2 must refuse; r and i flux within 5 %."""
    prior = lsst
    fwhm = factor * MEDIAN
    if factor < 1:
        with pytest.raises(PSFError, match="narrower than the prior's model-frame PSF"):
            deblend(
                np.zeros((6, 61, 61)),
                np.ones((6, 61, 61)),
                [[30.0, 30.0]],
                prior=GalaxyPrior.load("lsst-v0.2"),
                psf=fwhm,
            )
    noisy, variance, flux = _galaxy_field(fwhm, seed=int(100 * factor))
    psf = psf_images(fwhm, pixel_scale=SURVEY.pixel_scale, size=61)
    result = deblend(noisy, variance, [[30.0, 30.0]], prior=prior, psf=psf)
    assert abs(result.catalog["flux_r"][0] / flux[2] - 1) < 0.05
    assert abs(result.catalog["flux_i"][0] / flux[3] - 1) < 0.05


def test_laplace_errors_of_a_psf_aware_prior_need_the_fit_kernels(lsst):
    from madness_ppl.uncertainty import laplace_flux_errors

    fwhm = 1.6 * MEDIAN
    noisy, variance, _ = _galaxy_field(fwhm, seed=5)
    psf = psf_images(fwhm, pixel_scale=SURVEY.pixel_scale, size=75)
    result = deblend(noisy, variance, [[30.0, 30.0]], prior=lsst, psf=psf)
    z = np.asarray(result.fit.params["z"])[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MadnessInputWarning)
        right = laplace_flux_errors(lsst, z, [[30.0, 30.0]], variance, psf=result.psf)
    with pytest.warns(MadnessInputWarning, match="PSF-aware but no psf= was given"):
        frame = laplace_flux_errors(lsst, z, [[30.0, 30.0]], variance)
    # the model frame's Jacobian is not the observed one: the widths differ
    assert not np.allclose(right.flux_err, frame.flux_err, rtol=0.05)
