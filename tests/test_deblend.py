"""The deblending pipeline's plumbing and input checks, on a small random prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.deblend import deblend, extract_cutouts
from madness_ppl.prior import GalaxyPrior

BANDS = ("g", "r", "i")  # the tiny prior's bands (tests/conftest.py)


@pytest.fixture(scope="module")
def prior(tiny_prior) -> GalaxyPrior:
    return tiny_prior


@pytest.fixture
def field():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 10.0, (3, 40, 40)).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    for x, y in ((12, 15), (26, 22)):
        image += 400.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)[None]
    return image


def test_cutouts_are_zero_padded_at_edges():
    image = np.arange(2 * 9 * 9, dtype=np.float32).reshape(2, 9, 9)
    cut = extract_cutouts(image, np.array([[0.0, 0.0], [4.2, 3.8]]), 5)
    assert cut.shape == (2, 2, 5, 5)
    assert np.array_equal(cut[0, :, 2:, 2:], image[:, :3, :3]) and cut[0, :, :2].sum() == 0
    assert np.array_equal(cut[1], image[:, 2:7, 2:7])


def test_detects_fits_and_catalogues(prior, field):
    result = deblend(field, prior=prior, max_steps=10)
    assert len(result.catalog) == 2
    assert {
        "x",
        "y",
        "flux_g",
        "flux_r",
        "flux_i",
        "mag_r",
        "g1",
        "g2",
        "chi2",
        "converged",
        "chi2_footprint",
        "fit_flags",
    } <= set(result.catalog.colnames)
    assert result.sources.shape == (2, 3, 15, 15)
    assert np.isfinite(result.catalog["chi2"]).all()
    # fit_flags restates the columns it summarises (catalog.fit_flags)
    from madness_ppl.catalog import fit_flags

    cat = result.catalog
    expected = fit_flags(cat["converged"], cat["edge_flux_frac"], cat["chi2_footprint"], cat["snr"])
    np.testing.assert_array_equal(cat["fit_flags"], expected)


@pytest.mark.filterwarnings("ignore::madness_ppl.errors.MadnessInputWarning")  # not LSST depth
def test_recovers_a_blend_drawn_from_the_prior(prior):
    """Known answer: two overlapping galaxies decoded from prior draws, placed at integer
    positions 9 pixels apart, plus Gaussian noise of known variance. The fit must explain the
    data to the noise (chi2 / pixel 1), reproduce the noiseless image and recover each
    source's flux per band. Measured on this field: chi2 0.996, model rms 0.037 sigma, fluxes
    within 1.4 %, each source's rms 0.07 sigma, largest |flux - truth| / flux_err 1.75; over
    four draws (keys 0-3) at most 0.06 sigma, 1.4 %, 0.13 sigma and 2.5. The bounds are about
    twice the largest of those (chi2: 3 sigma of its spread over 3888 pixels)."""
    from madness_ppl.scene import place_stamps

    positions = np.array([[14.0, 16.0], [22.0, 20.0]])
    z = prior.latent_distribution().sample(jax.random.key(0), (2,))
    stamps = np.asarray(prior.decode(z))
    truth = np.asarray(place_stamps(jnp.asarray(stamps), jnp.asarray(positions), (36, 36)))
    sigma = 0.02 * truth.max()
    variance = np.full_like(truth, sigma**2)
    rng = np.random.default_rng(0)
    field = (truth + sigma * rng.normal(size=truth.shape)).astype(np.float32)
    result = deblend(field, variance, positions, prior=prior)
    chi2 = float(np.mean(result.residual**2 / variance))
    assert abs(chi2 - 1.0) < 3 * np.sqrt(2.0 / truth.size)
    assert np.sqrt(np.mean((result.model_image - truth) ** 2)) < 0.1 * sigma
    flux = np.stack([np.asarray(result.catalog[f"flux_{b}"]) for b in BANDS], axis=1)
    true_flux = stamps.sum(axis=(-1, -2))
    np.testing.assert_allclose(flux, true_flux, rtol=0.025)
    # the flux errors cover the truth
    err = np.stack([np.asarray(result.catalog[f"flux_{b}_err"]) for b in BANDS], axis=1)
    assert np.all(np.abs(flux - true_flux) < 4 * err)
    # each source's model, not only their sum, is the right galaxy
    rms = np.sqrt(np.mean((result.sources - stamps) ** 2, axis=(1, 2, 3)))
    assert np.all(rms < 0.25 * sigma)


def test_band_order_is_taken_from_names(prior, field):
    a = deblend(field, prior=prior, max_steps=5)
    b = deblend(field[::-1], prior=prior, bands=BANDS[::-1], max_steps=5)
    assert np.allclose(a.model_image, b.model_image, rtol=1e-5, atol=1e-3)


def test_nan_regions_are_masked(prior, field):
    field = field.copy()
    field[:, :5, :] = np.nan
    result = deblend(field, prior=prior, max_steps=5)
    assert np.isnan(result.residual[:, :5]).all()
    assert np.isfinite(result.model_image).all()
    assert np.isfinite(np.asarray(result.catalog["flux_r"])).all()


def test_zero_sources(prior, field):
    result = deblend(field, np.full_like(field, 100.0), np.zeros((0, 2)), prior=prior)
    assert len(result.catalog) == 0 and result.sources.shape[0] == 0
    assert np.all(result.model_image == 0)


def test_bad_inputs(prior, field):
    with pytest.raises(ValueError, match="zero noise"):
        deblend(np.zeros((3, 30, 30)), prior=prior)
    with pytest.raises(ValueError, match="the field has 2 bands but the prior expects 3"):
        deblend(field[:2], prior=prior)
    with pytest.raises(ValueError, match=r"lacks bands \['i'\]"):
        deblend(field, prior=prior, bands=("g", "r", "z"))
    with pytest.raises(ValueError, match="outside"):
        deblend(field, positions=np.array([[10.0, 10.0], [80.0, 3.0]]), prior=prior)
    with pytest.raises(ValueError, match="variance shape"):
        deblend(field, np.ones((3, 5, 5)), prior=prior)
    with pytest.raises(ValueError, match=r"\(bands, height, width\)"):
        deblend(field[0], prior=prior)


def test_redistributed_stamps_add_up_to_the_data_and_ignore_model_amplitude():
    from madness_ppl.deblend import redistribute_flux

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:9, :9]
    blob = np.exp(-((xx - 4) ** 2 + (yy - 4) ** 2) / 4.0)[None].repeat(2, 0)
    sources = np.stack([blob, 3.0 * blob])  # (2, 2, 9, 9)
    positions = np.array([[10.0, 10.0], [13.0, 11.0]])
    field = rng.normal(0, 1, (2, 24, 24)) + 5.0
    out = redistribute_flux(field, sources, positions)
    total = np.zeros((2, 24, 24))
    for (x, y), d in zip(positions.astype(int), out, strict=True):
        total[:, y - 4 : y + 5, x - 4 : x + 5] += d
    covered = total != 0
    np.testing.assert_allclose(total[covered], field[covered], rtol=1e-6)
    assert covered[:, 10, 10].all() and not covered[:, 0, 0].any()
    # an isolated source's share is the data, whatever its model amplitude
    alone = redistribute_flux(field, 7.0 * sources[:1], positions[:1])
    np.testing.assert_allclose(alone[0], field[:, 6:15, 6:15], rtol=1e-6)


# ------------------------------------------------------------------- MAP start and preconditioner
def _toy_blend():
    from madness_ppl.scene import place_stamps
    from madness_ppl.toy import LinearGaussianPrior

    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=15, latent_dim=4)
    positions = np.array([[12.0, 14.0], [18.0, 16.0], [14.0, 20.0]], np.float32)  # overlapping
    z = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    image = place_stamps(prior.decode(jnp.asarray(z)), positions, (32, 32), subpixel=False)
    return prior, positions, z, np.asarray(image)


def test_encoder_start_rounds_remove_the_neighbours():
    """On a noiseless linear blend, the residual rounds converge to the true latents (measured
    max error 1.39 with the encoder alone, 0.37 after 5 rounds, 0.005 after 20)."""
    from madness_ppl.deblend import encoder_start

    prior, positions, z, image = _toy_blend()
    errors = [
        float(np.abs(encoder_start(prior, image, positions, passes=p) - z).max())
        for p in (0, 5, 20)
    ]
    assert errors[0] > 0.5  # the neighbours bias a plain encoding
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02
    assert encoder_start(prior, image, np.zeros((0, 2)), passes=2).shape == (0, 4)
    with pytest.raises(ValueError, match="passes"):
        encoder_start(prior, image, positions, passes=-1)


def test_latent_scales_match_the_exact_gauss_newton_curvature():
    """For a linear decoder W the curvature is exact: tr(W^T W / sigma^2) / d."""
    from madness_ppl.deblend import latent_scales

    prior, positions, z, _ = _toy_blend()
    weight = np.asarray(prior.weight, np.float64)
    sigma2 = 100.0
    exact = 1.0 / np.sqrt(np.trace(weight.T @ weight) / sigma2 / 4 + 1.0)
    inverse_variance = np.full((2, 32, 32), 1.0 / sigma2, np.float32)
    many = latent_scales(prior, z, positions, inverse_variance, probes=1000)
    np.testing.assert_allclose(many[:, 0], exact, rtol=0.01)
    default = latent_scales(prior, z, positions, inverse_variance)
    np.testing.assert_allclose(default[:, 0], exact, rtol=0.1)
    # no data on a source: only the prior's unit curvature is left
    blind = latent_scales(prior, z, positions, np.zeros_like(inverse_variance))
    np.testing.assert_allclose(blind, 1.0)


@pytest.mark.filterwarnings("ignore::madness_ppl.errors.MadnessInputWarning")  # not LSST depth
def test_catalog_flux_errors_are_the_laplace_width_and_the_systematic_terms(prior):
    """``flux_<band>_err`` = Laplace (with the pixel term) + kappa F + lambda C in quadrature;
    the blending term leaves an isolated source alone."""
    from madness_ppl.uncertainty import flux_error_budget, laplace_flux_errors, neighbour_light

    rng = np.random.default_rng(1)
    image = rng.normal(0.0, 5.0, (3, 48, 48)).astype(np.float32)
    yy, xx = np.mgrid[:48, :48]
    positions = np.array([[12.0, 14.0], [17.0, 16.0], [36.0, 36.0]])  # a pair and a loner
    for x, y in positions:
        image += 300.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 6.0)[None]
    variance = np.full_like(image, 25.0)
    eps, kappa, lam = np.array([0.01, 0.02, 0.03]), np.array([0.05, 0.0, 0.1]), 0.3
    options = {"prior": prior, "max_steps": 15, "model_error": eps}

    def errors(result):
        return np.stack([np.asarray(result.catalog[f"flux_{b}_err"]) for b in BANDS], axis=1)

    plain = deblend(image, variance, positions, flux_error_floor=0.0, blend_error=0.0, **options)
    full = deblend(image, variance, positions, flux_error_floor=kappa, blend_error=lam, **options)
    laplace = laplace_flux_errors(
        prior, plain.fit.params["z"][:3], positions, variance, model_error=eps
    )
    np.testing.assert_allclose(errors(plain), laplace.flux_err, rtol=1e-5)
    light = neighbour_light(full.sources, positions, image.shape)
    assert np.all(light[:2] > 0) and np.all(light[2] == 0)
    expected = flux_error_budget(
        errors(plain),
        full.sources.sum(axis=(-2, -1)),
        light,
        flux_fraction=kappa,
        blend_fraction=lam,
    )
    np.testing.assert_allclose(errors(full), expected, rtol=1e-5)
    only_blend = deblend(
        image, variance, positions, flux_error_floor=0.0, blend_error=lam, **options
    )
    assert np.all(errors(only_blend)[:2] > errors(plain)[:2])
    np.testing.assert_allclose(errors(only_blend)[2], errors(plain)[2], rtol=1e-6)
