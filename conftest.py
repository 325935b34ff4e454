"""Test configuration (tests and doctests): JAX on the CPU, seeded generators."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator, fresh for every test."""
    return np.random.default_rng(12345)
