"""The benchmark field sets (``benchmarks/fields.py``): each is one definition that redraws the
fields the committed results were made on, and the README's table is the module's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fields

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_readme_table_of_field_sets_is_the_modules():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert fields.markdown_table() in readme


@pytest.mark.parametrize("population", fields.POPULATIONS)
def test_tight_set_redraws_the_fields_of_the_committed_tight_records(population):
    stored = json.loads((RESULTS / "tight" / f"{population}__refine=8.json").read_text())
    seed, n_fields = stored["settings"]["seed"], stored["settings"]["fields"]
    tight = fields.field_set("tight", population)
    counts = [len(tight.draw([seed, k]).blend.positions) for k in range(n_fields)]
    assert [c for c in counts if c] == [r["n"] for r in stored["records"]]


@pytest.mark.parametrize(("name", "method"), [("lsst", "madness"), ("ood", "blend")])
def test_headline_set_redraws_a_committed_field(name, method):
    path = RESULTS / "deblend_vs_scarlet2" / f"{method}_{name}_205.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    blend = fields.SETS[name].draw(record["seed"]).blend
    assert len(blend.positions) == record["n_galaxies"]
    i_mag = [row["i_mag"] for row in sorted(record["rows"], key=lambda row: row["galaxy"])]
    np.testing.assert_allclose(np.asarray(blend.catalog["i_mag"]), i_mag, rtol=1e-12)


def test_layouts_keep_counts_margins_and_sizes():
    tight = fields.SETS["tight"]
    for k in range(5):
        blend = tight.draw([9, k]).blend
        n = len(blend.positions)
        assert 2 <= n <= 6
        assert blend.field.shape[-2:] == (80, 80)
        assert np.all((blend.positions >= 20) & (blend.positions <= 60))
    small = fields.SETS["crowded"].draw(3, field_size=64).blend
    assert small.field.shape[-2:] == (64, 64)
    assert fields.SETS["crowded"].config().density == pytest.approx(
        3.0 * fields.SETS["lsst"].config().density
    )


def test_out_of_distribution_sets_widen_the_psf_and_change_the_galaxies():
    lsst, ood = fields.SETS["high"], fields.SETS["high-ood"]
    for a, b in zip(lsst.survey().bands, ood.survey().bands, strict=True):
        assert b.psf_fwhm == pytest.approx(fields.OOD_PSF_SCALE * a.psf_fwhm)
    assert fields.catalog_config_for(ood.population).size_median == 0.8
    assert fields.catalog_config_for(lsst.population) is None


def test_psf_sets_draw_a_psf_per_field_within_their_widths():
    wide = fields.field_set("psf-wide", fields.OUT_OF_DISTRIBUTION)
    assert wide.name == "psf-wide-ood"
    field = wide.draw([4, 0], field_size=48)
    assert 1.4 <= field.psf_info["factor"] <= 1.8
    images = field.psf_images()
    assert images.shape == (len(field.survey.bands), fields.PSF_IMAGE_SIZE, fields.PSF_IMAGE_SIZE)
    np.testing.assert_allclose(images.sum(axis=(-2, -1)), 1.0, rtol=1e-6)
    # the field's PSF replaces the population's: the survey is LSST's, not 15 % wider
    assert field.survey == fields.SETS["lsst"].survey()
    survey_psf = field.survey.psf_images(fields.PSF_IMAGE_SIZE)
    assert np.all(images.max(axis=(-2, -1)) < survey_psf.max(axis=(-2, -1)))  # wider: lower peak


def test_unknown_sets_and_populations_are_refused_by_name():
    with pytest.raises(KeyError, match="no field set 'lsst-ood'; known: lsst, dense"):
        fields.field_set("lsst", fields.OUT_OF_DISTRIBUTION)
    with pytest.raises(ValueError, match="population must be one of"):
        fields.field_set("tight", "elsewhere")
