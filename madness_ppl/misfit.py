r"""Each source's own evidence that its model does not fit: the residuals in its footprint.

The Laplace width is the posterior width *if the model were right*. Where the decoder cannot
draw a galaxy (a population the prior never saw, a wider PSF, a neighbour's light taken), the
residuals around that source show it. This module measures that evidence per source and band,
from the deblended field alone (no truth):

* the light-weighted reduced :math:`\chi^2` of the residual :math:`r = y - \sum_j m_j` in the
  source's footprint,

  .. math::

      \chi^2_{ib} = \frac{\sum_p u_{ib}(p)\, r_{bp}^2 / \sigma_{bp}^2}{\sum_p u_{ib}(p)},
      \qquad u_{ib}(p) = w_{ib}(p)\, \frac{m_{ib}(p)}{\max_p m_{ib}(p)},

  with :math:`w_{ib} = m_{ib} / \sum_j m_{jb}` the source's share of each pixel's model light
  (its ownership, as in :func:`~madness_ppl.uncertainty.neighbour_light`): pixels where the
  source is bright and owns the light count most, its faint wings and its neighbours' cores
  little. Pure noise gives :math:`\chi^2 \approx 1`.
* the per-pixel model-error fraction its residuals call for (the per-source counterpart of the
  prior's calibrated :math:`\epsilon`),

  .. math::

      \hat\epsilon_{ib}^2 = \frac{\max\big(0, E_{ib} - k\, s_{E,ib}\big)}
      {\sum_p u_{ib}(p)\, m_{ib}(p)^2}, \qquad
      E_{ib} = \sum_p u_{ib}(p)\,(r_{bp}^2 - \sigma_{bp}^2), \qquad
      s_{E,ib} = \Big(2 \sum_p u_{ib}(p)^2 \sigma_{bp}^4\Big)^{1/2},

  :math:`E` the residual power beyond the noise and :math:`s_E` its standard deviation from
  Gaussian noise alone: only an excess above :math:`k =` :data:`NOISE_ALLOWANCE` of those
  counts, so a faint source in a shallow band does not read noise as misfit. 0 where the
  residuals are at the noise, ~0.1 where the model misses 10 % of a bright galaxy's light
  pixel by pixel;
* the residual flux the source owns, :math:`R_{ib} = \sum_p w_{ib}(p)\, r_{bp}`, with its
  noise-only standard deviation :math:`s_{ib} = (\sum_p w_{ib}^2 \sigma_{bp}^2)^{1/2}`.

:func:`madness_ppl.uncertainty.flux_error_budget` turns :math:`\hat\epsilon` into a wider flux
error (``deblend(..., adaptive_errors=True)``, the default), and ``chi2_bands`` is the
catalog's ``chi2_footprint``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike

from madness_ppl.cutouts import extract_cutouts, model_shares
from madness_ppl.errors import MadnessInputError

__all__ = ["NOISE_ALLOWANCE", "SourceMisfit", "source_misfit", "stamp_edge_fraction"]

#: Standard deviations of the noise-only residual power a misfit must exceed to count.
NOISE_ALLOWANCE = 1.0


class SourceMisfit(NamedTuple):
    """Output of :func:`source_misfit`, every entry ``(n, B)``.

    Attributes
    ----------
    chi2
        Light- and ownership-weighted reduced :math:`\\chi^2` in the footprint (1 for noise).
    model_error
        :math:`\\hat\\epsilon`, the per-pixel model-error fraction the residuals call for.
    chi2_bands
        ``(n,)``: :math:`\\chi^2` pooled over the bands (the weights of every band together).
    excess, excess_sd
        :math:`E` and :math:`s_E`, electrons² (weighted by :math:`u`).
    model_power
        :math:`\\sum_p u\\, m^2`, electrons².
    residual_flux
        Residual flux the source owns, :math:`R`, electrons.
    residual_flux_sd
        Standard deviation :math:`s` of :math:`R` from pixel noise alone, electrons.
    """

    chi2: np.ndarray
    model_error: np.ndarray
    chi2_bands: np.ndarray
    excess: np.ndarray
    excess_sd: np.ndarray
    model_power: np.ndarray
    residual_flux: np.ndarray
    residual_flux_sd: np.ndarray


def source_misfit(
    stamps: ArrayLike, positions: ArrayLike, residual: ArrayLike, variance: ArrayLike
) -> SourceMisfit:
    r"""The residual evidence of misfit of every source, per band (module docstring).

    Parameters
    ----------
    stamps
        ``(n, B, S, S)`` observed model stamps (electrons) centred on
        :func:`~madness_ppl.cutouts.nearest_pixel` ``(positions)``, e.g.
        ``DeblendResult.sources``.
    positions
        ``(n, 2)`` positions ``(x, y)``.
    residual
        ``(B, H, W)`` data minus model, NaN where masked (``DeblendResult.residual``).
    variance
        ``(B, H, W)`` pixel variance.

    Returns
    -------
    SourceMisfit
        NaN for a band where the source has no unmasked light.

    Examples
    --------
    >>> import numpy as np
    >>> stamp = np.zeros((1, 1, 5, 5)); stamp[0, 0, 1:4, 1:4] = 1.0
    >>> residual, variance = np.zeros((1, 9, 9)), np.ones((1, 9, 9))
    >>> residual[0, 3:6, 3:6] = 2.0  # a misfit of 2 sigma under the source
    >>> m = source_misfit(stamp, [[4.0, 4.0]], residual, variance)
    >>> float(m.chi2[0, 0]), float(m.excess[0, 0] / m.model_power[0, 0])  # r^2 - sigma^2 = 3 m^2
    (4.0, 3.0)
    >>> round(float(m.excess_sd[0, 0]) ** 2 / 2, 6)  # the light-weights' sum of squares: 9
    9.0
    >>> round(float(m.model_error[0, 0]), 4)  # sqrt((27 - sqrt(18)) / 9)
    1.5902
    >>> float(m.residual_flux[0, 0]), float(m.residual_flux_sd[0, 0])
    (18.0, 3.0)
    """
    stamps = np.clip(np.asarray(stamps, np.float64), 0.0, None)
    n = len(stamps)
    residual = np.asarray(residual, np.float64)
    variance = np.asarray(variance, np.float64)
    positions = np.asarray(positions, np.float64)
    _check_shapes(stamps, positions, residual, variance)
    n_bands = residual.shape[0]
    if n == 0:
        empty = np.zeros((0, n_bands))
        return SourceMisfit(empty, empty, np.zeros(0), empty, empty, empty, empty, empty)
    size = stamps.shape[-1]
    seen = np.isfinite(residual) & np.isfinite(variance) & (np.asarray(variance) > 0)
    own, _, share, inside = model_shares(stamps, positions, seen)
    r = extract_cutouts(np.where(seen, residual, 0.0), positions, size, dtype=np.float64)
    var = extract_cutouts(np.where(seen, variance, 0.0), positions, size, dtype=np.float64)
    peak = own.max(axis=(-2, -1), keepdims=True)
    light = share * np.divide(own, peak, out=np.zeros_like(own), where=peak > 0)
    chi = np.divide(r**2, var, out=np.zeros_like(r), where=inside)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2 = (light * chi).sum((-2, -1)) / light.sum((-2, -1))
        chi2_bands = (light * chi).sum((-3, -2, -1)) / light.sum((-3, -2, -1))
        excess = (light * (r**2 - var)).sum((-2, -1))
        excess_sd = np.sqrt(2.0 * (light**2 * var**2).sum((-2, -1)))
        power = (light * own**2).sum((-2, -1))
        model_error = np.sqrt(np.maximum(excess - NOISE_ALLOWANCE * excess_sd, 0.0) / power)
    residual_flux = (share * r).sum((-2, -1))
    residual_flux_sd = np.sqrt((share**2 * var).sum((-2, -1)))
    no_light = share.sum((-2, -1)) == 0
    residual_flux[no_light] = np.nan
    residual_flux_sd[no_light] = np.nan
    return SourceMisfit(
        chi2, model_error, chi2_bands, excess, excess_sd, power, residual_flux, residual_flux_sd
    )


def _check_shapes(
    stamps: np.ndarray, positions: np.ndarray, residual: np.ndarray, variance: np.ndarray
) -> None:
    """Refuse inputs whose shapes do not describe one field and its sources."""
    if residual.ndim != 3:
        raise MadnessInputError(f"residual must be (bands, H, W), got shape {residual.shape}")
    if variance.shape != residual.shape:
        raise MadnessInputError(
            f"variance shape {variance.shape} differs from the residual's {residual.shape}"
        )
    if not len(stamps):
        return
    if (
        stamps.ndim != 4
        or stamps.shape[1] != residual.shape[0]
        or stamps.shape[2] != stamps.shape[3]
    ):
        raise MadnessInputError(
            f"stamps must be (n, {residual.shape[0]}, S, S) for a {residual.shape[0]}-band "
            f"residual, got shape {stamps.shape}"
        )
    if positions.shape != (len(stamps), 2):
        raise MadnessInputError(
            f"positions must be ({len(stamps)}, 2) for {len(stamps)} stamps, got shape "
            f"{positions.shape}"
        )


def stamp_edge_fraction(stamps: np.ndarray) -> np.ndarray:
    r"""Share of each stamp's light on its outermost pixel ring, summed over bands.

    :math:`f_i = \sum_{p \in \partial S} |m_{ip}| / \sum_p |m_{ip}|` for the ``(N, B, S, S)``
    stamps :math:`m_i`: about 0 for a galaxy that fits in its stamp; a galaxy larger than the
    stamp is cut there, and the light beyond is missing from its model (0 for an empty stamp).
    """
    light = np.abs(np.asarray(stamps, np.float64)).sum(axis=1)
    if not len(light):
        return np.zeros(0)
    ring = light.sum((-1, -2)) - light[:, 1:-1, 1:-1].sum((-1, -2))
    total = light.sum((-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, ring / total, 0.0)
