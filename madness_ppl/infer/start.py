r"""The starting point of NUTS, checked site by site before any compilation of the sampler.

:func:`init_values` reads a :class:`~madness_ppl.infer.MAPResult` or a mapping of values;
:func:`checked_start` completes them with NumPyro's ``init_to_value`` fallback and refuses a
start at which a site's log density :math:`\sum \log p(\text{site})`, or its gradient, is not
finite, or a latent site whose mask switches elements off (no density: a flat, improper
posterior). Each refusal names the sites.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import MaskedDistribution
from numpyro.infer.initialization import init_to_value

from madness_ppl.errors import MadnessInputError
from madness_ppl.infer.map import MAPResult
from madness_ppl.infer.target import Target

__all__ = ["check_mass_matrix", "checked_start", "init_values", "site_log_prob"]


def init_values(init: MAPResult | Mapping[str, Any] | None) -> dict[str, Any]:
    """Constrained starting values by site name (a warning if a MAP fit did not converge)."""
    if init is None:
        return {}
    if isinstance(init, MAPResult):
        converged = np.asarray(init.converged)
        if converged.ndim:
            raise ValueError(
                "init is a batched MAPResult; pass one field's result, e.g. "
                "jax.tree.map(lambda x: x[i], result)"
            )
        if not bool(converged):
            warnings.warn(
                f"the MAP fit did not converge ({int(init.n_steps)} steps, final loss "
                f"{float(init.loss):.6g}); NUTS starts from its last parameters, so the "
                "warm-up may be long and the posterior should be checked with care",
                UserWarning,
                stacklevel=3,
            )
        return dict(init.params)
    if isinstance(init, Mapping):
        return dict(init)
    raise TypeError(f"init must be a MAPResult, a mapping of site values or None, got {init!r}")


def checked_start(
    target: Target, data: list[Any], values: dict, key: jax.Array
) -> tuple[dict[str, jax.Array], dict]:
    r"""All latent values at the start, and the model's trace there.

    Each sample site's contribution :math:`\sum \log p(\text{site})` (scaled and masked as
    in the joint density), its support and the gradient of their sum are computed in one
    program, compiled once per (target, shapes); a non-finite one raises
    :class:`ValueError` naming the sites.

    Raises
    ------
    ValueError
        For values of sites that are not latent, a latent site with masked-out elements
        (e.g. padded sources), a start outside the support, or a non-finite log density or
        gradient.
    """
    args, kwargs = target.arguments(data)
    strategy = init_to_value(values=values)
    seeded = handlers.seed(target.model, key)
    with numpyro.validation_enabled(False):  # bad values are reported below, by site
        trace = handlers.trace(handlers.substitute(seeded, substitute_fn=strategy)).get_trace(
            *args, **kwargs
        )
    start = {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    unknown = sorted(set(values) - set(start))
    if unknown:
        raise ValueError(
            f"init has values for {unknown}, which are not latent sample sites of the model "
            f"(those are {list(start)})"
        )
    _reject_masked_latents(trace, start)
    terms, inside, grads = jax.device_get(_start_terms(target, data, key, start))
    outside = [name for name, ok in inside.items() if not bool(ok)]
    if outside:
        raise ValueError(
            f"the starting value of site(s) {outside} lies outside the support of its "
            "distribution; give initial values inside it"
        )
    bad = {name: float(v) for name, v in terms.items() if not np.isfinite(v)}
    if bad:
        listed = ", ".join(f"{name!r} (log density {v})" for name, v in bad.items())
        raise ValueError(
            f"the log density is not finite at the starting point at site(s) {listed}. "
            "Check the data (NaN/inf pixels not masked, zero or negative variance) and the "
            "initial values (outside the support of their prior?)."
        )
    bad_grad = [name for name, g in grads.items() if not np.all(np.isfinite(g))]
    if bad_grad:
        raise ValueError(
            f"the gradient of the log density is not finite at the starting point with "
            f"respect to site(s) {bad_grad}; check the initial values and the model."
        )
    return start, trace


@functools.partial(jax.jit, static_argnums=0)
def _start_terms(target: Target, data: list[Any], key: jax.Array, latent_values: dict):
    """Per-site log densities, support checks of the latents and the gradient of the sum."""
    args, kwargs = target.arguments(data)
    seeded = handlers.seed(target.model, key)

    def traced(values):
        return handlers.trace(handlers.substitute(seeded, data=values)).get_trace(*args, **kwargs)

    def site_terms(values):
        return {
            name: jnp.sum(site_log_prob(site))
            for name, site in traced(values).items()
            if site["type"] == "sample"
        }

    trace = traced(latent_values)
    inside = {
        name: jnp.all(trace[name]["fn"].support(value)) for name, value in latent_values.items()
    }
    grads = jax.grad(lambda w: sum(site_terms(w).values()))(latent_values)
    return site_terms(latent_values), inside, grads


def _reject_masked_latents(trace: dict, latents: Mapping[str, Any]) -> None:
    """Refuse latent sites with masked-out elements: they have no density to sample."""
    for name in latents:
        fn = trace[name]["fn"]
        mask = fn._mask if isinstance(fn, MaskedDistribution) else trace[name].get("mask")
        if mask is None or isinstance(mask, jax.core.Tracer):
            continue
        mask = np.asarray(mask, bool)
        if not mask.all():
            raise ValueError(
                f"the mask of latent site {name!r} switches off {int((~mask).sum())} "
                "element(s), e.g. padded sources (source_mask): their latents have no density "
                "(an improper, flat posterior) and NUTS cannot sample them. Pass the real "
                "sources only (prepare_blend(..., pad=False))."
            )


def site_log_prob(site: dict) -> jax.Array:
    """Log density of one traced sample site, with its scale and mask applied."""
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value)
    mask = site.get("mask")
    if mask is not None:
        lp = jnp.where(mask, lp, 0.0)
    scale = site.get("scale")
    if scale is not None:
        lp = scale * lp
    return lp


def check_mass_matrix(matrix: np.ndarray, u0: Mapping[str, Any]) -> None:
    """Refuse an inverse mass matrix of the wrong size, non-finite, or not positive definite.

    Parameters
    ----------
    matrix
        ``(k,)`` diagonal or ``(k, k)`` dense :math:`M^{-1}`.
    u0
        The unconstrained starting point by site; :math:`k` is its total size.
    """
    k = int(sum(np.size(v) for v in jax.tree.leaves(u0)))
    if matrix.shape not in ((k,), (k, k)):
        raise MadnessInputError(
            f"inverse_mass_matrix must have shape ({k},) or ({k}, {k}) for the model's {k} "
            f"unconstrained latent values, got {matrix.shape}",
            value=matrix.shape,
        )
    if not np.all(np.isfinite(matrix)):
        raise MadnessInputError("inverse_mass_matrix has non-finite entries", value=None)
    if matrix.ndim == 1:
        ok = bool(np.all(matrix > 0))
    else:
        ok = np.allclose(matrix, matrix.T, rtol=1e-6, atol=0.0)
        if ok:
            try:
                np.linalg.cholesky(matrix)
            except np.linalg.LinAlgError:
                ok = False
    if not ok:
        raise MadnessInputError(
            "inverse_mass_matrix must be positive (diagonal) or symmetric positive definite",
            value=None,
        )
