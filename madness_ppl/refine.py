r"""Refinement of a blend's MAP on all latents at once, with the blend's Gauss-Newton matrix.

L-BFGS (:func:`~madness_ppl.infer.fit_map`) stops when its per-step decrease is small, which on
blends can leave the latents of overlapping sources short of the optimum along the directions
that trade light between them (the coupled, badly conditioned directions that its per-source
diagonal preconditioner cannot see and a limited-memory method learns last). Where it stops
then depends on the path: masking an empty pixel or a tiny change of the data moves fluxes by a
fraction of their error. The refinement continues from that end point with the blend's
generalised Gauss-Newton matrix,

.. math::

    H = J^\top W J + \nabla^2_z\Big[-\sum_i \log p(z_i)\Big], \qquad
    L(z) = \tfrac12 \sum_p W_p (m_p(z) - y_p)^2 - \sum_i \log p(z_i),

(:func:`~madness_ppl.uncertainty.gauss_newton_precision`; overlapping sources couple through
the pixels they share, and it is the matrix the Laplace errors invert anyway). Eigenvalues of
:math:`H` below 1 (the flow's Hessian is indefinite away from its modes) are raised to 1, the
curvature of a unit-normal prior. Two methods:

* ``"gauss-newton"`` (the default): Newton steps :math:`\delta = -H^{-1}\nabla L` with
  :math:`H` rebuilt at every step (the decoder's Jacobian of every source: ``d`` forward-mode
  products, ~20 gradients' worth on the LSST prior), accepted only if the loss falls; otherwise
  Levenberg damping :math:`(H + \mu\lambda_\max I)` shortens and turns it toward the gradient.
* ``"lbfgs"``: :math:`H` of the start as the initial inverse Hessian of an L-BFGS two-loop
  recursion with a backtracking Armijo line search; its first step is the Gauss-Newton step,
  later ones cost one gradient each and correct :math:`H` along the directions explored. The
  loss is evaluated on the device relative to the start's model image,
  :math:`\tfrac12 \sum_p W_p (m_p - m^0_p)(m_p + m^0_p - 2 y_p)`, exact where the model does
  not change. It goes much further per second on dense fields (a 38-galaxy 205-px field: every
  r flux within 0.05 of its error of a 2000-step optimum after 60 steps in 26 s, where eight
  Gauss-Newton steps in 29 s left them up to 4.6 errors away), but it also leaves the
  neighbourhood of L-BFGS's end point for other optima, which on tight blends made the
  catalog *more* sensitive to one masked pixel (``benchmarks/results/tight.md``, stop 48). Not
  the default until that is understood.

The stopping test is the Newton decrement in the metric of :math:`H`,
:math:`\tfrac12 \nabla L^\top H^{-1} \nabla L` (the decrease a Gauss-Newton step from the
current point would predict), or, with ``flux_tol``, the largest flux move of such a step in
units of its error: by Cauchy-Schwarz, a step :math:`\delta` changes a flux with gradient
:math:`g` by :math:`|g^\top\delta| \le \sqrt{g^\top H^{-1} g}\,\sqrt{\delta^\top H \delta}`, so
a decrement below :math:`D` bounds every flux's remaining move by :math:`\sqrt{2D}` of its
Laplace error.

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
from madness_ppl.compile_options import ONCE
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
from madness_ppl.scene import bucket_size, place_stamps
from madness_ppl.uncertainty import gauss_newton_precision, linearise

__all__ = ["METHODS", "Refinement", "newton_refine"]

#: The refinement's methods (:func:`newton_refine`).
METHODS = ("gauss-newton", "lbfgs")
#: Levenberg damping :math:`\mu` of ``"gauss-newton"``, tried in order (relative to the
#: largest eigenvalue of :math:`H`) until the loss falls: the Newton step first.
_DAMPING = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: L-BFGS memory (pairs of steps and gradient changes) of ``"lbfgs"``.
MEMORY = 10
#: Armijo sufficient-decrease constant and the most trial points of a line search.
_ARMIJO, _BACKTRACKS = 1e-4, 12


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
        Predicted decrease :math:`\tfrac12 \nabla L^\top H^{-1} \nabla L` of a Gauss-Newton
        step from the final ``z`` (with :math:`H` at the final ``z``): the gap to the optimum
        that remains.
    steps
        Steps accepted (of either method).
    linearisation
        ``(jac, hess)`` at the final ``z``: observed-stamp Jacobians ``(n, d, B, G, G)`` and
        prior Hessians ``(n, d, d)``, for
        :func:`~madness_ppl.uncertainty.laplace_flux_errors` to reuse.
    converged
        Whether ``predicted`` is below the tolerance, or no flux would move by more than
        ``flux_tol`` of its error (:func:`newton_refine`), at the final ``z``.
    evaluations
        Loss evaluations: ``"gauss-newton"``'s trial points, ``"lbfgs"``'s gradients (the
        start's and the line search's).
    """

    z: np.ndarray
    stamps: np.ndarray
    observed: np.ndarray
    decrease: float
    predicted: float
    steps: int
    linearisation: tuple[np.ndarray, np.ndarray]
    converged: bool
    evaluations: int = 0


def _decode_and_score(
    prior: ScoredGalaxyModel, z: jax.Array, psf: PSFKernel | None, points: PointSources | None
):
    """Model-frame and observed stamps and :math:`-\\log p(z_i)` at padded latents."""
    stamps = decode_sources(prior, z, points)
    observed = stamps if psf is None else convolve_stamps(stamps, psf.fourier)
    neg_logp = lambda zi, point: -source_log_prob(prior, zi, point)  # noqa: E731
    return stamps, observed, per_source(neg_logp, z, points)


#: :func:`_decode_and_score` compiled on its own: the Gauss-Newton trial points
_evaluate = jax.jit(_decode_and_score, compiler_options=ONCE)


class _Objective(NamedTuple):
    """The field's data of :func:`_loss_change`, on the device once per refinement."""

    real: jax.Array  # (plate,) True for the n real sources
    positions: jax.Array  # (plate, 2), integer-valued pixel centres
    weight: jax.Array  # (B, H, W) 1/sigma^2, 0 where masked
    data: jax.Array  # (B, H, W), 0 where masked
    reference: jax.Array  # (B, H, W) model image at the start


@jax.jit
def _loss_change(
    prior: ScoredGalaxyModel,
    z: jax.Array,
    psf: PSFKernel | None,
    points: PointSources | None,
    objective: _Objective,
):
    r""":math:`L(z)` up to a constant (its pixel term relative to the start's model image) and
    its gradient, at padded latents (padding contributes 0)."""

    def change(z):
        _, observed, neg_logp = _decode_and_score(prior, z, psf, points)
        observed = observed * objective.real[:, None, None, None].astype(observed.dtype)
        image = place_stamps(
            observed, objective.positions, objective.data.shape[-2:], subpixel=False
        )
        reference = objective.reference
        pixels = objective.weight * (image - reference) * (image + reference - 2 * objective.data)
        return 0.5 * jnp.sum(pixels) + jnp.sum(jnp.where(objective.real, neg_logp, 0.0))

    return jax.value_and_grad(change)(z)


def _two_loop(
    grad: np.ndarray, memory: list[tuple[np.ndarray, np.ndarray]], precondition
) -> np.ndarray:
    r"""L-BFGS direction :math:`-\tilde H^{-1} \nabla L` (two-loop recursion, initial inverse
    Hessian ``precondition``; ``memory`` holds the pairs ``(s, y)``, oldest first)."""
    q = grad.copy()
    alphas = []
    for s, y in reversed(memory):
        alpha = (s @ q) / (s @ y)
        q -= alpha * y
        alphas.append(alpha)
    r = precondition(q)
    for (s, y), alpha in zip(memory, reversed(alphas), strict=True):
        r += s * (alpha - (y @ r) / (s @ y))
    return -r


def _backtrack(alpha: float, slope: float, change: float) -> float:
    r"""The next trial step of the line search: the minimum of the quadratic through
    :math:`L(0)`, :math:`L'(0) = ` ``slope`` and :math:`L(\alpha) - L(0) = ` ``change``,
    kept within :math:`[0.1, 0.5]\,\alpha` (a tenth when the loss is not finite)."""
    if not np.isfinite(change):
        return 0.1 * alpha
    curvature = change - slope * alpha
    best = -slope * alpha**2 / (2.0 * curvature) if curvature > 0 else 0.5 * alpha
    return float(np.clip(best, 0.1 * alpha, 0.5 * alpha))


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
    flux_tol: float = 0.0,
    method: str = "gauss-newton",
    points: PointSources | None = None,
) -> Refinement:
    r"""Refine ``z`` on the blend's MAP objective (see the module docstring).

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
        Steps at most. ``"gauss-newton"``: each builds the decoder Jacobians again;
        ``"lbfgs"``: each costs one gradient of the blend (more when the line search
        backtracks). The Jacobians are always built at the start and, when a step was taken,
        at the final ``z``, which tells whether it converged and serves the Laplace errors.
    tol
        Stop when the predicted decrease is below ``tol`` nats per free latent element (the
        L-BFGS tolerance of :func:`~madness_ppl.infer.fit_map`).
    flux_tol
        Also stop when a Gauss-Newton step from the current point would move no source's flux
        in any band by more than ``flux_tol`` of its (pixel-noise) Laplace error,
        :math:`|g_{ib}^\top \delta_i| \le` ``flux_tol`` :math:`\sqrt{g_{ib}^\top
        (H^{-1})_{ii} g_{ib}}` with :math:`g_{ib}` the gradient of flux :math:`F_{ib}`: what a
        catalog needs, and reachable where the decoder's float32 rounding puts a floor under
        the predicted decrease of a bright dense field (0: the decrease alone).
    method
        ``"gauss-newton"`` (default): Gauss-Newton steps with Levenberg damping when the loss
        does not fall; ``"lbfgs"``: L-BFGS preconditioned by the start's Gauss-Newton matrix.
    points
        The field's point sources (:func:`~madness_ppl.point_sources.point_sources`), or
        ``None``: all galaxies.

    Returns
    -------
    Refinement

    Examples
    --------
    The toy prior's decoder is linear: the first step (of either method) is the Newton step,
    which lands on the closed-form MAP.

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
    threshold = tol * n * d

    def padded(latents: np.ndarray) -> jax.Array:
        out = np.zeros((plate, d), np.float32)
        out[:n] = latents
        return jnp.asarray(out)

    def curvature(latents: np.ndarray):
        """Stamps, Jacobians, prior Hessians, the gradient and the floored eigenpairs of H."""
        outputs = linearise(prior, padded(latents), psf, points)
        stamps, observed, jac, hess, grad_prior = (np.asarray(a[:n], np.float64) for a in outputs)
        residual = paste_stamps(observed, centres, field.shape) - data
        size = jac.shape[-1]
        weights = extract_cutouts(weight, centres, size, dtype=np.float64)
        weighted = extract_cutouts(weight * residual, centres, size, dtype=np.float64)
        grad = np.einsum("ndbyx,nbyx->nd", jac, weighted).ravel() + grad_prior.ravel()
        with one_blas_thread():
            values, vectors = np.linalg.eigh(gauss_newton_precision(jac, hess, weights, centres))
        # the flow's Hessian is indefinite away from its modes: curvature below the prior's
        # unit scale is taken as 1 (a negative one would send the step uphill or far away)
        return stamps, observed, jac, hess, grad, np.maximum(values, 1.0), vectors

    def decrement(grad: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> float:
        return 0.5 * float(np.sum((vectors.T @ grad) ** 2 / values))

    def flux_moves(grad, jac, values, vectors) -> np.ndarray:
        """``(n, B)`` flux change of a Gauss-Newton step over its Laplace error."""
        flux_grad = jac.sum(axis=(-2, -1))  # (n, d, B): dF_ib / dz_i
        projected = np.einsum("ndb,ndk->nbk", flux_grad, vectors.reshape(n, d, -1))
        move = projected @ ((vectors.T @ grad) / values)
        error = np.sqrt(np.sum(projected**2 / values, axis=-1))
        return np.divide(np.abs(move), error, out=np.zeros_like(move), where=error > 0)

    def stationary(grad, jac, values, vectors) -> bool:
        return decrement(grad, values, vectors) <= threshold or (
            flux_tol > 0 and float(flux_moves(grad, jac, values, vectors).max()) <= flux_tol
        )

    stamps, observed, jac, hess, grad, values, vectors = curvature(z)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x, value, steps, evaluations = z.ravel(), 0.0, 0, 0
    if method == "gauss-newton" and max_steps > 0 and not stationary(grad, jac, values, vectors):

        def loss(flat: np.ndarray) -> float:
            """:math:`L` at latents ``flat`` (float64 on the host; one decoder pass)."""
            _, t_observed, t_neg_logp = _evaluate(prior, padded(flat.reshape(n, d)), psf, points)
            t_observed = np.asarray(t_observed[:n], np.float64)
            residual = paste_stamps(t_observed, centres, field.shape) - data
            neg_logp = np.asarray(t_neg_logp[:n], np.float64)
            return 0.5 * float(np.sum(weight * residual**2)) + float(np.sum(neg_logp))

        value = start_value = loss(x)
        for _ in range(max_steps):
            projected = vectors.T @ grad
            accepted = False
            for damping in _DAMPING:  # Levenberg: (H + mu lambda_max I) when the full step fails
                trial = x - vectors @ (projected / (values + damping * values[-1]))
                t_value = loss(trial)
                evaluations += 1
                if np.isfinite(t_value) and t_value < value:
                    x, value, accepted, steps = trial, t_value, True, steps + 1
                    break
            if not accepted:
                break
            stamps, observed, jac, hess, grad, values, vectors = curvature(x.reshape(n, d))
            if stationary(grad, jac, values, vectors):
                break
        value -= start_value
    if method == "lbfgs" and max_steps > 0 and not stationary(grad, jac, values, vectors):
        objective = _Objective(
            real=jnp.arange(plate) < n,
            positions=jnp.asarray(np.pad(centres, ((0, plate - n), (0, 0))), jnp.float32),
            weight=jnp.asarray(weight, jnp.float32),
            data=jnp.asarray(data, jnp.float32),
            reference=jnp.asarray(paste_stamps(observed, centres, field.shape), jnp.float32),
        )
        offset = 0.0

        def evaluate(flat: np.ndarray) -> tuple[float, np.ndarray]:
            change, gradient = _loss_change(
                prior, padded(flat.reshape(n, d)), psf, points, objective
            )
            return float(change) - offset, np.asarray(gradient[:n], np.float64).ravel()

        offset, evaluations = evaluate(x)[0], 1  # values relative to the start: L(z) - L(z_0)

        def precondition(v: np.ndarray) -> np.ndarray:
            return vectors @ ((vectors.T @ v) / values)

        memory: list[tuple[np.ndarray, np.ndarray]] = []
        last_alpha = 1.0
        for _ in range(max_steps):
            direction = _two_loop(grad, memory, precondition)
            slope = float(grad @ direction)
            if not slope < 0:  # not a descent direction: forget the memory
                memory.clear()
                direction = -precondition(grad)
                slope = float(grad @ direction)
            # the unit step first, unless the last step needed less: then twice the last
            alpha, accepted = min(1.0, 2.0 * last_alpha), False
            for _ in range(_BACKTRACKS):
                trial = x + alpha * direction
                t_value, t_grad = evaluate(trial)
                evaluations += 1
                if np.isfinite(t_value) and t_value <= value + _ARMIJO * alpha * slope:
                    accepted = True
                    break
                alpha = _backtrack(alpha, slope, t_value - value)
            if not accepted:
                break
            s, y = trial - x, t_grad - grad
            if s @ y > 1e-12 * np.sqrt((s @ s) * (y @ y)):  # curvature condition
                memory = [*memory[-(MEMORY - 1) :], (s, y)]
            x, value, grad, steps, last_alpha = trial, t_value, t_grad, steps + 1, alpha
            if stationary(grad, jac, values, vectors):
                break
    z = x.reshape(n, d)
    if steps and method == "lbfgs":  # the Jacobians at the final z: the convergence test
        stamps, observed, jac, hess, grad, values, vectors = curvature(z)  # and the errors
    return Refinement(
        z.astype(np.float32),
        stamps.astype(np.float32),
        observed.astype(np.float32),
        -value,
        decrement(grad, values, vectors),
        steps,
        (jac, hess),
        stationary(grad, jac, values, vectors),
        evaluations,
    )
