r"""Potential gradients evaluated outside the sampler's loop: :func:`callback_potential`.

NUTS builds its trajectories inside ``lax.while_loop``; XLA:CPU runs convolutions inside
loops several times slower than the same program in straight-line code (measured for the
lean decoder: 2.1 ms vs 8.6 ms per gradient for one galaxy, 17 vs 84 ms for ten). Here the
potential :math:`U` and :math:`\nabla U` come from a separately compiled straight-line
program, called from inside the loop through :func:`jax.pure_callback`.

The callback needs a second CPU: XLA:CPU runs the callback's program on the thread pool that
the sampler's loop occupies, and a process restricted to one core (``taskset -c 0``, a
one-CPU batch slot or container) deadlocks. With one usable CPU ``"auto"`` therefore
differentiates inline and an explicit ``"callback"`` is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import jax

from madness_ppl.errors import MadnessInputError

__all__ = ["Gradient", "callback_potential", "use_callback"]

Gradient = Literal["auto", "inline", "callback"]


def use_callback(gradient: Gradient, potential_fn: Callable, example: Any) -> bool:
    """Whether to wrap the potential with :func:`callback_potential`.

    ``"inline"`` and ``"callback"`` decide directly; ``"auto"`` chooses the callback on the
    CPU backend when the potential's jaxpr contains a convolution (``conv_general_dilated``)
    and the process may use at least two CPUs (with one the callback deadlocks, see the
    module docstring).

    Raises
    ------
    MadnessInputError
        For ``"callback"`` on the CPU backend with one usable CPU.
    """
    on_cpu = jax.default_backend() == "cpu"
    single_cpu = on_cpu and usable_cpus() < 2
    if gradient == "callback" and single_cpu:
        raise MadnessInputError(
            "gradient='callback' needs at least two CPUs on the CPU backend (this process may "
            "use one, e.g. under taskset or a one-CPU batch slot, and the callback would "
            "deadlock): use gradient='inline' or 'auto'",
            value=gradient,
        )
    if gradient != "auto":
        return gradient == "callback"
    if not on_cpu or single_cpu:
        return False
    return "conv_general_dilated" in str(jax.make_jaxpr(potential_fn)(example))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def callback_potential(potential_fn: Callable, example: Any) -> Callable:
    r"""Wrap a potential so that it and its gradient run as a separate straight-line program.

    Returns :math:`\tilde U` with :math:`\tilde U(u) = U(u)` and
    :math:`\nabla \tilde U(u) = \nabla U(u)`, where one :func:`jax.pure_callback` to the
    jitted ``value_and_grad(U)`` computes both (a :func:`jax.custom_vjp` returns the stored
    gradient, scaled by the cotangent). Inside a compiled ``while`` loop (NUTS), XLA:CPU
    then runs the model's convolutions as it does outside loops.

    Parameters
    ----------
    potential_fn
        :math:`U`, a function of a pytree of arrays returning a scalar.
    example
        A pytree with the shapes and dtypes of :math:`U`'s argument.

    Returns
    -------
    Callable
        :math:`\tilde U`. First-order differentiation only; under ``vmap`` the callback
        runs once per batch element.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> u = {"x": jnp.arange(3.0)}
    >>> U = lambda p: jnp.sum(jnp.sin(p["x"]))
    >>> V = callback_potential(U, u)
    >>> bool(jnp.allclose(jax.grad(V)(u)["x"], jnp.cos(u["x"])))
    True
    """
    value_and_grad = jax.jit(jax.value_and_grad(potential_fn))
    shapes = jax.eval_shape(value_and_grad, example)

    def host(u):
        return jax.device_get(value_and_grad(u))

    def call(u):
        return jax.pure_callback(host, shapes, u, vmap_method="sequential")

    @jax.custom_vjp
    def potential(u):
        return call(u)[0]

    def fwd(u):
        return call(u)

    def bwd(grad, cotangent):
        return (jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grad),)

    potential.defvjp(fwd, bwd)
    return potential
