import numpy as np
import pytest

from madness_ppl.simulate.catalog import CatalogConfig, expected_density, make_catalog
from madness_ppl.survey import Survey


@pytest.fixture(scope="module")
def lsst() -> Survey:
    return Survey.lsst()


def test_same_seed_same_catalog(lsst):
    a = make_catalog(50, lsst, rng=np.random.default_rng(3))
    b = make_catalog(50, lsst, rng=np.random.default_rng(3))
    c = make_catalog(50, lsst, rng=np.random.default_rng(4))
    for name in a.colnames:
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["i_mag"], c["i_mag"])


def test_number_counts_slope_and_range(lsst):
    cat = make_catalog(20000, lsst, rng=np.random.default_rng(0))
    mag = np.asarray(cat["i_mag"])
    assert mag.min() >= 20.0 and mag.max() <= 25.3
    counts, edges = np.histogram(mag, bins=np.arange(20.0, 25.31, 0.53))
    centres = 0.5 * (edges[1:] + edges[:-1])
    slope = np.polyfit(centres, np.log10(counts), 1)[0]
    assert slope == pytest.approx(0.31, abs=0.03)  # dN/dm ∝ 10^(0.31 m)


def test_i_band_flux_matches_magnitude(lsst):
    cat = make_catalog(100, lsst, rng=np.random.default_rng(1))
    # colours are relative to LSST i, so the i-band flux is exactly the i magnitude's flux
    assert np.allclose(cat["flux_i"], lsst.mag_to_electrons(np.asarray(cat["i_mag"]), "i"))


def test_colours_are_physical(lsst):
    cat = make_catalog(4000, lsst, rng=np.random.default_rng(2))
    g_r = -2.5 * np.log10(cat["flux_g"] / cat["flux_r"]) + 2.5 * np.log10(
        lsst.mag_to_electrons(0, "g") / lsst.mag_to_electrons(0, "r")
    )
    early = np.asarray(cat["sed"]) == 0
    irregular = np.asarray(cat["sed"]) == 3
    assert np.median(g_r[early]) > np.median(g_r[irregular]) + 0.2
    # bulges are redder than disks: the bulge fraction is higher in r than in g for composites
    bt_g = cat["bulge_flux_g"] / cat["flux_g"]
    bt_r = cat["bulge_flux_r"] / cat["flux_r"]
    composite = (np.asarray(cat["bulge_fraction"]) > 0.05) & ~early
    assert np.median((bt_r - bt_g)[composite]) > 0


def test_sizes_shrink_with_magnitude_and_shapes_bounded(lsst):
    cat = make_catalog(5000, lsst, rng=np.random.default_rng(5))
    mag, hlr = np.asarray(cat["i_mag"]), np.asarray(cat["disk_hlr"])
    assert np.median(hlr[mag < 22]) > np.median(hlr[mag > 24.5])
    g = np.hypot(cat["g1"], cat["g2"])
    assert g.max() < 0.7
    assert np.std(cat["g1"]) == pytest.approx(0.2, abs=0.05)


def test_bad_configs():
    with pytest.raises(ValueError, match="brighter"):
        CatalogConfig(mag_bright=26, mag_faint=25)
    with pytest.raises(ValueError, match="non-negative"):
        make_catalog(-1, Survey.lsst(), rng=np.random.default_rng(0))
    assert expected_density() == pytest.approx(46 * (10 ** (0.31 * 0.3) - 10 ** (0.31 * -5)))
