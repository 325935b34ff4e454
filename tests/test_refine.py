"""Newton refinement of a blend's MAP: exact on the linear-Gaussian toy, stabilising on galsim blends."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.infer import fit_map
from madness_ppl.refine import newton_refine
from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

POSITIONS = np.array([[12.0, 14.0], [15.0, 15.0], [14.0, 18.0]])  # heavily overlapping


def _toy_blend(seed=0):
    prior = LinearGaussianPrior.random(jax.random.key(1), n_bands=2, stamp_size=15, latent_dim=4)
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.normal(size=(3, 4))
    image = place_stamps(
        prior.decode(jnp.asarray(z, jnp.float32)), POSITIONS, (32, 32), subpixel=False
    )
    variance = default_variance(image, 10.0)
    field = image + jnp.sqrt(variance) * rng.normal(size=image.shape)
    return prior, np.asarray(field), np.asarray(variance)


@pytest.mark.parametrize("method", ["gauss-newton", "lbfgs"])
def test_one_newton_step_reaches_the_closed_form_map_where_lbfgs_has_not(method):
    prior, field, variance = _toy_blend()
    exact = np.asarray(linear_gaussian_posterior(field, POSITIONS, variance, prior).mean)
    start = np.zeros((3, 4))
    out = newton_refine(
        prior, start, POSITIONS, field, variance, max_steps=1, tol=0.0, method=method
    )
    assert out.steps == 1
    assert np.abs(out.z - exact).max() < 1e-3 * np.abs(exact).max()  # float32 decoder
    # the same number of model evaluations' worth of L-BFGS (from the same start) is not there
    lbfgs = fit_map(
        blend_model,
        field,
        POSITIONS.astype(np.float32),
        variance,
        prior,
        init={"z": start},
        method="lbfgs",
        max_steps=8,
    )
    assert np.abs(np.asarray(lbfgs.params["z"]) - exact).max() > 30 * np.abs(out.z - exact).max()
    # at the optimum the predicted decrease vanishes and nothing moves
    again = newton_refine(prior, out.z, POSITIONS, field, variance, max_steps=1, method=method)
    assert again.steps == 0 and again.predicted < 1e-2 and again.converged
    assert out.decrease > 0 and out.linearisation[0].shape == (3, 4, 2, 15, 15)


def test_masked_pixels_do_not_enter_the_step():
    prior, field, variance = _toy_blend(2)
    mask = np.ones(field.shape[-2:], bool)
    mask[10:20, 10:20] = False
    exact = np.asarray(
        linear_gaussian_posterior(field, POSITIONS, variance, prior, pixel_mask=mask).mean
    )
    field = field.copy()
    field[:, ~mask] = 1e9  # garbage under the mask must not matter
    out = newton_refine(
        prior, np.zeros((3, 4)), POSITIONS, field, variance, pixel_mask=mask, tol=0.0
    )
    assert np.abs(out.z - exact).max() < 1e-3 * np.abs(exact).max()


def test_deblend_of_a_tight_blend_does_not_depend_on_where_lbfgs_stopped():
    # 5 galaxies within 40 px: defaults vs a 2000-step fit to tol 1e-5, and vs one masked
    # empty corner pixel; every r flux agrees to 0.1 of its error (issue #31's criterion)
    from madness_ppl.deblend import deblend
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    prior = GalaxyPrior.load("lsst")
    blend = make_blend(
        Survey.lsst(),
        rng=np.random.default_rng(204),
        config=BlendConfig(field_size=80, n_galaxies=(2, 6), margin=20),
    )
    assert len(blend.positions) == 5
    masked_field = blend.field.copy()
    masked_field[:, 0, 79] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [
            deblend(blend.field, blend.variance, blend.positions, prior=prior),
            deblend(
                blend.field, blend.variance, blend.positions, prior=prior, tol=1e-5, max_steps=2000
            ),
            deblend(masked_field, blend.variance, blend.positions, prior=prior),
        ]
    default = runs[0].catalog
    for other in runs[1:]:
        shift = np.abs(other.catalog["flux_r"] - default["flux_r"]) / default["flux_r_err"]
        assert shift.max() <= 0.1, shift


def test_refine_tol_is_the_refinement_stopping_rule(tiny_prior):
    # an infinite tolerance takes no Newton step: the catalog is the L-BFGS one (refine=0);
    # a zero tolerance takes steps from the same unconverged 5-step L-BFGS start
    from madness_ppl.deblend import deblend
    from madness_ppl.errors import MadnessInputError

    rng = np.random.default_rng(3)
    field = rng.normal(size=(3, 40, 40)).astype(np.float32)
    field[:, 15:25, 15:25] += 30.0
    variance = np.ones_like(field)
    positions = np.array([[18.0, 19.0], [22.0, 21.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = {
            name: deblend(field, variance, positions, prior=tiny_prior, max_steps=5, **options)
            for name, options in {
                "lbfgs": {"refine": 0},
                "never": {"refine": 8, "refine_tol": np.inf},
                "always": {"refine": 8, "refine_tol": 0.0},
                "preconditioned": {"refine": 8, "refine_tol": 0.0, "refine_method": "lbfgs"},
            }.items()
        }
    flux = {name: np.asarray(fit.catalog["flux_r"]) for name, fit in fits.items()}
    np.testing.assert_array_equal(flux["never"], flux["lbfgs"])
    assert not np.allclose(flux["always"], flux["lbfgs"], rtol=1e-4)
    assert not np.allclose(flux["preconditioned"], flux["lbfgs"], rtol=1e-4)
    assert np.all(np.isfinite(fits["preconditioned"].catalog["flux_r_err"]))
    with pytest.raises(MadnessInputError, match="refine_method"):
        deblend(field, variance, positions, prior=tiny_prior, refine_method="newton")


def test_two_loop_with_the_exact_hessian_is_the_newton_direction():
    # on a quadratic with Hessian A, secant pairs satisfy y = A s: with H0 = A^-1 the
    # recursion must return the Newton direction -A^-1 g whatever the memory holds
    from madness_ppl.refine import _two_loop

    rng = np.random.default_rng(0)
    root = rng.normal(size=(6, 6))
    hessian = root @ root.T + 6 * np.eye(6)
    inverse = np.linalg.inv(hessian)
    memory = [(s, hessian @ s) for s in rng.normal(size=(4, 6))]
    grad = rng.normal(size=6)
    expected = -inverse @ grad
    for pairs in ([], memory[:1], memory):
        np.testing.assert_allclose(_two_loop(grad, pairs, lambda v: inverse @ v), expected)
    # with a wrong H0 the newest pair still satisfies the secant equation H y = s
    direction = _two_loop(memory[-1][1], memory, lambda v: v)
    np.testing.assert_allclose(direction, -memory[-1][0])


def test_backtrack_lands_on_the_minimum_of_a_quadratic_line():
    from madness_ppl.refine import _backtrack

    # L(a) = -2 a + 5 a^2 (minimum at a = 0.2): from a = 1 the change is 3
    assert _backtrack(1.0, -2.0, 3.0) == pytest.approx(0.2)
    assert _backtrack(1.0, -2.0, 100.0) == pytest.approx(0.1)  # clipped to a tenth
    assert _backtrack(1.0, -2.0, -1.0) == pytest.approx(0.5)  # no curvature: halve
    assert _backtrack(1.0, -2.0, np.nan) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["gauss-newton", "lbfgs"])
def test_flux_tolerance_stops_the_refinement_early_and_counts_evaluations(method):
    # a loose flux tolerance stops before the first step; none stops at the decrease test;
    # every accepted step costs at least one evaluation of the loss
    prior, field, variance = _toy_blend(1)
    start = np.zeros((3, 4))
    options = dict(max_steps=20, method=method)
    loose = newton_refine(prior, start, POSITIONS, field, variance, flux_tol=1e9, **options)
    assert loose.steps == 0 and loose.evaluations == 0 and loose.converged
    full = newton_refine(prior, start, POSITIONS, field, variance, tol=1e-6, **options)
    assert full.steps >= 1 and full.evaluations >= full.steps and full.converged
    with pytest.raises(ValueError, match="method must be one of"):
        newton_refine(prior, start, POSITIONS, field, variance, method="newton")
