"""Point sources (stars) in a blend: the slot's decoding, its exact Laplace error, and a bright
star deblended with its neighbours by ``deblend(point_sources=...)``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from madness_ppl.deblend import deblend
from madness_ppl.errors import MadnessInputError, MadnessInputWarning
from madness_ppl.point_sources import (
    decode_sources,
    point_mask,
    point_sources,
    point_start,
    star_centres,
)
from madness_ppl.prior import GalaxyPrior
from madness_ppl.psf import convolve_stamps, field_kernel
from madness_ppl.results import fitted_scene
from madness_ppl.scene import blend_model, place_stamps
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey
from madness_ppl.uncertainty import laplace_flux_errors


@pytest.fixture(scope="module")
def prior():
    return GalaxyPrior.load("lsst")


def test_point_mask_reads_booleans_and_indices_and_refuses_bad_ones():
    assert point_mask([2, 0], 3).tolist() == [True, False, True]
    assert point_mask(np.array([False, True]), 2).tolist() == [False, True]
    assert not point_mask(None, 2).any()
    with pytest.raises(MadnessInputError, match=r"outside 0\.\.2"):
        point_mask([3], 3)
    with pytest.raises(MadnessInputError, match="repeats"):
        point_mask([1, 1], 3)
    with pytest.raises(MadnessInputError, match="one per source"):
        point_mask(np.array([True]), 3)
    with pytest.raises(MadnessInputError, match="integer indices"):
        point_mask([0.5], 3)


def test_a_star_slot_draws_the_psf_times_its_fluxes_and_its_laplace_error_is_exact(prior):
    """On a flat-variance field with no galaxy, the star's flux error is the PSF-fit error
    sigma_b = (sum_p R^2 / s2)^(-1/2): the slot is linear in its fluxes and, at zero offset, the
    offset's derivative (odd) is orthogonal to the flux's (even)."""
    n_bands, s2 = len(prior.bands), 50.0
    shape = (n_bands, 61, 61)
    weight = np.full(shape, 1.0 / s2)
    positions = np.array([[30.0, 30.0], [12.0, 40.0]])
    points = point_sources(prior, [True, False], positions, np.zeros(shape), weight)
    reference = prior.reference_psf()
    sigma = np.sqrt(s2 / np.sum(reference**2, axis=(-1, -2)))
    np.testing.assert_allclose(points.scale[0, :n_bands], sigma, rtol=1e-5)
    z = np.zeros((2, prior.latent_dim), np.float32)
    z[0, :n_bands] = 1000.0 / sigma  # 1000 e- in every band
    z[1] = np.asarray(prior.latent_distribution().sample(jax.random.key(3)))
    stamps = np.asarray(decode_sources(prior, jnp.asarray(z), points))
    np.testing.assert_allclose(stamps[0], 1000.0 * reference, rtol=1e-4, atol=0.01)
    galaxies_only = z.copy()
    galaxies_only[0] = 0.0  # what the galaxy branch sees in the star's slot
    np.testing.assert_array_equal(
        stamps[1], np.asarray(prior.decode(jnp.asarray(galaxies_only)))[1]
    )
    with pytest.warns(MadnessInputWarning, match="PSF-aware"):  # data at the model frame here
        laplace = laplace_flux_errors(
            prior,
            z[:1],
            positions[:1],
            np.full(shape, s2),
            points=points._replace(mask=points.mask[:1], scale=points.scale[:1]),
        )
    np.testing.assert_allclose(laplace.flux_err[0], sigma, rtol=2e-3)
    # an offset moves the light and keeps the flux
    z[0, n_bands : n_bands + 2] = 0.4 / points.scale[0, n_bands]
    shifted = np.asarray(decode_sources(prior, jnp.asarray(z), points))[0]
    np.testing.assert_allclose(shifted.sum(axis=(-1, -2)), 1000.0, rtol=1e-4)
    # as observed through the survey's (Nyquist-sampled) PSF the shift is exact; the model
    # frame's 1.5-pixel Gaussian is undersampled, so its own centroid is not
    kernel = field_kernel(prior, Survey.lsst().psf_images(45))
    observed = np.asarray(convolve_stamps(jnp.asarray(shifted), kernel.fourier))[2]
    centre_x = (observed * np.arange(observed.shape[-1])).sum() / observed.sum()
    assert abs(centre_x - (observed.shape[-1] // 2 + 0.4)) < 0.01


def test_point_start_is_the_psf_fit_of_a_lone_star(prior):
    n_bands = len(prior.bands)
    shape = (n_bands, 61, 61)
    flux = np.linspace(500.0, 3000.0, n_bands)
    image = np.asarray(
        place_stamps(
            (flux[:, None, None] * prior.reference_psf())[None], np.array([[25.0, 31.0]]), shape[1:]
        )
    )
    weight = np.full(shape, 0.1)
    points = point_sources(prior, [True], [[25.0, 31.0]], image, weight)
    start = point_start(points, image, [[25.0, 31.0]], weight, prior.latent_dim)
    np.testing.assert_allclose(start[0, :n_bands] * points.scale[0, :n_bands], flux, rtol=1e-4)
    offset = start[0, n_bands : n_bands + 2] * points.scale[0, n_bands]
    assert np.all(np.abs(offset) < 1e-3)  # centred on its pixel: no offset found
    assert np.all(start[0, n_bands + 2 :] == 0)
    # given 0.6 pixel off (placed on pixel (26, 32)), the lone-star fit finds the centre again:
    # an offset of (-1, -1) from that pixel, not the (-0.4, -0.4) the given position says
    moved = point_start(points, image, [[25.6, 31.6]], weight, prior.latent_dim)
    found = moved[0, n_bands : n_bands + 2] * points.scale[0, n_bands]
    np.testing.assert_allclose(found, [-1.0, -1.0], atol=0.02)


def _star_field(mag: float, seed: int):
    """A 3-galaxy LSST field with a star of AB magnitude ``mag`` (every band) at a sub-pixel
    position, drawn with the survey's PSF (the one deblend assumes by default)."""
    survey = Survey.lsst()
    rng = np.random.default_rng(seed)
    blend = make_blend(
        survey, rng=rng, config=BlendConfig(field_size=72, n_galaxies=(3, 3), margin=14)
    )
    bands = [b.name for b in survey.bands]
    flux = np.array([survey.mag_to_electrons(mag, b) for b in bands])
    where = np.array([[36.3, 35.8]])
    psf = survey.psf_images(45)
    star = np.asarray(place_stamps((flux[:, None, None] * psf)[None], where, (72, 72)))
    noiseless = blend.noiseless + star
    variance = blend.variance - blend.noiseless + noiseless  # sky + Poisson of all sources
    field = noiseless + np.sqrt(variance) * rng.normal(size=variance.shape)
    positions = np.concatenate([blend.positions, where])
    footprint = star.sum(0) > 3 * np.sqrt((blend.variance - blend.noiseless).mean(0))
    return field.astype(np.float32), variance.astype(np.float32), positions, flux, footprint


def test_a_bright_star_is_fitted_by_the_psf_where_the_galaxy_prior_leaves_residuals(prior):
    """Measured on this field (mag 18): as a galaxy the star leaves chi2 ~3.5 per pixel on its
    footprint; as a point source ~1.0, its fluxes within ~0.1 % and its centre recovered."""
    field, variance, positions, flux, footprint = _star_field(18.0, 7)
    results = {}
    for label, stars in (("galaxy", None), ("star", [3])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[label] = deblend(field, variance, positions, prior=prior, point_sources=stars)
    chi2 = {k: float(np.mean((r.residual**2 / variance)[:, footprint])) for k, r in results.items()}
    assert chi2["star"] < 1.3 < 2.0 < chi2["galaxy"]
    catalog = results["star"].catalog
    assert catalog["point_source"].tolist() == [False, False, False, True]
    fitted = np.array([catalog[f"flux_{b}"][3] for b in prior.bands])
    errors = np.array([catalog[f"flux_{b}_err"][3] for b in prior.bands])
    assert np.all(np.abs(fitted / flux - 1) < 0.01)
    assert np.all(np.abs(fitted - flux) < 4 * errors)
    assert np.all(errors < 0.02 * flux)  # no galaxy-decoder floor on a star
    assert abs(catalog["x"][3] - 36.3) < 0.05 and abs(catalog["y"][3] - 35.8) < 0.05
    assert np.isnan(catalog["g1"][3]) and catalog["edge_flux_frac"][3] == 0
    points = results["star"].points
    x, y = star_centres(points, results["star"].fit.params["z"], positions)
    assert np.allclose([x[0], y[0]], [catalog["x"][3], catalog["y"][3]])
    # the scene handed back for further inference draws the same model, star included
    scene = fitted_scene(results["star"], prior)
    model = handlers.substitute(blend_model, data=scene.init)
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(*scene.args, **scene.kwargs)
    drawn = np.asarray(trace["model_image"]["value"])
    peak = np.abs(results["star"].model_image).max()
    assert np.max(np.abs(drawn - results["star"].model_image)) < 1e-3 * peak


def test_point_sources_need_positions_and_no_shear_response(prior):
    field, variance, positions, _, _ = _star_field(20.0, 8)
    with pytest.raises(MadnessInputError, match="pass positions"):
        deblend(field, variance, prior=prior, point_sources=[0])
    with pytest.raises(MadnessInputError, match="shear_response with point sources"):
        deblend(field, variance, positions, prior=prior, point_sources=[3], shear_response=True)


def test_cli_point_sources_come_from_the_option_or_the_positions_table(tmp_path):
    from astropy.table import Table

    from madness_ppl.cli import _point_sources_option
    from madness_ppl.errors import PositionsError

    table = Table({"x": [10.0, 20.0, 30.0], "y": [5.0, 6.0, 7.0], "point_source": [0, 1, 1]})
    path = tmp_path / "positions.ecsv"
    table.write(path)
    assert _point_sources_option(None, path) == [1, 2]
    assert _point_sources_option("0", path) == [0]  # the option wins over the column
    Table({"x": [1.0], "y": [2.0]}).write(tmp_path / "plain.csv")
    assert _point_sources_option(None, tmp_path / "plain.csv") is None
    with pytest.raises(MadnessInputError, match="needs --positions"):
        _point_sources_option("0,3", None)
    with pytest.raises(MadnessInputError, match="row numbers"):
        _point_sources_option("0,star", path)
    Table({"x": [1.0], "y": [2.0], "point_source": [2]}).write(tmp_path / "bad.csv")
    with pytest.raises(PositionsError, match="booleans or 0/1"):
        _point_sources_option(None, tmp_path / "bad.csv")


def test_deblend_many_fits_the_stars_its_positions_table_marks(tmp_path):
    """A star in a tile of blobs, marked in the positions table's ``point_source`` column: the
    stitched catalog flags it, finds its centre (given 0.3 px off) and its fluxes."""
    from astropy.io import fits
    from astropy.table import Table

    from madness_ppl.batch import BatchConfig, deblend_many
    from madness_ppl.io import write_field
    from madness_ppl.nn.flow import FlowConfig
    from madness_ppl.nn.vae import NetworkConfig
    from madness_ppl.options import DeblendOptions
    from madness_ppl.prior import PriorConfig

    bands = ("g", "r", "i")
    config = PriorConfig(  # tiny, but with room in a slot for 3 fluxes and an offset
        survey="lsst",
        bands=bands,
        stamp_size=15,
        network=NetworkConfig.tiny(bands=3, latent_dim=6, width=8),
        flow=FlowConfig(latent_dim=6, n_layers=2, hidden=(8,)),
    )
    tiny = GalaxyPrior.init(jax.random.key(2), config)
    prior_dir = tmp_path / "prior"
    tiny.save(prior_dir)
    rng = np.random.default_rng(4)
    size = 60
    yy, xx = np.mgrid[:size, :size]
    blobs = np.array([[7.0, 8.0], [53.0, 52.0]])  # far from the star: the random decoder of
    # this tiny prior draws them badly, and its stamps must not reach the star
    image = np.zeros((3, size, size))
    for x, y in blobs:
        image += 300.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 6.0)[None]
    star_at, star_flux = np.array([[30.4, 28.7]]), np.array([2e4, 3e4, 4e4])
    # the tile's PSF, in its file (the survey default would be drawn on this prior's 15-pixel
    # stamp, which cuts ~3 % of a Kolmogorov PSF's wings: a star's flux would come out 3 % low)
    psf = Survey.lsst().psf_images(45, bands)
    image += np.asarray(place_stamps((star_flux[:, None, None] * psf)[None], star_at, (60, 60)))
    variance = 100.0 + image
    image += rng.normal(size=image.shape) * np.sqrt(variance)
    path = tmp_path / "tile.fits"
    write_field(path, image.astype(np.float32), bands, variance=variance.astype(np.float32))
    hdu = fits.ImageHDU(psf.astype(np.float32), name="PSF")
    hdu.header["BANDS"] = ",".join(bands)
    with fits.open(path, mode="append") as hdul:
        hdul.append(hdu)
    given = np.concatenate([blobs, star_at + np.array([[0.3, -0.3]])])
    positions = tmp_path / "tile.ecsv"
    Table({"x": given[:, 0], "y": given[:, 1], "point_source": [False, False, True]}).write(
        positions
    )
    batch = BatchConfig(
        prior=str(prior_dir), patch_size=60, batch_size=1, options=DeblendOptions(max_steps=100)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = deblend_many(
            [path], tmp_path / "out", config=batch, positions=[positions], progress=False
        )
    catalog = report.catalog
    catalog.sort("id")
    assert catalog["point_source"].tolist() == [False, False, True]
    star = catalog[2]
    assert abs(star["x"] - 30.4) < 0.05 and abs(star["y"] - 28.7) < 0.05
    fitted = np.array([star[f"flux_{b}"] for b in bands])
    np.testing.assert_allclose(fitted, star_flux, rtol=0.01)
