"""A constant sky level per band fitted with the galaxies: exact on the linear toy, recovered
by ``deblend(fit_sky=True)``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.cutouts import paste_stamps
from madness_ppl.deblend import deblend
from madness_ppl.errors import MadnessInputWarning
from madness_ppl.infer import fit_map
from madness_ppl.scene import blend_model, place_stamps
from madness_ppl.toy import LinearGaussianPrior


def test_blend_model_sky_map_equals_the_closed_form_posterior_mean():
    """With a linear decoder the model is linear-Gaussian in (z, sky): its MAP solves
    (I_tau + A^T A / s2) theta = A^T (y - m0) / s2, with A = [dm/dz, one column per band]."""
    bands, size, dim = 2, 11, 3
    prior = LinearGaussianPrior.random(
        jax.random.key(0), n_bands=bands, stamp_size=size, latent_dim=dim
    )
    positions = jnp.array([[8.0, 9.0], [14.0, 12.0]])
    z_true = jax.random.normal(jax.random.key(1), (2, dim))
    shape = (bands, 24, 24)
    clean = place_stamps(prior.decode(z_true), positions, shape[-2:], subpixel=False)
    sky_true = jnp.array([4.0, -2.5])
    s2, tau = 9.0, jnp.array([3.0, 5.0])
    noise = 3.0 * jax.random.normal(jax.random.key(2), shape)
    field = clean + sky_true[:, None, None] + noise
    variance = jnp.full(shape, s2)

    def image(theta):
        z, sky = theta[: 2 * dim].reshape(2, dim), theta[2 * dim :]
        stamps = prior.decode(z)
        placed = place_stamps(stamps, positions, shape[-2:], subpixel=False)
        return (placed + sky[:, None, None]).reshape(-1)

    zero = jnp.zeros(2 * dim + bands)
    a = jax.jacfwd(image)(zero)
    m0 = image(zero)
    prior_precision = jnp.diag(jnp.concatenate([jnp.ones(2 * dim), 1.0 / tau**2]))
    precision = prior_precision + a.T @ a / s2
    exact = jnp.linalg.solve(precision, a.T @ (field.reshape(-1) - m0) / s2)

    fit = fit_map(
        blend_model,
        field,
        positions,
        variance,
        prior,
        sky_scale=tau,
        method="lbfgs",
        tol=1e-7,
        max_steps=2000,
    )
    assert bool(fit.converged)
    np.testing.assert_allclose(fit.params["z"].reshape(-1), exact[: 2 * dim], atol=2e-3)
    np.testing.assert_allclose(fit.params["sky"], exact[2 * dim :], atol=2e-3)
    # the model image includes the sky, so the fit's residual is the data's
    np.testing.assert_allclose(
        fit.model_image, image(exact).reshape(shape), atol=1e-2 * float(jnp.abs(field).max())
    )


def test_deblend_fits_a_leftover_sky_that_the_galaxies_would_absorb(tiny_prior):
    rng = np.random.default_rng(0)
    z = np.asarray(tiny_prior.latent_distribution().sample(jax.random.PRNGKey(3), (3,)))
    positions = np.array([[12.0, 14.0], [30.0, 20.0], [20.0, 34.0]])
    truth = paste_stamps(np.asarray(tiny_prior.decode(z)), positions, (3, 48, 48))
    offset = np.array([0.5, -0.3, 0.2])  # in units of the pixel noise (1)
    field = truth + rng.normal(0.0, 1.0, truth.shape) + offset[:, None, None]
    variance = np.ones_like(field)
    with pytest.warns(MadnessInputWarning, match="the background is not zero"):
        plain = deblend(field, variance, positions, prior=tiny_prior)
    with warnings.catch_warnings():  # a fitted sky is no reason to warn about the background
        warnings.filterwarnings("error", "the field: the background", MadnessInputWarning)
        sky = deblend(field, variance, positions, prior=tiny_prior, fit_sky=True)
    assert plain.sky is None and "SKY_r" not in plain.catalog.meta
    # the sky is measured to sigma / sqrt(48 * 48) ~ 0.02 (galaxy wings share it)
    np.testing.assert_allclose(sky.sky, offset, atol=0.08)
    assert [sky.catalog.meta[f"SKY_{b}"] for b in tiny_prior.bands] == sky.sky.tolist()
    # the residual is the data without sky and galaxies: white noise
    chi2 = {name: float(np.mean(r.residual**2)) for name, r in (("plain", plain), ("sky", sky))}
    assert abs(chi2["sky"] - 1.0) < 0.05 < chi2["plain"] - 1.0, chi2
    assert np.asarray(sky.catalog["converged"]).all()
    assert np.isfinite(np.asarray(sky.catalog["flux_r_err"])).all()


def test_fitted_scene_is_the_model_deblend_fitted():
    """Refitting ``blend_model`` from ``fitted_scene`` (same PSF kernels, same data, the sky as
    a site) barely moves: ``deblend`` already stopped at this model's optimum. Without the
    PSF kernels the same refit moves the fluxes by many errors."""
    from madness_ppl.deblend import fitted_scene
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    prior = GalaxyPrior.load("lsst")
    config = BlendConfig(field_size=48, n_galaxies=(2, 2), margin=14)
    blend = make_blend(Survey.lsst(), config=config, rng=np.random.default_rng(5))
    sky_true = 0.3 * np.sqrt(np.median(blend.variance, axis=(1, 2)))
    field = blend.field + sky_true[:, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MadnessInputWarning)  # the survey's default PSF
        result = deblend(field, blend.variance, blend.positions, prior=prior, fit_sky=True)
    scene = fitted_scene(result, prior, model_error=0.0)
    assert scene.kwargs["psf"] is result.psf and result.psf is not None
    np.testing.assert_array_equal(scene.init["sky"], result.sky)
    flux = np.stack([result.catalog[f"flux_{b}"] for b in prior.bands], axis=1)
    err = np.stack([result.catalog[f"flux_{b}_err"] for b in prior.bands], axis=1)

    def refit_shift(kwargs, max_steps):
        fit = fit_map(
            blend_model, *scene.args, **kwargs, init=scene.init, tol=1e-5, max_steps=max_steps
        )
        moved = np.asarray(fit.deterministics["flux"]) - flux
        return float(np.max(np.abs(moved) / err))

    # measured: 0.12 errors (deblend stops at its own tolerance) vs 5.1 without the kernels
    # (after 60 steps)
    same = refit_shift(scene.kwargs, 1000)
    no_psf = refit_shift({**scene.kwargs, "psf": None}, 60)
    assert same < 0.3 and no_psf > 3.0, (same, no_psf)
