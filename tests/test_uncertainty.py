"""Laplace flux errors against the closed-form posterior of the linear-Gaussian toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior
from madness_ppl.uncertainty import (
    calibrate_error_fraction,
    calibrate_model_error,
    flux_error_budget,
    laplace_flux_errors,
    neighbour_light,
    systematic_flux_errors,
)

POSITIONS = np.array([[12.0, 14.0], [17.0, 16.0], [14.0, 20.0]])  # overlapping, whole pixels


def _blend(seed=0):
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=15, latent_dim=4)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, 4))
    image = place_stamps(prior.decode(jnp.asarray(z)), POSITIONS, (32, 32), subpixel=False)
    variance = default_variance(image, 100.0)
    field = image + jnp.sqrt(variance) * rng.normal(size=image.shape)
    return prior, field, variance


def test_laplace_errors_equal_the_closed_form_posterior_sd():
    with jax.enable_x64(True):
        prior, field, variance = _blend()
        positions = jnp.asarray(POSITIONS)
        post = linear_gaussian_posterior(field, positions, variance, prior)
        out = laplace_flux_errors(prior, post.mean, POSITIONS, variance)
        # exact flux posterior: F_ib = sum_p (W z_i + b)_b, linear in z_i
        weight = np.asarray(prior.weight).reshape(2, 15 * 15, 4).sum(axis=1)  # (B, d)
        for i in range(3):
            block = np.asarray(post.covariance)[i * 4 : (i + 1) * 4, i * 4 : (i + 1) * 4]
            exact = np.sqrt(np.einsum("bd,de,be->b", weight, block, weight))
            np.testing.assert_allclose(out.flux_err[i], exact, rtol=1e-8)
        np.testing.assert_allclose(out.covariance, post.covariance, rtol=1e-8, atol=1e-12)
        # ignoring the overlaps would be wrong: the blend widens the errors
        alone = [
            laplace_flux_errors(prior, post.mean[i : i + 1], POSITIONS[i : i + 1], variance)
            for i in range(3)
        ]
        assert all(np.all(out.flux_err[i] > a.flux_err[0]) for i, a in enumerate(alone))


def test_model_error_widens_errors_and_masked_pixels_carry_no_information():
    with jax.enable_x64(True):
        prior, field, variance = _blend(1)
        post = linear_gaussian_posterior(field, jnp.asarray(POSITIONS), variance, prior)
        plain = laplace_flux_errors(prior, post.mean, POSITIONS, variance)
        wider = laplace_flux_errors(prior, post.mean, POSITIONS, variance, model_error=0.2)
        assert np.all(wider.flux_err >= plain.flux_err) and np.any(wider.flux_err > plain.flux_err)
        blind = laplace_flux_errors(
            prior, post.mean, POSITIONS, variance, pixel_mask=np.zeros((32, 32), bool)
        )
        weight = np.asarray(prior.weight).reshape(2, 15 * 15, 4).sum(axis=1)
        prior_sd = np.sqrt((weight**2).sum(axis=1))  # posterior = prior N(0, I)
        np.testing.assert_allclose(blind.flux_err, np.broadcast_to(prior_sd, (3, 2)), rtol=1e-6)
        with pytest.raises(ValueError, match="model_error"):
            laplace_flux_errors(prior, post.mean, POSITIONS, variance, model_error=-1.0)


def test_zero_model_error_is_the_plain_likelihood_exactly():
    prior, field, variance = _blend()
    args = (field, jnp.asarray(POSITIONS, field.dtype), variance, prior)
    z = {"z": jnp.ones((3, 4))}
    plain, _ = log_density(blend_model, args, {}, z)
    zero, _ = log_density(blend_model, args, {"model_error": 0.0}, z)
    assert float(zero) == float(plain)
    with_error, trace = log_density(blend_model, args, {"model_error": 0.1}, z)
    image = trace["model_image"]["value"]
    expected = (
        jax.scipy.stats.norm.logpdf(field, image, jnp.sqrt(variance + (0.1 * image) ** 2)).sum()
        + prior.log_prob(z["z"]).sum()
    )
    np.testing.assert_allclose(float(with_error), float(expected), rtol=1e-5)
    # one fraction per band (the prior's calibrated pixel_fraction): zeros are exact too, and
    # equal fractions give the scalar's likelihood
    n_bands = field.shape[0]
    zeros, _ = log_density(blend_model, args, {"model_error": np.zeros(n_bands)}, z)
    assert float(zeros) == float(plain)
    per_band, _ = log_density(blend_model, args, {"model_error": np.full(n_bands, 0.1)}, z)
    np.testing.assert_allclose(float(per_band), float(with_error), rtol=1e-6)
    fractions = np.linspace(0.05, 0.2, n_bands)
    mixed, _ = log_density(blend_model, args, {"model_error": fractions}, z)
    sd = jnp.sqrt(variance + (fractions[:, None, None] * image) ** 2)
    expected = jax.scipy.stats.norm.logpdf(field, image, sd).sum() + prior.log_prob(z["z"]).sum()
    np.testing.assert_allclose(float(mixed), float(expected), rtol=1e-5)
    for bad, match in (
        (np.full(n_bands + 1, 0.1), "one value per band"),
        (-0.1, ">= 0"),
        (np.full(n_bands, np.nan), ">= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            log_density(blend_model, args, {"model_error": bad}, z)


def test_calibrated_model_error_restores_unit_chi2():
    rng = np.random.default_rng(3)
    model = rng.uniform(10.0, 1000.0, size=(50, 2, 9, 9))
    variance = np.full_like(model, 25.0)
    residual = rng.normal(size=model.shape) * np.sqrt(variance + (0.07 * model) ** 2)
    eps = calibrate_model_error(residual, model, variance)
    assert abs(eps - 0.07) < 0.005
    noise_only = rng.normal(size=model.shape) * np.sqrt(variance)
    assert calibrate_model_error(noise_only * 0.9, model, variance) == 0.0


def test_neighbour_light_counts_the_shared_light_by_model_share():
    rng = np.random.default_rng(4)
    stamps = rng.uniform(1.0, 2.0, size=(3, 2, 5, 5))
    # source 0 overlaps source 1 (two columns shared); source 2 is alone; source 1's last
    # column falls off the field
    positions = np.array([[4.0, 4.0], [7.0, 4.0], [4.0, 14.0]])
    light = neighbour_light(stamps, positions, (2, 20, 9))
    a, b = stamps[0][:, :, 3:], stamps[1][:, :, :2]  # the shared columns x = 5, 6
    expected = (a / (a + b) * b).sum(axis=(-2, -1))
    np.testing.assert_allclose(light[0], expected)
    np.testing.assert_allclose(light[1], (b / (a + b) * a).sum(axis=(-2, -1)))
    np.testing.assert_array_equal(light[2], 0.0)
    assert neighbour_light(stamps[:0], positions[:0], (2, 20, 9)).shape == (0, 2)
    # half-pixel positions round as the fit does (floor(p + 0.5)): 6.5 -> 7
    half_pixel = positions - np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(neighbour_light(stamps, half_pixel, (2, 20, 9)), light)


def test_flux_error_budget_adds_the_systematic_terms_in_quadrature():
    sd = np.array([[3.0, 4.0]])
    flux = np.array([[100.0, 200.0]])
    light = np.array([[0.0, 50.0]])
    np.testing.assert_array_equal(flux_error_budget(sd, flux, light), sd)  # both terms off
    total = flux_error_budget(sd, flux, light, flux_fraction=[0.04, 0.0], blend_fraction=0.1)
    np.testing.assert_allclose(total, [[5.0, np.hypot(4.0, 5.0)]])
    with pytest.raises(ValueError, match=">= 0"):
        flux_error_budget(sd, flux, light, blend_fraction=-0.1)
    # each source's own terms: gamma * eps_hat * F and eta * e * F (NaN misfit reads as 0)
    own = flux_error_budget(
        sd,
        flux,
        light,
        misfit=[[0.1, np.nan]],
        misfit_fraction=0.3,
        edge=[0.002],
        edge_fraction=20.0,
    )
    np.testing.assert_allclose(own, np.sqrt(sd**2 + [[9.0 + 16.0, 0.0 + 64.0]]))
    with pytest.raises(ValueError, match="misfit_fraction"):
        flux_error_budget(sd, flux, light, misfit=[[0.1, 0.1]], misfit_fraction=-1.0)


def test_interval_halfwidth_is_one_at_one_sigma_and_widens_with_heavier_tails():
    from scipy.stats import t

    from madness_ppl.uncertainty import interval_halfwidth

    assert interval_halfwidth(0.6827) == pytest.approx(1.0, abs=1e-3)
    for dof in (2.0, 5.0, 30.0):
        assert interval_halfwidth(0.6826894921370859, dof) == pytest.approx(1.0)
        h = interval_halfwidth(0.9, dof)
        # the scaled Student-t puts exactly 90 % inside +- h
        scale = 1.0 / t.ppf(0.5 * (1 + 0.6826894921370859), dof)
        assert t.cdf(h / scale, dof) - t.cdf(-h / scale, dof) == pytest.approx(0.9)
    assert interval_halfwidth(0.9, 2.0) > interval_halfwidth(0.9, 5.0) > interval_halfwidth(0.9)
    with pytest.raises(ValueError, match="level"):
        interval_halfwidth(1.0)


def test_systematic_flux_errors_use_the_priors_calibration():
    from types import SimpleNamespace

    rng = np.random.default_rng(5)
    stamps = rng.uniform(1.0, 2.0, size=(2, 2, 5, 5))
    positions, shape = np.array([[4.0, 4.0], [6.0, 4.0]]), (2, 12, 12)
    calibration = {"flux_fraction": [0.1, 0.2], "blend_fraction": 0.5}
    prior = SimpleNamespace(config=SimpleNamespace(metadata={"model_error": calibration}))
    expected = flux_error_budget(
        np.zeros((2, 2)),
        stamps.sum(axis=(-2, -1)),
        neighbour_light(stamps, positions, shape),
        flux_fraction=[0.1, 0.2],
        blend_fraction=0.5,
    )
    np.testing.assert_allclose(systematic_flux_errors(prior, stamps, positions, shape), expected)
    uncalibrated = SimpleNamespace(config=SimpleNamespace(metadata={}))
    assert np.all(systematic_flux_errors(uncalibrated, stamps, positions, shape) == 0)


def test_calibrated_error_fraction_recovers_a_known_fraction():
    rng = np.random.default_rng(6)
    sd = rng.uniform(1.0, 3.0, 20000)
    scale = rng.uniform(10.0, 100.0, 20000)
    error = rng.normal(size=sd.shape) * np.sqrt(sd**2 + (0.05 * scale) ** 2)
    assert abs(calibrate_error_fraction(error, sd, scale) - 0.05) < 0.003
    assert abs(calibrate_error_fraction(error, sd, scale, level=0.9) - 0.05) < 0.003
    assert calibrate_error_fraction(0.5 * sd * rng.normal(size=sd.shape), sd, scale) == 0.0
    with pytest.raises(ValueError, match="covers only"):
        calibrate_error_fraction(error, sd, np.zeros_like(scale))
