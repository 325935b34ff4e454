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

The Laplace error is the posterior width *if the model were right*; the terms that stand for
what it is not are in :mod:`madness_ppl.error_budget` (re-exported here).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.blas import one_blas_thread
from madness_ppl.cutouts import extract_cutouts, nearest_pixel, paste_stamps
from madness_ppl.error_budget import (
    ONE_SIGMA,
    calibrate_error_fraction,
    calibrated_fractions,
    flux_error_budget,
    interval_halfwidth,
    neighbour_light,
    systematic_flux_errors,
)
from madness_ppl.errors import MadnessInputWarning
from madness_ppl.galaxy_model import ScoredGalaxyModel
from madness_ppl.likelihood import inverse_variance, model_error_fraction
from madness_ppl.point_sources import (
    PointSources,
    decode_sources,
    pad_points,
    per_source,
    source_log_prob,
)
from madness_ppl.psf import PSFKernel, convolve_stamps
from madness_ppl.scene import bucket_size

__all__ = [
    "ONE_SIGMA",
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
def linearise(
    prior: ScoredGalaxyModel,
    z: jax.Array,
    psf: PSFKernel | None = None,
    points: PointSources | None = None,
):
    r"""Everything second-order about the sources at latents ``z`` ``(n, d)``, in one program.

    Returns model-frame stamps ``(n, B, S, S)``, the stamps as observed (through ``psf``'s
    kernels, ``(n, B, G, G)``; the stamps themselves without one), the observed decoder
    Jacobians :math:`\partial f(z_i)/\partial z_i` ``(n, d, B, G, G)`` (``d`` forward-mode
    products of one linearised decoder), and the Hessians ``(n, d, d)`` and gradients
    ``(n, d)`` of :math:`-\log p(z_i)`. Used by the Laplace errors and by
    :func:`~madness_ppl.refine.newton_refine`. ``points`` marks point sources
    (:mod:`madness_ppl.point_sources`; padded to ``n``).
    """
    d = z.shape[-1]
    decode = lambda latents: decode_sources(prior, latents, points)  # noqa: E731
    stamps, linear = jax.linearize(decode, z)  # decoded once, differentiated d times
    basis = jnp.eye(d, dtype=z.dtype)
    jac = jnp.moveaxis(jax.vmap(lambda e: linear(jnp.broadcast_to(e, z.shape)))(basis), 0, 1)
    neg_logp = lambda zi, point: -source_log_prob(prior, zi, point)  # noqa: E731
    hess = per_source(jax.hessian(neg_logp), z, points)
    grad = per_source(jax.grad(neg_logp), z, points)
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
    points: PointSources | None = None,
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
    points
        The field's point sources (:func:`~madness_ppl.point_sources.point_sources`, ``n``
        of them), or ``None``: all galaxies.

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
    if linearisation is None and psf is None and getattr(prior, "psf_aware", False):
        warnings.warn(
            "laplace_flux_errors: the prior is PSF-aware but no psf= was given, so the errors "
            "are those of data at the prior's model frame (its narrow PSF), not of an observed "
            "field; pass the kernels the fit used (DeblendResult.psf, or "
            "madness_ppl.psf.field_kernel)",
            MadnessInputWarning,
            stacklevel=2,
        )
    if linearisation is None:
        plate = bucket_size(n)  # one compiled program per bucket, as in the fit
        padded = jnp.zeros((plate, d), z.dtype).at[:n].set(z)
        _, observed, jac, hess, _ = linearise(prior, padded, psf, pad_points(points, plate))
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
