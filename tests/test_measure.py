import galsim
import numpy as np
import pytest

from madness_ppl import measure
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey


@pytest.fixture(scope="module")
def survey() -> Survey:
    return Survey.lsst().select_bands(["g", "r", "i"])


@pytest.fixture(scope="module")
def blend(survey):
    config = BlendConfig(field_size=121, n_galaxies=(6, 6), margin=15, min_separation=3.0)
    return make_blend(survey, rng=np.random.default_rng(7), config=config)


def test_noise_estimate_matches_truth_despite_sources(survey, blend):
    level, noise = measure.estimate_noise(blend.field)
    assert np.allclose(noise, survey.sky_sigma, rtol=0.05)
    assert np.all(np.abs(level) < 0.1 * survey.sky_sigma)


def test_noise_estimate_errors(survey):
    with pytest.raises(ValueError, match="zero noise"):
        measure.estimate_noise(np.zeros((2, 30, 30)))
    with pytest.raises(ValueError, match=r"\(bands, height, width\)"):
        measure.estimate_noise(np.zeros((30, 30)))
    nan_field = np.random.default_rng(0).normal(size=(1, 40, 40))
    nan_field[0, :20] = np.nan  # NaN regions are ignored, not propagated
    assert np.isfinite(measure.estimate_noise(nan_field)[1]).all()


def test_detection_finds_separated_galaxies(blend):
    det = measure.detect(blend.field)
    bright = np.asarray(blend.catalog["i_mag"]) < 24.5
    ti, di = measure.match_positions(blend.positions, det.positions)
    assert set(np.flatnonzero(bright)) <= set(ti)
    assert np.median(np.hypot(*(blend.positions[ti] - det.positions[di]).T)) < 1.0


def test_aperture_flux_of_a_known_disk():
    image = np.zeros((1, 51, 51))
    yy, xx = np.mgrid[:51, :51]
    image[0][(xx - 25) ** 2 + (yy - 25) ** 2 <= 4] = 1.0  # 13 pixels within radius 2
    flux, err = measure.aperture_flux(
        image, np.array([[25.0, 25.0]]), 6.0, variance=np.full((1, 51, 51), 4.0)
    )
    assert flux[0, 0] == pytest.approx(13.0)
    assert err[0, 0] == pytest.approx(2.0 * np.sqrt(np.pi * 36), rel=0.02)


def test_hsm_shear_recovers_an_applied_shear(survey):
    psf = survey.psf("r")
    gal = galsim.Exponential(half_light_radius=0.8, flux=1e5).shear(g1=0.2, g2=-0.1)
    stamp = galsim.Convolve(gal, psf).drawImage(nx=45, ny=45, scale=0.2).array
    psf_image = psf.drawImage(nx=45, ny=45, scale=0.2).array
    g = measure.hsm_shear(stamp[None], psf_image)[0]
    assert g == pytest.approx([0.2, -0.1], abs=0.03)
    assert np.isnan(measure.hsm_shear(np.zeros((1, 45, 45)), psf_image)).all()


def test_similarity_metrics():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, (3, 21, 21))
    assert np.allclose(measure.ssim(truth, truth), 1.0)
    assert np.allclose(measure.cosine_similarity(2 * truth, truth), 1.0)
    noisy = truth + rng.normal(0, 1.0, truth.shape)
    assert np.all(measure.ssim(noisy, truth) < 0.95)
    assert np.all(measure.cosine_similarity(noisy, truth) < 1.0)


def test_blendedness_limits():
    stamp = np.zeros((1, 1, 11, 11))
    stamp[0, 0, 4:7, 4:7] = 1.0
    # alone: 0; two identical galaxies on top of each other: 1 - 1/2
    assert measure.blendedness(stamp, np.array([[20.0, 20.0]]), (41, 41))[0] == pytest.approx(0.0)
    pair = np.concatenate([stamp, stamp])
    b = measure.blendedness(pair, np.array([[20.0, 20.0], [20.0, 20.0]]), (41, 41))
    assert b == pytest.approx([0.5, 0.5])
    far = measure.blendedness(pair, np.array([[5.0, 5.0], [35.0, 35.0]]), (41, 41))
    assert far == pytest.approx([0.0, 0.0])


def test_matching_is_one_to_one_with_a_distance_cut():
    truth = np.array([[10.0, 10.0], [12.0, 10.0], [40.0, 40.0]])
    detected = np.array([[11.9, 10.1], [10.2, 9.9], [80.0, 80.0]])
    ti, di = measure.match_positions(truth, detected)
    assert ti.tolist() == [0, 1] and di.tolist() == [1, 0]
    assert measure.match_positions(truth, np.zeros((0, 2)))[0].size == 0


def test_stamp_edge_fraction_known_answers():
    from madness_ppl.misfit import stamp_edge_fraction

    size = 15
    flat = np.ones((1, 2, size, size))
    yy, xx = np.mgrid[:size, :size] - size // 2
    compact = np.exp(-(xx**2 + yy**2) / 2.0)[None, None].repeat(2, axis=1)
    frac = stamp_edge_fraction(np.concatenate([flat, compact, np.zeros_like(flat)]))
    assert frac[0] == pytest.approx((size**2 - (size - 2) ** 2) / size**2)
    assert frac[1] < 1e-10 and frac[2] == 0.0


def test_footprints_are_nearest_source_above_threshold_and_chi2_is_their_mean():
    from madness_ppl.measure import chi2_per_pixel, footprints

    field = np.zeros((2, 20, 30))
    field[:, 5, 5] = field[:, 5, 6] = 10.0  # two pixels near source 0
    field[:, 15, 25] = 10.0  # one near source 1
    field[:, 10, 15] = 2.0  # below 3 sigma in the coadd (2 * 2 / sqrt(2) = 2.8)
    labels = footprints(field, np.ones(2), np.array([[4.0, 4.0], [26.0, 14.0]]))
    assert (labels == 0).sum() == 2 and (labels == 1).sum() == 1 and labels[10, 15] == -1
    residual = np.ones((2, 20, 30))
    residual[:, labels == 0] = 3.0
    variance = np.ones((2, 20, 30))
    assert chi2_per_pixel(residual, variance, labels == 0) == pytest.approx(9.0)
    assert chi2_per_pixel(residual, variance, labels == 1) == pytest.approx(1.0)
    residual[0, 0, 0] = np.nan  # masked pixels do not count
    assert chi2_per_pixel(residual, variance) == pytest.approx((4 * 9 + 1195 * 1) / 1199)
