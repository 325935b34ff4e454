"""PSF-aware training: the PSF distribution, its kernel bank, and a VAE trained through it."""

import dataclasses

import jax
import numpy as np
import pytest

from madness_ppl import psf as psf_module
from madness_ppl.nn import FlowConfig, NetworkConfig
from madness_ppl.prior import GalaxyPrior, PriorConfig
from madness_ppl.simulate import draw_isolated, make_catalog
from madness_ppl.simulate.stamps import dataset_psf
from madness_ppl.survey import Survey
from madness_ppl.train import StageConfig, train_vae
from madness_ppl.train.psfs import (
    PSFDistribution,
    draw_psf_parameters,
    kernel_bank,
    observe,
    psf_images_of,
)
from madness_ppl.train.stages import with_data_amplitude

SIZE = 15


@pytest.fixture(scope="module")
def bank():
    return kernel_bank(PSFDistribution(), Survey.lsst().select_bands(["g", "r"]), 48, grid=45)


def test_parameters_follow_the_distribution():
    survey = Survey.lsst()
    dist = PSFDistribution()
    draws = draw_psf_parameters(dist, survey, 4000, np.random.default_rng(0))
    assert draws.fwhm.shape == (4000, 6)
    assert draws.fwhm.min() >= 0.35 and draws.fwhm.max() <= 1.7
    # the log-uniform half reaches both ends of the range in every band
    assert np.all(draws.fwhm.min(axis=0) < 0.37) and np.all(draws.fwhm.max(axis=0) > 1.6)
    # the log-normal half: about half the draws within 15 % of the median FWHM
    ratio = draws.fwhm[:, 2] / survey.band("r").psf_fwhm
    assert 0.3 < np.mean(np.abs(np.log(ratio)) < 0.15) < 0.6
    assert 0.45 < draws.moffat.mean() < 0.55
    assert 2.5 <= draws.beta.min() and draws.beta.max() <= 4.5
    assert np.hypot(draws.e1, draws.e2).max() <= 0.05
    with pytest.raises(ValueError):
        PSFDistribution(fwhm_range=(1.0, 0.5))


def test_kernel_bank_is_a_smoothing_within_range(bank):
    assert bank.fourier.shape == (48, 2, 45, 23) and bank.fourier.dtype == np.complex64
    assert bank.descriptor.shape == (48, 2, 3) and bank.descriptor.dtype == np.float32
    assert bank.fwhm.min() >= 0.35 and bank.fwhm.max() <= 1.7
    # |K^| <= 1.2 wherever the PSF has power (the kernel never sharpens the model frame)
    survey = Survey.lsst().select_bands(["g", "r"])
    draws = draw_psf_parameters(PSFDistribution(), survey, 48, np.random.default_rng([0, 28]))
    images = psf_images_of(draws, survey, 45)
    p_hat = np.abs(np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1))))
    gain = np.where(p_hat > 1e-3, np.abs(bank.fourier), 0.0)
    assert gain.max() <= psf_module.MAX_KERNEL_GAIN
    assert np.allclose(np.abs(bank.fourier[..., 0, 0]), 1.0, atol=1e-4)  # flux kept
    # the descriptors grow with the FWHM (log size relative to the reference PSF)
    assert np.corrcoef(np.log(bank.fwhm.ravel()), bank.descriptor[..., 0].ravel())[0, 1] > 0.99
    again = kernel_bank(PSFDistribution(), survey, 48, grid=45)
    assert np.array_equal(again.fourier, bank.fourier)  # seeded


def test_observing_a_reference_stamp_matches_drawing_at_the_psf():
    """A galaxy drawn at the reference PSF and convolved with the kernel to P matches galsim's
    drawing at P (to ~1e-3 of the peak on a grid that holds the light)."""
    import galsim

    survey = Survey.lsst().select_bands(["r"])
    galaxy = galsim.Exponential(half_light_radius=0.4).shear(g1=0.2, g2=-0.1)
    reference = dataset_psf("reference", survey)("r")
    model = galsim.Convolve(galaxy, reference).drawImage(nx=25, ny=25, scale=0.2).array
    target = galsim.Convolve(galaxy, galsim.Moffat(beta=3.0, fwhm=1.1)).drawImage(
        nx=25, ny=25, scale=0.2
    )
    p = psf_module.psf_images([1.1], pixel_scale=0.2, size=45, profile="moffat", beta=3.0)
    kernel = psf_module.difference_kernel(p, psf_module.reference_psf(1, 45), grid=45)
    observed = np.asarray(observe(model[None].astype(np.float32), kernel.fourier))[0]
    assert np.abs(observed - target.array).max() < 3e-3 * target.array.max()


@pytest.fixture(scope="module")
def tiny_reference():
    survey = Survey.lsst().select_bands(["g", "r"])
    rng = np.random.default_rng(0)
    cat = make_catalog(96, survey, rng=rng)
    cat["disk_hlr"] = np.minimum(cat["disk_hlr"], 0.5)
    stamps = draw_isolated(
        cat, survey, rng=rng, stamp_size=SIZE, psf=dataset_psf("reference", survey)
    )
    network = dataclasses.replace(
        NetworkConfig.tiny(stamp_size=SIZE, latent_dim=4, width=8, dense=32), psf_features=3
    )
    config = PriorConfig(
        survey="lsst",
        bands=("g", "r"),
        stamp_size=SIZE,
        network=network,
        flow=FlowConfig(latent_dim=4, n_layers=2, hidden=(16,)),
        reference_fwhm_pixels=psf_module.REFERENCE_FWHM_PIXELS,
    )
    prior = GalaxyPrior.init(jax.random.key(0), config)
    data = {"noisy": stamps.noisy, "noiseless": stamps.noiseless}
    return survey, prior, {k: v[:64] for k, v in data.items()}, {k: v[64:] for k, v in data.items()}


def test_psf_aware_vae_trains_through_the_bank(tiny_reference, bank):
    survey, prior, train, val = tiny_reference
    prior = with_data_amplitude(prior, train["noiseless"])
    stage = StageConfig(epochs=8, batch_size=16, learning_rate=3e-3, snr_cap=100.0, augment=True)
    _, log = train_vae(
        prior,
        train,
        val,
        sky_variance=survey.sky_variance,
        config=stage,
        progress=False,
        psf_bank=bank,
    )
    assert log[-1].metrics["val_loss"] < 0.7 * log[0].metrics["val_loss"]
    assert log[-1].train_loss < 0.6 * log[0].train_loss
    assert all(np.isfinite(h.metrics["val_flux_width68"]) for h in log)
    with pytest.raises(ValueError, match="PSF-aware"):
        plain = dataclasses.replace(prior.config.network, psf_features=0)
        other = GalaxyPrior.init(
            jax.random.key(0), dataclasses.replace(prior.config, network=plain)
        )
        train_vae(other, train, val, sky_variance=survey.sky_variance, config=stage, psf_bank=bank)


def test_train_prior_psf_aware_end_to_end(tmp_path):
    import json

    from madness_ppl.simulate import BlendConfig, simulate_dataset
    from madness_ppl.train import TrainConfig, train_prior

    common = {"bands": ("g", "r"), "stamp_size": SIZE, "progress": False, "psf": "reference"}
    simulate_dataset(tmp_path / "iso_train", kind="isolated", n=64, seed=1, **common)
    simulate_dataset(tmp_path / "iso_val", kind="isolated", n=32, seed=2, **common)
    blends = BlendConfig(field_size=SIZE, n_galaxies=(1, 2), central_galaxy=True, stamp_size=SIZE)
    for name, seed in (("bl_train", 3), ("bl_val", 4)):
        simulate_dataset(
            tmp_path / name, kind="blends", n=32, seed=seed, blend_config=blends, **common
        )
    config = TrainConfig(
        latent_dim=4,
        flow_layers=2,
        flow_hidden=(8,),
        vae=StageConfig(epochs=1, batch_size=16, augment=True, snr_cap=100.0),
        flow=StageConfig(epochs=1, batch_size=32),
        deblender=StageConfig(epochs=1, batch_size=16),
        psf=PSFDistribution(),
        psf_bank_size=16,
    )
    paths = [tmp_path / n for n in ("iso_train", "iso_val", "bl_train", "bl_val")]
    _, report = train_prior(*paths, tmp_path / "prior", config=config, progress=False)
    loaded = GalaxyPrior.load(tmp_path / "prior")
    assert loaded.config.reference_fwhm_pixels == psf_module.REFERENCE_FWHM_PIXELS
    assert loaded.psf_aware and loaded.config.network.psf_features == 3
    assert "--psf-aware" in report["command"]
    card = (tmp_path / "prior" / "README.md").read_text()
    assert "model frame" in card and '0.35"-1.7"' in card
    assert json.loads(json.dumps(report["train_config"]))["psf"]["fwhm_range"] == [0.35, 1.7]
    assert np.isfinite(report["history"]["deblender"][-1]["metrics"]["val_latent_rms"])
    # the held-out report is measured through fixed observed PSFs, not at the model frame's
    by_psf = report["reconstruction"]["by_psf"]
    assert list(by_psf) == ["narrow", "median", "wide"]
    fwhm_r = [by_psf[c]["fwhm"]["r"] for c in by_psf]
    assert np.allclose(fwhm_r, np.array([0.6, 1.0, 1.6]) * Survey.lsst().band("r").psf_fwhm)
    for row in by_psf.values():
        assert all(np.isfinite(v) for k, v in row.items() if k != "fwhm")
    median = report["reconstruction"]["r_aperture_flux_rel_error"]["width68"]
    assert median == by_psf["median"]["r_flux_width68"]
    assert np.isfinite(report["reconstruction"]["shape_bright_half"]["e_rms"])
    for v in report["deblender"].values():
        assert np.isfinite(v["latent_rms"]) and np.isfinite(
            v["r_aperture_flux_rel_error"]["width68"]
        )
    assert "fixed round Kolmogorov PSFs" in card and "| wide |" in card
    # survey-PSF datasets are refused by a PSF-aware run (and the reverse)
    simulate_dataset(
        tmp_path / "survey_iso", kind="isolated", n=8, seed=5, **{**common, "psf": "survey"}
    )
    with pytest.raises(ValueError, match="--psf reference"):
        train_prior(tmp_path / "survey_iso", *paths[1:], tmp_path / "p2", config=config)
    plain = dataclasses.replace(config, psf=None)
    with pytest.raises(ValueError, match="psf-aware"):
        train_prior(*paths, tmp_path / "p3", config=plain)


def test_recipe_datasets_are_the_shipped_priors_layout_and_are_kept_on_rerun(tmp_path):
    from madness_ppl.simulate import read_config
    from madness_ppl.train.recipe import RecipeData, recipe_datasets

    sizes = RecipeData(isolated_train=12, isolated_val=6, blends_train=6, blends_val=6)
    paths = recipe_datasets("hsc", tmp_path, sizes=sizes, data_seed=200, progress=False)
    configs = [read_config(p) for p in paths]
    assert [c["seed"] for c in configs] == [201, 202, 203, 204]
    assert [c["n"] for c in configs] == list(sizes)
    assert all(c["psf"] == "reference" and c["survey"] == "hsc" for c in configs)
    assert configs[0]["bands"] == ["g", "r", "i", "z", "y"]
    layout = configs[2]["blend_config"]
    assert layout["field_size"] == layout["stamp_size"] == 45 and layout["central_galaxy"]
    assert layout["n_galaxies"] == [1, 3] and layout["max_shift"] == 2.0
    stamps = {p: sorted(p.glob("*.npz")) for p in paths}
    mtimes = {f: f.stat().st_mtime_ns for files in stamps.values() for f in files}
    again = recipe_datasets("hsc", tmp_path, sizes=sizes, data_seed=200, progress=False)
    assert again == paths
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())  # finished: not redone
