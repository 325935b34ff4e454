"""Laplace approximation of any NumPyro model's latents at a point (e.g. its MAP).

:func:`laplace_approximation` differentiates NumPyro's potential energy (minus the log joint
in the unconstrained space, with the transforms' log-Jacobians) twice at a given point. Its
inverse is the covariance of the Gaussian approximation of the posterior there, and the
inverse mass matrix that makes NUTS sample an approximately whitened space
(``sample_posterior(..., inverse_mass_matrix=laplace.covariance)`` or NumPyro's own
``NUTS(model, inverse_mass_matrix=..., dense_mass=True)``). For
:func:`~madness_ppl.scene.blend_model` :func:`~madness_ppl.uncertainty.laplace_flux_errors`
is the cheaper, specialised route (Gauss-Newton blocks and the flow's Hessian, flux errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import potential_energy, unconstrain_fn

from madness_ppl.errors import MadnessInputError

__all__ = ["LaplaceApproximation", "laplace_approximation"]


class LaplaceApproximation(NamedTuple):
    r"""Gaussian approximation :math:`u \sim \mathcal{N}(\hat u, H^{-1})` of the posterior of
    the unconstrained latents.

    Attributes
    ----------
    location
        :math:`\hat u`, the unconstrained latent values by site name.
    precision
        :math:`H = \nabla^2_u U(\hat u)` ``(k, k)``, the Hessian of the potential energy.
    covariance
        :math:`H^{-1}` ``(k, k)``.
    sites
        ``(name, shape)`` of each latent site, in the order of the flattened vector: sorted
        by name (``jax.flatten_util.ravel_pytree`` of the dict, as NumPyro's NUTS flattens
        its inverse mass matrix), each site raveled row-major.
    """

    location: dict[str, jax.Array]
    precision: np.ndarray
    covariance: np.ndarray
    sites: tuple[tuple[str, tuple[int, ...]], ...]

    def sd(self) -> dict[str, np.ndarray]:
        """Marginal standard deviations by site (unconstrained space), in each site's shape."""
        sd = np.sqrt(np.diag(self.covariance))
        out, start = {}, 0
        for name, shape in self.sites:
            size = int(np.prod(shape))
            out[name] = sd[start : start + size].reshape(shape)
            start += size
        return out


def laplace_approximation(
    model: Callable, *args: Any, params: Mapping[str, Any], **kwargs: Any
) -> LaplaceApproximation:
    r"""Laplace approximation of ``model``'s latents at ``params``.

    With :math:`U(u) = -\log p(y, T(u)) - \log|\det J_T(u)|` NumPyro's potential energy over the
    unconstrained latents :math:`u` (:math:`T` the transforms to each site's support),

    .. math::

        H = \nabla^2_u U(\hat u), \qquad p(u \mid y) \approx \mathcal{N}(\hat u, H^{-1}),

    by exact second derivatives (``jax.hessian``; :math:`k^2` memory for :math:`k` latent
    elements, fine to a few thousand). For a model linear in its latents with Gaussian prior
    and likelihood this is the exact posterior. At a constrained site's MAP the potential's
    gradient is not exactly zero (the log-Jacobian is not part of the MAP objective); the
    approximation is then centred at the MAP, not at the potential's minimum.

    Parameters
    ----------
    model
        A NumPyro model with continuous latent sites.
    *args, **kwargs
        Its arguments (the data included).
    params
        Constrained values of every latent site, e.g. ``fit_map(...).params``.

    Returns
    -------
    LaplaceApproximation

    Raises
    ------
    MadnessInputError
        When :math:`H` is not finite or not positive definite: ``params`` is not near a local
        optimum of the posterior (fit to convergence first), or the posterior is flat in
        some direction (a latent the data and prior do not constrain).
    """
    unconstrained = unconstrain_fn(model, args, kwargs, dict(params))
    flat, unravel = ravel_pytree(unconstrained)

    def potential(u_flat):
        return potential_energy(model, args, kwargs, unravel(u_flat))

    hessian = np.asarray(jax.jit(jax.hessian(potential))(flat), np.float64)
    hessian = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(hessian)):
        raise MadnessInputError("the Hessian of the potential at params is not finite", None)
    eigenvalues, vectors = np.linalg.eigh(hessian)
    if eigenvalues.size and eigenvalues.min() <= 1e-12 * max(eigenvalues.max(), 1e-300):
        raise MadnessInputError(
            f"the Hessian of the potential at params is not positive definite (eigenvalues "
            f"{eigenvalues.min():.3g} to {eigenvalues.max():.3g}): params is not near a local "
            "optimum of the posterior, or some latent is unconstrained; fit to convergence "
            "(fit_map) first",
            None,
        )
    covariance = (vectors / eigenvalues) @ vectors.T
    sites = tuple((name, tuple(jnp.shape(value))) for name, value in sorted(unconstrained.items()))
    return LaplaceApproximation(
        location=dict(unconstrained),
        precision=hessian,
        covariance=0.5 * (covariance + covariance.T),
        sites=sites,
    )
