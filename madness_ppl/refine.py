r"""Newton refinement of a blend's MAP: Gauss-Newton steps on all latents at once.

L-BFGS (:func:`~madness_ppl.infer.fit_map`) stops when its per-step decrease is small, which on
tight blends can leave the latents of overlapping sources short of the optimum along the
directions that trade light between them (the coupled, badly conditioned directions a
limited-memory method learns last). Where it stops then depends on the path: masking an empty
pixel or a tiny change of the data moves fluxes by a fraction of their error. From that end
point, a Newton step with the blend's generalised Gauss-Newton matrix,

.. math::

    H = J^\top W J + \nabla^2_z\Big[-\sum_i \log p(z_i)\Big], \qquad
    \delta = -H^{-1} \nabla L(z), \qquad
    L(z) = \tfrac12 \sum_p W_p (m_p(z) - y_p)^2 - \sum_i \log p(z_i),

solves the quadratic model of the loss over every source jointly (overlapping sources couple
through the pixels they share: :func:`~madness_ppl.uncertainty.gauss_newton_precision`, the
matrix the Laplace errors invert anyway), so the result no longer depends on where L-BFGS
stopped. Eigenvalues of :math:`H` below 1 (the flow's Hessian is indefinite away from its
modes) are raised to 1, the curvature of a unit-normal prior. The step is accepted only if
the loss falls; otherwise Levenberg damping
:math:`(H + \mu\lambda_\max I)` shortens and turns it toward the gradient. Its
predicted decrease :math:`-\tfrac12 \nabla L^\top \delta` measures the gap L-BFGS left.

Conventions are the fit's: stamps at the nearest pixel (``blend_model(subpixel=False)``),
pixel weights :math:`W = 1/\sigma^2` (no model-error term: that belongs to the errors, not to
the fit), stamps observed through the field's difference kernels when a PSF is given.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.blas import one_blas_thread
from madness_ppl.cutouts import extract_cutouts, nearest_pixel, paste_stamps
from madness_ppl.galaxy_model import ScoredGalaxyModel
from madness_ppl.likelihood import inverse_variance
from madness_ppl.point_sources import (
    PointSources,
    decode_sources,
    pad_points,
    per_source,
    source_log_prob,
)
from madness_ppl.psf import PSFKernel, convolve_stamps
from madness_ppl.scene import bucket_size
from madness_ppl.uncertainty import gauss_newton_precision, linearise

__all__ = ["Refinement", "newton_refine"]

#: Levenberg damping :math:`\mu` tried in order (relative to the largest eigenvalue of
#: :math:`H`) until the loss falls: the Newton step first.
_DAMPING = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class Refinement(NamedTuple):
    r"""Output of :func:`newton_refine`.

    Attributes
    ----------
    z
        ``(n, d)`` refined latents.
    stamps
        ``(n, B, S, S)`` model-frame stamps at ``z``.
    observed
        ``(n, B, G, G)`` stamps as observed (``stamps`` when there is no PSF).
    decrease
        :math:`L(z_0) - L(z)` in nats (0 when no step was accepted).
    predicted
        Predicted decrease :math:`-\tfrac12 \nabla L^\top \delta` of a Newton step from the
        final ``z``: the gap to the optimum that remains.
    steps
        Newton steps accepted.
    linearisation
        ``(jac, hess)`` at the final ``z``: observed-stamp Jacobians ``(n, d, B, G, G)`` and
        prior Hessians ``(n, d, d)``, for
        :func:`~madness_ppl.uncertainty.laplace_flux_errors` to reuse.
    converged
        Whether ``predicted`` is below the tolerance.
    """

    z: np.ndarray
    stamps: np.ndarray
    observed: np.ndarray
    decrease: float
    predicted: float
    steps: int
    linearisation: tuple[np.ndarray, np.ndarray]
    converged: bool


@jax.jit
def _evaluate(
    prior: ScoredGalaxyModel, z: jax.Array, psf: PSFKernel | None, points: PointSources | None
):
    """Model-frame and observed stamps and :math:`-\\log p(z_i)` at padded latents."""
    stamps = decode_sources(prior, z, points)
    observed = stamps if psf is None else convolve_stamps(stamps, psf.fourier)
    neg_logp = lambda zi, point: -source_log_prob(prior, zi, point)  # noqa: E731
    return stamps, observed, per_source(neg_logp, z, points)


def newton_refine(
    prior: ScoredGalaxyModel,
    z: ArrayLike,
    positions: ArrayLike,
    field: ArrayLike,
    variance: ArrayLike,
    *,
    pixel_mask: ArrayLike | None = None,
    psf: PSFKernel | None = None,
    max_steps: int = 1,
    tol: float = 1e-3,
    points: PointSources | None = None,
) -> Refinement:
    r"""Gauss-Newton steps from ``z`` on the blend's MAP objective (see the module docstring).

    Parameters
    ----------
    prior
        The galaxy prior (``decode``, ``log_prob``, ``latent_dim``).
    z
        ``(n, d)`` latents of the real sources (e.g. the L-BFGS result, padding removed).
    positions
        ``(n, 2)`` positions ``(x, y)`` (stamps at the nearest pixel, as in the fit).
    field, variance
        ``(B, H, W)`` data and pixel variance of the fit; NaN/inf data are masked.
    pixel_mask
        Optional ``(B, H, W)`` or ``(H, W)`` booleans, ``False`` for pixels left out.
    psf
        The field's difference kernels, as in the fit.
    max_steps
        Newton steps at most. The objective is linearised ``steps + 1`` times (``d`` decoder
        JVPs per source each), the last time at the final ``z``, which tells whether it
        converged and serves the Laplace errors.
    tol
        Stop when the predicted decrease is below ``tol`` nats per free latent element (the
        L-BFGS tolerance of :func:`~madness_ppl.infer.fit_map`).
    points
        The field's point sources (:func:`~madness_ppl.point_sources.point_sources`), or
        ``None``: all galaxies.

    Returns
    -------
    Refinement

    Examples
    --------
    The toy prior's decoder is linear: one step lands on the closed-form MAP.

    >>> import jax, numpy as np
    >>> from madness_ppl.toy import LinearGaussianPrior
    >>> prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=1, stamp_size=9, latent_dim=2)
    >>> out = newton_refine(prior, np.zeros((1, 2)), [[10.0, 10.0]], np.ones((1, 21, 21)),
    ...                     np.ones((1, 21, 21)))
    >>> out.steps
    1
    """
    z = np.asarray(z, np.float64)
    n, d = z.shape
    field = np.asarray(field, np.float64)
    variance = np.asarray(variance, np.float64)
    finite = np.isfinite(field)
    mask = finite if pixel_mask is None else finite & np.broadcast_to(pixel_mask, field.shape)
    weight = inverse_variance(variance, mask)
    data = np.where(mask, field, 0.0)
    centres = nearest_pixel(positions)
    plate = bucket_size(n)  # one compiled program per bucket, as in the fit
    points = pad_points(points, plate)

    def padded(latents: np.ndarray) -> jax.Array:
        out = np.zeros((plate, d), np.float32)
        out[:n] = latents
        return jnp.asarray(out)

    def loss(observed: np.ndarray, neg_logp: np.ndarray) -> tuple[float, np.ndarray]:
        residual = paste_stamps(observed, centres, field.shape) - data
        return 0.5 * float(np.sum(weight * residual**2)) + float(neg_logp.sum()), residual

    stamps, observed, neg_logp = (
        np.asarray(a[:n], np.float64) for a in _evaluate(prior, padded(z), psf, points)
    )
    value, residual = loss(observed, neg_logp)
    start_value, steps = value, 0
    for iteration in range(max_steps + 1):  # the last linearisation is at the final z
        outputs = linearise(prior, padded(z), psf, points)
        _, _, jac, hess, grad_prior = (np.asarray(a[:n], np.float64) for a in outputs)
        size = jac.shape[-1]
        weights = extract_cutouts(weight, centres, size, dtype=np.float64)
        weighted = extract_cutouts(weight * residual, centres, size, dtype=np.float64)
        grad = np.einsum("ndbyx,nbyx->nd", jac, weighted) + grad_prior
        with one_blas_thread():
            values, vectors = np.linalg.eigh(gauss_newton_precision(jac, hess, weights, centres))
        # the flow's Hessian is indefinite away from its modes: curvature below the prior's
        # unit scale is taken as 1 (a negative one would send the step uphill or far away)
        values = np.maximum(values, 1.0)
        projected = vectors.T @ grad.ravel()
        predicted = 0.5 * float(np.sum(projected**2 / values))
        if predicted <= tol * n * d or iteration == max_steps:
            break
        accepted = False
        for damping in _DAMPING:  # Levenberg: (H + mu lambda_max I) when the full step fails
            step = -(vectors @ (projected / (values + damping * values[-1]))).reshape(n, d)
            trial = z + step
            outputs = _evaluate(prior, padded(trial), psf, points)
            t_stamps, t_observed, t_neg_logp = (np.asarray(a[:n], np.float64) for a in outputs)
            t_value, t_residual = loss(t_observed, t_neg_logp)
            if np.isfinite(t_value) and t_value < value:
                z, stamps, observed = trial, t_stamps, t_observed
                value, residual, accepted = t_value, t_residual, True
                steps += 1
                break
        if not accepted:
            break
    return Refinement(
        z.astype(np.float32),
        stamps.astype(np.float32),
        observed.astype(np.float32),
        start_value - value,
        predicted,
        steps,
        (jac, hess),
        predicted <= tol * n * d,
    )
