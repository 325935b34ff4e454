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

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from madness_ppl.errors import MadnessInputError

__all__ = [
    "CallbackPotential",
    "Gradient",
    "callback_data",
    "callback_potential",
    "use_callback",
]

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


def callback_potential(potential_fn: Callable) -> Callable:
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

    Returns
    -------
    Callable
        :math:`\tilde U`. First-order differentiation only; under ``vmap`` the callback
        runs once per batch element. (:class:`CallbackPotential` is the same for a
        potential of ``(data, u)`` whose data are traced arguments.)

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> u = {"x": jnp.arange(3.0)}
    >>> U = lambda p: jnp.sum(jnp.sin(p["x"]))
    >>> V = callback_potential(U)
    >>> bool(jnp.allclose(jax.grad(V)(u)["x"], jnp.cos(u["x"])))
    True
    """
    return functools.partial(CallbackPotential(_WithoutData(potential_fn)), ())


class CallbackPotential(NamedTuple):
    r""":math:`U(\text{data}, u)` of ``potential`` through a callback (see
    :func:`callback_potential`), differentiable in :math:`u`.

    Hashable when ``potential`` is (e.g. a :class:`~madness_ppl.infer.target.Target`), so
    that a sampler compiled with it as a static argument serves every field of one shape.
    Only :math:`u` crosses to the host at each evaluation: the callback reads the data bound
    by :func:`callback_data` around the run (passing the data, a prior's weights included,
    through every callback made each gradient 1.7 times dearer); the traced ``data``
    argument gives the shapes and gets no gradient.
    """

    potential: Callable

    def __call__(self, data: Any, u: Any) -> jax.Array:
        """:math:`U(u)`; the gradient comes from the same callback."""
        out = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
            jax.eval_shape(_value_and_grad, self.potential, data, u),
        )
        host = functools.partial(_host_value_and_grad, self.potential)

        def call(v):
            return jax.pure_callback(host, out, v, vmap_method="sequential")

        @jax.custom_vjp
        def potential(v):
            return call(v)[0]

        def fwd(v):
            return call(v)

        def bwd(grad, cotangent):
            return (jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grad),)

        potential.defvjp(fwd, bwd)
        return potential(u)


#: data of the runs in progress, by potential (see :func:`callback_data`)
_bound: dict[Callable, Any] = {}


@contextlib.contextmanager
def callback_data(potential: Callable, data: Any) -> Iterator[None]:
    """Give the callbacks of ``CallbackPotential(potential)`` their data while the block runs.

    Raises
    ------
    RuntimeError
        If a run of the same potential (model, static arguments) is already in progress in
        this process, e.g. in another thread: its callbacks would read the wrong data.
    """
    if potential in _bound:
        raise RuntimeError(
            "a sampling run of this model (same static arguments) is already in progress in "
            "this process; run them one after the other"
        )
    _bound[potential] = data
    try:
        yield
    finally:
        del _bound[potential]


class _WithoutData(NamedTuple):
    """A potential of ``u`` alone, called as one of ``(data, u)``."""

    fn: Callable

    def __call__(self, data: Any, u: Any) -> jax.Array:
        return self.fn(u)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(potential: Callable, data: Any, u: Any) -> tuple[jax.Array, Any]:
    """:math:`(U, \nabla_u U)`, compiled once per (potential, shapes)."""
    return jax.value_and_grad(potential, argnums=1)(data, u)


def _host_value_and_grad(potential: Callable, u: Any) -> tuple[Any, Any]:
    if isinstance(potential, _WithoutData):
        data = ()
    elif potential in _bound:
        data = _bound[potential]
    else:
        raise RuntimeError(
            "a CallbackPotential was evaluated outside callback_data(potential, data): "
            "its callback has no data"
        )
    return jax.device_get(_value_and_grad(potential, data, u))
