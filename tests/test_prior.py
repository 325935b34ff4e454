"""Tests for madness_ppl.prior: FlowPrior, PriorConfig and GalaxyPrior persistence/pytree."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

from madness_ppl import prior as prior_module
from madness_ppl.nn import FlowConfig, NetworkConfig, flow_log_prob, init_flow, vae
from madness_ppl.nn import decode as net_decode
from madness_ppl.nn.flow import flow_inverse
from madness_ppl.prior import FlowPrior, GalaxyPrior, PriorConfig, available_priors

D = 3
NET = NetworkConfig.tiny(latent_dim=D)
FLOW = FlowConfig(latent_dim=D, n_layers=2, hidden=(8,))
CONFIG = PriorConfig(
    survey="toy",
    bands=("g", "r"),
    stamp_size=15,
    network=NET,
    flow=FLOW,
    version="test",
    metadata={"note": "unit test", "n_train": 3},
)


def perturb(tree, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x + scale * rng.normal(size=x.shape), x.dtype), tree
    )


@pytest.fixture(scope="module")
def galaxy_prior() -> GalaxyPrior:
    prior = GalaxyPrior.init(jax.random.key(0), CONFIG, deblender=True)
    return prior.replace(flow_params=perturb(prior.flow_params))  # a non-identity flow


def model(prior, n=5):
    with numpyro.plate("sources", n):
        return numpyro.sample("z", prior.latent_distribution())


# ----------------------------------------------------------------------------- FlowPrior


def test_flow_prior_in_plate_and_predictive(galaxy_prior):
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(galaxy_prior)
    site = trace["z"]
    assert site["value"].shape == (5, D)
    assert site["fn"].batch_shape == (5,) and site["fn"].event_shape == (D,)
    lp = site["fn"].log_prob(site["value"])
    assert lp.shape == (5,)
    np.testing.assert_allclose(lp, galaxy_prior.log_prob(site["value"]), rtol=1e-6)
    density, _ = log_density(model, (galaxy_prior,), {}, {"z": site["value"]})
    np.testing.assert_allclose(density, jnp.sum(lp), rtol=1e-5)
    draws = Predictive(model, num_samples=4)(jax.random.key(1), galaxy_prior)["z"]
    assert draws.shape == (4, 5, D)
    assert len(np.unique(np.asarray(draws).reshape(-1, D), axis=0)) == 20


def test_flow_prior_expand_batch_and_pytree(galaxy_prior):
    base = galaxy_prior.latent_distribution()
    assert base.batch_shape == () and base.support is numpyro.distributions.constraints.real_vector
    expanded = base.expand((2, 3))
    assert isinstance(expanded, FlowPrior) and expanded.batch_shape == (2, 3)
    assert expanded.sample(jax.random.key(0), (4,)).shape == (4, 2, 3, D)
    assert expanded.log_prob(jnp.zeros(D)).shape == (2, 3)  # broadcast against the batch
    with pytest.raises(ValueError, match="cannot expand"):
        expanded.expand((4,))
    # the distribution is a pytree: it crosses jit and vmap
    z = jnp.ones((2, 3, D))
    via_jit = jax.jit(lambda dist, v: dist.log_prob(v))(expanded, z)
    np.testing.assert_allclose(via_jit, flow_log_prob(galaxy_prior.flow_params, FLOW, z), rtol=1e-6)
    keys = jax.random.split(jax.random.key(3), 4)
    vmapped = jax.vmap(lambda k: numpyro.handlers.seed(model, k)(galaxy_prior))(keys)
    assert vmapped.shape == (4, 5, D)


# ----------------------------------------------------------------------------- GalaxyPrior


def test_prior_methods_and_units(galaxy_prior):
    assert galaxy_prior.bands == ("g", "r") and galaxy_prior.stamp_size == 15
    assert galaxy_prior.latent_dim == D
    assert galaxy_prior.normalisation.shape == (2, 1, 1)
    assert np.all(galaxy_prior.normalisation == 1e4)
    z = jax.random.normal(jax.random.key(0), (4, D))
    img = galaxy_prior.decode(z)
    assert img.shape == (4, 2, 15, 15)
    np.testing.assert_allclose(
        img, 1e4 * net_decode(galaxy_prior.decoder_params, NET, z), rtol=1e-6
    )
    mean = galaxy_prior.encode(img)
    full = galaxy_prior.encode(img, with_scale=True)
    assert mean.shape == (4, D) and full.scale_tril.shape == (4, D, D)
    np.testing.assert_array_equal(mean, full.mean)
    # deblender: its own parameters when present, the VAE encoder otherwise
    assert not np.allclose(galaxy_prior.deblend_encode(img), mean)
    fallback = galaxy_prior.replace(deblender_params=None)
    np.testing.assert_array_equal(fallback.deblend_encode(img), mean)
    assert "GalaxyPrior(survey='toy'" in repr(galaxy_prior)


def test_prior_is_a_pytree_that_crosses_jit(galaxy_prior):
    leaves = jax.tree_util.tree_leaves(galaxy_prior)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)

    @jax.jit
    def objective(prior, z):
        return jnp.sum(prior.decode(z)) - jnp.sum(prior.log_prob(z))

    z = jnp.zeros((2, D))
    expected = float(jnp.sum(galaxy_prior.decode(z)) - jnp.sum(galaxy_prior.log_prob(z)))
    np.testing.assert_allclose(float(objective(galaxy_prior, z)), expected, rtol=1e-5)
    other = galaxy_prior.replace(decoder_params=perturb(galaxy_prior.decoder_params, seed=1))
    assert float(objective(other, z)) != float(objective(galaxy_prior, z))
    assert objective._cache_size() == 1  # new parameters, same config: no recompilation
    doubled = jax.tree_util.tree_map(np.asarray, galaxy_prior)
    assert isinstance(doubled, GalaxyPrior) and doubled.config == galaxy_prior.config


def test_save_load_round_trip_is_bit_identical(galaxy_prior, tmp_path):
    target = galaxy_prior.save(tmp_path / "prior")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.safetensors"]
    vae._jitted_init.cache_clear()  # load traces the initialisers first (eval_shape): no leak
    loaded = GalaxyPrior.load(target)
    assert vae.init_decoder(jax.random.key(1), NET)["decoder/out"]["w"].shape == (3, 3, 4, 2)
    assert loaded.config == galaxy_prior.config
    assert loaded.config.metadata == {"note": "unit test", "n_train": 3}
    old, new = jax.tree_util.tree_leaves(galaxy_prior), jax.tree_util.tree_leaves(loaded)
    for a, b in zip(old, new, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    z = jax.random.normal(jax.random.key(5), (3, D))
    np.testing.assert_array_equal(loaded.decode(z), galaxy_prior.decode(z))
    np.testing.assert_array_equal(loaded.log_prob(z), galaxy_prior.log_prob(z))
    # overwrite protection, then an overwrite that leaves no temporary directory behind
    with pytest.raises(FileExistsError):
        galaxy_prior.save(target)
    no_deblender = galaxy_prior.replace(deblender_params=None)
    no_deblender.save(target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["prior"]
    assert GalaxyPrior.load(str(target)).deblender_params is None


def test_load_errors(galaxy_prior, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no shipped prior named 'nope'; available: \["):
        GalaxyPrior.load("nope")
    with pytest.raises(FileNotFoundError, match="no prior directory"):
        GalaxyPrior.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GalaxyPrior.load(tmp_path)

    target = galaxy_prior.save(tmp_path / "p")
    document = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        GalaxyPrior.load(target)

    wider = dict(document["config"])
    wider["network"] = {**wider["network"], "decoder_dense": 32}
    (target / "config.json").write_text(json.dumps({**document, "config": wider}))
    with pytest.raises(ValueError, match=r"has shape \(.*\) but the configuration expects"):
        GalaxyPrior.load(target)


def test_shipped_priors_resolve_by_name(galaxy_prior, tmp_path, monkeypatch):
    assert isinstance(available_priors(), list)
    monkeypatch.setattr(prior_module, "_weights_root", lambda: tmp_path / "weights")
    assert available_priors() == []
    galaxy_prior.save(tmp_path / "weights" / "toy")
    (tmp_path / "weights" / "not_a_prior").mkdir()
    assert available_priors() == ["toy"]
    loaded = GalaxyPrior.load("toy")
    np.testing.assert_array_equal(loaded.log_prob(jnp.ones(D)), galaxy_prior.log_prob(jnp.ones(D)))
    with pytest.raises(FileNotFoundError, match=r"available: \['toy'\]"):
        GalaxyPrior.load("lsst")


def test_prior_config_defaults_validation_and_hash():
    default = PriorConfig()
    assert default.bands == ("u", "g", "r", "i", "z", "y") and default.normalisation == (1e4,) * 6
    assert default.network == NetworkConfig.lean() and default.flow.latent_dim == 16
    same = PriorConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict())))
    assert same == CONFIG and hash(same) == hash(CONFIG)
    relabelled = PriorConfig(**{**vars(CONFIG), "metadata": {"other": 1}})
    assert relabelled == CONFIG and hash(relabelled) == hash(CONFIG)
    with pytest.raises(ValueError, match="bands"):
        PriorConfig(bands=("g", "r", "i"), stamp_size=15, network=NET, flow=FLOW)
    with pytest.raises(ValueError, match="latent_dim"):
        PriorConfig(bands=("g", "r"), stamp_size=15, network=NET, flow=FlowConfig(latent_dim=4))
    with pytest.raises(ValueError, match="normalisation"):
        PriorConfig(normalisation=0)
    with pytest.raises(ValueError, match="one value per band"):
        PriorConfig(normalisation=(1.0, 2.0))


def test_per_band_normalisation_scales_each_band(galaxy_prior):
    """Decoding multiplies band b by nu_b and encoding divides by it: same networks, same latents."""
    config = dataclasses.replace(galaxy_prior.config, normalisation=(2e4, 5e3))
    scaled = galaxy_prior.replace(config=config)
    z = jnp.linspace(-1.0, 1.0, D)
    base, out = galaxy_prior.decode(z), scaled.decode(z)
    np.testing.assert_allclose(out[0], 2 * base[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.5 * base[1], rtol=1e-6)
    np.testing.assert_allclose(scaled.encode(out), galaxy_prior.encode(base), rtol=1e-5, atol=1e-6)
    same = PriorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert same.normalisation == (2e4, 5e3)


def test_flow_prior_direct_construction():
    params = init_flow(jax.random.key(0), FLOW)
    fp = FlowPrior(params, FLOW, batch_shape=(2,))
    x = fp.sample(jax.random.key(1))
    assert x.shape == (2, D) and fp.batch_shape == (2,) and fp.event_shape == (D,)
    # the distribution's density is the flow's, one value per batch element
    np.testing.assert_allclose(fp.log_prob(x), flow_log_prob(params, FLOW, x), rtol=1e-6)
    assert fp.log_prob(x).shape == (2,)
    # samples are the flow's pushforward of N(0, I): inverting them gives back normal draws
    many = FlowPrior(params, FLOW).sample(jax.random.key(2), (4000,))
    u, _ = flow_inverse(params, FLOW, many)
    np.testing.assert_allclose(np.mean(u, 0), 0.0, atol=0.08)
    np.testing.assert_allclose(np.std(u, 0), 1.0, atol=0.08)


def test_shipped_priors_all_load_and_decode():
    old, new = GalaxyPrior.load("lsst-v0.1.0"), GalaxyPrior.load("lsst-v0.2")
    default = GalaxyPrior.load("lsst")
    assert old.config.version == "0.1.0" and new.config.version == "0.2.0"
    assert default.config.version == "0.3.1" and default.psf_aware and not new.psf_aware
    assert old.config.network.upsampling == "transpose" and not old.config.network.amplitude
    assert new.config.network.upsampling == "subpixel" and new.config.network.amplitude
    for prior in (old, new, default):
        z = prior.latent_distribution().sample(jax.random.key(0), (2,))
        image = np.asarray(prior.decode(z))
        assert image.shape == (2, 6, 45, 45) and np.all(np.isfinite(image)) and image.min() >= 0
        # galaxies, not blanks: light in g-z (u may be dead in v0.1.0), two different galaxies
        flux = image.sum(axis=(-1, -2))
        assert np.all(flux[:, 1:5] > 10.0), flux
        assert not np.allclose(image[0], image[1], rtol=0.05)
        assert np.unravel_index(image[0, 2].argmax(), (45, 45)) in {
            (y, x) for y in range(19, 26) for x in range(19, 26)
        }  # centred on the stamp
