import json

import numpy as np
import pytest

from madness_ppl.simulate import dataset as dataset_module
from madness_ppl.simulate import iter_shards, load_dataset, read_config, simulate_dataset
from madness_ppl.simulate.blends import BlendConfig

SMALL = dict(kind="isolated", survey="lsst", bands=("g", "r"), stamp_size=21, progress=False)


def test_isolated_dataset_round_trip(tmp_path):
    shards = simulate_dataset(tmp_path / "d", n=7, shard_size=3, seed=1, **SMALL)
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    data = load_dataset(tmp_path / "d")
    assert data["noisy"].shape == (7, 2, 21, 21)
    assert data["cat_flux_r"].shape == (7,)
    config = read_config(tmp_path / "d")
    assert config["n"] == 7 and config["bands"] == ["g", "r"] and config["seed"] == 1


def test_output_independent_of_worker_count(tmp_path):
    simulate_dataset(tmp_path / "one", n=6, shard_size=3, seed=5, workers=1, **SMALL)
    simulate_dataset(tmp_path / "two", n=6, shard_size=3, seed=5, workers=2, **SMALL)
    a, b = load_dataset(tmp_path / "one"), load_dataset(tmp_path / "two")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_blend_dataset_pads_sources(tmp_path):
    config = BlendConfig(
        field_size=45, n_galaxies=(1, 3), max_shift=2.0, central_galaxy=True, stamp_size=21
    )
    simulate_dataset(
        tmp_path / "b",
        kind="blends",
        n=5,
        bands=("r",),
        blend_config=config,
        progress=False,
        seed=2,
    )
    shard = next(iter_shards(tmp_path / "b"))
    n_max = shard["positions"].shape[1]
    assert shard["field"].shape == (5, 1, 45, 45)
    assert shard["isolated"].shape == (5, n_max, 1, 21, 21)
    for i, k in enumerate(shard["n_sources"]):
        assert np.all(np.isfinite(shard["positions"][i, :k]))
        assert np.all(np.isnan(shard["positions"][i, k:]))
        assert np.all(np.abs(shard["positions"][i, 0] - 22) <= 0.5)
    with pytest.raises(ValueError, match="iterate blends"):
        load_dataset(tmp_path / "b")


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "d"
    simulate_dataset(out, n=2, seed=0, **SMALL)
    with pytest.raises(FileExistsError, match=r"already exists.*overwrite"):
        simulate_dataset(out, n=2, seed=0, **SMALL)
    simulate_dataset(out, n=3, seed=0, overwrite=True, **SMALL)
    assert read_config(out)["n"] == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        simulate_dataset(tmp_path / "x", kind="stars", n=1, progress=False)
    with pytest.raises(ValueError, match="n must be a positive"):
        simulate_dataset(tmp_path / "x", kind="isolated", n=0, progress=False)
    with pytest.raises(ValueError, match="unknown band 'w'"):
        simulate_dataset(tmp_path / "x", kind="isolated", n=1, bands=("w",), progress=False)
    assert not (tmp_path / "x").exists()


def test_interrupt_leaves_no_partial_shard_and_resume_completes(tmp_path, monkeypatch):
    out = tmp_path / "d"
    real_savez = np.savez
    calls = {"n": 0}

    def flaky_savez(fh, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard is interrupted half-way through writing
            fh.write(b"partial bytes")
            raise KeyboardInterrupt
        real_savez(fh, **arrays)

    monkeypatch.setattr(dataset_module.np, "savez", flaky_savez)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(out, n=6, shard_size=2, seed=3, **SMALL)
    monkeypatch.setattr(dataset_module.np, "savez", real_savez)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".madness-ppl-output", "config.json", "shard_00000.npz"]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        list(iter_shards(out))
    simulate_dataset(out, n=6, shard_size=2, seed=3, resume=True, **SMALL)
    simulate_dataset(tmp_path / "ref", n=6, shard_size=2, seed=3, **SMALL)
    a, b = load_dataset(out), load_dataset(tmp_path / "ref")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # resuming with a different configuration is refused
    with pytest.raises(ValueError, match="different configuration"):
        simulate_dataset(out, n=6, shard_size=2, seed=4, resume=True, **SMALL)
    assert json.loads((out / "config.json").read_text())["seed"] == 3
