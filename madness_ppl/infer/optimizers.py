r"""The optimisers of :func:`madness_ppl.infer.fit_map`: the reference Adam schedule and L-BFGS.

``method="lbfgs"`` takes L-BFGS directions (``optax.scale_by_lbfgs``) with a backtracking
line search that is spread over steps: each step evaluates one trial point, so every step costs
exactly one gradient and the step program has no inner loop (XLA:CPU runs convolutions inside
``while`` loops far slower than straight-line code). :func:`lbfgs_step` documents the rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

__all__ = [
    "LBFGSState",
    "default_lbfgs",
    "default_optimizer",
    "diagonal_newton_decrement",
    "hessian_diagonal",
    "lbfgs_init",
    "lbfgs_step",
]


@functools.cache
def default_optimizer() -> optax.GradientTransformation:
    r"""The MADNESS reference optimiser: Adam, learning rate :math:`0.05 \times 0.8^{\lfloor
    t / 30 \rfloor}` (exponential decay by 0.8 every 30 steps, staircase).

    Cached: the same object is returned on every call, so fits share one compiled program.
    """
    schedule = optax.exponential_decay(
        init_value=0.05, transition_steps=30, decay_rate=0.8, staircase=True
    )
    return optax.adam(schedule)


@functools.cache
def default_lbfgs() -> optax.GradientTransformation:
    """The L-BFGS direction, ``optax.scale_by_lbfgs(memory_size=10)``.

    Used by ``fit_map(method="lbfgs")`` together with its loop-free line search.
    Cached, like :func:`default_optimizer`.
    """
    return optax.scale_by_lbfgs(memory_size=10)


_ARMIJO_C1 = 1e-4
_SHRINK_MIN, _SHRINK_MAX = 0.1, 0.5  # bounds of the backtracking factor of a rejected trial
MIN_ALPHA = 1e-8  # a trial step this short means the line search has failed


class LBFGSState(NamedTuple):
    r"""State of ``method="lbfgs"`` between steps (flat vectors over the unconstrained latents).

    Attributes
    ----------
    params
        Accepted point :math:`x_k` (pytree of unconstrained parameters).
    value, grad
        :math:`L(x_k)` and :math:`\nabla L(x_k)` (``value`` is ``+inf`` before the first step).
    direction
        Search direction :math:`d_k = -H_k \nabla L(x_k)` (L-BFGS).
    alpha
        Length of the next trial step along ``direction`` (1 after an accepted step).
    predicted
        :math:`-\tfrac12 \nabla L(x_k)^\top d_k`, the decrease a full quasi-Newton step
        predicts: an estimate of :math:`L(x_k) - L(\hat x)`.
    direction_state
        State of the optax direction transformation (the L-BFGS memory, kept in the scaled
        variables :math:`w = x / s`).
    scale
        Diagonal preconditioner :math:`s` (``fit_map(scale=...)``; ones by default).
    """

    params: Any
    value: jax.Array
    grad: jax.Array
    direction: jax.Array
    alpha: jax.Array
    predicted: jax.Array
    direction_state: Any
    scale: jax.Array


def lbfgs_init(u: Any, direction: optax.GradientTransformation, scale: Any) -> LBFGSState:
    """The state before the first step at ``u``: no value yet (``+inf``), so the first
    :func:`lbfgs_step` evaluates ``u`` itself; ``scale`` is the diagonal preconditioner."""
    x, _ = jax.flatten_util.ravel_pytree(u)
    s, _ = jax.flatten_util.ravel_pytree(scale)
    zero = jnp.zeros((), x.dtype)
    return LBFGSState(
        params=u,
        value=jnp.asarray(jnp.inf, x.dtype),
        grad=jnp.zeros_like(x),
        direction=jnp.zeros_like(x),
        alpha=zero,
        predicted=jnp.asarray(jnp.inf, x.dtype),
        direction_state=direction.init(x / s),
        scale=s,
    )


def lbfgs_step(
    loss_fn: Callable, state: LBFGSState, direction: optax.GradientTransformation
) -> tuple[LBFGSState, jax.Array, jax.Array]:
    r"""One L-BFGS trial: one loss-and-gradient evaluation, no inner loop.

    The trial point :math:`t = x_k + \alpha d_k` is evaluated once. It is accepted when
    :math:`L(t) \le L(x_k) + c_1 \alpha \nabla L(x_k)^\top d_k + \epsilon_L` (Armijo,
    :math:`c_1 = 10^{-4}`, :math:`\epsilon_L` = 8 float ulps of :math:`L`, the rounding
    of a float32 sum); then :math:`x_{k+1} = t`, the L-BFGS memory takes the pair
    :math:`(t - x_k, \nabla L(t) - \nabla L(x_k))`, the new direction is
    :math:`d_{k+1} = -H_{k+1} \nabla L(t)` (steepest descent scaled to unit length if that
    is not a descent direction) and :math:`\alpha = 1`. A rejected trial (or a non-finite
    one) keeps :math:`x_k` and shrinks :math:`\alpha` to the minimiser of the quadratic
    through :math:`L(x_k)`, its slope and :math:`L(t)`, clipped to
    :math:`[0.1 \alpha, 0.5 \alpha]`. A backtracking line search thus spreads over steps,
    each costing exactly one gradient (the cost of an Adam step), with no ``while_loop``
    (XLA:CPU runs convolutions inside loops far slower than straight-line code).

    Returns
    -------
    (LBFGSState, accepted, decrease)
        The new state, whether the trial was accepted, and :math:`L(x_k) - L(x_{k+1})`.
    """
    x, unravel = jax.flatten_util.ravel_pytree(state.params)
    t = x + state.alpha * state.direction
    value, grad_tree = jax.value_and_grad(loss_fn)(unravel(t))
    grad, _ = jax.flatten_util.ravel_pytree(grad_tree)
    value = jnp.asarray(value, x.dtype)
    slope = jnp.vdot(state.grad, state.direction)
    start = ~jnp.isfinite(state.value)  # the first evaluation, at the starting point
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
    ulp = jnp.finfo(x.dtype).eps * jnp.maximum(jnp.abs(value), 1.0)
    armijo = value <= state.value + _ARMIJO_C1 * state.alpha * slope + 8 * ulp
    accepted = finite & (start | armijo)

    # L-BFGS in the scaled variables w = x / s: gradient s * g, step s * d_w
    s = state.scale
    scaled_grad = s * grad
    precond, direction_state = direction.update(scaled_grad, state.direction_state, t / s)
    d = -s * precond
    new_slope = jnp.vdot(grad, d)
    descent = jnp.isfinite(new_slope) & (new_slope < 0)
    fallback = -s * scaled_grad / jnp.maximum(jnp.linalg.norm(scaled_grad), 1.0)
    d = jnp.where(descent, d, fallback)
    predicted = -0.5 * jnp.vdot(grad, d)

    curvature = 2.0 * (value - state.value - slope * state.alpha)
    interpolated = jnp.where(
        finite & (curvature > 0), -slope * state.alpha**2 / curvature, _SHRINK_MIN * state.alpha
    )
    shrunk = jnp.clip(interpolated, _SHRINK_MIN * state.alpha, _SHRINK_MAX * state.alpha)

    accepted_state = LBFGSState(
        unravel(t), value, grad, d, jnp.ones((), x.dtype), predicted, direction_state, s
    )
    rejected_state = state._replace(alpha=shrunk.astype(x.dtype))
    new = jax.tree.map(lambda a, r: jnp.where(accepted, a, r), accepted_state, rejected_state)
    decrease = jnp.where(accepted & ~start, state.value - value, jnp.inf)
    return new, accepted, decrease


def hessian_diagonal(loss_fn: Callable, x: jax.Array, batch_size: int = 16) -> jax.Array:
    r"""Exact diagonal of the Hessian of ``loss_fn`` at the flat point ``x``.

    :math:`H_{ii} = e_i^\top \nabla^2 L(x)\, e_i`, one forward-over-reverse Hessian-vector
    product per element (``jax.lax.map`` over the basis vectors, ``batch_size`` at a time):
    :math:`n` products for :math:`n` elements, so meant for small latent vectors.
    """
    grad_fn = jax.grad(loss_fn)

    def along(e: jax.Array) -> jax.Array:
        return jnp.vdot(e, jax.jvp(grad_fn, (x,), (e,))[1])

    basis = jnp.eye(x.shape[0], dtype=x.dtype)
    return jax.lax.map(along, basis, batch_size=min(batch_size, max(x.shape[0], 1)))


def diagonal_newton_decrement(grad: jax.Array, diagonal: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""The decrease a Newton step on the diagonal of the Hessian predicts, and its scales.

    .. math::

        \delta = \sum_i \frac{g_i^2}{2 \tilde H_{ii}}, \qquad
        \tilde H_{ii} = \begin{cases} H_{ii} & H_{ii} > 0 \\
        \epsilon \max_j |H_{jj}| & \text{otherwise,} \end{cases}

    an estimate of :math:`L(x) - L(\hat x)` that needs no memory of earlier steps (exact for
    a separable quadratic; :math:`\epsilon` the float precision). A coordinate with no
    positive curvature counts as nearly flat, so a gradient along it is not mistaken for
    convergence. Also returns the Jacobi preconditioner :math:`s_i = \tilde H_{ii}^{-1/2}`
    (``LBFGSState.scale``).
    """
    finfo = jnp.finfo(diagonal.dtype)
    floor = jnp.maximum(finfo.eps * jnp.max(jnp.abs(diagonal), initial=0.0), finfo.tiny)
    curvature = jnp.where(diagonal > 0, diagonal, floor)
    return jnp.sum(grad**2 / (2 * curvature)), 1 / jnp.sqrt(curvature)
