"""Tests of the linear-Gaussian toy prior and its closed-form blend posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.scene import place_stamps
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

B, S, D = 2, 11, 3


@pytest.fixture(scope="module")
def prior():
    return LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=D)


def test_interface_and_pytree(prior):
    assert prior.bands == ("b0", "b1") and prior.stamp_size == S and prior.latent_dim == D
    assert prior.decode(jnp.zeros((4, D))).shape == (4, B, S, S)
    assert prior.decode(jnp.zeros(D)).shape == (B, S, S)
    latent = prior.latent_distribution()
    assert latent.event_shape == (D,) and latent.batch_shape == ()
    leaves, treedef = jax.tree_util.tree_flatten(prior)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.bands == prior.bands
    z = jnp.array([0.3, -1.0, 0.5])
    np.testing.assert_allclose(jax.jit(lambda p: p.decode(z))(prior), prior.decode(z), atol=1e-5)
    expected = -0.5 * float(z @ z) - 0.5 * D * np.log(2 * np.pi)
    assert float(prior.log_prob(z)) == pytest.approx(expected, rel=1e-6)


def test_random_basis_is_centred_and_galaxy_like(prior):
    mean = prior.decode(jnp.zeros(D))
    assert np.all(mean >= 0)
    np.testing.assert_allclose(mean[:, S // 2, S // 2], mean.max(axis=(1, 2)))
    np.testing.assert_allclose(mean.sum(), 2 * 1e3, rtol=1e-3)  # default flux 1e3 per band
    # Draws from the prior vary by tens of per cent around the mean profile.
    stamps = prior.decode(jax.random.normal(jax.random.key(5), (200, D)))
    rel = jnp.std(stamps.sum((2, 3)), axis=0) / mean.sum((1, 2))
    assert np.all((rel > 0.05) & (rel < 1.0))


def test_deblend_encode_recovers_isolated_latents(prior):
    z = jax.random.normal(jax.random.key(1), (5, D))
    np.testing.assert_allclose(prior.deblend_encode(prior.decode(z)), z, atol=1e-3)


def test_posterior_of_a_single_galaxy_equals_the_isolated_formula(prior):
    # One source at the centre of a field the size of its stamp, white noise:
    # posterior mean = (W^T W + s2 I)^-1 W^T (y - b) = deblend_encode(noise_variance=s2).
    s2 = 50.0
    y = prior.decode(jnp.array([0.5, -0.2, 1.0])) + 3.0
    post = linear_gaussian_posterior(
        y, jnp.array([[S // 2, S // 2]], float), jnp.full(y.shape, s2), prior
    )
    np.testing.assert_allclose(
        post.mean[0], prior.deblend_encode(y[None], noise_variance=s2)[0], rtol=1e-4
    )
    gram = prior.weight.T @ prior.weight
    np.testing.assert_allclose(post.covariance, jnp.linalg.inv(jnp.eye(D) + gram / s2), atol=1e-6)


def test_posterior_blocks_for_masked_sources_and_pixels(prior):
    positions = jnp.array([[6.0, 7.0], [9.0, 8.0], [3.0, 12.0]])
    z = jax.random.normal(jax.random.key(2), (3, D))
    field = place_stamps(prior.decode(z[:2]), positions[:2], (16, 16), subpixel=False)
    variance = jnp.ones_like(field)
    pixel_mask = jnp.ones(field.shape, bool).at[0, :4].set(False)
    field = jnp.where(pixel_mask, field, jnp.nan)
    post = linear_gaussian_posterior(
        field,
        positions,
        variance,
        prior,
        source_mask=jnp.array([True, True, False]),
        pixel_mask=pixel_mask,
    )
    assert np.all(np.isfinite(post.mean))
    np.testing.assert_allclose(post.mean[2], 0.0, atol=1e-6)
    np.testing.assert_allclose(post.covariance[2 * D :, 2 * D :], jnp.eye(D), atol=1e-6)
    np.testing.assert_allclose(post.covariance, post.covariance.T)
    assert np.all(np.linalg.eigvalsh(np.asarray(post.covariance)) > 0)
    # Noiseless, high signal-to-noise data: the mean is close to the truth.
    np.testing.assert_allclose(post.mean[:2], z[:2], atol=1e-2)
