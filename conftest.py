"""Test configuration (tests and doctests): JAX on the CPU, seeded generators."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# the CLI turns on the persistent compilation cache; tests must not write into the home directory
os.environ.setdefault("MADNESS_PPL_NO_COMPILE_CACHE", "1")

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator, fresh for every test."""
    return np.random.default_rng(12345)
