"""simulate -> FITS -> `madness-ppl deblend` -> catalog, with the shipped LSST prior."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from typer.testing import CliRunner

from madness_ppl.cli import app
from madness_ppl.io import write_field
from madness_ppl.simulate import BlendConfig, CatalogConfig, make_blend, make_catalog
from madness_ppl.survey import Survey

runner = CliRunner()


@pytest.fixture(scope="module")
def survey() -> Survey:
    return Survey.lsst()


def _bright_blend(survey, positions, seed):
    cat = make_catalog(
        len(positions),
        survey,
        rng=np.random.default_rng(seed),
        config=CatalogConfig(mag_bright=20.5, mag_faint=22.5),
    )
    return make_blend(
        survey,
        rng=np.random.default_rng(seed + 1),
        config=BlendConfig(field_size=71),
        catalog=cat,
        positions=np.asarray(positions, float),
    )


@pytest.mark.parametrize(
    ("positions", "tolerance", "redist_tolerance"),
    # Tolerances are regression guards set at the measured accuracy of the v0.1.0 prior (the
    # shipped v0.2 prior passes them; tightening them to its accuracy is still to do), not goals.
    # v0.1.0: its VAE reconstructs held-out r-band fluxes with a 68 % width of 12.5 % (model card);
    # here the bright isolated galaxy comes out at +13 % and the two large, bright blended ones at
    # -28 % and -25 % (reduced chi2 2.4: the lean prior cannot represent them well). The flux
    # re-distributed by the models (catalog flux_r_redist) is far closer: 1.3 %, and 7.4 % / 0.9 %.
    [([[35.2, 34.8]], 0.20, 0.05), ([[28.0, 35.0], [42.3, 31.6]], 0.35, 0.12)],
    ids=["isolated", "blended"],
)
def test_cli_deblend_recovers_fluxes(survey, tmp_path, positions, tolerance, redist_tolerance):
    blend = _bright_blend(survey, positions, seed=len(positions))
    write_field(tmp_path / "field.fits", blend.field, survey.band_names)
    Table({"x": blend.positions[:, 0], "y": blend.positions[:, 1]}).write(tmp_path / "pos.csv")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "deblend",
            str(tmp_path / "field.fits"),
            "--positions",
            str(tmp_path / "pos.csv"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {
        "catalog.fits",
        "catalog.ecsv",
        "sources.fits",
        "model.fits",
        "residual.fits",
        "deblend.png",
    }
    catalog = Table.read(out / "catalog.ecsv")
    true_r = blend.isolated[:, 2].sum(axis=(-1, -2))
    assert np.all(np.abs(np.asarray(catalog["flux_r"]) / true_r - 1) < tolerance)
    shared = np.abs(np.asarray(catalog["flux_r_redist"]) / true_r - 1)
    assert np.all(shared < redist_tolerance)
    with fits.open(out / "sources.fits") as hdul:
        stamps = hdul[0].data
    # the observed stamps: the 45-px model frame convolved to the field's PSF, with its wings
    assert stamps.shape[:2] == (len(positions), 6) and stamps.shape[2] == stamps.shape[3] >= 45
    assert np.allclose(stamps[:, 2].sum(axis=(-1, -2)), catalog["flux_r"], rtol=1e-4)


def test_cli_deblend_detects_when_no_positions(survey, tmp_path):
    blend = _bright_blend(survey, [[20.0, 20.0], [50.0, 48.0]], seed=5)
    write_field(tmp_path / "field.fits", blend.field, survey.band_names)
    result = runner.invoke(
        app, ["deblend", str(tmp_path / "field.fits"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert len(Table.read(tmp_path / "o" / "catalog.ecsv")) == 2


def test_cli_deblend_bad_inputs(survey, tmp_path):
    image = np.random.default_rng(0).normal(0, 300, (6, 41, 41)).astype(np.float32)
    write_field(tmp_path / "ok.fits", image, survey.band_names)
    write_field(tmp_path / "three.fits", image[:3], ("g", "r", "i"))
    write_field(tmp_path / "zero.fits", np.zeros_like(image), survey.band_names)
    (tmp_path / "text.fits").write_text("not fits")
    Table({"x": [10.0, 400.0], "y": [5.0, 5.0]}).write(tmp_path / "off.csv")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    cases = [
        (["three.fits"], "lacks bands"),
        (["text.fits"], "not a readable FITS file"),
        (["zero.fits"], "zero noise"),
        (["ok.fits", "--positions", str(tmp_path / "off.csv")], "off the 41x41 image"),
    ]
    for args, message in cases:
        out = tmp_path / f"out_{args[0]}"
        result = runner.invoke(
            app, ["deblend", str(tmp_path / args[0]), *args[1:], "--out", str(out)]
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists()  # nothing half-written
    result = runner.invoke(
        app, ["deblend", str(tmp_path / "ok.fits"), "--out", str(tmp_path / "exists")]
    )
    assert result.exit_code == 2 and "exists" in result.output
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"
    assert not list(tmp_path.glob(".exists.*"))


def test_cli_deblend_masks_nan_regions(survey, tmp_path):
    blend = _bright_blend(survey, [[35.0, 35.0]], seed=9)
    field = blend.field.copy()
    field[:, :10, :] = np.nan
    write_field(tmp_path / "nan.fits", field, survey.band_names)
    result = runner.invoke(
        app, ["deblend", str(tmp_path / "nan.fits"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    with fits.open(tmp_path / "o" / "residual.fits") as hdul:
        assert np.isnan(hdul[0].data[:, :10]).all() and np.isfinite(hdul[0].data[:, 10:]).all()


def test_demo_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--field-size", "81", "--n-galaxies", "3:3", "--seed", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 galaxies simulated" in result.output and "median |flux error|" in result.output
    assert (out / "deblend.png").stat().st_size > 10_000
    assert len(Table.read(out / "catalog.ecsv")) >= 1


def _psf_hdu(images: np.ndarray, bands) -> fits.ImageHDU:
    hdu = fits.ImageHDU(images.astype(np.float32), name="PSF")
    hdu.header["BANDS"] = ",".join(bands)
    return hdu


def test_cli_reads_the_psf_hdu_in_any_band_order(survey, tmp_path):
    """A field observed at 1.4x the median PSF, its PSF cube stored with the bands reversed
    (named by BANDS): the CLI puts it in the prior's order and gives the API's answer; the
    same PSF from ``--psf file`` too; no 'no PSF given' warning in either."""
    import galsim

    from madness_ppl.deblend import deblend
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.psf import psf_images

    fwhm = 1.4 * np.array([survey.band(b).psf_fwhm for b in survey.band_names])
    lookup = dict(zip(survey.band_names, fwhm, strict=True))
    cat = make_catalog(
        1, survey, rng=np.random.default_rng(7), config=CatalogConfig(mag_bright=21, mag_faint=22)
    )
    blend = make_blend(
        survey,
        rng=np.random.default_rng(8),
        config=BlendConfig(field_size=61),
        catalog=cat,
        positions=np.array([[30.2, 29.7]]),
        psf=lambda band: galsim.Kolmogorov(fwhm=lookup[band]),
    )
    images = psf_images(fwhm, pixel_scale=survey.pixel_scale, size=41)
    reverse = list(survey.band_names)[::-1]
    write_field(tmp_path / "bare.fits", blend.field, survey.band_names)
    write_field(tmp_path / "field.fits", blend.field, survey.band_names)
    with fits.open(tmp_path / "field.fits", mode="append") as hdul:
        hdul.append(_psf_hdu(images[::-1], reverse))
    fits.HDUList([fits.PrimaryHDU(), _psf_hdu(images[::-1], reverse)]).writeto(tmp_path / "p.fits")
    Table({"x": [30.2], "y": [29.7]}).write(tmp_path / "pos.csv")

    api = deblend(blend.field, positions=[[30.2, 29.7]], prior=GalaxyPrior.load("lsst"), psf=images)
    runs = (("field.fits", []), ("bare.fits", ["--psf", str(tmp_path / "p.fits")]))
    for name, extra in runs:
        result = runner.invoke(
            app,
            [
                "deblend",
                str(tmp_path / name),
                "--positions",
                str(tmp_path / "pos.csv"),
                "--out",
                str(tmp_path / f"out-{name}"),
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        assert "no PSF given" not in result.output
        catalog = Table.read(tmp_path / f"out-{name}" / "catalog.ecsv")
        assert catalog["flux_r"][0] == pytest.approx(api.catalog["flux_r"][0], rel=1e-4)
