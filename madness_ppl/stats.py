r"""Summary statistics of measurement errors, one definition each, for benchmarks and training.

NaN policy, everywhere: non-finite values are dropped, and a statistic of nothing is ``nan``.

* :func:`width68`: the **scatter**, half the 16-84 % interquantile range,
  :math:`(q_{84} - q_{16}) / 2` (the standard deviation for a Gaussian; blind to a bias);
* :func:`abs68`: the **error**, the 68th percentile of :math:`|x|` (bias and scatter together:
  the radius that holds 68 % of the errors around zero);
* :func:`median`;
* :func:`field_bootstrap`: a statistic and its 95 % interval from resampling *fields* (groups
  of sources) with replacement, since sources of one field share its noise, neighbours and
  fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.typing import ArrayLike

__all__ = ["abs68", "field_bootstrap", "median", "width68"]


def _finite(x: ArrayLike) -> np.ndarray:
    x = np.asarray(x, np.float64).ravel()
    return x[np.isfinite(x)]


def width68(x: ArrayLike) -> float:
    r"""Half the 16-84 % interquantile range of the finite values of ``x``:
    :math:`(q_{84} - q_{16}) / 2` (``nan`` when there are none)."""
    x = _finite(x)
    if not x.size:
        return float("nan")
    p16, p84 = np.percentile(x, [16, 84])
    return float(0.5 * (p84 - p16))


def abs68(x: ArrayLike) -> float:
    r"""The 68th percentile of :math:`|x|` over the finite values of ``x`` (``nan`` when there
    are none): the error radius that includes a bias."""
    x = np.abs(_finite(x))
    return float(np.quantile(x, 0.68)) if x.size else float("nan")


def median(x: ArrayLike) -> float:
    """Median of the finite values of ``x`` (``nan`` when there are none)."""
    x = _finite(x)
    return float(np.median(x)) if x.size else float("nan")


def field_bootstrap(
    groups: Sequence[Any],
    statistic: Callable[[list[Any]], ArrayLike],
    *,
    n: int = 1000,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    r"""``statistic(groups)`` and its 95 % interval from resampling the groups.

    Each of the ``n`` draws picks ``len(groups)`` groups (fields) with replacement,
    ``rng.integers(0, k, k)`` from ``numpy.random.default_rng(seed)``, and evaluates
    ``statistic`` on that list; the interval is the 2.5-97.5 % range of the draws (NaN draws
    and infinite draws ignored). A ratio of two methods on the same fields is a statistic of paired groups.

    ``statistic`` may return an array (several statistics, or a ratio next to its numerator
    and denominator): all its elements are evaluated on the same draws, so their intervals
    are paired, and the interval is taken element by element.

    Returns
    -------
    tuple
        ``(value, low, high)``: floats for a scalar statistic, arrays of its shape otherwise
        (``nan`` where every draw was ``nan``).
    """
    groups = list(groups)
    rng = np.random.default_rng(seed)
    value = np.asarray(statistic(groups), np.float64)
    k = len(groups)
    draws = np.array(
        [statistic([groups[i] for i in rng.integers(0, k, k)]) for _ in range(n)], np.float64
    ).reshape(n, *value.shape)
    draws[~np.isfinite(draws)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an element with no finite draw
        low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    if value.ndim == 0:
        return float(value), float(low), float(high)
    return value, low, high
