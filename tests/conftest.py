"""Shared fixtures: a tiny random galaxy prior (3 bands, 15-pixel stamps) that compiles fast."""

import jax
import pytest

from madness_ppl.nn import FlowConfig, NetworkConfig
from madness_ppl.prior import GalaxyPrior, PriorConfig

TINY_BANDS = ("g", "r", "i")


def make_tiny_prior(seed: int = 1) -> GalaxyPrior:
    """A randomly initialised 3-band prior with 15-pixel stamps and a 4-d latent space."""
    network = NetworkConfig.tiny(bands=3, latent_dim=4, width=8)
    config = PriorConfig(
        survey="lsst",
        bands=TINY_BANDS,
        stamp_size=15,
        network=network,
        flow=FlowConfig(latent_dim=4, n_layers=2, hidden=(8,)),
    )
    return GalaxyPrior.init(jax.random.key(seed), config)


@pytest.fixture(scope="module")
def tiny_prior() -> GalaxyPrior:
    return make_tiny_prior()
