"""DeblendOptions / Detection / BatchConfig: one value carries every deblending setting."""

import dataclasses

import jax
import numpy as np
import pytest

from madness_ppl.cutouts import paste_stamps
from madness_ppl.deblend import deblend
from madness_ppl.errors import MadnessInputError
from madness_ppl.options import REFINE_TOL_FACTOR, BatchConfig, DeblendOptions, Detection


def test_replace_routes_detection_aliases_and_fit_keywords():
    options = DeblendOptions(max_steps=50).replace(
        detect_threshold=5.0, detect_contrast=0.001, errors=False, chunk_size=7
    )
    assert options.max_steps == 50 and options.errors is False
    assert options.detection == Detection(threshold=5.0, contrast=0.001)
    assert dict(options.fit_options) == {"chunk_size": 7}
    # later fit keywords join the earlier ones; the original value is unchanged (frozen)
    again = options.replace(seed=3)
    assert dict(again.fit_options) == {"chunk_size": 7, "seed": 3}
    assert DeblendOptions().fit_options == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_steps = 3


def test_refine_tolerance_follows_tol_unless_given():
    assert DeblendOptions(tol=2e-3).refine_tolerance == pytest.approx(REFINE_TOL_FACTOR * 2e-3)
    assert DeblendOptions(tol=2e-3, refine_tol=0.5).refine_tolerance == 0.5
    assert DeblendOptions(refine_tol=np.inf).refine_tolerance == np.inf  # never a step


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_steps": 0}, "max_steps must be an integer >= 1, got 0"),
        ({"max_steps": 2.5}, "max_steps must be an integer >= 1"),
        ({"max_steps": True}, "max_steps must be an integer >= 1"),
        ({"refine": -1}, "refine must be an integer >= 0"),
        ({"start_passes": 1.0}, "start_passes must be an integer >= 0"),
        ({"method": "adam"}, "method must be 'lbfgs' or 'svi'"),
        ({"start": "zero"}, "start must be 'refined' or 'deblender'"),
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"tol": float("nan")}, "tol must be a positive number"),
        ({"refine_tol": -1.0}, "refine_tol must be a number >= 0"),
        ({"detect_threshold": -5.0}, "detect_threshold must be a positive number"),
        ({"detect_contrast": 1.5}, "detect_contrast must be a flux fraction"),
        ({"detect_min_area": 0}, "min_area must be an integer >= 1"),
        ({"detect_nthresh": 2.0}, "nthresh must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_when_made(changes, message):
    with pytest.raises(MadnessInputError, match=message):
        DeblendOptions().replace(**changes)


def test_settings_lists_only_what_differs_from_the_defaults_as_json():
    assert DeblendOptions().settings() == {}
    options = DeblendOptions(model_error=np.array([0.01, 0.02]), refine=0).replace(
        detect_contrast=0.001
    )
    assert options.settings() == {
        "detect_contrast": 0.001,
        "refine": 0,
        "model_error": [0.01, 0.02],
    }


def test_batch_config_carries_the_options_and_refuses_other_values():
    config = BatchConfig(options=DeblendOptions(max_steps=7))
    assert config.options.max_steps == 7 and config.settings()["max_steps"] == 7
    with pytest.raises(MadnessInputError, match="options must be a DeblendOptions"):
        BatchConfig(options={"max_steps": 7})


def test_options_and_keywords_give_the_same_deblend(tiny_prior):
    """``deblend(options=...)`` and the same settings as keywords are one fit."""
    rng = np.random.default_rng(0)
    z = np.asarray(tiny_prior.latent_distribution().sample(jax.random.PRNGKey(1), (2,)))

    positions = np.array([[12.0, 14.0], [20.0, 17.0]])
    stamps = np.asarray(tiny_prior.decode(z))
    field = paste_stamps(stamps, positions, (3, 32, 32)) + rng.normal(0, 1.0, (3, 32, 32))
    variance = np.ones_like(field)
    options = DeblendOptions(max_steps=5, refine=0, errors=False)
    a = deblend(field, variance, positions, prior=tiny_prior, options=options)
    b = deblend(field, variance, positions, prior=tiny_prior, max_steps=5, refine=0, errors=False)
    assert int(a.fit.n_steps) == int(b.fit.n_steps) <= 5
    np.testing.assert_array_equal(a.catalog["flux_r"], b.catalog["flux_r"])
    assert "flux_r_err" not in a.catalog.colnames


def test_every_detection_setting_reaches_sep(tiny_prior):
    """``Detection`` fields are :func:`measure.detect`'s keywords: a minimum area larger than
    any galaxy's footprint finds nothing where the default finds the simulated galaxies."""
    from madness_ppl.prepare import prepare_field
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst().select_bands(tiny_prior.bands)
    config = BlendConfig(field_size=64, n_galaxies=(3, 3), margin=12)
    blend = make_blend(survey, config=config, rng=np.random.default_rng(2))
    found = {
        area: len(
            prepare_field(blend.field, tiny_prior, detection=Detection(min_area=area)).positions
        )
        for area in (5, 64 * 64)
    }
    assert found[5] >= 1 and found[64 * 64] == 0, found
    assert Detection(min_area=9, nthresh=8).sep_keywords() == {
        "threshold": 3.0,
        "deblend_cont": 0.005,
        "min_area": 9,
        "deblend_nthresh": 8,
    }
