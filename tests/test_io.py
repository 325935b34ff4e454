import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from madness_ppl.io import read_field, read_positions, write_field


def test_cube_round_trip_with_variance(tmp_path):
    image = np.random.default_rng(0).normal(size=(3, 20, 30)).astype(np.float32)
    write_field(tmp_path / "f.fits", image, ["g", "r", "i"], variance=np.ones_like(image))
    data = read_field(tmp_path / "f.fits")
    assert data.bands == ("g", "r", "i")
    assert np.array_equal(data.image, image) and np.array_equal(data.variance, np.ones_like(image))
    with pytest.raises(FileExistsError, match="exists"):
        write_field(tmp_path / "f.fits", image, ["g", "r", "i"])
    assert not list(tmp_path.glob("*.tmp"))


def test_one_hdu_per_band(tmp_path):
    hdus = [fits.PrimaryHDU()]
    for band in "gri":
        hdus.append(fits.ImageHDU(np.full((10, 12), ord(band), np.float32), name=band))
    fits.HDUList(hdus).writeto(tmp_path / "bands.fits")
    data = read_field(tmp_path / "bands.fits")
    assert data.bands == ("G", "R", "I")  # FITS stores EXTNAME upper-case
    assert data.image.shape == (3, 10, 12)
    # each plane holds its own band's pixels, in the order of the HDUs
    for k, band in enumerate("gri"):
        assert np.all(data.image[k] == ord(band))
    assert data.variance is None


def test_bad_fields(tmp_path):
    (tmp_path / "text.fits").write_text("this is not FITS")
    with pytest.raises(ValueError, match="not a readable FITS file"):
        read_field(tmp_path / "text.fits")
    with pytest.raises(FileNotFoundError):
        read_field(tmp_path / "missing.fits")
    fits.PrimaryHDU(np.zeros((3, 5, 5), np.float32)).writeto(tmp_path / "nobands.fits")
    with pytest.raises(ValueError, match="names no bands"):
        read_field(tmp_path / "nobands.fits")
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(np.zeros((5, 5)), name="g"),
        fits.ImageHDU(np.zeros((6, 5)), name="r"),
    ]
    fits.HDUList(hdus).writeto(tmp_path / "shapes.fits")
    with pytest.raises(ValueError, match="different shapes"):
        read_field(tmp_path / "shapes.fits")
    cube = fits.PrimaryHDU(np.zeros((2, 5, 5), np.float32))
    cube.header["BANDS"] = "g,r,i"
    cube.writeto(tmp_path / "count.fits")
    with pytest.raises(ValueError, match="3 bands"):
        read_field(tmp_path / "count.fits")


def test_positions_tables(tmp_path):
    Table({"x": [1.0, 5.0], "y": [2.0, 3.0]}).write(tmp_path / "p.csv")
    assert read_positions(tmp_path / "p.csv", (10, 10)).tolist() == [[1.0, 2.0], [5.0, 3.0]]
    Table({"X": [1.0], "Y": [2.0]}).write(tmp_path / "p.fits")
    assert read_positions(tmp_path / "p.fits").shape == (1, 2)
    Table({"x": [1.0, 50.0], "y": [2.0, 3.0]}).write(tmp_path / "off.ecsv")
    with pytest.raises(ValueError, match=r"off the 10x10 image, rows \[1\]"):
        read_positions(tmp_path / "off.ecsv", (10, 10))
    Table({"ra": [1.0]}).write(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="columns x and y"):
        read_positions(tmp_path / "cols.csv")
