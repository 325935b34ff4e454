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
5. a few Gauss-Newton steps on all of a field's latents jointly, the flux errors and the
   catalog (:func:`madness_ppl.results.field_result`).

Every setting of these steps is one :class:`~madness_ppl.options.DeblendOptions` value;
:func:`deblend` and :func:`deblend_batch` also take its fields as keywords.

NaN/inf pixels are masked (they do not enter the likelihood); galaxies may sit anywhere in the
field, stamps leaving the field are clipped. Sources marked as stars are fitted as point
sources (:mod:`madness_ppl.point_sources`).

Why one module of ~550 lines: ``deblend``, ``deblend_batch`` and the batched fit share the
padding to source-count buckets, the sharding over devices and the two-stage sky fit; what a
field's result holds, the stars and the options already live in their own modules.
"""

from __future__ import annotations

import inspect
import sys
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.catalog import (
    MIN_OBSERVED_LIGHT,
    check_fit_quality,
    dead_bands,
    redistribute_flux,
)
from madness_ppl.cutouts import extract_cutouts
from madness_ppl.errors import FieldFormatError, MadnessInputError, MadnessInputWarning
from madness_ppl.infer import MAPResult, fit_map
from madness_ppl.initialise import encoder_start, latent_scales, starting_point
from madness_ppl.measure import estimate_noise
from madness_ppl.options import REFINE_TOL_FACTOR, DeblendOptions, Detection
from madness_ppl.point_sources import (
    batch_point_masks,
    batch_point_sources,
    point_mask,
    start_point_slots,
)
from madness_ppl.prepare import (
    check_field,
    check_noise_scale,
    field_for_prior,
    field_noise,
    prepare_field,
)
from madness_ppl.prior import GalaxyPrior
from madness_ppl.psf import PSFKernel, field_kernel, with_field_transform
from madness_ppl.results import DeblendResult, FittedScene, error_terms, field_result, fitted_scene
from madness_ppl.scene import blend_model, bucket_size, prepare_blend
from madness_ppl.shear import add_shear_columns
from madness_ppl.shear import shear_response as measure_shear_response
from madness_ppl.survey import match_bands

__all__ = [  # encoder_start ... redistribute_flux live in initialise / catalog, re-exported here
    "MIN_OBSERVED_LIGHT",
    "REFINE_TOL_FACTOR",
    "DeblendOptions",
    "DeblendResult",
    "Detection",
    "FittedScene",
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
    "fitted_scene",
    "latent_scales",
    "prepare_field",
    "redistribute_flux",
]


def deblend(
    field: Any,
    variance: Any | None = None,
    positions: Any | None = None,
    *,
    prior: GalaxyPrior | None = None,
    bands: Sequence[str] | None = None,
    psf: Any | None = None,
    psf_profile: str = "kolmogorov",
    progress: bool = False,
    source: str = "the field",
    options: DeblendOptions | None = None,
    point_sources: Any | None = None,
    **overrides: Any,
) -> DeblendResult:
    """Deblend one multi-band field (see the module docstring for the steps).

    Parameters
    ----------
    field
        ``(bands, H, W)`` sky-subtracted image in electrons.
    variance
        ``(bands, H, W)`` per-pixel variance; default estimated from the field.
    positions
        ``(N, 2)`` source positions ``(x, y)`` in pixels; default detected with sep
        (``options.detection``). Another shape (e.g. ``(2, N)``) raises
        :class:`~madness_ppl.errors.PositionsError`; positions closer than half a pixel warn.
    prior
        The galaxy prior; default ``GalaxyPrior.load("lsst")``.
    bands
        Names of the field's bands, used to select and order the prior's bands.
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
    progress
        Show the fit's progress bar.
    source
        Name of the field in warnings and errors (e.g. its file name).
    options
        Detection, fit, error and measurement settings (:class:`DeblendOptions`).
    point_sources
        Sources to model as stars, the field's PSF times free band fluxes
        (:mod:`madness_ppl.point_sources`): ``(N,)`` booleans or indices into ``positions``
        (which must then be given). The catalog marks them in ``point_source``. ``None``
        (default): every source is a galaxy.
    **overrides
        Changes to ``options`` by name (``max_steps=50``, ``errors=False``,
        ``detect_threshold=5.0``, or a further :func:`~madness_ppl.infer.fit_map` keyword),
        see :meth:`DeblendOptions.replace`.

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
    >>> result = deblend(field, max_steps=100)       # doctest: +SKIP
    >>> result.catalog["flux_r"]                     # doctest: +SKIP
    """
    options = (options or DeblendOptions()).replace(**overrides)
    prior = GalaxyPrior.load("lsst") if prior is None else prior
    t_start = time.perf_counter()
    if bands is not None:  # the variance and the PSF follow the image into the prior's order
        if variance is not None:
            variance = _in_prior_order(variance, "variance", bands, prior)
        if psf is not None and np.ndim(psf) >= 1:
            psf = _in_prior_order(psf, "psf", bands, prior)
    field = check_field(field, prior, bands)
    kernel = field_kernel(prior, psf, profile=psf_profile, source=source)
    prepared = prepare_field(
        field,
        prior,
        variance,
        detection=options.detection if positions is None else None,
        check_sky=not options.fit_sky,
        source=source,
    )
    noise_done = time.perf_counter() - prepared.timings["detection"]
    field, variance = prepared.field, prepared.variance
    if positions is None:
        if point_sources is not None:
            raise MadnessInputError(
                "point_sources are indices or flags of the given positions: pass positions "
                "with them (detections have no order known in advance)",
                point_sources,
            )
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
        psf=kernel,
        progress=progress,
        options=options,
        point_sources=None
        if point_sources is None
        else [point_mask(point_sources, len(positions))],
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
    psf: PSFKernel | None = None,
    progress: bool = False,
    options: DeblendOptions | None = None,
    point_sources: Sequence[ArrayLike | None] | None = None,
    **overrides: Any,
) -> list[DeblendResult]:
    r"""Deblend a batch of same-shape fields with known positions in one vmapped MAP fit.

    Every field's sources are padded to the plate size :func:`~madness_ppl.scene.bucket_size`
    of the largest count, so a batch of ``K`` fields of one shape and bucket compiles once;
    each field stops on its own and its result equals fitting it alone (see
    :func:`~madness_ppl.infer.fit_map` with ``batched=True``). Where several devices exist,
    the batch axis is sharded across them (``K`` must then be a multiple of the device count).
    ``options.vectorize`` chooses between that and fitting the fields one after the other.

    Parameters
    ----------
    fields, variances
        ``(K, bands, H, W)`` background-subtracted images and variances (electrons), bands in
        the prior's order (see :func:`field_noise`). NaN/inf pixels are masked.
    positions
        ``K`` arrays of ``(N_k, 2)`` source positions ``(x, y)`` in pixels.
    prior
        The galaxy prior.
    psf
        The fields' difference kernels (:func:`~madness_ppl.psf.field_kernel`), or ``None``
        to fit in the prior's model frame.
    progress
        Show the fit's progress bar.
    options, **overrides
        As in :func:`deblend` (the detection settings are not used).
    point_sources
        ``K`` entries, each as :func:`deblend`'s ``point_sources`` for that field (or
        ``None``), or ``None``: every source is a galaxy.

    Returns
    -------
    list of DeblendResult
        One per field, each with its own slice of the batched
        :class:`~madness_ppl.infer.MAPResult` (``None`` when the batch holds no source).
    """
    options = (options or DeblendOptions()).replace(**overrides)
    fields = np.asarray(fields, np.float32)
    variances = np.asarray(variances, np.float32)
    if fields.ndim != 4 or variances.shape != fields.shape or len(positions) != len(fields):
        raise FieldFormatError(
            f"need (K, bands, H, W) fields and variances and K position arrays; got shapes "
            f"{fields.shape}, {variances.shape} and {len(positions)} position arrays"
        )
    points = batch_point_masks(point_sources, positions)
    if points is not None and options.shear_response:
        raise MadnessInputError(
            "shear_response with point sources is not supported: the shear refit draws every "
            "source with the galaxy decoder",
            options.shear_response,
        )
    vectorize = options.vectorize
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu" or len(jax.local_devices()) > 1
    if not vectorize and len(fields) > 1:
        alone = options.replace(vectorize=False, shear_response=False)
        results = [
            result
            for i in range(len(fields))
            for result in deblend_batch(
                fields[i : i + 1],
                variances[i : i + 1],
                positions[i : i + 1],
                prior=prior,
                psf=psf,
                progress=progress,
                options=alone,
                point_sources=None if points is None else points[i : i + 1],
            )
        ]
    else:
        results = _deblend_together(
            fields, variances, positions, prior, psf, progress, options, points
        )
    if options.shear_response:
        results = _with_shear(results, prior, fields, variances, psf, options.shear_seed)
    return results


def _deblend_together(
    fields: np.ndarray,
    variances: np.ndarray,
    positions: Sequence[np.ndarray],
    prior: GalaxyPrior,
    psf: PSFKernel | None,
    progress: bool,
    options: DeblendOptions,
    points: list[np.ndarray] | None = None,
) -> list[DeblendResult]:
    """:func:`deblend_batch` of ``K`` fields in one vmapped fit: the start, the MAP, then each
    field's result (:func:`~madness_ppl.results.field_result`); the phases' seconds are split
    evenly between the fields."""
    positions = [np.asarray(p, np.float32).reshape(-1, 2) for p in positions]
    counts = [len(p) for p in positions]
    plate = bucket_size(max(counts, default=0))
    stars, star_starts = batch_point_sources(prior, fields, variances, positions, points, psf)
    inputs = [  # checks the positions before anything is computed
        prepare_blend(f, p, v, prior, pad=plate, pixel_mask=np.isfinite(f), point_sources=q)
        for f, p, v, q in zip(fields, positions, variances, stars, strict=True)
    ]
    k = len(fields)
    sky = None
    clock = [time.perf_counter()]
    if plate == 0:
        models = np.zeros_like(fields)
        stamps = np.zeros((k, 0, len(prior.bands), prior.stamp_size, prior.stamp_size), np.float32)
        fit, converged = None, np.zeros(k, bool)
        clock.append(clock[0])
    else:
        z_init, scales = starting_point(
            prior,
            fields,
            variances,
            positions,
            plate,
            start=options.start,
            passes=options.start_passes,
            precondition=options.method == "lbfgs" and options.precondition,
            psf=psf,
        )
        start_point_slots(stars, star_starts, z_init, scales)
        clock.append(time.perf_counter())
        kernel = None
        if psf is not None:
            kernel = with_field_transform(
                psf, fields.shape[-2:], n_sources=plate, stamp_size=prior.stamp_size
            )
        fit = _fit(prior, inputs, z_init, scales, options, progress=progress, psf=kernel)
        if options.fit_sky:  # joint (galaxies, sky) MAP from the galaxies' fit
            level = _residual_levels(fields - np.asarray(fit.model_image))
            z_fit = np.asarray(fit.params["z"])
            fit = _fit(prior, inputs, z_fit, scales, options, psf=kernel, sky_init=level)
        models = np.asarray(fit.model_image)
        stamps = np.asarray(fit.deterministics["stamps"])
        converged = np.asarray(fit.converged, bool)
        if options.fit_sky:  # the galaxies' model and the data without the fitted sky
            sky = np.asarray(fit.params["sky"], np.float32)
            models = models - sky[..., None, None]
            fields = fields - sky[..., None, None]
    clock.append(time.perf_counter())
    _warn_dead_bands(prior, any(counts))
    terms = error_terms(prior, options)
    results, error_seconds, refine_seconds = [], 0.0, 0.0
    for i in range(k):
        result, (seconds, refined) = field_result(
            prior,
            fields[i],
            variances[i],
            positions[i],
            models[i],
            stamps[i, : counts[i]],
            bool(converged[i]),
            None if fit is None else jax.tree.map(lambda a, i=i: np.asarray(a)[i], fit),
            options=options,
            terms=terms,
            psf=psf,
            sky=None if sky is None else sky[i],
            points=stars[i],
        )
        results.append(result)
        error_seconds += seconds
        refine_seconds += refined
    clock.append(time.perf_counter())
    spent = np.diff(clock) / k
    timings = dict(zip(("encoder", "fit", "catalog"), spent.tolist(), strict=True))
    timings["errors"] = error_seconds / k
    timings["refine"] = refine_seconds / k
    timings["catalog"] -= timings["errors"] + timings["refine"]
    return [r._replace(timings=dict(timings)) for r in results]


def _warn_dead_bands(prior: GalaxyPrior, any_source: bool) -> None:
    dead = dead_bands(prior)
    if dead and any_source:
        warnings.warn(
            f"the prior cannot model band(s) {list(dead)} (its decoder outputs zero there for "
            "every latent): their fluxes are 0 and flagged in the catalog (flux_<band>_flag)",
            MadnessInputWarning,
            stacklevel=4,
        )


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
        field = fields[i] if result.sky is None else fields[i] - result.sky[:, None, None]
        response = measure_shear_response(
            prior,
            z,
            result.positions,
            field,
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
    options: DeblendOptions,
    sky_init: np.ndarray | None = None,
    **fit_options: Any,
) -> MAPResult:
    """The batched MAP fit of :func:`~madness_ppl.scene.blend_model` over padded inputs
    (sharded over the local devices), L-BFGS preconditioned by ``scales``; with ``sky_init``
    ``(K, B)``, a sky level per band is fitted too, starting there (:func:`_sky_widths`)."""

    # the fields' BlendInputs stacked along a new batch axis (the prior is shared), sharded
    stacked = jax.tree.map(lambda *a: np.stack(a), *(i._replace(prior=None) for i in inputs))
    init, scale, sky_scale = {"z": z_init}, {"z": scales}, None
    if sky_init is not None:
        sky_scale, scale["sky"] = _sky_widths(stacked.variance, stacked.pixel_mask)
        init["sky"] = sky_init.astype(np.float32)
    stacked, init, scale, sky_scale = _shard_batch((stacked, init, scale, sky_scale))
    fit_options = {**options.fit_options, **fit_options}
    if sky_scale is not None:
        fit_options["sky_scale"] = sky_scale
    if options.method == "lbfgs":
        fit_options = {"scale": scale, **fit_options}
    return fit_map(
        blend_model,
        *stacked._replace(prior=prior).args,
        **stacked.kwargs,
        init=init,
        batched=True,
        in_axes=(0, 0, 0, None),
        method=options.method,
        max_steps=options.max_steps,
        tol=options.tol,
        **fit_options,
    )


def _residual_levels(residuals: np.ndarray) -> np.ndarray:
    """``(K, B)`` sigma-clipped background level of each field's residual (sources masked,
    :func:`madness_ppl.measure.estimate_noise`); 0 in a band with too few sky pixels."""
    levels = np.zeros(residuals.shape[:2], np.float32)
    for k, residual in enumerate(residuals):
        for b, plane in enumerate(residual):
            try:
                levels[k, b] = estimate_noise(plane[None])[0][0]
            except MadnessInputError:
                continue
    return levels


def _sky_widths(variance: np.ndarray, pixel_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Prior width and L-BFGS scale of each field's sky levels, ``(K, B)`` each: the median
    pixel noise :math:`\sigma_b` of the unmasked pixels, and :math:`\sigma_b / \sqrt{N_b}`,
    the width the likelihood of the :math:`N_b` unmasked pixels gives a constant level."""
    mask = np.broadcast_to(pixel_mask, variance.shape)
    sigma = np.sqrt(np.nanmedian(np.where(mask, variance, np.nan), axis=(-2, -1)))
    count = np.maximum(mask.sum(axis=(-2, -1)), 1)
    return sigma.astype(np.float32), (sigma / np.sqrt(count)).astype(np.float32)


def _shard_batch(tree: Any) -> Any:
    """Shard the leading (batch) axis of every array in ``tree`` over the local devices when
    there are several."""
    devices = jax.local_devices()
    arrays = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, np.ndarray | jax.Array)]
    k = len(arrays[0]) if arrays else 1
    if len(devices) < 2 or k == 1:
        return tree
    if k % len(devices):
        raise ValueError(f"batch of {k} fields cannot be split over {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return jax.tree.map(
        lambda leaf: (
            jax.device_put(leaf, sharding)
            if isinstance(leaf, np.ndarray | jax.Array) and leaf.ndim and len(leaf) == k
            else leaf
        ),
        tree,
    )


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
