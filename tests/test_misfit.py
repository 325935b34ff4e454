"""Per-source misfit evidence (madness_ppl.misfit) against known answers."""

import numpy as np
import pytest

from madness_ppl.errors import MadnessInputError
from madness_ppl.misfit import source_misfit


def gaussian_stamp(size: int = 15, sigma: float = 2.0, flux: float = 1000.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    g = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return flux * g / g.sum()


def test_noise_only_residuals_read_as_a_good_fit():
    rng = np.random.default_rng(0)
    stamps = np.stack([gaussian_stamp()[None]] * 40)  # (40, 1, 15, 15)
    positions = np.array([[20.0 + 40 * (k % 8), 20.0 + 40 * (k // 8)] for k in range(40)])
    variance = np.full((1, 200, 340), 4.0)
    residual = rng.normal(0.0, 2.0, variance.shape)
    m = source_misfit(stamps, positions, residual, variance)
    assert abs(np.mean(m.chi2) - 1.0) < 0.1
    pull = m.residual_flux / m.residual_flux_sd
    assert abs(np.std(pull) - 1.0) < 0.25 and abs(np.mean(pull)) < 0.4
    # noise alone calls for little model error; a 10 % pixel misfit calls for ~0.1
    assert np.median(m.model_error) < 0.05
    misfit = source_misfit(
        stamps, positions, residual + _pasted(0.1 * stamps, positions, variance.shape), variance
    )
    assert np.median(misfit.model_error) == pytest.approx(0.1, abs=0.03)


def _pasted(stamps, positions, shape):
    from madness_ppl.cutouts import paste_stamps

    return paste_stamps(stamps, positions, shape)


def test_misfit_is_charged_to_the_source_that_owns_the_light():
    stamps = np.stack([gaussian_stamp()[None], gaussian_stamp(flux=200.0)[None]])
    positions = np.array([[10.0, 10.0], [19.0, 10.0]])
    variance = np.ones((1, 21, 30))
    residual = np.zeros((1, 21, 30))
    residual[0, 8:13, 8:13] = 5.0  # under the bright source's core only
    m = source_misfit(stamps, positions, residual, variance)
    assert m.chi2[0, 0] > 5.0 > m.chi2[1, 0]
    assert m.residual_flux[0, 0] > 0.9 * 125.0 and m.residual_flux[1, 0] < 0.05 * 125.0


def test_masked_pixels_and_empty_inputs():
    stamps = gaussian_stamp()[None, None]
    variance = np.ones((1, 21, 21))
    residual = np.full((1, 21, 21), 3.0)
    residual[0, :, :11] = np.nan  # masked half: the misfit is read from the other half only
    m = source_misfit(stamps, [[10.0, 10.0]], residual, variance)
    assert m.chi2[0, 0] == pytest.approx(9.0)
    assert np.all(np.isfinite(m.residual_flux))
    empty = source_misfit(np.zeros((0, 1, 15, 15)), np.zeros((0, 2)), residual, variance)
    assert empty.chi2.shape == (0, 1)


@pytest.mark.filterwarnings("ignore::madness_ppl.errors.MadnessInputWarning")  # not LSST depth
def test_injected_misfit_widens_the_error_enough_to_cover_the_truth(tiny_prior):
    """Known answer: a galaxy decoded from the prior plus an extra compact component (30 % of
    its light, 2.5 pixels off centre) that the decoder cannot draw. The true flux is the sum.
    The Laplace error misses it by tens of sigma; the error with the shipped lsst prior's
    calibrated misfit term (gamma, and its Student-t tails for the 90 % interval) covers it in
    every band, and a clean field drawn from the prior gets no extra width."""
    import dataclasses

    import jax

    from madness_ppl.deblend import deblend
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.uncertainty import calibrated_fractions, interval_halfwidth

    shipped = calibrated_fractions(GalaxyPrior.load("lsst"))
    gamma, dof = float(shipped["misfit_fraction"]), float(shipped["tail_dof"])
    assert gamma > 0
    metadata = {"model_error": {"misfit_fraction": gamma, "tail_dof": dof}}
    prior = dataclasses.replace(
        tiny_prior, config=dataclasses.replace(tiny_prior.config, metadata=metadata)
    )
    stamp = np.asarray(prior.decode(prior.latent_distribution().sample(jax.random.key(0), (1,))))[0]
    size = 31
    clean = np.zeros((3, size, size))
    clean[:, 8:23, 8:23] = stamp
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((xx - 17.5) ** 2 + (yy - 15.0) ** 2) / 2.0)
    extra = 0.3 * stamp.sum((-1, -2))[:, None, None] * (blob / blob.sum())[None]
    sigma = 0.02 * clean.max()
    variance = np.full(clean.shape, sigma**2)
    noise = np.random.default_rng(0).normal(0.0, sigma, clean.shape)
    h90 = interval_halfwidth(0.9, dof)
    bands = prior.bands

    def fit(image, adaptive):
        result = deblend(
            (image + noise).astype(np.float32),
            variance,
            np.array([[15.0, 15.0]]),
            prior=prior,
            max_steps=300,
            flux_error_floor=0.0,
            blend_error=0.0,
            adaptive_errors=adaptive,
        )
        flux = np.array([result.catalog[f"flux_{b}"][0] for b in bands])
        err = np.array([result.catalog[f"flux_{b}_err"][0] for b in bands])
        return flux, err

    truth = (clean + extra).sum((-1, -2))
    flux, laplace = fit(clean + extra, adaptive=False)
    _, adaptive = fit(clean + extra, adaptive=True)
    assert np.all(np.abs(flux - truth) > 10 * laplace)  # the plain error misses
    assert np.all(np.abs(flux - truth) < h90 * adaptive)  # the widened one covers (90 %)
    _, clean_plain = fit(clean, adaptive=False)
    _, clean_adaptive = fit(clean, adaptive=True)
    np.testing.assert_allclose(clean_adaptive, clean_plain, rtol=1e-6)


def test_source_misfit_refuses_shapes_that_do_not_describe_one_field():
    """Bad input gets a precise error, not a broadcast or a silently wrong misfit."""
    stamps = np.ones((2, 3, 5, 5))
    positions = np.array([[5.0, 5.0], [10.0, 10.0]])
    residual = np.zeros((3, 20, 20))
    with pytest.raises(MadnessInputError, match=r"stamps must be \(n, 3, S, S\)"):
        source_misfit(np.ones((2, 4, 5, 5)), positions, residual, residual + 1)
    with pytest.raises(MadnessInputError, match="variance shape"):
        source_misfit(stamps, positions, residual, np.ones((3, 20, 21)))
    with pytest.raises(MadnessInputError, match=r"positions must be \(2, 2\)"):
        source_misfit(stamps, positions[:1], residual, residual + 1)
    with pytest.raises(MadnessInputError, match=r"residual must be \(bands, H, W\)"):
        source_misfit(stamps, positions, residual[0], residual[0] + 1)
