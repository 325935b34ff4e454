r"""A NumPyro model bound to its data as a hashable target: compiled once per shape.

:class:`Target` holds the model and the static part of its arguments
(:class:`~madness_ppl.infer.arguments.ArgSpec`); the arrays travel separately as ``data``.
Called as ``target(data, u)`` it is the potential energy

.. math::

    U(u) = -\log p(y, T(u)) - \log\lvert\det \partial T / \partial u\rvert,

and ``target.constrain(data, u)`` maps unconstrained draws back to the sites (deterministic
ones included). Because the target is a static (hashable) argument and the data a traced
one, the samplers' programs are compiled once per (model, static arguments, shapes): a
second field of the same shapes reuses them, and a long run over many fields does not
accumulate compiled programs (each one holds memory maps until the process ends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from numpyro.infer.util import constrain_fn, potential_energy

from madness_ppl.infer.arguments import ArgSpec, split_args

__all__ = ["Target"]


class Target(NamedTuple):
    """A model and the static part of its arguments; ``target(data, u)`` is :math:`U(u)`."""

    model: Callable
    spec: ArgSpec

    @classmethod
    def bind(cls, model: Callable, args: tuple, kwargs: dict) -> tuple[Target, list[Any]]:
        """The target of ``model(*args, **kwargs)`` and its data (the array leaves)."""
        data, spec = split_args(args, kwargs, caller="sample_posterior")
        return cls(model, spec), data

    def arguments(self, data: list[Any]) -> tuple[tuple, dict]:
        """The model's ``(args, kwargs)`` with ``data`` put back."""
        return self.spec.merge(data)

    def __call__(self, data: list[Any], u: dict[str, jax.Array]) -> jax.Array:
        """The potential energy :math:`U(u)` (NumPyro's, Jacobian term included)."""
        args, kwargs = self.arguments(data)
        return potential_energy(self.model, args, kwargs, u)

    def constrain(self, data: list[Any], u: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Latent sites :math:`T(u)` and the deterministic sites there."""
        args, kwargs = self.arguments(data)
        return constrain_fn(self.model, args, kwargs, u, return_deterministic=True)
