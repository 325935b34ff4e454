import galsim
import numpy as np
import pytest

from madness_ppl.survey import Survey


@pytest.fixture(scope="module")
def lsst() -> Survey:
    return Survey.lsst()


def test_lsst_numbers_come_from_surveycodex(lsst):
    assert lsst.band_names == ("u", "g", "r", "i", "z", "y")
    assert lsst.pixel_scale == pytest.approx(0.2)
    r = lsst.band("r")
    # sky per pixel: t * 10^(-0.4 (mu - zp)) * p^2
    expected = r.exposure_time * 10 ** (-0.4 * (r.sky_brightness - r.zeropoint)) * 0.2**2
    assert lsst.sky_level[2] == pytest.approx(expected)
    assert lsst.sky_sigma[2] == pytest.approx(np.sqrt(expected))


def test_magnitude_electron_round_trip(lsst):
    mags = np.array([18.0, 22.5, 27.0])
    for band in lsst.band_names:
        assert np.allclose(lsst.electrons_to_mag(lsst.mag_to_electrons(mags, band), band), mags)
    # one magnitude is a factor 10^0.4 in flux
    assert lsst.mag_to_electrons(24, "i") / lsst.mag_to_electrons(25, "i") == pytest.approx(10**0.4)
    assert np.isnan(lsst.electrons_to_mag(-5.0, "r"))


def test_unknown_band_is_a_clear_error(lsst):
    with pytest.raises(ValueError, match=r"unknown band 'q'.*'u', 'g'"):
        lsst.band("q")
    with pytest.raises(ValueError, match="unknown band"):
        lsst.select_bands(["g", "H"])


def test_other_surveys_are_data_only():
    hsc = Survey.named("hsc")
    assert hsc.band_names == ("g", "r", "i", "z", "y")
    assert hsc.pixel_scale == pytest.approx(0.168)
    vis = Survey.named("euclid_vis")
    assert vis.band_names == ("IE",)
    assert vis.bands[0].bandpass == (550.0, 900.0)
    with pytest.raises(ValueError, match="unknown survey"):
        Survey.named("not-a-survey")


@pytest.mark.parametrize("band", ["u", "r", "y"])
def test_psf_fwhm_of_a_drawn_star(lsst, band):
    psf = lsst.psf(band)
    target = lsst.band(band).psf_fwhm
    fine = psf.drawImage(nx=201, ny=201, scale=0.02, method="no_pixel")
    assert fine.calculateFWHM() == pytest.approx(target, rel=0.01)
    # a star as the survey sees it: pixel-integrated on the 0.2" grid
    star = galsim.Convolve(galsim.DeltaFunction(flux=1e5), psf).drawImage(
        nx=45, ny=45, scale=lsst.pixel_scale
    )
    assert star.calculateFWHM() == pytest.approx(target, rel=0.05)
    assert star.array.sum() == pytest.approx(1e5, rel=1e-2)  # Airy wings beyond 9"


def test_space_psf_is_diffraction_dominated():
    vis = Survey.named("euclid_vis")
    fine = vis.psf("IE").drawImage(nx=201, ny=201, scale=0.005, method="no_pixel")
    assert fine.calculateFWHM() == pytest.approx(vis.band("IE").psf_fwhm, rel=0.02)


def test_psf_images_are_the_bands_psfs_unit_sum_centred_in_the_order_asked():
    survey = Survey.lsst()
    images = survey.psf_images(25, bands=["i", "g"])
    assert images.shape == (2, 25, 25)
    np.testing.assert_allclose(images.sum(axis=(-2, -1)), 1.0, rtol=1e-12)
    assert all(np.unravel_index(im.argmax(), im.shape) == (12, 12) for im in images)
    i_band = survey.psf("i").drawImage(nx=25, ny=25, scale=survey.pixel_scale).array
    np.testing.assert_allclose(images[0], i_band / i_band.sum(), rtol=1e-6)
    assert not np.allclose(images[0], images[1])  # g is wider than i
    assert survey.psf_images(25).shape == (len(survey.band_names), 25, 25)
