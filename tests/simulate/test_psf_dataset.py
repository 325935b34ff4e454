"""Datasets drawn at the model frame's reference PSF (``--psf reference``)."""

import json

import numpy as np
import pytest

from madness_ppl.errors import MadnessInputError
from madness_ppl.simulate import load_dataset, read_config, simulate_dataset
from madness_ppl.simulate.blends import BlendConfig

SMALL = dict(survey="lsst", bands=("g", "r"), stamp_size=21, progress=False)


def _second_moment(images: np.ndarray) -> np.ndarray:
    """Unweighted <r^2> of each image about its centroid, for images with enough flux."""
    y, x = np.indices(images.shape[-2:])
    w = np.clip(images, 0, None)
    total = w.sum(axis=(-2, -1))
    xc = (w * x).sum(axis=(-2, -1)) / total
    yc = (w * y).sum(axis=(-2, -1)) / total
    r2 = (x - xc[..., None, None]) ** 2 + (y - yc[..., None, None]) ** 2
    return (w * r2).sum(axis=(-2, -1)) / total


def test_reference_psf_dataset_is_recorded_and_narrower(tmp_path):
    simulate_dataset(tmp_path / "ref", kind="isolated", n=12, seed=3, psf="reference", **SMALL)
    simulate_dataset(tmp_path / "survey", kind="isolated", n=12, seed=3, **SMALL)
    assert read_config(tmp_path / "ref")["psf"] == "reference"
    assert json.loads((tmp_path / "survey" / "config.json").read_text())["psf"] == "survey"
    ref, survey = load_dataset(tmp_path / "ref"), load_dataset(tmp_path / "survey")
    # same galaxies (same seed), same flux, drawn narrower: the PSF's second moment adds
    assert np.array_equal(ref["cat_flux_r"], survey["cat_flux_r"])
    m_ref, m_survey = _second_moment(ref["noiseless"]), _second_moment(survey["noiseless"])
    assert np.all(m_ref < m_survey)
    # second moments add under convolution: the 0.81" survey PSF adds > 2 sigma_Gauss^2 - that
    # of the 1.5 px reference (> 5 px^2; more with its Kolmogorov wings, cut by the stamp)
    assert np.median(m_survey[:, 1] - m_ref[:, 1]) > 5.0
    assert np.allclose(
        ref["noiseless"].sum(axis=(-2, -1)), survey["noiseless"].sum(axis=(-2, -1)), rtol=0.1
    )


def test_old_datasets_mean_survey_psf_and_resume_them(tmp_path):
    out = tmp_path / "old"
    simulate_dataset(out, kind="isolated", n=6, shard_size=3, seed=1, **SMALL)
    config = json.loads((out / "config.json").read_text())
    del config["psf"]  # as written before the key existed
    (out / "config.json").write_text(json.dumps(config))
    (out / "shard_00001.npz").unlink()
    assert read_config(out)["psf"] == "survey"
    simulate_dataset(out, kind="isolated", n=6, shard_size=3, seed=1, resume=True, **SMALL)
    assert load_dataset(out)["noisy"].shape[0] == 6
    with pytest.raises(MadnessInputError, match="psf"):
        simulate_dataset(tmp_path / "bad", kind="isolated", n=2, psf="narrow", **SMALL)


def test_reference_psf_blends(tmp_path):
    layout = BlendConfig(field_size=21, n_galaxies=(1, 2), central_galaxy=True, stamp_size=21)
    common = dict(kind="blends", n=3, seed=2, blend_config=layout, **SMALL)
    simulate_dataset(tmp_path / "ref", psf="reference", **common)
    simulate_dataset(tmp_path / "survey", **common)
    assert read_config(tmp_path / "ref")["psf"] == "reference"
    from madness_ppl.simulate import iter_shards

    ref, survey = next(iter_shards(tmp_path / "ref")), next(iter_shards(tmp_path / "survey"))
    assert np.all(_second_moment(ref["isolated"][:, 0]) < _second_moment(survey["isolated"][:, 0]))
