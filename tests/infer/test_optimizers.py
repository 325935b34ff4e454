"""The pieces of fit_map's L-BFGS that stand alone: the Hessian diagonal and the diagonal
Newton decrement of its convergence check."""

import jax
import jax.numpy as jnp
import numpy as np

from madness_ppl.infer.optimizers import diagonal_newton_decrement, hessian_diagonal


def test_hessian_diagonal_equals_the_diagonal_of_the_full_hessian():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(7, 7)), jnp.float32)

    def loss(x):
        return jnp.sum(jnp.tanh(a @ x) ** 2) + 0.5 * jnp.sum(jnp.exp(x))

    x = jnp.asarray(rng.normal(size=7), jnp.float32)
    expected = jnp.diag(jax.hessian(loss)(x))
    np.testing.assert_allclose(hessian_diagonal(loss, x, batch_size=3), expected, rtol=1e-4)


def test_diagonal_newton_decrement_is_the_exact_excess_of_a_separable_quadratic():
    """L(x) = sum_i h_i (x_i - m_i)^2 / 2: the decrement equals L(x) - L(m) and the Jacobi
    scales are h^-1/2; a coordinate with no positive curvature counts as nearly flat."""
    h = jnp.array([1e-3, 1.0, 4e6])
    m = jnp.array([2.0, -1.0, 0.5])
    x = jnp.array([-3.0, 0.0, 0.5001])

    def loss(x):
        return 0.5 * jnp.sum(h * (x - m) ** 2)

    decrement, scale = diagonal_newton_decrement(jax.grad(loss)(x), hessian_diagonal(loss, x))
    np.testing.assert_allclose(decrement, loss(x), rtol=1e-4)
    np.testing.assert_allclose(scale, h**-0.5, rtol=1e-4)
    flat, _ = diagonal_newton_decrement(jnp.array([1e-3, 0.0]), jnp.array([-1.0, 1e4]))
    assert float(flat) > 1e-6 / (2 * 1e4 * 1.2e-7) * 0.9  # g^2 / (2 eps max|H|)
