"""The deblending pipeline's plumbing and input checks, on a small random prior."""

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
    } <= set(result.catalog.colnames)
    assert result.sources.shape == (2, 3, 15, 15)
    # data = model + residual up to the estimated sky level (noise 10, level ~0)
    assert np.allclose(result.model_image + result.residual, field, atol=2.0)
    assert np.isfinite(result.catalog["chi2"]).all()


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
