r"""The MADNESS per-pixel noise variance, in one place.

.. math::

    \sigma^2_{bp} = \sigma^2_{\mathrm{sky},b} + \max(y_{bp}, 0)

in electrons² for an image :math:`y` in electrons (gain 1): the sky (plus read noise) and the
Poisson term of the sources. The simulator draws its noise with it, the training loss and
validation weight residuals by it, and the scene and the pipeline fit with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pixel_variance"]


def pixel_variance(
    signal: Any,
    sky_variance: Any,
    *,
    unit: Any = None,
    dtype: Any = None,
    xp: Any = np,
) -> Any:
    r"""Sky plus source Poisson variance, :math:`\sigma^2_\mathrm{sky} + \max(y, 0)`.

    Parameters
    ----------
    signal
        :math:`y`, ``(..., B, H, W)``: electrons, or ``unit`` electrons per count.
    sky_variance
        :math:`\sigma^2_\mathrm{sky}` in electrons²: a scalar, per band ``(B,)`` (broadcast
        over the pixels) or a full map.
    unit
        Electrons per unit of ``signal`` (:math:`\nu`, e.g. the networks' normalisation):
        the variance of :math:`y` in those units is
        :math:`\sigma^2_\mathrm{sky} / \nu^2 + \max(y, 0) / \nu`.
    dtype
        Data type of the sky term (default: that of ``sky_variance``).
    xp
        Array module: ``numpy`` (default) or ``jax.numpy`` (inside traced code).

    Returns
    -------
    array
        The variance, broadcast to ``signal``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> pixel_variance(np.array([[[-3.0, 0.0, 5.0]]]), [2.0]).tolist()
    [[[2.0, 2.0, 7.0]]]
    """
    sky = xp.asarray(sky_variance, dtype)
    if sky.ndim == 1:
        sky = sky[:, None, None]
    if unit is None:
        return sky + xp.maximum(signal, 0.0)
    return sky / unit**2 + xp.maximum(signal, 0.0) / unit
