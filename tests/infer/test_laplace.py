"""The Laplace approximation of any NumPyro model: exact on a linear-Gaussian scene with extra
sites, ordered as NUTS flattens its mass matrix, and refused away from an optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from madness_ppl.errors import MadnessInputError
from madness_ppl.infer import fit_map, laplace_approximation
from madness_ppl.scene import blend_model, place_stamps
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

B, S, H, W, D = 2, 11, 24, 24, 3


def test_laplace_of_the_linear_gaussian_blend_is_its_closed_form_posterior():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=D)
    positions = jnp.array([[9.0, 10.0], [13.0, 12.0]])  # overlapping: correlated latents
    z_true = jax.random.normal(jax.random.key(1), (2, D))
    variance = jnp.full((B, H, W), 4.0)
    truth = place_stamps(prior.decode(z_true), positions, (H, W))
    field = truth + 2.0 * jax.random.normal(jax.random.key(2), truth.shape)
    exact = linear_gaussian_posterior(field, positions, variance, prior)
    args = (blend_model, field, positions, variance, prior)
    laplace = laplace_approximation(*args, params={"z": exact.mean})
    np.testing.assert_allclose(laplace.covariance, exact.covariance, rtol=2e-3, atol=1e-6)
    assert laplace.sites == (("z", (2, D)),)
    np.testing.assert_allclose(
        laplace.sd()["z"], np.sqrt(np.diag(exact.covariance)).reshape(2, D), rtol=1e-3
    )
    # at a fitted MAP too (what a user has)
    fitted = fit_map(*args, tol=1e-6, max_steps=400)
    again = laplace_approximation(*args, params=fitted.params)
    np.testing.assert_allclose(again.covariance, exact.covariance, rtol=5e-3, atol=1e-6)


def test_sites_are_ordered_as_nuts_flattens_them_and_constrained_sites_are_unconstrained():
    """Two sites (one positive): the flat order is by name, and the positive site's block is
    in log space: for sigma ~ LogNormal with a Gaussian likelihood, the log-space curvature."""
    y = jnp.array([0.5, -1.0, 2.0, 0.3])

    def model(y):
        sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    fit = fit_map(model, y, tol=1e-7, max_steps=500)
    laplace = laplace_approximation(model, y, params=fit.params)
    assert [name for name, _ in laplace.sites] == ["mu", "sigma"]
    assert set(laplace.location) == {"mu", "sigma"}
    np.testing.assert_allclose(float(laplace.location["sigma"]), np.log(fit.params["sigma"]))
    # with s = log sigma: d2U/dmu2 = n / sigma^2 + 1/100 and d2U/dmu ds = 2 sum(y - mu) /
    # sigma^2, which is 2 mu / 100 at the MAP of mu (where the likelihood's pull equals the prior's)
    sigma, mu = float(fit.params["sigma"]), float(fit.params["mu"])
    assert laplace.precision[0, 0] == pytest.approx(4 / sigma**2 + 0.01, rel=1e-3)
    assert laplace.precision[0, 1] == pytest.approx(2 * mu / 100, rel=2e-2)


def test_a_point_that_is_not_an_optimum_is_refused():
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 10.0))
        numpyro.factor("two_modes", -((x**2 - 1.0) ** 2))  # modes at +-1, a maximum at 0

    with pytest.raises(MadnessInputError, match="not positive definite"):
        laplace_approximation(model, params={"x": jnp.asarray(0.0)})
    at_mode = laplace_approximation(model, params={"x": jnp.asarray(1.0)})
    assert at_mode.precision[0, 0] == pytest.approx(8.0 + 0.01, rel=1e-4)  # 12x^2 - 4 + 1/100
