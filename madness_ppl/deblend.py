"""The deblending pipeline: detect, estimate noise, initialise with the encoder, fit the MAP.

``deblend(field)`` is what an astronomer calls on a sky-subtracted multi-band image in electrons:

1. the noise of *this* field is estimated per band (sigma-clipped sky pixels,
   :func:`madness_ppl.measure.estimate_noise`) unless a variance map is given, and the per-pixel
   variance is :math:`\\sigma^2_b + \\max(y, 0)` (sky + source Poisson term, as in MADNESS);
2. sources are detected on the noise-weighted coadd (sep) unless positions are given;
3. each galaxy's latent starts at the VAE encoder's prediction on a cutout around it, refined
   by two rounds on the cutout with the other sources' models removed (:func:`~madness_ppl.initialise.encoder_start`);
4. :func:`madness_ppl.infer.fit_map` solves the MAP of :func:`madness_ppl.scene.blend_model`
   with L-BFGS, preconditioned per source (:func:`~madness_ppl.initialise.latent_scales`), source count padded to a
   bucket so that fields of one shape compile once;
5. the per-source models are measured into an astropy catalog.

NaN/inf pixels are masked (they do not enter the likelihood); galaxies may sit anywhere in the
field, stamps leaving the field are clipped.
"""

from __future__ import annotations

import inspect
import sys
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from astropy.table import Table
from jax.typing import ArrayLike

from madness_ppl.catalog import (
    MIN_OBSERVED_LIGHT,
    check_fit_quality,
    dead_bands,
    redistribute_flux,
    source_catalog,
)
from madness_ppl.cutouts import extract_cutouts, paste_stamps
from madness_ppl.errors import FieldFormatError, MadnessInputError, MadnessInputWarning
from madness_ppl.infer import MAPResult, fit_map
from madness_ppl.initialise import encoder_start, latent_scales, starting_point
from madness_ppl.misfit import source_misfit, stamp_edge_fraction
from madness_ppl.prepare import (
    check_field,
    check_noise_scale,
    field_for_prior,
    field_noise,
    prepare_field,
)
from madness_ppl.prior import GalaxyPrior
from madness_ppl.psf import PSFKernel, field_kernel, with_field_transform
from madness_ppl.refine import newton_refine
from madness_ppl.scene import blend_model, bucket_size, observe_stamps, prepare_blend
from madness_ppl.shear import add_shear_columns
from madness_ppl.shear import shear_response as measure_shear_response
from madness_ppl.survey import match_bands
from madness_ppl.uncertainty import (
    calibrated_fractions,
    flux_error_budget,
    laplace_flux_errors,
    neighbour_light,
)

# the Newton refinement stops at a tenth of L-BFGS's tolerance: on a tight blend of the
# v0.3.1 prior (tests/test_refine.py) the Gauss-Newton predicted decrease at L-BFGS's tolerance
# still left a 0.12-error flux shift from full convergence; at a tenth, 0.06
REFINE_TOL_FACTOR = 0.1

__all__ = [  # encoder_start ... redistribute_flux live in initialise / catalog, re-exported here
    "MIN_OBSERVED_LIGHT",
    "DeblendResult",
    "check_field",
    "check_fit_quality",
    "check_noise_scale",
    "dead_bands",
    "deblend",
    "deblend_batch",
    "encoder_start",
    "extract_cutouts",
    "field_for_prior",
    "field_noise",
    "latent_scales",
    "prepare_field",
    "redistribute_flux",
]


class DeblendResult(NamedTuple):
    """Output of :func:`deblend`.

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
        Wall-clock seconds per phase: ``noise``, ``detection`` (:func:`deblend` only),
        ``encoder`` (start and preconditioner), ``fit`` (MAP, compilation included when this
        shape is new), ``errors`` (Laplace flux errors) and ``catalog``. In a batch the shared phases are split evenly between its fields.
    model_frame
        ``(N, bands, S, S)`` each source in the prior's model frame (at its reference PSF,
        before the field's PSF) when a PSF other than the model frame's was given; ``None``
        otherwise (``sources`` are then the model-frame stamps).
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


def deblend(
    field: Any,
    variance: Any | None = None,
    positions: Any | None = None,
    *,
    prior: GalaxyPrior | None = None,
    bands: Sequence[str] | None = None,
    max_steps: int = 200,
    detect_threshold: float = 3.0,
    detect_contrast: float = 0.005,
    reference_band: str = "r",
    progress: bool = False,
    source: str = "the field",
    psf: Any | None = None,
    psf_profile: str = "kolmogorov",
    **fit_options: Any,
) -> DeblendResult:
    """Deblend one multi-band field (see the module docstring for the steps).

    Parameters
    ----------
    field
        ``(bands, H, W)`` sky-subtracted image in electrons.
    variance
        ``(bands, H, W)`` per-pixel variance; default estimated from the field.
    positions
        ``(N, 2)`` source positions ``(x, y)`` in pixels; default detected with sep. Another
        shape (e.g. ``(2, N)``) raises :class:`~madness_ppl.errors.PositionsError`; positions
        closer than half a pixel warn.
    prior
        The galaxy prior; default ``GalaxyPrior.load("lsst")``.
    bands
        Names of the field's bands, used to select and order the prior's bands.
    max_steps
        Maximum optimisation steps of :func:`~madness_ppl.infer.fit_map`.
    detect_threshold
        Detection threshold (coadd sigma) when positions are not given.
    detect_contrast
        sep's deblending contrast of the detection (see
        :func:`~madness_ppl.prepare.prepare_field`).
    reference_band
        Band used for shapes (falls back to the middle band).
    progress
        Show the fit's progress bar.
    source
        Name of the field in warnings and errors (e.g. its file name).
    psf
        The field's PSF per band, in the order of ``bands`` (or the prior's): images
        ``(bands, P, P)`` (any odd or even ``P``; centred, pixel-integrated, normalised here)
        or FWHMs in arcseconds ``(bands,)`` drawn as ``psf_profile``. The prior's decoded
        galaxies (at its model-frame PSF, :meth:`~madness_ppl.prior.GalaxyPrior.reference_psf`)
        are convolved with the difference kernels (:func:`madness_ppl.psf.field_kernel`).
        ``None``: the survey's default PSF, with a warning. A PSF narrower than the model
        frame's, non-finite, empty or of the wrong band count raises
        :class:`~madness_ppl.psf.PSFError`.
    psf_profile
        ``"kolmogorov"``, ``"moffat"`` or ``"gaussian"``, for FWHMs.
    **fit_options
        Passed to :func:`deblend_batch` (``method``, ``start``, ``start_passes``,
        ``precondition``, ``refine``, ``refine_tol``, ``errors``, ``model_error``, ``flux_error_floor``,
        ``blend_error``, ``adaptive_errors``, ``shear_response``, ``shear_seed``)
        and on to :func:`~madness_ppl.infer.fit_map` (``optimizer``,
        ``tol``, ...).

    Returns
    -------
    DeblendResult

    Warns
    -----
    madness_ppl.errors.MadnessInputWarning
        The measured sky noise is more than 10x off the prior's survey
        (:func:`check_noise_scale`), positions closer than half a pixel, a band the prior
        cannot model (:func:`~madness_ppl.catalog.dead_bands`), or sources fitted with a reduced chi2 above 100
        (:func:`~madness_ppl.catalog.check_fit_quality`).

    Examples
    --------
    >>> result = deblend(field)                      # doctest: +SKIP
    >>> result.catalog["flux_r"]                     # doctest: +SKIP
    """
    prior = GalaxyPrior.load("lsst") if prior is None else prior
    if not (isinstance(max_steps, int | np.integer) and max_steps >= 1):
        raise MadnessInputError(f"max_steps must be an integer >= 1, got {max_steps!r}", max_steps)
    t_start = time.perf_counter()
    if bands is not None:  # the variance and the PSF follow the image into the prior's order
        if variance is not None:
            variance = _in_prior_order(variance, "variance", bands, prior)
        if psf is not None and np.ndim(psf) >= 1:
            psf = _in_prior_order(psf, "psf", bands, prior)
    field = check_field(field, prior, bands)
    kernel = field_kernel(prior, psf, profile=psf_profile, source=source)
    threshold = detect_threshold if positions is None else None
    prepared = prepare_field(
        field,
        prior,
        variance,
        detect_threshold=threshold,
        detect_contrast=detect_contrast,
        source=source,
    )
    noise_done = time.perf_counter() - prepared.timings["detection"]
    field, variance = prepared.field, prepared.variance
    if positions is None:
        positions = prepared.positions
    else:
        from madness_ppl.io import check_positions

        positions = check_positions(positions, source=source)
    positions = np.asarray(positions, dtype=np.float32).reshape(-1, 2)
    detection_done = time.perf_counter()
    (result,) = deblend_batch(
        field[None],
        variance[None],
        [positions],
        prior=prior,
        max_steps=max_steps,
        reference_band=reference_band,
        progress=progress,
        psf=kernel,
        **fit_options,
    )
    check_fit_quality(result.catalog, source=source)
    timings = {"noise": noise_done - t_start, "detection": detection_done - noise_done}
    return result._replace(timings={**timings, **(result.timings or {})})


def _in_prior_order(values: Any, name: str, bands: Sequence[str], prior: GalaxyPrior) -> np.ndarray:
    """Per-band ``values`` (variance planes, PSF images or FWHMs) given in the field's band
    order ``bands``, selected and put in the prior's (as :func:`check_field` does the image)."""
    array = np.asarray(values)
    if array.ndim == 0 or len(array) != len(bands):
        raise FieldFormatError(
            f"{name} has {len(array) if array.ndim else 0} bands but bands= names {len(bands)} "
            f"{tuple(bands)}",
            array.shape,
        )
    return array[match_bands(list(bands), prior.bands)]


def deblend_batch(
    fields: np.ndarray,
    variances: np.ndarray,
    positions: Sequence[np.ndarray],
    *,
    prior: GalaxyPrior,
    max_steps: int = 200,
    method: str = "lbfgs",
    start: str = "refined",
    start_passes: int = 2,
    precondition: bool = True,
    refine: int = 8,
    refine_tol: float | None = None,
    vectorize: bool | None = None,
    errors: bool = True,
    model_error: ArrayLike | None = None,
    flux_error_floor: ArrayLike | None = None,
    blend_error: ArrayLike | None = None,
    adaptive_errors: bool = True,
    reference_band: str = "r",
    progress: bool = False,
    psf: PSFKernel | None = None,
    shear_response: bool = False,
    shear_seed: int = 0,
    **fit_options: Any,
) -> list[DeblendResult]:
    r"""Deblend a batch of same-shape fields with known positions in one vmapped MAP fit.

    Every field's sources are padded to the plate size :func:`~madness_ppl.scene.bucket_size`
    of the largest count, so a batch of ``K`` fields of one shape and bucket compiles once;
    each field stops on its own and its result equals fitting it alone (see
    :func:`~madness_ppl.infer.fit_map` with ``batched=True``). Where several devices exist,
    the batch axis is sharded across them (``K`` must then be a multiple of the device count).

    Parameters
    ----------
    fields, variances
        ``(K, bands, H, W)`` background-subtracted images and variances (electrons), bands in
        the prior's order (see :func:`field_noise`). NaN/inf pixels are masked.
    positions
        ``K`` arrays of ``(N_k, 2)`` source positions ``(x, y)`` in pixels.
    prior, max_steps, reference_band, progress
        As in :func:`deblend`.
    method
        ``"lbfgs"`` (default) or ``"svi"`` (the MADNESS reference Adam), see
        :func:`~madness_ppl.infer.fit_map`.
    start
        ``"refined"`` (default): :func:`~madness_ppl.initialise.encoder_start` with ``start_passes`` residual rounds;
        ``"deblender"``: the deblending encoder on each cutout (the MADNESS start).
    start_passes
        Residual rounds of the ``"refined"`` start.
    precondition
        With ``"lbfgs"``, scale each source's latents by :func:`~madness_ppl.initialise.latent_scales`.
    refine
        Gauss-Newton steps at most on all of a field's latents jointly after the fit
        (:func:`madness_ppl.refine.newton_refine`; 0: none; a step is taken only while the
        predicted decrease exceeds ``tol / 10`` nats per latent element: ten times tighter
        than L-BFGS's test, since the Gauss-Newton model underestimates the gap it leaves on
        tight blends). They take the coupled directions of overlapping sources to the
        optimum, where L-BFGS may stop short, so the catalog depends much less on where it
        stopped (tight-blend set, prior v0.3.1: 0.93 of sources within 0.1 error of a fully
        converged fit, 0.81 without); the flux errors reuse its last Jacobians (at the final
        latents).
        ``converged`` is also set when the refinement finds the remaining predicted decrease
        below that tolerance, even if L-BFGS hit ``max_steps``.
    refine_tol
        The refinement's stopping tolerance (nats per latent element of predicted decrease);
        default :data:`REFINE_TOL_FACTOR` times L-BFGS's ``tol``.
    vectorize
        Fit the ``K`` fields in one vmapped program (``True``) or one after the other, each
        padded to its own bucket (``False``). Default: vmapped on accelerators or when the
        batch is sharded over several devices, one after the other on a single CPU, where
        the vmapped decoder runs slower than ``K`` separate fits (measured: 81 ms for one
        vmapped step of 2 fields of 24 sources vs 2 x 33 ms) and the L-BFGS path of a
        vmapped fit can round differently from the same field fitted alone.
    errors
        Add flux errors ``flux_<band>_err`` to the catalog: the Laplace width
        (:func:`madness_ppl.uncertainty.laplace_flux_errors`) with the model-error terms below
        (:func:`madness_ppl.uncertainty.flux_error_budget`).
    model_error
        Per-pixel model-error fraction :math:`\epsilon` of those errors (a scalar or one per
        band); default the prior's calibrated ``config.metadata["model_error"]
        ["pixel_fraction"]`` (0 when it has none).
    flux_error_floor
        Fractional flux error :math:`\kappa` added in quadrature,
        :math:`\sigma_F^2 = \sigma_\mathrm{Laplace}^2 + (\kappa F)^2`: the decoder's
        reconstruction error of a galaxy's total flux, coherent over its pixels, which the
        pixel term cannot represent; default the prior's calibrated ``["flux_fraction"]``.
    blend_error
        Fraction :math:`\lambda` of the neighbours' light in a source's territory
        (:func:`~madness_ppl.uncertainty.neighbour_light` :math:`C`) added in quadrature as
        well, :math:`\sigma_F^2 \mathrel{+}= (\lambda C)^2`: light a misfit neighbour leaves
        for this source to absorb (0 for an isolated source); default the prior's calibrated
        ``["blend_fraction"]`` (0 when it has none). See
        :func:`~madness_ppl.uncertainty.flux_error_budget`.
    adaptive_errors
        Add each source's own evidence of misfit to its errors, with the prior's calibrated
        ``["misfit_fraction"]`` :math:`\gamma` and ``["edge_fraction"]`` :math:`\eta`:
        :math:`\sigma_F^2 \mathrel{+}= (\gamma \hat\epsilon F)^2 + (\eta e F)^2`, with
        :math:`\hat\epsilon` the pixel model-error fraction its residuals call for
        (:func:`madness_ppl.misfit.source_misfit`) and :math:`e` its ``edge_flux_frac``.
        ``False``: the population terms only.
    shear_response
        Add each source's shape ``e1``, ``e2`` and its shear response ``R11``, ``R12``,
        ``R21``, ``R22`` (:math:`R_{ak} = \partial e_a / \partial g_k`, metacalibration
        differentiated through the MAP, :func:`madness_ppl.shear.shear_response`) to the
        catalog: a population's shear is :math:`\langle R \rangle^{-1} \langle e \rangle`.
        Off by default; its time is ``timings["shear"]`` (a Newton refit of the field on a
        second noise realisation, ~0.5-1x the fit: ``benchmarks/shear_response.py``).
    shear_seed
        Seed of that second noise realisation (field ``i`` of the batch uses ``(shear_seed,
        i)``).
    **fit_options
        Passed to :func:`~madness_ppl.infer.fit_map`.

    Returns
    -------
    list of DeblendResult
        One per field, each with its own slice of the batched
        :class:`~madness_ppl.infer.MAPResult` (``None`` when the batch holds no source).
    """
    if start not in ("refined", "deblender"):
        raise ValueError(f"start must be 'refined' or 'deblender', got {start!r}")
    fields = np.asarray(fields, np.float32)
    variances = np.asarray(variances, np.float32)
    if fields.ndim != 4 or variances.shape != fields.shape or len(positions) != len(fields):
        raise FieldFormatError(
            f"need (K, bands, H, W) fields and variances and K position arrays; got shapes "
            f"{fields.shape}, {variances.shape} and {len(positions)} position arrays"
        )
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu" or len(jax.local_devices()) > 1
    if not vectorize and len(fields) > 1:
        options = {
            "prior": prior,
            "max_steps": max_steps,
            "method": method,
            "start": start,
            "start_passes": start_passes,
            "precondition": precondition,
            "refine": refine,
            "vectorize": False,
            "errors": errors,
            "model_error": model_error,
            "flux_error_floor": flux_error_floor,
            "blend_error": blend_error,
            "adaptive_errors": adaptive_errors,
            "reference_band": reference_band,
            "progress": progress,
            "psf": psf,
            **fit_options,
        }
        results = [
            result
            for i in range(len(fields))
            for result in deblend_batch(
                fields[i : i + 1], variances[i : i + 1], positions[i : i + 1], **options
            )
        ]
        if shear_response:
            results = _with_shear(results, prior, fields, variances, psf, shear_seed)
        return results
    positions = [np.asarray(p, np.float32).reshape(-1, 2) for p in positions]
    counts = [len(p) for p in positions]
    plate = bucket_size(max(counts, default=0))
    inputs = [
        prepare_blend(f, p, v, prior, pad=plate, pixel_mask=np.isfinite(f))
        for f, p, v in zip(fields, positions, variances, strict=True)
    ]
    k = len(fields)
    clock = [time.perf_counter()]
    if plate == 0:
        models = np.zeros_like(fields)
        stamps = np.zeros((k, 0, len(prior.bands), prior.stamp_size, prior.stamp_size), np.float32)
        fit, converged = None, np.zeros(k, bool)
    else:
        z_init, scales = starting_point(
            prior,
            fields,
            variances,
            positions,
            plate,
            start=start,
            passes=start_passes,
            precondition=method == "lbfgs" and precondition,
            psf=psf,
        )
        clock.append(time.perf_counter())
        fit = _fit(
            prior,
            inputs,
            z_init,
            scales,
            method,
            max_steps=max_steps,
            progress=progress,
            psf=None
            if psf is None
            else with_field_transform(
                psf, fields.shape[-2:], n_sources=plate, stamp_size=prior.stamp_size
            ),
            **fit_options,
        )
        models = np.asarray(fit.model_image)
        stamps = np.asarray(fit.deterministics["stamps"])
        converged = np.asarray(fit.converged, bool)
    clock.append(time.perf_counter())
    dead = dead_bands(prior)
    if dead and any(counts):
        warnings.warn(
            f"the prior cannot model band(s) {list(dead)} (its decoder outputs zero there for "
            "every latent): their fluxes are 0 and flagged in the catalog (flux_<band>_flag)",
            MadnessInputWarning,
            stacklevel=2,
        )
    calibrated = calibrated_fractions(prior)
    if model_error is None:
        model_error = calibrated["pixel_fraction"]
    if flux_error_floor is None:
        flux_error_floor = calibrated["flux_fraction"]
    if blend_error is None:
        blend_error = calibrated["blend_fraction"]
    results, error_seconds, refine_seconds = [], 0.0, 0.0
    for i in range(k):
        result, (seconds, refined) = _field_result(
            prior,
            fields[i],
            variances[i],
            positions[i],
            models[i],
            stamps[i, : counts[i]],
            bool(converged[i]),
            None if fit is None else jax.tree.map(lambda a, i=i: np.asarray(a)[i], fit),
            errors=errors,
            model_error=model_error,
            flux_error_floor=flux_error_floor,
            blend_error=blend_error,
            adaptive=(calibrated["misfit_fraction"], calibrated["edge_fraction"])
            if adaptive_errors
            else (0.0, 0.0),
            reference_band=reference_band,
            psf=psf,
            refine=refine,
            tol=REFINE_TOL_FACTOR * fit_options.get("tol", 1e-3)
            if refine_tol is None
            else refine_tol,
        )
        results.append(result)
        error_seconds += seconds
        refine_seconds += refined
    clock.append(time.perf_counter())
    if len(clock) == 4:
        spent = np.diff(clock) / k
        timings = dict(zip(("encoder", "fit", "catalog"), spent.tolist(), strict=True))
    else:  # no source: nothing encoded or fitted
        timings = {"encoder": 0.0, "fit": 0.0, "catalog": (clock[-1] - clock[0]) / k}
    timings["errors"] = error_seconds / k
    timings["refine"] = refine_seconds / k
    timings["catalog"] -= timings["errors"] + timings["refine"]
    results = [r._replace(timings=dict(timings)) for r in results]
    if shear_response:
        results = _with_shear(results, prior, fields, variances, psf, shear_seed)
    return results


def _with_shear(
    results: list[DeblendResult],
    prior: GalaxyPrior,
    fields: np.ndarray,
    variances: np.ndarray,
    psf: PSFKernel | None,
    seed: int,
) -> list[DeblendResult]:
    """``results`` with shapes and shear responses in their catalogs (``timings["shear"]``)."""
    out = []
    for i, result in enumerate(results):
        tick = time.perf_counter()
        n = len(result.positions)
        z = np.zeros((0, prior.latent_dim)) if n == 0 else np.asarray(result.fit.params["z"][:n])
        response = measure_shear_response(
            prior,
            z,
            result.positions,
            fields[i],
            variances[i],
            psf=psf,
            seed=(seed, i),
        )
        catalog = result.catalog.copy(copy_data=False)
        add_shear_columns(catalog, response)
        timings = {**(result.timings or {}), "shear": time.perf_counter() - tick}
        out.append(result._replace(catalog=catalog, timings=timings))
    return out


def _fit(
    prior: GalaxyPrior,
    inputs: list,
    z_init: np.ndarray,
    scales: np.ndarray,
    method: str,
    **fit_options: Any,
) -> MAPResult:
    """The batched MAP fit of :func:`~madness_ppl.scene.blend_model` over padded inputs
    (sharded over the local devices), L-BFGS preconditioned by ``scales``."""

    # every array of the fields' BlendInputs stacked along a new batch axis (the prior is shared)
    batch = jax.tree.map(lambda *a: np.stack(a), *(i._replace(prior=None) for i in inputs))
    arrays = _shard_batch(
        [
            batch.field,
            batch.positions,
            batch.variance,
            batch.source_mask,
            batch.pixel_mask,
            z_init,
            scales,
        ]
    )
    if method == "lbfgs":
        fit_options = {"scale": {"z": arrays[6]}, **fit_options}
    return fit_map(
        blend_model,
        *arrays[:3],
        prior,
        init={"z": arrays[5]},
        source_mask=arrays[3],
        pixel_mask=arrays[4],
        batched=True,
        in_axes=(0, 0, 0, None),
        method=method,
        **fit_options,
    )


def _field_result(
    prior: GalaxyPrior,
    field: np.ndarray,
    variance: np.ndarray,
    positions: np.ndarray,
    model: np.ndarray,
    sources: np.ndarray,
    converged: bool,
    fit: MAPResult | None,
    *,
    errors: bool,
    model_error: ArrayLike,
    flux_error_floor: ArrayLike,
    blend_error: ArrayLike,
    adaptive: tuple[ArrayLike, ArrayLike],
    reference_band: str,
    psf: PSFKernel | None = None,
    refine: int = 0,
    tol: float = 1e-3,
) -> tuple[DeblendResult, tuple[float, float]]:
    """One field's :class:`DeblendResult` (catalog, residual) and the seconds its flux
    errors and its Newton refinement took; ``sources`` are the model-frame stamps, observed here through ``psf``;
    ``refine`` Newton steps first (:func:`~madness_ppl.refine.newton_refine`)."""
    n = len(positions)
    finite = np.isfinite(field)
    linearisation, refine_seconds, observed = None, 0.0, None
    if refine and n:
        tick = time.perf_counter()
        z = np.asarray(fit.params["z"])
        step = newton_refine(
            prior,
            z[:n],
            positions,
            field,
            variance,
            pixel_mask=finite,
            psf=psf,
            max_steps=refine,
            tol=tol,
        )
        if step.steps:
            z = z.copy()
            z[:n] = step.z
            fit = fit._replace(params={**fit.params, "z": z})
            sources, observed = step.stamps, step.observed
            model = paste_stamps(observed, positions, field.shape).astype(np.float32)
        converged = converged or step.converged
        linearisation = step.linearisation  # at the final z: the errors reuse it
        refine_seconds = time.perf_counter() - tick
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
    if errors and n:
        tick = time.perf_counter()
        z = np.asarray(fit.params["z"][:n])
        laplace = laplace_flux_errors(
            prior,
            z,
            positions,
            variance,
            pixel_mask=finite,
            model_error=model_error,
            psf=psf,
            linearisation=None if linearisation is None else (sources, *linearisation),
        )
        flux_err = flux_error_budget(
            laplace.flux_err,
            sources.sum(axis=(-2, -1)),
            neighbour_light(sources, positions, field.shape),
            flux_fraction=flux_error_floor,
            blend_fraction=blend_error,
            misfit=misfit.model_error,
            misfit_fraction=adaptive[0],
            edge=stamp_edge_fraction(model_frame),
            edge_fraction=adaptive[1],
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
        reference_band,
        flux_err,
        model_frame,
        misfit=misfit,
    )
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
    )
    return result, (seconds, refine_seconds)


def _shard_batch(arrays: list[np.ndarray]) -> list[Any]:
    """Shard the leading (batch) axis over the local devices when there are several."""
    devices = jax.local_devices()
    if len(devices) < 2 or len(arrays[0]) == 1:
        return arrays
    k = len(arrays[0])
    if k % len(devices):
        raise ValueError(f"batch of {k} fields cannot be split over {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return [jax.device_put(a, sharding) for a in arrays]


class _CallableModule(types.ModuleType):
    """``madness_ppl.deblend`` is both this module and, called, the function :func:`deblend`.

    The package exports the function ``madness_ppl.deblend``, and Python's import system sets the
    attribute ``madness_ppl.deblend`` to this submodule whenever it is imported (by the package,
    a user, or ``from madness_ppl.deblend import ...``). Making the module callable keeps both
    meanings valid whatever the import order: ``madness_ppl.deblend(field)`` and
    ``madness_ppl.deblend.DeblendResult`` work, repeatedly.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> DeblendResult:
        return deblend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(deblend)
