import numpy as np
import pytest
from astropy.table import Table

from madness_ppl.simulate.catalog import make_catalog
from madness_ppl.simulate.stamps import add_noise, draw_isolated
from madness_ppl.survey import Survey


@pytest.fixture(scope="module")
def lsst() -> Survey:
    return Survey.lsst()


def _compact_galaxy(lsst: Survey) -> Table:
    cat = make_catalog(1, lsst, rng=np.random.default_rng(0))
    cat["disk_hlr"] = [0.4]
    cat["bulge_hlr"] = [0.15]
    return cat


def test_noiseless_flux_equals_catalog_flux(lsst):
    cat = _compact_galaxy(lsst)
    stamps = draw_isolated(cat, lsst, rng=np.random.default_rng(1), stamp_size=45)
    measured = stamps.noiseless[0].sum(axis=(1, 2))
    expected = np.array([cat[f"flux_{b}"][0] for b in lsst.band_names])
    assert np.allclose(measured, expected, rtol=0.01)
    # the centroid follows the sub-pixel jitter
    yy, xx = np.mgrid[:45, :45]
    r_band = stamps.noiseless[0, 2]
    cx = (r_band * xx).sum() / r_band.sum() - 22
    cy = (r_band * yy).sum() / r_band.sum() - 22
    assert cx == pytest.approx(stamps.offsets[0, 0], abs=0.02)
    assert cy == pytest.approx(stamps.offsets[0, 1], abs=0.02)


def test_pure_noise_has_the_survey_sigma(lsst):
    empty = np.zeros((lsst.n_bands, 200, 200), np.float32)
    noisy, variance = add_noise(empty, lsst.sky_variance, np.random.default_rng(2))
    assert np.allclose(noisy.std(axis=(1, 2)), lsst.sky_sigma, rtol=0.02)
    assert np.allclose(variance[:, 0, 0], lsst.sky_variance, rtol=1e-6)


def test_source_poisson_noise_adds_to_sky(lsst):
    bright = np.full((lsst.n_bands, 200, 200), 1e6, np.float32)
    noisy, _ = add_noise(bright, lsst.sky_variance, np.random.default_rng(3))
    assert np.allclose(
        (noisy - bright).std(axis=(1, 2)), np.sqrt(lsst.sky_variance + 1e6), rtol=0.02
    )


def test_same_seed_bit_identical(lsst):
    cat = make_catalog(4, lsst, rng=np.random.default_rng(9))
    a = draw_isolated(cat, lsst, rng=np.random.default_rng(10), stamp_size=31)
    b = draw_isolated(cat, lsst, rng=np.random.default_rng(10), stamp_size=31)
    assert a.noisy.shape == (4, 6, 31, 31)
    assert np.array_equal(a.noisy, b.noisy) and np.array_equal(a.noiseless, b.noiseless)


@pytest.mark.parametrize("size", [0, -45, 44, 12.5])
def test_bad_stamp_sizes(lsst, size):
    cat = make_catalog(1, lsst, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="stamp_size must be a positive odd integer"):
        draw_isolated(cat, lsst, rng=np.random.default_rng(0), stamp_size=size)
