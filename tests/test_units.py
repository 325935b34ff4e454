"""Pixel units -> electrons of the prior's survey, and the survey / pixel-scale check."""

import numpy as np
import pytest
from astropy.io import fits

from madness_ppl.errors import FieldFormatError
from madness_ppl.fields import FieldData
from madness_ppl.prepare import field_for_prior
from madness_ppl.survey import Survey
from madness_ppl.units import check_survey, electrons_per_unit, header_zeropoint


def _header(**cards) -> fits.Header:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header


def test_header_zeropoint_conventions():
    assert header_zeropoint(_header(FLUXMAG0=10 ** (0.4 * 27.0))) == pytest.approx(27.0)
    assert header_zeropoint(_header(MAGZERO=30.5)) == 30.5
    assert header_zeropoint(_header(BUNIT="nJy")) == pytest.approx(31.4)
    assert header_zeropoint(_header(BUNIT="electron")) is None
    assert header_zeropoint(None) is None


def test_electrons_per_unit_is_the_survey_magnitude_relation(tiny_prior):
    lsst = Survey.lsst()
    scale = electrons_per_unit(tiny_prior, _header(FLUXMAG0=10 ** (0.4 * 27.0)))
    # a source of AB magnitude m has 10**(-0.4 (m - 27)) units, hence this many electrons:
    for b, s in zip(tiny_prior.bands, scale, strict=True):
        units = 10 ** (-0.4 * (22.0 - 27.0))
        assert s * units == pytest.approx(float(lsst.mag_to_electrons(22.0, b)), rel=1e-9)
    # nJy is the same relation on zero point 31.4; an explicit zero point wins over the header
    njy = electrons_per_unit(tiny_prior, _header(BUNIT="nJy"))
    np.testing.assert_allclose(njy, scale * 10 ** (-0.4 * 4.4), rtol=1e-9)
    np.testing.assert_allclose(
        electrons_per_unit(tiny_prior, _header(BUNIT="nJy"), zeropoint=27.0), scale, rtol=1e-12
    )
    np.testing.assert_array_equal(electrons_per_unit(tiny_prior, _header(BUNIT="electron")), 1.0)
    np.testing.assert_array_equal(electrons_per_unit(tiny_prior, None, flux_scale=2.0), 2.0)


def test_units_without_a_conversion_or_bad_scales_are_refused(tiny_prior):
    with pytest.raises(FieldFormatError, match="'adu' and its header states no zero point"):
        electrons_per_unit(tiny_prior, _header(BUNIT="adu"))
    with pytest.raises(FieldFormatError, match="2 values for the prior's 3 bands"):
        electrons_per_unit(tiny_prior, None, flux_scale=[1.0, 2.0])
    with pytest.raises(FieldFormatError, match="positive and finite"):
        electrons_per_unit(tiny_prior, None, flux_scale=[1.0, -2.0, 1.0])


def test_field_for_prior_converts_image_and_variance(tiny_prior):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 8, 8)).astype(np.float32)
    variance = np.full((3, 8, 8), 0.01, np.float32)
    data = FieldData(image, ("g", "r", "i"), variance, _header(MAGZERO=27.0))
    field, var = field_for_prior(data, tiny_prior)
    scale = electrons_per_unit(tiny_prior, _header(MAGZERO=27.0))
    np.testing.assert_allclose(field, image * scale[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(var, variance * scale[:, None, None] ** 2, rtol=1e-6)


def test_a_field_of_another_survey_or_pixel_scale_is_refused(tiny_prior):
    bands = ("u", "g", "r", "i", "z", "y")
    hsc = _header(SURVEY="HSC", PIXSCALE=0.168)
    with pytest.raises(FieldFormatError, match=r"HSC field \(bands u, g, r, i, z, y.*lsst bands g"):
        check_survey(tiny_prior, bands, hsc)
    with pytest.raises(FieldFormatError, match=r'0\.168"/pixel'):
        check_survey(tiny_prior, bands, _header(PIXSCALE=0.168))
    check_survey(tiny_prior, bands, _header(SURVEY="LSST", PIXSCALE=0.2))
    check_survey(tiny_prior, bands, None)


def test_load_tile_converts_units_like_deblend(tmp_path, tiny_prior):
    # deblend-many's reader: the header's zero point, or BatchConfig.zeropoint over it
    from madness_ppl.fields import write_field
    from madness_ppl.tiling import load_tile

    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 40, 40)).astype(np.float32)
    variance = np.ones_like(image)
    header = _header(MAGZERO=27.0)
    write_field(tmp_path / "t.fits", image, ("g", "r", "i"), variance=variance, header=header)
    # write_field labels its cube electrons; a zero point in the header takes precedence
    scale = electrons_per_unit(tiny_prior, header)
    tile = load_tile(tmp_path / "t.fits", tiny_prior, positions=np.zeros((0, 2)))
    np.testing.assert_allclose(tile.field, image * scale[:, None, None], rtol=1e-5)
    other = load_tile(tmp_path / "t.fits", tiny_prior, positions=np.zeros((0, 2)), zeropoint=30.0)
    # a pixel value of 1 three magnitudes fainter is 10**(-1.2) as many electrons
    np.testing.assert_allclose(other.field, tile.field * 10 ** (-0.4 * 3.0), rtol=1e-5)
