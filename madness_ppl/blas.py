"""Small dense linear algebra next to JAX: run NumPy's BLAS on one thread.

NumPy's OpenBLAS starts its own threads for every matrix product or eigendecomposition, also
for a 64 x 64 one; right after a JAX computation they compete with XLA's (still spinning)
thread pool for the same cores, and a 0.4 ms ``numpy.linalg.eigh`` takes 20-60 ms. Host-side
algebra on small matrices between JAX calls (the Laplace precision of
:mod:`madness_ppl.uncertainty`) runs inside :func:`one_blas_thread`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

__all__ = ["one_blas_thread"]


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # inspects the loaded libraries once


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit the BLAS libraries loaded in this process to one thread inside the block.

    >>> import numpy as np
    >>> with one_blas_thread():
    ...     values = np.linalg.eigvalsh(np.eye(3))
    >>> values.tolist()
    [1.0, 1.0, 1.0]
    """
    with _controller().limit(limits=1, user_api="blas"):
        yield
