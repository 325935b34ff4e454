r"""Model arguments split into traced arrays and a hashable static part.

A compiled program is cached by :func:`jax.jit` on its static arguments and on the shapes of
its traced ones. :func:`split_args` flattens a model's ``(args, kwargs)``: the array leaves
(fields, variances, a prior's weights when they are pytree leaves) become traced arguments,
everything else (flags, floats, objects such as a decoder) a hashable :class:`ArgSpec`, so
that a second call with new data of the same shapes reuses the compiled programs of
:func:`~madness_ppl.infer.fit_map` and :func:`~madness_ppl.infer.sample_posterior`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["ArgSpec", "is_array", "split_args"]


def is_array(x: Any) -> bool:
    """Whether a leaf is traced (a JAX or NumPy array or NumPy scalar)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class ArgSpec(NamedTuple):
    """Hashable description of the model's ``(args, kwargs)``: structure + non-array leaves."""

    treedef: Any
    dynamic: tuple[bool, ...]
    static_leaves: tuple[Any, ...]

    def merge(self, dyn: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` again, with the array leaves ``dyn`` (in order) put back."""
        it = iter(dyn)
        leaves = [
            next(it) if d else s for d, s in zip(self.dynamic, self.static_leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def split_args(args: tuple, kwargs: dict, caller: str = "fit_map") -> tuple[list[Any], ArgSpec]:
    """The array leaves of ``(args, kwargs)`` and the :class:`ArgSpec` of the rest.

    Raises
    ------
    TypeError
        If a leaf that is not an array is not hashable (it would be a compile-time value).
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = tuple(is_array(leaf) for leaf in leaves)
    static = tuple(None if d else leaf for d, leaf in zip(dynamic, leaves, strict=True))
    try:
        hash(static)
    except TypeError as err:
        bad = [type(s).__name__ for s in static if not _hashable(s)]
        raise TypeError(
            f"{caller}: model arguments that are not arrays are treated as static "
            f"(compile-time) values and must be hashable; got {bad}. Pass arrays for data."
        ) from err
    dyn = [leaf for d, leaf in zip(dynamic, leaves, strict=True) if d]
    return dyn, ArgSpec(treedef, dynamic, static)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True
