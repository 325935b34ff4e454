"""Offline galsim simulations: a galaxy population, isolated stamps, blended fields, datasets.

numpy + galsim only (no JAX), so that worker processes start fast.
"""

from madness_ppl.simulate.blends import Blend, BlendConfig, add_stamps, make_blend, sample_positions
from madness_ppl.simulate.catalog import (
    CatalogConfig,
    expected_density,
    make_catalog,
    rotate_shapes,
)
from madness_ppl.simulate.dataset import iter_shards, load_dataset, read_config, simulate_dataset
from madness_ppl.simulate.stamps import IsolatedStamps, add_noise, draw_galaxy, draw_isolated

__all__ = [
    "Blend",
    "BlendConfig",
    "CatalogConfig",
    "IsolatedStamps",
    "add_noise",
    "add_stamps",
    "draw_galaxy",
    "draw_isolated",
    "expected_density",
    "iter_shards",
    "load_dataset",
    "make_blend",
    "make_catalog",
    "read_config",
    "rotate_shapes",
    "sample_positions",
    "simulate_dataset",
]
