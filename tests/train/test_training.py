"""A few training steps on tiny simulated data: losses go down, checkpoints resume exactly."""

import jax
import numpy as np
import pytest

from madness_ppl.nn import FlowConfig, NetworkConfig
from madness_ppl.prior import GalaxyPrior, PriorConfig
from madness_ppl.simulate import draw_isolated, make_catalog
from madness_ppl.survey import Survey
from madness_ppl.train import StageConfig, train_flow, train_vae
from madness_ppl.train.checkpoint import load_checkpoint, save_checkpoint

SIZE = 15


@pytest.fixture(scope="module")
def tiny():
    survey = Survey.lsst().select_bands(["g", "r"])
    rng = np.random.default_rng(0)
    cat = make_catalog(96, survey, rng=rng)
    cat["disk_hlr"] = np.minimum(cat["disk_hlr"], 0.5)
    stamps = draw_isolated(cat, survey, rng=rng, stamp_size=SIZE)
    data = {"noisy": stamps.noisy, "noiseless": stamps.noiseless}
    network = NetworkConfig.tiny(stamp_size=SIZE, latent_dim=4, width=8, dense=32)
    config = PriorConfig(
        survey="lsst",
        bands=("g", "r"),
        stamp_size=SIZE,
        network=network,
        flow=FlowConfig(latent_dim=4, n_layers=2, hidden=(16,)),
    )
    prior = GalaxyPrior.init(jax.random.key(0), config)
    train = {k: v[:64] for k, v in data.items()}
    val = {k: v[64:] for k, v in data.items()}
    return survey, prior, train, val


def test_vae_and_flow_losses_decrease(tiny):
    from madness_ppl.train.stages import with_data_amplitude

    survey, prior, train, val = tiny
    prior = with_data_amplitude(prior, train["noiseless"])
    stage = StageConfig(epochs=8, batch_size=16, learning_rate=3e-3, snr_cap=100.0)
    trained, log = train_vae(
        prior, train, val, sky_variance=survey.sky_variance, config=stage, progress=False
    )
    # 32 steps on 64 stamps: measured 1.30 -> 0.54 (held out) and 2.58 -> 0.80 (training)
    assert log[-1].metrics["val_loss"] < 0.6 * log[0].metrics["val_loss"]
    assert log[-1].train_loss < 0.5 * log[0].train_loss

    # the reconstruction moved towards the data: the held-out chi2 of decode(encode(noisy))
    # against the noiseless truth falls well below the untrained networks' (same amplitude head)
    def chi2(p):
        recon = np.asarray(p.decode(p.encode(val["noisy"])))
        sky = np.asarray(survey.sky_variance)[None, :, None, None]
        return float(np.mean((recon - val["noiseless"]) ** 2 / sky))

    before, after = chi2(prior), chi2(trained)  # measured 98 -> 33
    assert np.isfinite(after) and after < 0.5 * before
    _, flow_log = train_flow(
        trained,
        train["noisy"],
        val["noisy"],
        config=StageConfig(epochs=6, batch_size=32, learning_rate=3e-3),
        progress=False,
    )
    assert flow_log[-1].train_loss < flow_log[0].train_loss
    assert np.isfinite(flow_log[-1].metrics["val_nll"])


def test_resume_continues_identically(tiny, tmp_path, monkeypatch):
    import madness_ppl.train.loop as loop

    survey, prior, train, val = tiny
    kwargs = dict(
        sky_variance=survey.sky_variance,
        progress=False,
        seed=3,
        config=StageConfig(epochs=2, batch_size=32),
    )
    straight, _ = train_vae(prior, train, val, **kwargs)

    real_save = loop.save_checkpoint

    def save_then_die(*args):  # the run is killed right after its first checkpoint
        real_save(*args)
        raise KeyboardInterrupt

    ckpt = tmp_path / "vae.ckpt.npz"
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_vae(prior, train, val, checkpoint=ckpt, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed, log = train_vae(prior, train, val, checkpoint=ckpt, resume=True, **kwargs)
    assert [h.epoch for h in log] == [0, 1]  # epoch 0 restored from the checkpoint, 1 trained
    a = jax.tree_util.tree_leaves(straight.decoder_params)
    b = jax.tree_util.tree_leaves(resumed.decoder_params)
    assert all(np.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b, strict=True))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    state = {"a": np.arange(3.0), "b": (np.ones((2, 2)), np.zeros(1))}
    save_checkpoint(tmp_path / "c.npz", state, {"epoch": 4})
    loaded, record = load_checkpoint(tmp_path / "c.npz", state)
    assert record == {"epoch": 4}
    assert np.array_equal(loaded["b"][0], state["b"][0])
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="different configuration"):
        load_checkpoint(tmp_path / "c.npz", {"a": np.arange(3.0)})


def test_per_band_peak_normalisation(tiny):
    from madness_ppl.train.pipeline import per_band_peak

    _, _, train, _ = tiny
    nu = per_band_peak(train["noiseless"])
    peaks = train["noiseless"].max(axis=(-2, -1))
    assert len(nu) == 2
    for b in range(2):
        assert np.mean(peaks[:, b] <= nu[b]) == pytest.approx(0.5, abs=1 / len(peaks))
    with pytest.raises(ValueError, match="median peak"):
        per_band_peak(np.zeros((4, 2, SIZE, SIZE)))


def test_train_prior_end_to_end_writes_a_generated_model_card(tmp_path):
    import json

    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.simulate import BlendConfig, simulate_dataset
    from madness_ppl.train import TrainConfig, train_prior
    from madness_ppl.train.pipeline import model_card

    common = {"bands": ("g", "r", "i"), "stamp_size": SIZE, "progress": False}
    simulate_dataset(tmp_path / "iso_train", kind="isolated", n=96, seed=1, **common)
    simulate_dataset(tmp_path / "iso_val", kind="isolated", n=48, seed=2, **common)
    blends = BlendConfig(field_size=SIZE, n_galaxies=(1, 2), central_galaxy=True, stamp_size=SIZE)
    for name, seed in (("bl_train", 3), ("bl_val", 4)):
        simulate_dataset(
            tmp_path / name, kind="blends", n=32, seed=seed, blend_config=blends, **common
        )
    fast = StageConfig(epochs=1, batch_size=16, augment=True, snr_cap=100.0)
    config = TrainConfig(
        latent_dim=4,
        flow_layers=2,
        flow_hidden=(8,),
        vae=fast,
        flow=StageConfig(epochs=1, batch_size=32),
        deblender=StageConfig(epochs=1, batch_size=16),
    )
    out = tmp_path / "prior"
    _, report = train_prior(
        *(tmp_path / n for n in ("iso_train", "iso_val", "bl_train", "bl_val")),
        out,
        config=config,
        progress=False,
    )
    loaded = GalaxyPrior.load(out)
    assert loaded.config.network.upsampling == "subpixel" and loaded.config.network.amplitude
    card = (out / "README.md").read_text()
    assert card == model_card(json.loads((tmp_path / "prior.work" / "report.json").read_text()))
    assert str(tmp_path) not in card  # no paths of the training machine
    rec = report["reconstruction"]
    assert f"{rec['chi2_per_pixel']:.3f}" in card
    assert set(rec["band_flux_ratio_median"]) == {"g", "r", "i"}
    assert set(rec["colour_width68"]) == {"g-r", "r-i"}
    assert "val_e_rms_bright" in report["history"]["vae"][0]["metrics"]
    for figure in ("reconstructions.png", "samples.png", "training_curves.png"):
        assert (tmp_path / "prior.work" / figure).stat().st_size > 1000


def test_resume_refuses_a_checkpoint_of_other_settings(tiny, tmp_path):
    survey, prior, train, val = tiny
    ckpt = tmp_path / "vae.ckpt.npz"
    kwargs = dict(sky_variance=survey.sky_variance, progress=False, checkpoint=ckpt)
    train_vae(prior, train, val, config=StageConfig(epochs=1, batch_size=32), **kwargs)
    other = StageConfig(epochs=2, batch_size=32, beta=0.5)  # same array shapes, other run
    with pytest.raises(ValueError, match="other settings"):
        train_vae(prior, train, val, config=other, resume=True, **kwargs)


def test_resumed_flow_restarts_when_the_encoder_under_it_changed(tiny, tmp_path, capsys):
    """Resuming a run whose VAE stage trained further must not reuse the flow checkpoint fitted
    to the old encoder's latents (a silently wrong prior): the flow stage starts afresh."""
    survey, prior, train, val = tiny
    ckpt = tmp_path / "flow.ckpt.npz"
    flow_kwargs = dict(config=StageConfig(epochs=2, batch_size=32), progress=False, seed=1)
    _, first = train_flow(prior, train["noisy"], val["noisy"], checkpoint=ckpt, **flow_kwargs)
    # same encoder: the finished checkpoint is resumed, no epoch is trained again
    _, again = train_flow(
        prior, train["noisy"], val["noisy"], checkpoint=ckpt, resume=True, **flow_kwargs
    )
    assert [h.epoch for h in again] == [0, 1]
    assert [h.train_loss for h in again] == [h.train_loss for h in first]
    assert "afresh" not in capsys.readouterr().out

    trained, _ = train_vae(  # the stage below changes
        prior,
        train,
        val,
        sky_variance=survey.sky_variance,
        config=StageConfig(epochs=1, batch_size=32),
        progress=False,
    )
    retrained, log = train_flow(
        trained, train["noisy"], val["noisy"], checkpoint=ckpt, resume=True, **flow_kwargs
    )
    assert "afresh" in capsys.readouterr().out
    assert [h.epoch for h in log] == [0, 1]
    # both epochs ran now, on the new encoder's latents: the same as a run without a checkpoint
    fresh, fresh_log = train_flow(trained, train["noisy"], val["noisy"], **flow_kwargs)
    assert [h.train_loss for h in log] == pytest.approx([h.train_loss for h in fresh_log])
    a = jax.tree_util.tree_leaves(retrained.flow_params)
    b = jax.tree_util.tree_leaves(fresh.flow_params)
    assert all(np.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["lsst", "lsst-v0.2", "lsst-v0.1.0"])
def test_shipped_model_cards_are_generated_from_their_reports(name, tmp_path):
    """No number of a shipped card is typed by hand: each README equals the card that
    ``write_model_card`` generates from the prior's own ``report.json``."""
    import shutil
    from pathlib import Path

    import madness_ppl
    from madness_ppl.train.pipeline import write_model_card

    shipped = Path(madness_ppl.__file__).parent / "weights" / name
    copy = tmp_path / name
    copy.mkdir()
    for item in shipped.iterdir():
        if item.suffix in (".json", ".png"):
            shutil.copy(item, copy / item.name)
    generated = write_model_card(copy).read_text()
    assert generated == (shipped / "README.md").read_text()
    assert "/work/" not in generated  # no path of the training machine
