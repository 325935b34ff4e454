"""The Gaussian likelihood, its model error, weights and chi² against hand computations."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy.stats import norm

from madness_ppl.errors import MadnessInputError
from madness_ppl.likelihood import (
    chi2_map,
    gaussian_likelihood,
    inverse_variance,
    model_error_fraction,
    normal_chi2,
    total_variance,
)
from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.toy import LinearGaussianPrior

B, H, W = 2, 6, 7


def _data(seed=0):
    """A field, model and variance with a masked pixel, a NaN pixel and a zero variance."""
    rng = np.random.default_rng(seed)
    model = rng.uniform(1.0, 50.0, (B, H, W))
    variance = rng.uniform(1.0, 4.0, (B, H, W))
    field = model + np.sqrt(variance) * rng.normal(size=(B, H, W))
    field[0, 1, 2] = np.nan
    variance[1, 3, 4] = 0.0
    variance[1, 0, 0] = np.inf
    mask = np.ones((B, H, W), bool)
    mask[0, 5, 6] = False
    return field, model, variance, mask


def _logp(site):
    return float(site["fn"].log_prob(site["value"]))


def test_inverse_variance_is_zero_exactly_where_masked_or_unusable():
    field, model, variance, mask = _data()
    usable = mask & np.isfinite(field)
    eps = np.array([0.1, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division or invalid-value warning
        plain = inverse_variance(variance, usable)
        with_error = inverse_variance(variance, usable, model=model, model_error=eps)
    good = usable & np.isfinite(variance) & (variance > 0)
    with np.errstate(divide="ignore"):
        expectations = (1.0 / variance, 1.0 / (variance + (eps[:, None, None] * model) ** 2))
    for weight, expected in zip((plain, with_error), expectations, strict=True):
        assert np.all(np.isfinite(weight))
        assert np.all(weight[~good] == 0.0)
        assert good.sum() == B * H * W - 4
        np.testing.assert_allclose(weight[good], expected[good], rtol=1e-12)
    # a 2-D mask is shared by the bands; jax.numpy gives the same weights
    np.testing.assert_array_equal(
        inverse_variance(variance, mask[0]), inverse_variance(variance, mask[:1])
    )
    np.testing.assert_allclose(
        np.asarray(inverse_variance(jnp.asarray(variance), jnp.asarray(usable), xp=jnp)),
        plain.astype(np.float32),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="model"):
        inverse_variance(variance, model_error=0.1)


@pytest.mark.parametrize("eps", [0.0, 0.2, [0.05, 0.3]])
def test_gaussian_likelihood_is_the_normal_log_pdf_over_unmasked_pixels(eps):
    field, model, variance, mask = _data(1)
    usable = mask & np.isfinite(field) & np.isfinite(variance) & (variance > 0)
    site = handlers.trace(
        lambda: gaussian_likelihood(
            "obs", model, field, variance, pixel_mask=usable, model_error=eps
        )
    ).get_trace()["obs"]
    sd = np.sqrt(variance + (np.reshape(eps, (-1, 1, 1)) * model) ** 2)
    expected = norm.logpdf(field[usable], model[usable], sd[usable]).sum()
    np.testing.assert_allclose(_logp(site), expected, rtol=1e-5)
    assert np.all(np.asarray(site["value"])[~usable] == 0.0)


def test_gaussian_likelihood_without_mask_and_its_gradient_with_a_model_error():
    field, model, variance, _ = _data(2)
    field, variance = np.nan_to_num(field), np.full_like(variance, 2.0)

    def logp(m):
        trace = handlers.trace(
            lambda: gaussian_likelihood("obs", m, field, variance, model_error=0.1)
        ).get_trace()
        return trace["obs"]["fn"].log_prob(trace["obs"]["value"])

    value, grad = jax.value_and_grad(logp)(jnp.asarray(model))

    def hand(m):
        return jax.scipy.stats.norm.logpdf(field, m, jnp.sqrt(variance + (0.1 * m) ** 2))

    np.testing.assert_allclose(float(value), float(hand(model).sum()), rtol=1e-5)
    expected_grad = jax.grad(lambda m: hand(m).sum())(jnp.asarray(model))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([0.1, 0.2, 0.3], "one value per band"),
        (np.zeros((2, 2)), "one value per band"),
        (-0.1, "finite and >= 0"),
        ([0.1, -0.2], "finite and >= 0"),
        (np.nan, "finite and >= 0"),
        ([0.1, np.inf], "finite and >= 0"),
    ],
)
def test_model_error_fraction_rejects_bad_values(bad, match):
    with pytest.raises(MadnessInputError, match=match):
        model_error_fraction(bad, 2)


def test_model_error_fraction_shapes_and_tracers():
    assert model_error_fraction(0.1, 3).shape == ()
    per_band = model_error_fraction([0.1, 0.2, 0.0], 3)
    assert per_band.shape == (3, 1, 1)
    np.testing.assert_array_equal(model_error_fraction(per_band, 3), per_band)  # idempotent
    # a tracer is not checked (jit/vmap over the fraction), only shaped
    traced = jax.jit(lambda e: model_error_fraction(e, 2))(jnp.array([-1.0, 0.5]))
    assert traced.shape == (2, 1, 1)
    # the Python 0 leaves the variance itself untouched; a zero array adds exactly 0
    variance = np.ones((2, 1, 1))
    assert total_variance(variance, np.ones((2, 1, 1)), 0) is variance
    np.testing.assert_array_equal(total_variance(variance, 5.0 * variance, [0.0, 0.0]), variance)


def test_chi2_map_against_a_hand_computation():
    field, model, variance, mask = _data(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chi2 = chi2_map(field, model, variance, mask)
        with_error = chi2_map(field, model, variance, mask, model_error=0.2)
    good = mask & np.isfinite(field) & np.isfinite(variance) & (variance > 0)
    assert np.all(chi2[~good] == 0.0) and np.all(with_error[~good] == 0.0)
    r2, v, m = (field[good] - model[good]) ** 2, variance[good], model[good]
    np.testing.assert_allclose(chi2[good], r2 / v, rtol=1e-12)
    np.testing.assert_allclose(with_error[good], r2 / (v + (0.2 * m) ** 2), rtol=1e-12)
    # the pipeline's catalog form: a residual with NaN where masked, against a zero model,
    # gives the old residual² / variance bit for bit (float32 kept)
    residual = np.where(good, field - model, np.nan).astype(np.float32)
    v32 = np.where(good, variance, 1.0).astype(np.float32)
    old = np.where(np.isfinite(residual), residual**2 / v32, 0.0)
    new = chi2_map(residual, 0.0, v32)
    assert new.dtype == old.dtype == np.float32
    np.testing.assert_array_equal(new, old)


def test_normal_chi2_sums_unmasked_standardised_residuals():
    value = jnp.array([[1.0, 4.0], [2.0, 10.0]])
    mask = jnp.array([[True, True], [True, False]])
    expected = ((1 - 0.5) / 2) ** 2 + ((4 - 0.5) / 2) ** 2 + ((2 - 0.5) / 2) ** 2
    assert float(normal_chi2(value, 0.5, 2.0, mask)) == pytest.approx(expected, rel=1e-6)


def test_blend_model_with_model_error_and_mask_is_the_hand_computed_log_density():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=9, latent_dim=3)
    positions = jnp.array([[10.0, 12.0], [16.0, 14.0]])
    z = jax.random.normal(jax.random.key(1), (2, 3))
    image = place_stamps(prior.decode(z), positions, (24, 24), subpixel=False)
    variance = default_variance(image, 50.0)
    rng = np.random.default_rng(4)
    field = np.asarray(image + jnp.sqrt(variance) * rng.normal(size=image.shape))
    mask = np.ones((24, 24), bool)
    mask[11:14, 9:12] = False  # over a source, shared by the bands
    eps = np.array([0.05, 0.25])
    args = (jnp.asarray(field), positions, variance, prior)
    kwargs = {"pixel_mask": jnp.asarray(mask), "model_error": eps}
    lp, trace = log_density(blend_model, args, kwargs, {"z": z})
    m = np.asarray(trace["model_image"]["value"], np.float64)
    sd = np.sqrt(np.asarray(variance, np.float64) + (eps[:, None, None] * m) ** 2)
    keep = np.broadcast_to(mask, field.shape)
    expected = norm.logpdf(field, m, sd)[keep].sum() + float(prior.log_prob(z).sum())
    np.testing.assert_allclose(float(lp), expected, rtol=1e-5)
    # and the model error matters: the plain likelihood differs
    plain, _ = log_density(blend_model, args, {"pixel_mask": jnp.asarray(mask)}, {"z": z})
    assert abs(float(plain) - float(lp)) > 1.0
