r"""Fast flux errors for every deblended source: a Laplace approximation at the MAP.

At the MAP :math:`\hat z` of :func:`madness_ppl.scene.blend_model` the posterior of all the
field's latents is approximated by a Gaussian whose precision is the generalised Gauss-Newton
matrix of the negative log joint,

.. math::

    H = J^\top W J + \nabla^2_z\big[-\textstyle\sum_i \log p(z_i)\big], \qquad
    W = \mathrm{diag}\big(1 / (\sigma^2 + \epsilon^2 m^2)\big),

with :math:`J = \partial m / \partial z` the Jacobian of the model image (source :math:`i`'s
block is its decoder Jacobian placed at its position; blocks of overlapping sources couple
through the pixels they share), :math:`\sigma^2` the pixel variance and :math:`\epsilon` an
optional *model-error fraction*: the decoder cannot draw every galaxy exactly, and a
per-pixel variance :math:`(\epsilon m)^2` proportional to the model stands for that error
(:func:`calibrate_model_error` fits :math:`\epsilon` on isolated galaxies). Eigenvalues of
:math:`H` below a small floor are raised to it (the flow's Hessian can be indefinite away
from its modes). The flux of source :math:`i` in band :math:`b`, :math:`F_{ib} = \sum_p
f_b(z_i)_p`, is propagated linearly:

.. math::

    \sigma^2(F_{ib}) = g_{ib}^\top \,(H^{-1})_{ii}\, g_{ib}, \qquad
    g_{ib} = \partial F_{ib} / \partial z_i = \textstyle\sum_p J_{i,b,p}.

Cost: one decoder Jacobian per source (``d`` forward-mode products, computed together for all
sources) and the pixel products of overlapping pairs; no further model evaluation.

The Laplace error is the posterior width *if the model were right*. Two systematic terms stand
for what it is not (:func:`flux_error_budget`), both calibrated on simulations the prior was
not trained on (``benchmarks/laplace_coverage.py``) and stored in the prior's
``config.metadata["model_error"]``:

.. math::

    \sigma_{ib}^2 = \sigma_{\mathrm{Laplace},ib}^2 + (\kappa_b F_{ib})^2
    + (\lambda\, C_{ib})^2,

:math:`\kappa_b` the decoder's error on an isolated galaxy's total flux (``flux_fraction``) and
:math:`\lambda` (``blend_fraction``) the share of the neighbours' light in a source's
territory, :math:`C_{ib}` (:func:`neighbour_light`), that a misfit can move between sources.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.blas import one_blas_thread
from madness_ppl.cutouts import extract_cutouts, model_shares, nearest_pixel, paste_stamps
from madness_ppl.galaxy_model import GalaxyModel, ScoredGalaxyModel
from madness_ppl.likelihood import inverse_variance, model_error_fraction
from madness_ppl.misfit import source_misfit, stamp_edge_fraction
from madness_ppl.psf import PSFKernel, convolve_stamps
from madness_ppl.scene import bucket_size

__all__ = [
    "LaplaceFluxes",
    "calibrate_error_fraction",
    "calibrate_model_error",
    "calibrated_fractions",
    "floored_eigh",
    "flux_error_budget",
    "gauss_newton_precision",
    "interval_halfwidth",
    "laplace_flux_errors",
    "linearise",
    "neighbour_light",
    "systematic_flux_errors",
]

#: Relative floor of the eigenvalues of the precision matrix (times its largest).
EIGEN_FLOOR = 1e-6


class LaplaceFluxes(NamedTuple):
    """Output of :func:`laplace_flux_errors`.

    Attributes
    ----------
    flux
        ``(n, B)`` model fluxes at the MAP (electrons).
    flux_err
        ``(n, B)`` Laplace standard deviations of ``flux``.
    covariance
        ``(n d, n d)`` Laplace covariance of all latents (``d`` = latent dimension).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    covariance: np.ndarray


@jax.jit
def linearise(prior: ScoredGalaxyModel, z: jax.Array, psf: PSFKernel | None = None):
    r"""Everything second-order about the sources at latents ``z`` ``(n, d)``, in one program.

    Returns model-frame stamps ``(n, B, S, S)``, the stamps as observed (through ``psf``'s
    kernels, ``(n, B, G, G)``; the stamps themselves without one), the observed decoder
    Jacobians :math:`\partial f(z_i)/\partial z_i` ``(n, d, B, G, G)`` (``d`` forward-mode
    products of one linearised decoder), and the Hessians ``(n, d, d)`` and gradients
    ``(n, d)`` of :math:`-\log p(z_i)`. Used by the Laplace errors and by
    :func:`~madness_ppl.refine.newton_refine`.
    """
    d = z.shape[-1]
    stamps, linear = jax.linearize(prior.decode, z)  # decoded once, differentiated d times
    basis = jnp.eye(d, dtype=z.dtype)
    jac = jnp.moveaxis(jax.vmap(lambda e: linear(jnp.broadcast_to(e, z.shape)))(basis), 0, 1)
    neg_logp = lambda zi: -prior.log_prob(zi)  # noqa: E731
    hess = jax.vmap(jax.hessian(neg_logp))(z)
    grad = jax.vmap(jax.grad(neg_logp))(z)
    observed = stamps
    if psf is not None:
        observed, jac = convolve_stamps(stamps, psf.fourier), convolve_stamps(jac, psf.fourier)
    return stamps, observed, jac, hess, grad


def _window(offset: int, size: int) -> tuple[slice, slice]:
    """Rows (or columns) of stamp ``i`` and of stamp ``j`` (``offset = c_j - c_i``) that overlap."""
    lo, hi = max(0, offset), min(size, size + offset)
    return slice(lo, hi), slice(lo - offset, hi - offset)


def laplace_flux_errors(
    prior: ScoredGalaxyModel,
    z: ArrayLike,
    positions: ArrayLike,
    variance: ArrayLike,
    *,
    pixel_mask: ArrayLike | None = None,
    model_error: ArrayLike = 0.0,
    psf: PSFKernel | None = None,
    linearisation: tuple[ArrayLike, ArrayLike, ArrayLike] | None = None,
) -> LaplaceFluxes:
    r"""Laplace flux errors of the sources of one field at its MAP (see the module docstring).

    Parameters
    ----------
    prior
        The galaxy prior (``decode``, ``log_prob``, ``stamp_size``).
    z
        ``(n, d)`` MAP latents of the real sources (no padding).
    positions
        ``(n, 2)`` positions ``(x, y)``; stamps are placed at the nearest pixel, as in the fit.
    variance
        ``(B, H, W)`` pixel variance used in the fit (electrons²).
    pixel_mask
        Optional ``(B, H, W)`` or ``(H, W)`` booleans, ``False`` for pixels left out of the fit.
    model_error
        Model-error fraction :math:`\epsilon`, a scalar or one per band (0: pixel noise only;
        checked by :func:`~madness_ppl.likelihood.model_error_fraction`). The weights are
        :func:`~madness_ppl.likelihood.inverse_variance` with the model at the MAP.
    psf
        The field's difference kernels (:func:`madness_ppl.psf.field_kernel`), as in the fit:
        stamps and Jacobians are convolved with them (the flux, a model-frame sum, is
        unchanged: :math:`\hat K(0) = 1`).
    linearisation
        Optional ``(stamps, jac, hess)``: the observed stamps ``(n, B, G, G)``, Jacobians
        ``(n, d, B, G, G)`` and prior Hessians ``(n, d, d)`` already computed at ``z`` (e.g.
        :attr:`~madness_ppl.refine.Refinement.linearisation` when it took no step); no
        decoder is run then.

    Returns
    -------
    LaplaceFluxes

    Examples
    --------
    >>> import jax, numpy as np
    >>> from madness_ppl.toy import LinearGaussianPrior
    >>> prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=1, stamp_size=9, latent_dim=2)
    >>> out = laplace_flux_errors(prior, np.zeros((1, 2)), [[10.0, 10.0]], np.ones((1, 21, 21)))
    >>> out.flux_err.shape
    (1, 1)
    """
    z = jnp.asarray(z)
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    variance = np.asarray(variance, np.float64)
    n, d = z.shape
    n_bands = variance.shape[0]
    if len(positions) != n:
        raise ValueError(f"{n} latents for {len(positions)} positions")
    if n == 0:
        empty = np.zeros((0, n_bands))
        return LaplaceFluxes(empty, empty, np.zeros((0, 0)))
    eps = model_error_fraction(model_error, n_bands, dtype=np.float64)
    if linearisation is None:
        plate = bucket_size(n)  # one compiled program per bucket, as in the fit
        padded = jnp.zeros((plate, d), z.dtype).at[:n].set(z)
        _, observed, jac, hess, _ = linearise(prior, padded, psf)
        linearisation = (observed[:n], jac[:n], hess[:n])
    stamps, jac, hess = (np.asarray(a, np.float64) for a in linearisation)
    with one_blas_thread():  # small products next to XLA's threads (see madness_ppl.blas)
        return _laplace_at(stamps, jac, hess, positions, variance, pixel_mask, eps)


def gauss_newton_precision(
    jac: np.ndarray, hess: np.ndarray, weights: np.ndarray, centres: np.ndarray
) -> np.ndarray:
    r"""The generalised Gauss-Newton matrix of a blend,
    :math:`H = J^\top W J + \nabla^2_z[-\sum_i \log p(z_i)]`, block by block.

    Block :math:`(i, j)` is :math:`\sum_p J_{i,p}^\top W_p J_{j,p}` over the pixels the two
    stamps share (zero unless they overlap), plus the prior Hessian on the diagonal.

    Parameters
    ----------
    jac
        ``(n, d, B, S, S)`` Jacobians of the (observed) stamps.
    hess
        ``(n, d, d)`` Hessians of :math:`-\log p(z_i)`.
    weights
        ``(n, B, S, S)`` pixel weights :math:`W` on each stamp's footprint.
    centres
        ``(n, 2)`` integer pixel centres (:func:`~madness_ppl.cutouts.nearest_pixel`).

    Returns
    -------
    numpy.ndarray
        ``(n d, n d)`` symmetric.
    """
    n, d = jac.shape[:2]
    size = jac.shape[-1]
    precision = np.zeros((n * d, n * d))
    for i in range(n):
        w_i = weights[i]
        for j in range(i, n):
            dx, dy = centres[j] - centres[i]
            if abs(dx) >= size or abs(dy) >= size:
                continue
            (ri, rj), (ci, cj) = _window(dy, size), _window(dx, size)
            left = (jac[i][:, :, ri, ci] * w_i[:, ri, ci]).reshape(d, -1)
            block = left @ jac[j][:, :, rj, cj].reshape(d, -1).T  # sum over shared pixels
            precision[i * d : (i + 1) * d, j * d : (j + 1) * d] = block
            precision[j * d : (j + 1) * d, i * d : (i + 1) * d] = block.T
        precision[i * d : (i + 1) * d, i * d : (i + 1) * d] += hess[i]
    return 0.5 * (precision + precision.T)


def floored_eigh(precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (raised to :data:`EIGEN_FLOOR` times the largest, or 1) and eigenvectors."""
    values, vectors = np.linalg.eigh(precision)
    return np.maximum(values, EIGEN_FLOOR * max(values[-1], 1.0)), vectors


def _laplace_at(stamps, jac, hess, positions, variance, pixel_mask, eps) -> LaplaceFluxes:
    """:func:`laplace_flux_errors` from the decoded stamps, their Jacobians and the prior
    Hessians (float64 host arrays of the ``n`` sources)."""
    n, d = jac.shape[:2]
    size = stamps.shape[-1]
    centres = nearest_pixel(positions)  # the fit's rounding (place_stamps)

    # Gauss-Newton weights on every stamp's footprint (0 outside the field and where masked)
    model = paste_stamps(stamps, centres, variance.shape)
    weight = inverse_variance(variance, pixel_mask, model=model, model_error=eps)
    weights = extract_cutouts(weight, centres, size, dtype=np.float64)

    values, vectors = floored_eigh(gauss_newton_precision(jac, hess, weights, centres))
    covariance = (vectors / values) @ vectors.T

    grad = jac.sum(axis=(-2, -1))  # (n, d, B): dF_ib / dz_i
    flux_var = np.stack(
        [
            np.einsum(
                "ab,ac,cb->b",
                grad[i],
                covariance[i * d : (i + 1) * d, i * d : (i + 1) * d],
                grad[i],
            )
            for i in range(n)
        ]
    )
    return LaplaceFluxes(
        flux=stamps.sum(axis=(-2, -1)),
        flux_err=np.sqrt(np.maximum(flux_var, 0.0)),
        covariance=covariance,
    )


def calibrate_model_error(
    residuals: ArrayLike, models: ArrayLike, variances: ArrayLike, *, threshold: float = 0.1
) -> float:
    r"""Model-error fraction that makes reconstruction residuals of isolated galaxies
    consistent with their noise.

    With residuals :math:`r = y - m` of galaxies fitted alone, on the pixels where the model
    exceeds ``threshold`` times the pixel noise (where the galaxy is), :math:`\epsilon` solves

    .. math::

        \frac{1}{N} \sum_p \frac{r_p^2}{\sigma_p^2 + \epsilon^2 m_p^2} = 1

    (bisection on :math:`\epsilon \in [0, 1]`; 0 when the residuals are already at the noise).

    Parameters
    ----------
    residuals, models, variances
        Arrays of one shape (e.g. ``(n, B, S, S)`` stamps of held-out isolated galaxies).
    threshold
        Pixels used: :math:`m > \mathrm{threshold}\cdot\sigma`.

    Returns
    -------
    float
        :math:`\epsilon`.
    """
    r = np.asarray(residuals, np.float64)
    m = np.asarray(models, np.float64)
    v = np.asarray(variances, np.float64)
    use = np.isfinite(r) & np.isfinite(v) & (v > 0) & (m > threshold * np.sqrt(np.abs(v)))
    r, m, v = r[use], m[use], v[use]
    if not len(r):
        raise ValueError("no pixel where the model exceeds the threshold")

    def excess(eps: float) -> float:
        return float(np.mean(r**2 / (v + (eps * m) ** 2)) - 1.0)

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


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
