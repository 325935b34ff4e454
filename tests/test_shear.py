"""The shear derivative of an image, and shear responses differentiated through the MAP."""

from __future__ import annotations

import warnings

import galsim
import jax
import numpy as np
import pytest

from madness_ppl.cutouts import paste_stamps
from madness_ppl.refine import newton_refine
from madness_ppl.shear import (
    _band_weights,
    _padded,
    _shape_and_jacobian,
    observed_psf,
    ownership_centres,
    shear_derivative,
    shear_response,
)
from madness_ppl.toy import LinearGaussianPrior

SCALE = 0.2  # arcsec per pixel


def _draw(profile: galsim.GSObject, size: int, offset=(0.0, 0.0)) -> np.ndarray:
    image = profile.drawImage(nx=size, ny=size, scale=SCALE, offset=offset)
    return image.array.astype(np.float64)


def test_derivative_matches_galsim_finite_difference():
    """D_k I equals galsim's (I(+h) - I(-h)) / 2h for a galaxy sheared before an anisotropic
    PSF, off-centre and sheared about its own centre (the PSF term matters: without it the
    derivative would also shear the PSF)."""
    galaxy = galsim.Exponential(half_light_radius=0.6, flux=1e4).shear(e1=0.2, e2=-0.1)
    psf = galsim.Moffat(beta=3.5, fwhm=0.7).shear(g1=0.06, g2=0.03)
    size, offset, h = 49, (3.0, -2.0), 1e-3
    image = _draw(galsim.Convolve(galaxy, psf), size, offset)[None]
    psf_image = _draw(psf, 25)[None]
    centre = (size - 1) / 2 + np.array(offset)  # (x, y) of the galaxy's centre
    centres = np.broadcast_to(centre[:, None, None], (2, size, size))
    derivative = shear_derivative(image, psf_image, centres)
    for k, (g1, g2) in enumerate(((h, 0.0), (0.0, h))):
        plus = _draw(galsim.Convolve(galaxy.shear(g1=g1, g2=g2), psf), size, offset)
        minus = _draw(galsim.Convolve(galaxy.shear(g1=-g1, g2=-g2), psf), size, offset)
        expected = (plus - minus) / (2 * h)
        error = np.abs(derivative[k, 0] - expected).max() / np.abs(expected).max()
        assert error < 0.01, (k, error)
    # the same derivative without the PSF term shears the PSF too: measurably wrong
    naive = shear_derivative(image, None, centres)[0, 0]
    assert np.abs(naive - derivative[0, 0]).max() > 0.05 * np.abs(derivative[0, 0]).max()


def test_response_input_checks():
    from madness_ppl.errors import MadnessInputError

    prior = LinearGaussianPrior.random(jax.random.key(1), n_bands=1, stamp_size=11, latent_dim=3)
    field = np.ones((1, 20, 20))
    with pytest.raises(MadnessInputError, match="positions"):
        shear_response(prior, np.zeros((2, 3)), [[5.0, 5.0]], field, field)
    with pytest.raises(MadnessInputError, match="variance of its shape"):
        shear_response(prior, np.zeros((1, 3)), [[5.0, 5.0]], field, np.ones((1, 20, 21)))


def test_derivative_input_checks():
    with pytest.raises(ValueError, match="bands"):
        shear_derivative(np.zeros((2, 9, 9)), np.ones((1, 3, 3)) / 9)
    with pytest.raises(ValueError, match=r"\(bands, H, W\)"):
        shear_derivative(np.zeros((9, 9)), None)


def test_ownership_follows_the_brighter_source():
    stamps = np.zeros((2, 1, 5, 5))
    stamps[0, 0, 2, 2], stamps[1, 0, 2, 2] = 10.0, 1.0
    centres = ownership_centres(stamps, [[3.0, 3.0], [5.0, 3.0]], (7, 9))
    np.testing.assert_allclose(centres[:, 3, 3], [3.0, 3.0], atol=1e-3)  # source 0's light
    np.testing.assert_allclose(centres[:, 3, 5], [5.0, 3.0], atol=1e-2)  # source 1's
    assert 3.0 < centres[0, 3, 4] < 5.0  # both floors: between the two centres
    assert centres[:, 0, 8].tolist() == [8.0, 0.0]  # no stamp covers it: its own centre


def test_response_equals_finite_differences_through_the_linear_map():
    """A linear decoder with a Gaussian prior has a MAP linear in the data, so the response
    (noise correction off) is exactly (e(z*(I + eps D I)) - e(z*(I - eps D I))) / 2 eps."""
    prior = LinearGaussianPrior.random(jax.random.key(3), n_bands=2, stamp_size=15, latent_dim=6)
    positions = np.array([[12.0, 13.0], [18.0, 15.0]])  # overlapping stamps
    truth = np.asarray(jax.random.normal(jax.random.key(4), (2, 6)), np.float64)
    stamps = np.asarray(prior.decode(truth), np.float64)
    field = paste_stamps(stamps, positions, (2, 30, 32))
    variance = np.full(field.shape, 0.05 * field.std() ** 2)
    field = field + np.sqrt(variance) * np.random.default_rng(0).standard_normal(field.shape)
    fit = newton_refine(prior, np.zeros((2, 6)), positions, field, variance, max_steps=3)
    out = shear_response(
        prior, fit.z, positions, field, variance, pixel_scale=SCALE, noise_correction=False
    )
    derivative = shear_derivative(
        field, observed_psf(prior, None), ownership_centres(fit.observed, positions, (30, 32))
    )
    band_weights = _band_weights(prior, ("r", "i", "z"))
    width = 1.2 / SCALE / 2.3548

    def shape_at(data):
        z = newton_refine(prior, fit.z, positions, data, variance, max_steps=3).z
        latents, offsets = _padded(np.asarray(z, np.float64)), _padded(np.zeros((2, 2)))
        e, _ = _shape_and_jacobian(prior, latents, band_weights, width, offsets)
        return np.asarray(e, np.float64)[:2]

    eps = 1e-2
    expected = np.stack(
        [
            (shape_at(field + eps * derivative[k]) - shape_at(field - eps * derivative[k]))
            / (2 * eps)
            for k in range(2)
        ],
        axis=-1,
    )
    assert np.abs(expected).max() > 0.1  # a response worth checking
    np.testing.assert_allclose(out.R, expected, atol=2e-3 * np.abs(expected).max())


def test_known_shear_of_isolated_noiseless_galaxies_is_recovered():
    """galsim shears isolated noiseless galaxies by g = +-0.02 before the PSF; the deblended
    models' ellipticities, calibrated by the response, give back g within 5 % for each galaxy,
    while the raw ellipticities fall short by more than 20 % (the MAP's and the estimator's
    response): a missing or wrong response fails."""
    from madness_ppl import GalaxyPrior
    from madness_ppl.deblend import deblend
    from madness_ppl.psf import field_kernel
    from madness_ppl.simulate import BlendConfig, make_blend, make_catalog
    from madness_ppl.survey import Survey

    prior = GalaxyPrior.load("lsst")
    survey = Survey.lsst()
    catalog = make_catalog(8, survey, rng=np.random.default_rng(3))[[4, 5]]  # i 22.3, 24.2
    g, config, centre = 0.02, BlendConfig(field_size=45), np.array([[22.0, 22.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the survey's default PSF, as the simulation's
        kernel = field_kernel(prior, None)
    worst_raw = 0.0
    for row in range(len(catalog)):
        shapes, responses = [], []
        for sign in (1, -1):
            blend = make_blend(
                survey,
                rng=np.random.default_rng(0),
                config=config,
                catalog=catalog[row : row + 1],
                positions=centre,
                shear=(sign * g, sign * g),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = deblend(
                    blend.noiseless, blend.variance, centre, prior=prior, psf=None, errors=False
                )
            out = shear_response(
                prior,
                np.asarray(fit.fit.params["z"][:1]),
                centre,
                blend.noiseless,
                blend.variance,
                psf=kernel,
                noise_correction=False,
            )
            shapes.append(out.e[0])
            responses.append(out.R[0])
        half_difference = (shapes[0] - shapes[1]) / 2
        calibrated = np.linalg.solve((responses[0] + responses[1]) / 2, half_difference)
        np.testing.assert_allclose(calibrated, [g, g], rtol=0.05)
        worst_raw = max(worst_raw, np.abs(half_difference / g - 1).max())
    assert worst_raw > 0.2


def test_empty_field_and_noise_correction_are_reproducible():
    prior = LinearGaussianPrior.random(jax.random.key(1), n_bands=1, stamp_size=11, latent_dim=3)
    empty = shear_response(
        prior, np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((1, 20, 20)), np.ones((1, 20, 20))
    )
    assert empty.e.shape == (0, 2) and empty.R.shape == (0, 2, 2)
    positions = np.array([[10.0, 10.0]])
    field = paste_stamps(np.asarray(prior.decode(np.ones((1, 3)))), positions, (1, 21, 21))
    args = (prior, np.ones((1, 3)), positions, field, np.full(field.shape, 0.01))
    first = shear_response(*args, pixel_scale=SCALE, seed=5)
    again = shear_response(*args, pixel_scale=SCALE, seed=5)
    other = shear_response(*args, pixel_scale=SCALE, seed=6)
    np.testing.assert_array_equal(first.R, again.R)
    assert np.isfinite(first.R).all() and not np.allclose(first.e, other.e)


def test_deblend_adds_the_response_columns(tiny_prior):
    """``deblend(shear_response=True)``: the catalog's e and R are those of
    :func:`shear_response` at the deblended MAP with seed ``(shear_seed, 0)``."""
    from madness_ppl.deblend import deblend

    rng = np.random.default_rng(2)
    positions = np.array([[12.0, 14.0], [19.0, 15.0]])
    truth = np.asarray(tiny_prior.decode(np.zeros((2, 4), np.float32)), np.float64)
    field = paste_stamps(truth, positions, (3, 30, 30))
    variance = np.full(field.shape, max(1e-4, 0.01 * field.max()) ** 2)
    field = (field + np.sqrt(variance) * rng.standard_normal(field.shape)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = deblend(
            field,
            variance,
            positions,
            prior=tiny_prior,
            psf=None,
            errors=False,
            shear_response=True,
            shear_seed=7,
        )
        plain = deblend(field, variance, positions, prior=tiny_prior, psf=None, errors=False)
    assert {"e1", "e2", "R11", "R12", "R21", "R22"} <= set(result.catalog.colnames)
    assert "e1" not in plain.catalog.colnames and "shear" in result.timings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from madness_ppl.psf import field_kernel

        kernel = field_kernel(tiny_prior, None)
    direct = shear_response(
        tiny_prior,
        result.fit.params["z"][:2],
        positions,
        field,
        variance,
        psf=kernel,
        seed=(7, 0),
    )
    np.testing.assert_allclose(result.catalog["R11"], direct.R[:, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(result.catalog["e2"], direct.e[:, 1], rtol=1e-5, atol=1e-7)
