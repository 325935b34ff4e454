"""Both shipped galaxy priors satisfy the GalaxyModel contract the scene relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.galaxy_model import GalaxyModel, ScoredGalaxyModel
from madness_ppl.prior import FlowConfig, GalaxyPrior, NetworkConfig, PriorConfig
from madness_ppl.toy import LinearGaussianPrior


def _priors():
    toy = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=15, latent_dim=3)
    network = NetworkConfig.tiny()
    learned = GalaxyPrior.init(
        jax.random.key(1),
        PriorConfig(
            bands=("g", "r"),
            stamp_size=15,
            network=network,
            flow=FlowConfig(latent_dim=3, n_layers=2, hidden=(8,)),
        ),
    )
    return {"toy": toy, "learned": learned}


@pytest.mark.parametrize("name", ["toy", "learned"])
def test_priors_satisfy_galaxy_model(name):
    prior = _priors()[name]
    assert isinstance(prior, GalaxyModel)
    d, b, s = prior.latent_dim, len(prior.bands), prior.stamp_size
    assert (d, b, s) == (3, 2, 15)
    latent = prior.latent_distribution()
    assert latent.batch_shape == () and latent.event_shape == (d,)
    stamps = prior.decode(jnp.zeros((4, d)))
    assert stamps.shape == (4, b, s, s)
    z = prior.deblend_encode(np.asarray(stamps))
    assert z.shape == (4, d)


def test_an_object_without_decode_is_not_a_galaxy_model():
    class Half:
        bands, stamp_size, latent_dim = ("g",), 15, 3

        def latent_distribution(self):
            return None

    assert not isinstance(Half(), GalaxyModel)


def test_both_priors_are_scored_galaxy_models_and_a_decoder_alone_is_not(tiny_prior):
    """The Laplace errors, the refinement and the shear response need log_prob: the
    ScoredGalaxyModel protocol says so, and a model without it fails the check."""
    toy = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=9, latent_dim=3)
    assert isinstance(tiny_prior, ScoredGalaxyModel) and isinstance(toy, ScoredGalaxyModel)

    class DecoderOnly:
        bands, stamp_size, latent_dim = ("r",), 9, 3

        def latent_distribution(self):
            return None

        def decode(self, z):
            return z

        def deblend_encode(self, cutouts):
            return cutouts

    assert isinstance(DecoderOnly(), GalaxyModel)
    assert not isinstance(DecoderOnly(), ScoredGalaxyModel)
