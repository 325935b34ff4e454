"""What a deblended field returns, and how one field's result is made from its MAP fit.

:func:`field_result` finishes a field after :func:`~madness_ppl.infer.fit_map`: the joint
Newton refinement (:func:`~madness_ppl.refine.newton_refine`), the residual, each source's
misfit, its flux errors (:func:`~madness_ppl.uncertainty.laplace_flux_errors` and
:func:`~madness_ppl.uncertainty.flux_error_budget`) and the catalog
(:func:`~madness_ppl.catalog.source_catalog`), into a :class:`DeblendResult`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
from astropy.table import Table
from jax.typing import ArrayLike

from madness_ppl.blend_inputs import prepare_blend
from madness_ppl.catalog import source_catalog
from madness_ppl.cutouts import paste_stamps
from madness_ppl.error_budget import calibrated_fractions, flux_error_budget, neighbour_light
from madness_ppl.errors import MadnessInputError
from madness_ppl.infer import MAPResult
from madness_ppl.misfit import source_misfit, stamp_edge_fraction
from madness_ppl.options import REFINE_FLUX_TOL, DeblendOptions
from madness_ppl.point_sources import PointSources, star_centres
from madness_ppl.prior import GalaxyPrior
from madness_ppl.psf import PSFKernel
from madness_ppl.refine import Refinement, newton_refine
from madness_ppl.scene import observe_stamps
from madness_ppl.uncertainty import laplace_flux_errors

__all__ = [
    "DeblendResult",
    "ErrorTerms",
    "FittedScene",
    "error_terms",
    "field_result",
    "fitted_scene",
]


class DeblendResult(NamedTuple):
    """Output of :func:`~madness_ppl.deblend.deblend`.

    Attributes
    ----------
    catalog
        One row per source: ``id``, ``x``, ``y``, ``flux_<band>`` (electrons), ``mag_<band>``
        (AB, when the prior's survey is known), ``g1``, ``g2`` (KSB shear of the model in the
        reference band, PSF-corrected), ``chi2`` (reduced chi² over the source's stamp),
        ``converged``; ``flux_<band>_err`` (Laplace with the prior's calibrated model-error and
        blending terms, unless ``errors=False``).
    sources
        ``(N, bands, S, S)`` model of each source as observed (electrons; ``S`` is the PSF
        kernel's grid when a PSF is given), centred on ``nearest_pixel(position)`` (halves up, as in the fit).
    model_image
        ``(bands, H, W)`` sum of the sources.
    residual
        ``(bands, H, W)`` data minus model (NaN where masked).
    variance
        ``(bands, H, W)`` variance used in the fit.
    positions
        ``(N, 2)`` positions used.
    bands
        Band names.
    fit
        The raw :class:`~madness_ppl.infer.MAPResult` (padded plate).
    timings
        Wall-clock seconds per phase: ``noise``, ``detection`` (:func:`~madness_ppl.deblend.deblend` only),
        ``encoder`` (start and preconditioner), ``fit`` (MAP, compilation included when this
        shape is new), ``errors`` (Laplace flux errors) and ``catalog``. In a batch the shared phases are split evenly between its fields.
    model_frame
        ``(N, bands, S, S)`` each source in the prior's model frame (at its reference PSF,
        before the field's PSF) when a PSF other than the model frame's was given; ``None``
        otherwise (``sources`` are then the model-frame stamps).
    sky
        ``(bands,)`` sky level fitted with the galaxies (``DeblendOptions.fit_sky``), in
        electrons per pixel; ``model_image`` and ``residual`` are then of the data without it.
        ``None`` when no sky was fitted.
    psf
        The difference kernels the fit observed the galaxies through (``None``: the model
        frame); :func:`fitted_scene` hands them back to :func:`~madness_ppl.scene.blend_model`.
    points
        The point sources of the fit (:class:`~madness_ppl.point_sources.PointSources`, one
        per source), or ``None`` when every source is a galaxy.
    """

    catalog: Table
    sources: np.ndarray
    model_image: np.ndarray
    residual: np.ndarray
    variance: np.ndarray
    positions: np.ndarray
    bands: tuple[str, ...]
    fit: MAPResult | None
    timings: dict[str, float] | None = None
    model_frame: np.ndarray | None = None
    sky: np.ndarray | None = None
    psf: PSFKernel | None = None
    points: PointSources | None = None


class ErrorTerms(NamedTuple):
    r"""The model-error terms of a catalog's flux errors (see
    :func:`~madness_ppl.uncertainty.flux_error_budget`): the pixel fraction :math:`\epsilon`,
    the flux floor :math:`\kappa`, the blend fraction :math:`\lambda`, and the adaptive
    misfit :math:`\gamma` and edge :math:`\eta` fractions (0 when the adaptive terms are off)."""

    model_error: ArrayLike
    flux_error_floor: ArrayLike
    blend_error: ArrayLike
    misfit_fraction: ArrayLike
    edge_fraction: ArrayLike


def error_terms(prior: GalaxyPrior, options: DeblendOptions) -> ErrorTerms:
    """The error terms ``options`` asks for, the prior's calibrated values where it gives none
    (:func:`~madness_ppl.uncertainty.calibrated_fractions`)."""
    calibrated = calibrated_fractions(prior)

    def chosen(value: ArrayLike | None, name: str) -> ArrayLike:
        return calibrated[name] if value is None else value

    adaptive = options.adaptive_errors
    return ErrorTerms(
        chosen(options.model_error, "pixel_fraction"),
        chosen(options.flux_error_floor, "flux_fraction"),
        chosen(options.blend_error, "blend_fraction"),
        calibrated["misfit_fraction"] if adaptive else 0.0,
        calibrated["edge_fraction"] if adaptive else 0.0,
    )


def field_result(
    prior: GalaxyPrior,
    field: np.ndarray,
    variance: np.ndarray,
    positions: np.ndarray,
    model: np.ndarray,
    sources: np.ndarray,
    converged: bool,
    fit: MAPResult | None,
    *,
    options: DeblendOptions,
    terms: ErrorTerms,
    psf: PSFKernel | None = None,
    sky: np.ndarray | None = None,
    points: PointSources | None = None,
) -> tuple[DeblendResult, tuple[float, float]]:
    """One field's :class:`DeblendResult` and the seconds its flux errors and its Newton
    refinement took.

    Parameters
    ----------
    prior
        The galaxy prior of the fit.
    field, variance
        ``(B, H, W)`` image (NaN where masked) and variance of the field.
    positions
        ``(N, 2)`` source positions (the field's unpadded sources).
    model
        ``(B, H, W)`` model image of the fit.
    sources
        ``(N, B, S, S)`` model-frame stamps of the fit; observed here through ``psf``.
    converged
        Whether the MAP fit converged (the refinement may also set it).
    fit
        The field's slice of the batched :class:`~madness_ppl.infer.MAPResult`.
    options
        ``refine`` / ``refine_tolerance``, ``errors`` and ``reference_band`` are read.
    terms
        The flux errors' model-error terms (:func:`error_terms`).
    psf
        The field's difference kernels, or ``None`` in the model frame.
    sky
        ``(B,)`` sky level fitted with the galaxies, already subtracted from ``field`` and
        ``model``; recorded in the result and as the catalog's ``SKY_<band>``.
    points
        The field's point sources (``N`` of them), or ``None``: all galaxies. The catalog's
        ``point_source`` column marks them.
    """
    n = len(positions)
    finite = np.isfinite(field)
    stars = np.zeros(n, bool) if points is None else np.asarray(points.mask, bool)
    refined = _refine(prior, fit, positions, field, variance, psf, options, points) if n else None
    linearisation, refine_seconds, observed = None, 0.0, None
    if refined is not None:
        step, refine_seconds = refined
        if step.steps:
            z = np.asarray(fit.params["z"]).copy()
            z[:n] = step.z
            fit = fit._replace(params={**fit.params, "z": z})
            sources, observed = step.stamps, step.observed
            model = paste_stamps(observed, positions, field.shape).astype(np.float32)
        converged = converged or step.converged
        linearisation = step.linearisation  # at the final z: the errors reuse it
    model_frame = sources
    if psf is not None and n:  # the refinement's observed stamps when it moved the latents
        sources = (
            observed
            if observed is not None
            else np.asarray(observe_stamps(sources, positions, psf, subpixel=False))
        )
    residual = np.where(finite, field - model, np.nan).astype(np.float32)
    misfit = source_misfit(sources, positions, residual, variance)
    flux_err, seconds = None, 0.0
    if options.errors and n:
        tick = time.perf_counter()
        laplace = laplace_flux_errors(
            prior,
            np.asarray(fit.params["z"][:n]),
            positions,
            variance,
            pixel_mask=finite,
            model_error=terms.model_error,
            psf=psf,
            linearisation=None if linearisation is None else (sources, *linearisation),
            points=points,
        )
        flux_err = flux_error_budget(
            laplace.flux_err,
            sources.sum(axis=(-2, -1)),
            neighbour_light(sources, positions, field.shape),
            # the decoder's flux error is not a star's: its model is the PSF
            flux_fraction=np.where(stars[:, None], 0.0, terms.flux_error_floor),
            blend_fraction=terms.blend_error,
            misfit=misfit.model_error,
            misfit_fraction=terms.misfit_fraction,
            edge=np.where(stars, 0.0, stamp_edge_fraction(model_frame)),
            edge_fraction=terms.edge_fraction,
        )
        seconds = time.perf_counter() - tick
    catalog = source_catalog(
        prior,
        positions,
        sources,
        model,
        residual,
        variance,
        np.full(n, converged),
        options.reference_band,
        flux_err,
        model_frame,
        misfit=misfit,
        point_sources=stars,
    )
    if stars.any():  # a star's centre is fitted: its placement plus its offset
        catalog["x"][stars], catalog["y"][stars] = star_centres(points, fit.params["z"], positions)
    if sky is not None:
        for band, level in zip(prior.bands, sky, strict=True):
            catalog.meta[f"SKY_{band}"] = float(level)
    result = DeblendResult(
        catalog,
        sources,
        model,
        residual,
        variance,
        positions,
        tuple(prior.bands),
        fit,
        model_frame=None if psf is None else model_frame,
        sky=None if sky is None else np.asarray(sky, np.float32),
        psf=psf,
        points=points,
    )
    return result, (seconds, refine_seconds)


def _refine(
    prior: GalaxyPrior,
    fit: MAPResult,
    positions: np.ndarray,
    field: np.ndarray,
    variance: np.ndarray,
    psf: PSFKernel | None,
    options: DeblendOptions,
    points: PointSources | None = None,
) -> tuple[Refinement, float] | None:
    """The Newton refinement of a field's fit and its seconds (``None`` when ``options.refine``
    is 0)."""
    if not options.refine:
        return None
    tick = time.perf_counter()
    step = newton_refine(
        prior,
        np.asarray(fit.params["z"])[: len(positions)],
        positions,
        field,
        variance,
        pixel_mask=np.isfinite(field),
        psf=psf,
        max_steps=options.refine,
        tol=options.refine_tolerance,
        flux_tol=REFINE_FLUX_TOL if options.refine_method == "lbfgs" else 0.0,
        method=options.refine_method,
        points=points,
    )
    return step, time.perf_counter() - tick


class FittedScene(NamedTuple):
    """What :func:`~madness_ppl.scene.blend_model` needs to be the model a
    :class:`DeblendResult` fitted: ``blend_model(*args, **kwargs)``, started at ``init``."""

    args: tuple
    kwargs: dict[str, Any]
    init: dict[str, np.ndarray]


def fitted_scene(
    result: DeblendResult, prior: GalaxyPrior, *, model_error: ArrayLike | None = None
) -> FittedScene:
    r"""The NumPyro model of a deblended field, with its MAP, for NUTS or any other inference.

    ``deblend`` fits :func:`~madness_ppl.scene.blend_model` to the field; sampling *that*
    model needs what ``deblend`` added to it: the field's PSF kernels (``result.psf``), the
    fitted sky (``result.sky``, as a ``sky`` site) and the model-error fraction :math:`\epsilon`
    its flux errors used, which adds :math:`(\epsilon m)^2` to each pixel's variance.

    Parameters
    ----------
    result
        The output of :func:`~madness_ppl.deblend.deblend` (one field).
    prior
        The prior it was deblended with.
    model_error
        :math:`\epsilon`; default the prior's calibrated ``pixel_fraction``
        (:func:`~madness_ppl.error_budget.calibrated_fractions`), as the catalog's errors.

    Returns
    -------
    FittedScene
        ``args`` and ``kwargs`` of ``blend_model`` (the data as fitted: NaN where masked, the
        sky added back when it was fitted) and ``init``: the MAP latents ``{"z": (N, d)}`` (and
        ``"sky"``).

    Examples
    --------
    >>> result = deblend(field, variance, positions, prior=prior)   # doctest: +SKIP
    >>> scene = fitted_scene(result, prior)                         # doctest: +SKIP
    >>> idata = sample_posterior(blend_model, *scene.args, **scene.kwargs,
    ...                          init=scene.init)                   # doctest: +SKIP
    """
    n = len(result.positions)
    if result.fit is None or n == 0:
        raise MadnessInputError("the result holds no source: there is no scene to sample", n)
    data = result.residual + result.model_image
    if result.sky is not None:
        data = data + result.sky[:, None, None]
    inputs = prepare_blend(
        data, result.positions, result.variance, prior, point_sources=result.points
    )
    epsilon = calibrated_fractions(prior)["pixel_fraction"] if model_error is None else model_error
    kwargs = {**inputs.kwargs, "psf": result.psf, "model_error": epsilon}
    init = {"z": np.asarray(result.fit.params["z"])[:n]}
    if result.sky is not None:
        variance = np.where(np.isfinite(data), result.variance, np.nan)
        kwargs["sky_scale"] = np.sqrt(np.nanmedian(variance, axis=(-2, -1))).astype(np.float32)
        init["sky"] = result.sky
    return FittedScene(inputs.args, kwargs, init)
