"""Apply a function to an array (or a pytree of arrays) a chunk of rows at a time.

For work too large for one call (encoding a validation set, decoding posterior draws): the
leading axis is cut into chunks of ``size`` rows, ``fn`` runs on each and the results come
back to the host, concatenated. With ``pad=True`` the last chunk is padded to ``size`` rows
(repeating its last row), so a jitted ``fn`` compiles once; the padding is dropped again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["map_chunks"]


def map_chunks(fn: Callable[[Any], Any], x: Any, size: int, *, pad: bool = False) -> Any:
    r"""``fn`` over chunks of rows of ``x``: :math:`[f(x_{0:s}), f(x_{s:2s}), \dots]` stacked.

    Parameters
    ----------
    fn
        Maps a chunk (same pytree structure as ``x``, ``k <= size`` rows) to a pytree of arrays
        with ``k`` rows each.
    x
        An array or a pytree of arrays sharing their leading axis (``n >= 1`` rows).
    size
        Rows per chunk.
    pad
        Pad the last chunk to ``size`` rows (one compiled shape for a jitted ``fn``).

    Returns
    -------
    pytree of numpy.ndarray
        ``fn``'s output structure, each leaf with ``n`` rows.

    Examples
    --------
    >>> import numpy as np
    >>> map_chunks(lambda a: 2 * a, np.arange(5), 2, pad=True).tolist()
    [0, 2, 4, 6, 8]
    """
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    pieces = []
    for first in range(0, n, size):
        chunk = jax.tree.map(lambda a, first=first: a[first : first + size], x)
        rows = min(size, n - first)
        if pad and rows < size:
            chunk = jax.tree.map(
                lambda a, rows=rows: np.concatenate([a, np.repeat(a[-1:], size - rows, 0)]), chunk
            )
        out = jax.device_get(fn(chunk))
        pieces.append(jax.tree.map(lambda a, rows=rows: np.asarray(a)[:rows], out))
    if not pieces:
        raise ValueError("map_chunks needs at least one row")
    return jax.tree.map(lambda *parts: np.concatenate(parts), *pieces)
