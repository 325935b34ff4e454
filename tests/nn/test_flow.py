"""Tests for the RealNVP flow in madness_ppl.nn.flow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madness_ppl.nn.flow import (
    FlowConfig,
    _masks,
    flow_forward,
    flow_inverse,
    flow_log_prob,
    flow_sample,
    init_flow,
    standard_normal_log_prob,
)

CFG = FlowConfig(latent_dim=4, n_layers=6, hidden=(16,))


def perturbed_params(cfg: FlowConfig, seed: int = 0, scale: float = 0.3):
    """Initial parameters plus noise, so that no layer is the identity."""
    rng = np.random.default_rng(seed)
    params = init_flow(jax.random.key(seed), cfg)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x + scale * rng.normal(size=x.shape), x.dtype), params
    )


def test_log_prob_matches_numerical_jacobian():
    d = 3  # odd: the masks split the coordinates unevenly
    cfg = FlowConfig(latent_dim=d, n_layers=4, hidden=(8, 8))
    params = perturbed_params(cfg)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
        z = jax.random.normal(jax.random.key(2), (6, d), jnp.float64) * 1.5
        u, log_det = flow_inverse(params64, cfg, z)

        @jax.jit
        def numerical(p, z):
            jac = jax.vmap(jax.jacfwd(lambda v: flow_inverse(p, cfg, v)[0]))(z)
            sign, logabsdet = jnp.linalg.slogdet(jac)
            return sign, logabsdet, standard_normal_log_prob(u) + logabsdet

        sign, logabsdet, expected = numerical(params64, z)
        got = flow_log_prob(params64, cfg, z)
        assert got.dtype == jnp.float64
        assert np.all(np.asarray(sign) != 0)
        np.testing.assert_allclose(log_det, logabsdet, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
        # the perturbation makes the flow non-trivial
        assert float(jnp.max(jnp.abs(logabsdet))) > 1e-2


def test_inverse_of_forward_is_identity():
    cfg = CFG
    params = perturbed_params(cfg, seed=3, scale=0.1)
    u = jax.random.normal(jax.random.key(4), (200, 4))
    z, ld_fwd = flow_forward(params, cfg, u)
    u_back, ld_inv = flow_inverse(params, cfg, z)
    assert float(jnp.max(jnp.abs(z - u))) > 1e-2
    np.testing.assert_allclose(u_back, u, atol=1e-5)
    np.testing.assert_allclose(ld_fwd, -ld_inv, atol=1e-4)


def test_sample_and_log_prob_are_consistent():
    cfg = CFG
    params = perturbed_params(cfg, seed=5)
    key = jax.random.key(6)
    z = flow_sample(params, cfg, key, (3, 7))
    assert z.shape == (3, 7, 4)
    # flow_sample pushes N(0, I) draws through flow_forward
    u = jax.random.normal(key, (3, 7, 4))
    z_fwd, ld_fwd = flow_forward(params, cfg, u)
    np.testing.assert_allclose(z, z_fwd, rtol=1e-5, atol=1e-5)
    # forward change of variables: log p(T(u)) = log N(u) - log|det dT/du|
    np.testing.assert_allclose(
        flow_log_prob(params, cfg, z), standard_normal_log_prob(u) - ld_fwd, atol=1e-4
    )
    assert flow_sample(params, cfg, key, 5).shape == (5, 4)


def test_density_integrates_to_one_in_2d():
    cfg = FlowConfig(latent_dim=2, n_layers=4, hidden=(16,))
    params = perturbed_params(cfg, seed=7, scale=0.2)
    grid = jnp.linspace(-9.0, 9.0, 721)
    xx, yy = jnp.meshgrid(grid, grid)
    pts = jnp.stack([xx, yy], axis=-1)
    step = float(grid[1] - grid[0])
    total = float(jnp.sum(jnp.exp(flow_log_prob(params, cfg, pts))) * step**2)
    assert abs(total - 1.0) < 1e-2


def test_fitted_flow_beats_best_gaussian_on_banana():
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=2048)
    x2 = 0.8 * x1**2 - 0.8 + 0.25 * rng.normal(size=2048)
    data = jnp.asarray(np.stack([x1, x2], axis=-1), jnp.float32)
    cfg = FlowConfig(latent_dim=2, n_layers=4, hidden=(32, 32))
    params = init_flow(jax.random.key(0), cfg, data=data)

    def nll(p):
        return -jnp.mean(flow_log_prob(p, cfg, data))

    opt = optax.adam(1e-2)
    state = jax.jit(opt.init)(params)  # eager init would compile once per leaf shape

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(nll)(p)
        updates, s = opt.update(grads, s)
        return optax.apply_updates(p, updates), s, loss

    initial = float(nll(params))
    for _ in range(300):
        params, state, _ = step(params, state)
    final = float(nll(params))
    cov = np.cov(np.asarray(data).T)
    centred = np.asarray(data) - np.asarray(data).mean(0)
    gauss_nll = float(
        0.5 * np.mean(np.sum(centred @ np.linalg.inv(cov) * centred, axis=1))
        + 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1]
    )
    std_normal_nll = float(-jnp.mean(standard_normal_log_prob(data)))
    assert initial < std_normal_nll  # data-initialised affine layer
    assert final < gauss_nll - 0.3, (final, gauss_nll)


@pytest.mark.parametrize("d", [2, 3, 5, 8, 16, 17])
def test_masks_transform_and_condition_every_coordinate(d):
    cfg = FlowConfig(latent_dim=d, n_layers=6)
    masks = _masks(cfg)
    assert masks.shape == (6, d)
    assert np.all(masks.sum(1) >= 1) and np.all((1 - masks).sum(1) >= 1)
    assert np.all(masks.max(0) == 1) and np.all(masks.min(0) == 0)
    if d > 2:  # the second pair of layers uses another split
        assert not np.array_equal(masks[0], masks[2]) and not np.array_equal(masks[0], masks[3])


def test_no_recompilation_on_second_call():
    cfg = FlowConfig(latent_dim=3, n_layers=2, hidden=(4,))
    params = init_flow(jax.random.key(0), cfg)
    z = jnp.ones((4, 3))
    flow_log_prob(params, cfg, z)
    size = flow_log_prob._cache_size()
    flow_log_prob(perturbed_params(cfg), FlowConfig(latent_dim=3, n_layers=2, hidden=(4,)), z + 1)
    assert flow_log_prob._cache_size() == size


def test_identity_at_init_and_config_validation():
    cfg = FlowConfig(latent_dim=3, n_layers=3, hidden=[4])
    assert cfg.hidden == (4,) and hash(cfg) == hash(FlowConfig(3, 3, (4,)))
    params = init_flow(jax.random.key(0), cfg)
    z = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(flow_log_prob(params, cfg, z), standard_normal_log_prob(z))
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="latent_dim"):
        FlowConfig(latent_dim=1)
