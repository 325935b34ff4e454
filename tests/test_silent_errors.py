"""Issue #35 (silent errors, part 3): each input that used to give a plausible wrong answer or a
traceback now gives the right answer or a typed, one-line error."""

import warnings

import numpy as np
import pytest
from astropy.table import Table
from typer.testing import CliRunner

from madness_ppl.cli import app
from madness_ppl.deblend import deblend
from madness_ppl.errors import MadnessInputError, PositionsError
from madness_ppl.io import check_positions, write_field

runner = CliRunner()
BANDS = ("g", "r", "i")
SKY = np.array([157.4, 361.4, 434.5], np.float32)
CENTRES = np.array([[12.0, 15.0], [27.0, 22.0]])


def make_field(seed=0, size=40):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = np.zeros((3, size, size), np.float32)
    for x, y in CENTRES:
        clean += 3e4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)[None]
    image = clean + rng.normal(size=clean.shape).astype(np.float32) * SKY[:, None, None]
    variance = np.broadcast_to(SKY[:, None, None] ** 2, image.shape).astype(np.float32)
    return image, variance.copy()


def _fit(image, variance, positions, prior, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deblend(image, variance, positions, prior=prior, max_steps=10, **options)


def test_masked_array_mask_is_kept(tiny_prior):
    """Item 2: np.asarray dropped the mask of a numpy masked array (zeros under it were fitted)."""
    image, variance = make_field()
    zeroed = image.copy()
    zeroed[:, 10:20, 8:18] = 0.0  # garbage under the mask: a hole in galaxy 0
    masked = np.ma.masked_array(zeroed, mask=np.zeros(image.shape, bool))
    masked.mask[:, 10:20, 8:18] = True
    with_nan = image.copy()
    with_nan[:, 10:20, 8:18] = np.nan
    a = _fit(masked, variance, CENTRES, tiny_prior)
    b = _fit(with_nan, variance, CENTRES, tiny_prior)
    np.testing.assert_allclose(a.catalog["flux_r"], b.catalog["flux_r"], rtol=1e-5)
    assert np.isnan(a.residual[:, 10:20, 8:18]).all()
    # a masked variance masks its pixels too
    masked_var = np.ma.masked_array(variance, mask=np.zeros(image.shape, bool))
    masked_var.mask[:, 10:20, 8:18] = True
    c = _fit(zeroed, masked_var, CENTRES, tiny_prior)
    np.testing.assert_allclose(c.catalog["flux_r"], b.catalog["flux_r"], rtol=1e-5)


def test_position_tables_are_read_by_column_name():
    """Item 3: a DataFrame with columns (y, x) was read by position, swapping x and y."""
    pd = pytest.importorskip("pandas")
    expected = CENTRES
    frame = pd.DataFrame({"y": CENTRES[:, 1], "x": CENTRES[:, 0]})
    np.testing.assert_array_equal(check_positions(frame), expected)
    table = Table({"Y": CENTRES[:, 1], "X": CENTRES[:, 0], "flux": [1.0, 2.0]})
    np.testing.assert_array_equal(check_positions(table), expected)
    records = np.rec.fromarrays([CENTRES[:, 1], CENTRES[:, 0]], names="y,x")
    np.testing.assert_array_equal(check_positions(records), expected)
    np.testing.assert_array_equal(check_positions({"x": [12.0, 27.0], "y": [15.0, 22.0]}), expected)
    with pytest.raises(PositionsError, match=r"columns named x and y.*\['col0', 'col1'\]"):
        check_positions(pd.DataFrame({"col0": [1.0], "col1": [2.0]}))


@pytest.mark.parametrize("threshold", [-5.0, float("nan"), 0.0, float("inf")])
def test_bad_detection_threshold_is_refused(tiny_prior, threshold):
    """Item 7: thresholds of -5, NaN or 0 were accepted (1 merged source, 0, or 25 sources)."""
    image, variance = make_field()
    with pytest.raises(MadnessInputError, match="detect_threshold must be a positive number"):
        deblend(image, variance, prior=tiny_prior, detect_threshold=threshold)


def test_cli_threshold_and_max_steps_are_one_line_errors(tmp_path, tiny_prior):
    """Items 7 and 9: --threshold -5 ran; --max-steps 0 gave a 47-line traceback."""
    image, variance = make_field()
    write_field(tmp_path / "f.fits", image, BANDS, variance=variance)
    prior_dir = tmp_path / "prior"
    tiny_prior.save(prior_dir)
    base = ["deblend", str(tmp_path / "f.fits"), "--prior", str(prior_dir)]
    for option, message in (
        (["--threshold", "-5"], "detect_threshold must be a positive number"),
        (["--max-steps", "0"], "max_steps must be an integer >= 1"),
    ):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "out"), *option])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_max_steps_zero_is_a_typed_error_from_the_api(tiny_prior):
    image, variance = make_field()
    with pytest.raises(MadnessInputError, match="max_steps"):
        deblend(image, variance, CENTRES, prior=tiny_prior, max_steps=0)


def test_unconverged_fits_warn(tiny_prior):
    """Item 8: 40 sources in a 100x100 field all came back converged=False, with no warning."""
    from madness_ppl.errors import MadnessInputWarning

    image, variance = make_field()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = deblend(image, variance, CENTRES, prior=tiny_prior, max_steps=1, refine=0)
    assert not np.asarray(result.catalog["converged"]).any()
    messages = [str(w.message) for w in caught if issubclass(w.category, MadnessInputWarning)]
    assert any("2 of 2 source(s) did not converge within max_steps" in m for m in messages)


def test_absurd_density_is_refused_before_any_work(tmp_path):
    """Item 10: simulate blends --density 1e9 allocated 805 GiB after 77 s, leaving config.json."""
    result = runner.invoke(
        app,
        ["simulate", "blends", "--out", str(tmp_path / "ds"), "--n", "2", "--density", "1e9"],
    )
    assert result.exit_code == 2, result.output
    assert "galaxies per" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ds").exists()


def test_tile_compressed_fits_is_read_and_a_cut_one_refused(tmp_path):
    """Item 11: a valid RICE_1 .fits.fz was refused as truncated (CompImageHDU byte count)."""
    from astropy.io import fits

    from madness_ppl.errors import FieldFormatError
    from madness_ppl.io import read_field

    image, _ = make_field()
    hdus = [fits.PrimaryHDU()] + [
        fits.CompImageHDU(image[b], name=band, compression_type="RICE_1")
        for b, band in enumerate(BANDS)
    ]
    path = tmp_path / "f.fits.fz"
    fits.HDUList(hdus).writeto(path)
    field = read_field(path)
    assert [b.lower() for b in field.bands] == list(BANDS)
    assert np.std(field.image - image) < 0.05 * SKY.min()  # RICE quantisation, not garbage
    raw = path.read_bytes()
    (tmp_path / "cut.fits.fz").write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(FieldFormatError, match=r"cut\.fits\.fz (is truncated|is not a readable)"):
        read_field(tmp_path / "cut.fits.fz")


def test_band_without_data_is_flagged(tiny_prior):
    """Item 5: an all-NaN band gave a flux predicted from the other bands, with no flag."""
    image, variance = make_field()
    image[0] = np.nan  # no g data at all
    image[2, :, :20] = np.nan  # i masked over galaxy 0 only
    result = _fit(image, variance, CENTRES, tiny_prior)
    assert result.catalog["flux_g_flag"].tolist() == [True, True]
    assert result.catalog["flux_i_flag"].tolist() == [True, False]
    assert "flux_r_flag" not in result.catalog.colnames
    assert "predicted from the other bands" in result.catalog["flux_g_flag"].description


def test_sources_on_empty_sky_have_a_low_snr(tiny_prior):
    """Item 6: a position on empty sky got a plausible flux and nothing said it was not there."""
    image, variance = make_field()
    positions = np.vstack([CENTRES, [[32.0, 5.0]]])  # the third is empty sky
    result = _fit(image, variance, positions, tiny_prior)
    snr = np.asarray(result.catalog["snr"])
    assert snr[0] > 50 and snr[1] > 50
    assert abs(snr[2]) < 5


def test_sky_left_in_a_field_with_variance_warns(tiny_prior):
    """Item 4: +0.3 sigma of sky per pixel with variance= was neither estimated nor flagged."""
    from madness_ppl.errors import MadnessInputWarning

    image, variance = make_field()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deblend(image, variance, CENTRES, prior=tiny_prior, max_steps=2)
    assert not [w for w in caught if "background is not zero" in str(w.message)]
    image = image + 0.3 * SKY[:, None, None]
    with pytest.warns(MadnessInputWarning, match=r"background is not zero.*g \+0\.[23]"):
        deblend(image, variance, CENTRES, prior=tiny_prior, max_steps=2)


def test_a_finished_output_is_never_replaced_without_overwrite(tmp_path):
    """Item 12: two runs on one --out: the second replaced the first's finished directory
    (the existence check and the swap were not one atomic step)."""
    from madness_ppl.atomic import new_output_dir, swap_into_place
    from madness_ppl.errors import OutputDirectoryError

    out = tmp_path / "out"
    first, second = new_output_dir(out), new_output_dir(out)  # both checked: out was absent
    (first / "catalog.fits").write_text("first")
    (second / "catalog.fits").write_text("second")
    swap_into_place(first, out, replace=False)
    with pytest.raises(OutputDirectoryError, match="written by another run"):
        swap_into_place(second, out, replace=False)
    assert (out / "catalog.fits").read_text() == "first"
    swap_into_place(second, out, replace=True)  # --overwrite
    assert (out / "catalog.fits").read_text() == "second"


def test_output_directories_follow_the_umask(tmp_path):
    """Smaller item: deblend outputs were mode 700 where the other commands give 755."""
    import os

    from madness_ppl.atomic import new_output_dir

    umask = os.umask(0o022)
    try:
        assert (new_output_dir(tmp_path / "out").stat().st_mode & 0o777) == 0o755
    finally:
        os.umask(umask)


def test_whitespace_positions_table_is_read_and_a_bad_one_is_one_line(tmp_path):
    """Smaller items: a whitespace .txt table gave a 54-line astropy error."""
    from madness_ppl.io import read_positions

    (tmp_path / "pos.txt").write_text("x y\n12.0 15.0\n27.0 22.0\n")
    np.testing.assert_array_equal(read_positions(tmp_path / "pos.txt"), CENTRES)
    (tmp_path / "pos.xyz").write_text("junk")
    with pytest.raises(PositionsError) as err:
        read_positions(tmp_path / "pos.xyz")
    assert len(str(err.value).splitlines()) == 1 and "pos.xyz" in str(err.value)


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root can write anywhere",
)
def test_unwritable_output_is_refused_before_the_fit(tmp_path):
    """Smaller item: an unwritable --out was reported only after the whole fit."""
    from madness_ppl.atomic import check_output_dir
    from madness_ppl.errors import OutputDirectoryError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputDirectoryError, match="not writable"):
            check_output_dir(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o700)


def test_messages_name_bands_not_plane_numbers(tiny_prior):
    """Smaller item: 'band 3: ...' named a plane number the user never saw."""
    image, _ = make_field()
    image[1] = np.nan
    with pytest.raises(MadnessInputError, match="band 'r': fewer than 16 usable pixels"):
        deblend(image, positions=CENTRES, prior=tiny_prior)
