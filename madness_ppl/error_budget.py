r"""The systematic terms of a catalog's flux errors, and their calibration.

The Laplace error (:func:`madness_ppl.uncertainty.laplace_flux_errors`) is the posterior width
*if the model were right*. Systematic terms stand for what it is not
(:func:`flux_error_budget`), calibrated on simulations the prior was not trained on
(``benchmarks/error_model.py``) and stored in the prior's ``config.metadata["model_error"]``:

.. math::

    \sigma_{ib}^2 = \sigma_{\mathrm{Laplace},ib}^2 + (\kappa_b F_{ib})^2
    + (\lambda\, C_{ib})^2,

:math:`\kappa_b` the decoder's error on an isolated galaxy's total flux (``flux_fraction``) and
:math:`\lambda` (``blend_fraction``) the share of the neighbours' light in a source's
territory, :math:`C_{ib}` (:func:`neighbour_light`), that a misfit can move between sources.

Each source's own evidence of misfit adds two more (``misfit_fraction``, ``edge_fraction``,
:func:`flux_error_budget`); :func:`interval_halfwidth` turns the errors into intervals of other
levels (Student-t tails when the calibration stored ``tail_dof``).
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

from madness_ppl.cutouts import model_shares
from madness_ppl.galaxy_model import GalaxyModel
from madness_ppl.misfit import source_misfit, stamp_edge_fraction

__all__ = [
    "ONE_SIGMA",
    "calibrate_error_fraction",
    "calibrated_fractions",
    "flux_error_budget",
    "interval_halfwidth",
    "neighbour_light",
    "systematic_flux_errors",
]


def neighbour_light(stamps: ArrayLike, positions: ArrayLike, shape: tuple) -> np.ndarray:
    r"""The neighbours' model light in each source's territory, ``(n, B)``.

    With model stamps :math:`m_i` placed at ``nearest_pixel(positions)`` and each pixel shared among
    the sources in proportion to their models, :math:`w_i = m_i / \sum_k m_k` (the
    re-distribution weights of the catalog),

    .. math::

        C_{ib} = \sum_p w_{ib}(p) \sum_{j \ne i} m_{jb}(p),

    0 for a source no other model overlaps. :math:`C / (F + C)` is a model-based blendedness.

    Parameters
    ----------
    stamps
        ``(n, B, S, S)`` model stamps (electrons), e.g. ``DeblendResult.sources``.
    positions
        ``(n, 2)`` positions ``(x, y)`` of the stamps' centres.
    shape
        ``(B, H, W)`` of the field.

    Examples
    --------
    >>> import numpy as np
    >>> stamps = np.ones((2, 1, 3, 3))
    >>> neighbour_light(stamps, [[5.0, 5.0], [6.0, 5.0]], (1, 11, 11))[:, 0]  # 6 shared pixels
    array([3., 3.])
    """
    stamps = np.asarray(stamps, np.float64)
    n = len(stamps)
    if n == 0:
        return np.zeros((0, shape[0]))
    # a stamp's pixels outside the field are not in the pasted total: leave them out
    own, total, share, _ = model_shares(stamps, positions, np.ones(shape, bool))
    return (share * (total - own)).sum(axis=(-2, -1))


def flux_error_budget(
    laplace_err: ArrayLike,
    flux: ArrayLike,
    neighbour: ArrayLike,
    *,
    flux_fraction: ArrayLike = 0.0,
    blend_fraction: ArrayLike = 0.0,
    misfit: ArrayLike | None = None,
    misfit_fraction: ArrayLike = 0.0,
    edge: ArrayLike | None = None,
    edge_fraction: ArrayLike = 0.0,
) -> np.ndarray:
    r"""Total flux error: the Laplace width and the systematic terms in quadrature.

    .. math::

        \sigma_{ib}^2 = \sigma_{\mathrm{Laplace},ib}^2 + (\kappa_b F_{ib})^2
        + (\lambda_b C_{ib})^2 + (\gamma\, \hat\epsilon_{ib} F_{ib})^2
        + (\eta\, e_i F_{ib})^2

    The first two systematic terms are population averages (the decoder's flux error on an
    isolated galaxy, the light a neighbour can trade); the last two are each source's own
    evidence: :math:`\hat\epsilon_{ib}`, the pixel model-error fraction its residuals call for
    (:func:`madness_ppl.misfit.source_misfit`), and :math:`e_i`, the share of its model light
    on its stamp's border (:func:`madness_ppl.misfit.stamp_edge_fraction`). :math:`e` grows
    with the galaxy's extent: light beyond the stamp is missing from the model (for an
    exponential profile of scale :math:`h` pixels cut at radius :math:`R`, about
    :math:`e\,h\,(1 + h/R)` of the light), and extended wings under the noise are the prior's
    extrapolation. All four are calibrated on held-out simulations
    (``benchmarks/laplace_coverage.py``: :math:`\kappa`; ``benchmarks/error_model.py``:
    :math:`\lambda, \gamma, \eta`).

    Parameters
    ----------
    laplace_err, flux, neighbour
        ``(n, B)``: :func:`laplace_flux_errors`'s ``flux_err`` (or a posterior sd), the model
        fluxes :math:`F` and :func:`neighbour_light` :math:`C`.
    flux_fraction
        :math:`\kappa`, a scalar or one per band (>= 0).
    blend_fraction
        :math:`\lambda`, a scalar or one per band (>= 0).
    misfit
        ``(n, B)`` :math:`\hat\epsilon` (NaN read as 0); None: no misfit term.
    misfit_fraction
        :math:`\gamma` (>= 0).
    edge
        ``(n,)`` :math:`e`; None: no truncation term.
    edge_fraction
        :math:`\eta` (>= 0).

    Returns
    -------
    numpy.ndarray
        ``(n, B)`` standard deviations.
    """
    fractions = {
        "flux_fraction": flux_fraction,
        "blend_fraction": blend_fraction,
        "misfit_fraction": misfit_fraction,
        "edge_fraction": edge_fraction,
    }
    for name, value in fractions.items():
        if not np.all(np.asarray(value, np.float64) >= 0):
            raise ValueError(f"{name} must be >= 0, got {value}")
    kappa, lam, gamma, eta = (np.asarray(a, np.float64) for a in fractions.values())
    sd = np.asarray(laplace_err, np.float64)
    flux = np.asarray(flux, np.float64)
    variance = sd**2 + (kappa * flux) ** 2 + (lam * np.asarray(neighbour, np.float64)) ** 2
    if misfit is not None:
        variance = variance + (gamma * np.nan_to_num(np.asarray(misfit, np.float64)) * flux) ** 2
    if edge is not None:
        variance = variance + (eta * np.asarray(edge, np.float64)[:, None] * flux) ** 2
    return np.sqrt(variance)


def systematic_flux_errors(
    prior: GalaxyModel,
    stamps: ArrayLike,
    positions: ArrayLike,
    shape: tuple,
    *,
    residual: ArrayLike | None = None,
    variance: ArrayLike | None = None,
) -> np.ndarray:
    r"""The prior's calibrated systematic flux errors of model stamps, ``(n, B)``: the terms
    :func:`flux_error_budget` adds to a Laplace width (zeros for a prior with no calibration).

    Add them in quadrature to the spread of posterior draws too (e.g. ``flux_table(idata,
    bands, systematic=...)``), since the likelihood does not contain them.

    Parameters
    ----------
    prior
        A prior with ``config.metadata["model_error"]`` (``flux_fraction``,
        ``blend_fraction``, ``misfit_fraction``, ``edge_fraction``), e.g. the shipped
        :class:`~madness_ppl.prior.GalaxyPrior`.
    stamps, positions, shape
        As in :func:`neighbour_light` (e.g. the stamps decoded at the MAP).
    residual, variance
        ``(B, H, W)`` data minus model (NaN where masked) and pixel variance: with both, each
        source's own misfit and truncation terms are included
        (:func:`madness_ppl.misfit.source_misfit`; the truncation is read from ``stamps``).
    """
    calibrated = calibrated_fractions(prior)
    stamps = np.asarray(stamps, np.float64)
    flux = stamps.sum(axis=(-2, -1))
    adaptive = residual is not None and variance is not None
    return flux_error_budget(
        np.zeros_like(flux),
        flux,
        neighbour_light(stamps, positions, shape),
        flux_fraction=calibrated["flux_fraction"],
        blend_fraction=calibrated["blend_fraction"],
        misfit=source_misfit(stamps, positions, residual, variance).model_error
        if adaptive
        else None,
        misfit_fraction=calibrated["misfit_fraction"],
        edge=stamp_edge_fraction(stamps) if adaptive else None,
        edge_fraction=calibrated["edge_fraction"],
    )


#: Standard-normal level of one sigma, :math:`\Phi(1) - \Phi(-1)`.
ONE_SIGMA = 0.6826894921370859


def interval_halfwidth(level: float, tail_dof: float = np.inf) -> float:
    r"""Half-width of the central ``level`` interval of a flux, in units of its
    ``flux_<band>_err``.

    The catalog's error :math:`\sigma` is the half-width of the 68.27 % interval. Flux errors
    have heavier tails than a Gaussian (a few sources the data cannot reveal as misfit), so
    they are modelled as a scaled Student-t with :math:`\nu` degrees of freedom (the prior's
    calibrated ``tail_dof``, catalog header ``ERRDOF``) whose 68.27 % half-width is
    :math:`\sigma`:

    .. math::

        h_\gamma = \sigma\, \frac{t_\nu^{-1}\big((1 + \gamma)/2\big)}
        {t_\nu^{-1}\big((1 + 0.6827)/2\big)},

    the Gaussian :math:`z_\gamma \sigma` for :math:`\nu = \infty`.

    Parameters
    ----------
    level
        :math:`\gamma` in (0, 1).
    tail_dof
        :math:`\nu > 0` (``inf``: Gaussian).

    Examples
    --------
    >>> round(interval_halfwidth(0.9), 3)  # Gaussian: 1.645
    1.645
    >>> round(interval_halfwidth(0.6827, tail_dof=3.0), 3)
    1.0
    >>> round(interval_halfwidth(0.9, tail_dof=3.0), 3)  # heavier tails: wider 90 % interval
    1.966
    """
    from scipy.stats import norm, t

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not tail_dof > 0:
        raise ValueError(f"tail_dof must be > 0, got {tail_dof}")
    quantile = 0.5 * (1.0 + level)
    one = 0.5 * (1.0 + ONE_SIGMA)
    if np.isinf(tail_dof):
        return float(norm.ppf(quantile))
    return float(t.ppf(quantile, tail_dof) / t.ppf(one, tail_dof))


def calibrated_fractions(prior: object) -> dict[str, np.ndarray]:
    """The prior's calibrated model-error fractions, 0 for any it does not store.

    Parameters
    ----------
    prior
        Any object; its ``config.metadata["model_error"]`` is read when present.

    Returns
    -------
    dict
        ``pixel_fraction`` (:math:`\\epsilon`), ``flux_fraction`` (:math:`\\kappa`),
        ``blend_fraction`` (:math:`\\lambda`), ``misfit_fraction`` (:math:`\\gamma`) and
        ``edge_fraction`` (:math:`\\eta`) from ``prior.config.metadata["model_error"]``
        (0 when absent), and ``tail_dof`` (:func:`interval_halfwidth`'s :math:`\\nu`, inf
        when absent); each a scalar or one value per band (float64 arrays).
    """
    config = getattr(prior, "config", None)
    stored = getattr(config, "metadata", {}).get("model_error", {})
    names = (
        "pixel_fraction",
        "flux_fraction",
        "blend_fraction",
        "misfit_fraction",
        "edge_fraction",
    )
    out = {name: np.asarray(stored.get(name, 0.0), np.float64) for name in names}
    out["tail_dof"] = np.asarray(stored.get("tail_dof", np.inf), np.float64)
    return out


def calibrate_error_fraction(
    error: ArrayLike,
    sd: ArrayLike,
    scale: ArrayLike,
    *,
    level: float = 0.68,
    upper: float = 4.0,
) -> float:
    r"""Smallest fraction :math:`f \ge 0` of ``scale`` that, added in quadrature to ``sd``,
    makes the ``level`` interval cover the errors:

    .. math::

        \frac{1}{N}\sum_k \mathbf{1}\Big[|e_k| < z_\gamma
        \sqrt{\sigma_k^2 + (f s_k)^2}\Big] = \gamma, \qquad
        z_\gamma = \Phi^{-1}\big(\tfrac{1 + \gamma}{2}\big)

    (bisection on :math:`[0, \mathrm{upper}]`; 0 when ``sd`` alone already covers). With
    :math:`s = F` on isolated galaxies this is the flux fraction :math:`\kappa`; with
    :math:`s = C` (:func:`neighbour_light`) on blended sources, the blend fraction
    :math:`\lambda` (``benchmarks/laplace_coverage.py``).

    Parameters
    ----------
    error
        Measured minus true values :math:`e` (any shape; non-finite entries are left out).
    sd, scale
        :math:`\sigma` and :math:`s`, broadcastable to ``error``.
    level
        Coverage :math:`\gamma` to reach, in (0, 1).
    upper
        Largest fraction searched; reaching it raises (the scale cannot explain the errors).

    Returns
    -------
    float
        :math:`f`.
    """
    from scipy.special import ndtri

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    e, sigma, s = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (error, sd, scale)))
    keep = np.isfinite(e) & np.isfinite(sigma) & np.isfinite(s)
    e, sigma, s = np.abs(e[keep]), sigma[keep], np.abs(s[keep])
    if not len(e):
        raise ValueError("no finite error to calibrate on")
    z = float(ndtri(0.5 * (1.0 + level)))

    def coverage(f: float) -> float:
        return float(np.mean(e < z * np.sqrt(sigma**2 + (f * s) ** 2)))

    if coverage(0.0) >= level:
        return 0.0
    if coverage(upper) < level:
        raise ValueError(
            f"even a fraction of {upper} covers only {coverage(upper):.2f} < {level} of the errors"
        )
    lo, hi = 0.0, upper
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if coverage(mid) < level else (lo, mid)
    return hi
