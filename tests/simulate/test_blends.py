import numpy as np
import pytest

from madness_ppl.simulate.blends import BlendConfig, add_stamps, make_blend, sample_positions
from madness_ppl.simulate.catalog import make_catalog
from madness_ppl.survey import Survey


@pytest.fixture(scope="module")
def lsst() -> Survey:
    return Survey.lsst().select_bands(["g", "r", "i"])


def test_blend_truth_is_consistent(lsst):
    config = BlendConfig(field_size=81, n_galaxies=(3, 5), max_shift=4.0, min_separation=1.0)
    blend = make_blend(lsst, rng=np.random.default_rng(0), config=config)
    n = len(blend.positions)
    assert 3 <= n <= 5
    assert blend.field.shape == (3, 81, 81) and blend.isolated.shape == (n, 3, 45, 45)
    assert np.all(np.abs(blend.positions - 40) <= 4.0 / 0.2 + 1e-9)
    d = np.hypot(*(blend.positions[:, None] - blend.positions[None]).transpose(2, 0, 1))
    assert d[np.triu_indices(n, 1)].min() >= 1.0 / 0.2
    # the noiseless field is the sum of the truth stamps when galaxies fit in them
    rebuilt = np.zeros_like(blend.noiseless)
    add_stamps(rebuilt, blend.isolated, np.rint(blend.positions))
    assert np.abs(rebuilt - blend.noiseless).max() < 0.02 * blend.noiseless.max()
    residual = (blend.field - blend.noiseless) / np.sqrt(blend.variance)
    assert residual.std() == pytest.approx(1.0, abs=0.03)
    assert set(blend.catalog.colnames) >= {"x", "y", "flux_r"}


def test_density_sets_the_mean_count(lsst):
    config = BlendConfig(field_size=205, density=60.0)
    rng = np.random.default_rng(1)
    from madness_ppl.simulate.blends import _galaxy_count

    counts = [_galaxy_count(config, 0.2, rng) for _ in range(400)]
    expected = 60.0 * (205 * 0.2 / 60) ** 2
    assert np.mean(counts) == pytest.approx(expected, rel=0.05)


def test_central_galaxy_and_edges(lsst):
    config = BlendConfig(field_size=45, n_galaxies=(2, 2), max_shift=2.0, central_galaxy=True)
    positions = sample_positions(2, config, 0.2, np.random.default_rng(2))
    assert np.all(np.abs(positions[0] - 22) <= 0.5)
    # a galaxy on the field edge is drawn partly, without error
    cat = make_catalog(1, lsst, rng=np.random.default_rng(3))
    blend = make_blend(
        lsst,
        rng=np.random.default_rng(4),
        config=BlendConfig(field_size=41),
        catalog=cat,
        positions=np.array([[0.0, 20.0]]),
    )
    assert blend.noiseless[:, :, :5].sum() > 0


def test_bad_layouts(lsst):
    with pytest.raises(ValueError, match="field_size must be a positive integer"):
        BlendConfig(field_size=-5)
    with pytest.raises(ValueError, match="n_galaxies"):
        BlendConfig(n_galaxies=(5, 2))
    with pytest.raises(ValueError, match="density must be"):
        BlendConfig(density=-1.0)
    with pytest.raises(ValueError, match="density too high"):
        sample_positions(
            50, BlendConfig(field_size=41, min_separation=2.0), 0.2, np.random.default_rng(0)
        )
    cat = make_catalog(1, lsst, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside the 41x41 field"):
        make_blend(
            lsst,
            rng=np.random.default_rng(0),
            config=BlendConfig(field_size=41),
            catalog=cat,
            positions=np.array([[50.0, 3.0]]),
        )
