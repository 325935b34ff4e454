r"""Every setting of deblending a field, in one frozen value: :class:`DeblendOptions`.

:func:`madness_ppl.deblend.deblend`, :func:`~madness_ppl.deblend.deblend_batch`,
:func:`~madness_ppl.batch.deblend_many` (through :class:`BatchConfig`, which adds the patch and
batch settings) and the CLI all carry one :class:`DeblendOptions` (the detection settings
inside it, :class:`Detection`) instead of passing each knob through every layer: a new setting
is a field here, the line that uses it, and its CLI flag. Values are checked when the options
are made, so a bad setting fails before any pixel is read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from madness_ppl.errors import MadnessInputError

__all__ = [
    "DEFAULT_DETECTION",
    "REFINE_FLUX_TOL",
    "REFINE_TOL_FACTOR",
    "BatchConfig",
    "DeblendOptions",
    "Detection",
]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Detection:
    """How sources are found when no positions are given (sep on the noise-weighted coadd,
    :func:`madness_ppl.measure.detect`).

    Parameters
    ----------
    threshold
        Detection threshold in coadd sigma (> 0).
    contrast
        sep's deblending contrast (``deblend_cont``, in (0, 1]): a peak inside a detection is
        split off as its own source when it holds at least this fraction of the detection's
        flux. The default (sep's) keeps faint neighbours of a bright galaxy inside its
        detection on real images; 0.001 splits them (the HSC tutorial).
    min_area
        Minimum number of connected pixels above the threshold (>= 1).
    nthresh
        Number of sep's deblending thresholds (``deblend_nthresh``, >= 1).
    """

    threshold: float = 3.0
    contrast: float = 0.005
    min_area: int = 5
    nthresh: int = 32

    def __post_init__(self) -> None:
        if not (np.isscalar(self.threshold) and np.isfinite(self.threshold) and self.threshold > 0):
            raise MadnessInputError(
                f"detect_threshold must be a positive number of sigma, got {self.threshold!r}",
                self.threshold,
            )
        if not (np.isscalar(self.contrast) and 0 < self.contrast <= 1):
            raise MadnessInputError(
                f"detect_contrast must be a flux fraction in (0, 1], got {self.contrast!r}",
                self.contrast,
            )
        for name in ("min_area", "nthresh"):
            value = getattr(self, name)
            if not (_is_integer(value) and value >= 1):
                raise MadnessInputError(f"{name} must be an integer >= 1, got {value!r}", value)

    def sep_keywords(self) -> dict[str, Any]:
        """The keywords of :func:`madness_ppl.measure.detect` these settings stand for."""
        return {
            "threshold": float(self.threshold),
            "deblend_cont": float(self.contrast),
            "min_area": int(self.min_area),
            "deblend_nthresh": int(self.nthresh),
        }


#: The default detection settings (sep's contrast, 3 sigma).
DEFAULT_DETECTION = Detection()

# keyword names of the detection settings in deblend(), DeblendOptions.replace and settings()
_DETECTION_ALIASES = {
    "detect_threshold": "threshold",
    "detect_contrast": "contrast",
    "detect_min_area": "min_area",
    "detect_nthresh": "nthresh",
}


@dataclasses.dataclass(frozen=True)
class DeblendOptions:
    r"""How a field is deblended once its pixels, variance and PSF are known.

    Parameters
    ----------
    detection
        Source detection (:class:`Detection`), used when no positions are given.
    max_steps
        Maximum optimisation steps of :func:`~madness_ppl.infer.fit_map` (>= 1).
    tol
        :func:`~madness_ppl.infer.fit_map`'s stopping tolerance (nats per latent element).
    method
        ``"lbfgs"`` (default) or ``"svi"`` (the MADNESS reference Adam).
    start
        ``"refined"`` (default): :func:`~madness_ppl.initialise.encoder_start` with
        ``start_passes`` residual rounds; ``"deblender"``: the deblending encoder on each cutout
        (the MADNESS start).
    start_passes
        Residual rounds of the ``"refined"`` start.
    precondition
        With ``"lbfgs"``, scale each source's latents by
        :func:`~madness_ppl.initialise.latent_scales`.
    refine
        Steps at most of the refinement after the fit (:func:`madness_ppl.refine.newton_refine`;
        0: none), on all of a field's latents jointly with the blend's Gauss-Newton matrix,
        which couples overlapping sources. It takes the directions that trade light between
        them to the optimum, where the fit's L-BFGS may stop short, so the catalog depends much
        less on where it stopped (tight-blend set, prior v0.3.1: 0.93 of sources within 0.1
        error of a fully converged fit, 0.81 without). A step is taken only while the
        predicted decrease exceeds ``refine_tol``. The flux errors reuse its last Jacobians.
        ``converged`` is also set when the refinement meets its test, even if L-BFGS hit
        ``max_steps``.
    refine_method
        ``"gauss-newton"`` (default): Gauss-Newton steps, each rebuilding the Jacobians;
        ``"lbfgs"``: L-BFGS preconditioned by the start's Gauss-Newton matrix, one gradient per
        step, also stopping when one more Gauss-Newton step would move no flux by more than
        :data:`REFINE_FLUX_TOL` of its error (converges much further on dense fields, less
        stable on tight blends: :mod:`madness_ppl.refine`).
    refine_tol
        The refinement's tolerance (nats per latent element of predicted decrease); default
        :data:`REFINE_TOL_FACTOR` times ``tol``: ten times tighter than L-BFGS's test, since the
        Gauss-Newton model underestimates the gap L-BFGS leaves on tight blends.
    fit_sky
        Fit a constant sky level per band with the galaxies (:func:`~madness_ppl.scene.blend_model`
        with ``sky_scale`` the pixel noise), for images whose background subtraction left a
        residual level that the galaxy models would otherwise absorb. The fitted level is
        subtracted before the refinement, the errors and the catalog (which record it as
        ``SKY_<band>``); the flux errors are then conditional on it.
    vectorize
        Fit a batch's fields in one vmapped program (``True``) or one after the other, each
        padded to its own bucket (``False``). Default: vmapped on accelerators or when the
        batch is sharded over several devices, one after the other on a single CPU, where the
        vmapped decoder runs slower than separate fits (measured: 81 ms for one vmapped step of
        2 fields of 24 sources vs 2 x 33 ms) and the L-BFGS path of a vmapped fit can round
        differently from the same field fitted alone.
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
        well, :math:`\sigma_F^2 \mathrel{+}= (\lambda C)^2`; default the prior's calibrated
        ``["blend_fraction"]`` (0 when it has none).
    adaptive_errors
        Add each source's own evidence of misfit to its errors, with the prior's calibrated
        ``["misfit_fraction"]`` :math:`\gamma` and ``["edge_fraction"]`` :math:`\eta`:
        :math:`\sigma_F^2 \mathrel{+}= (\gamma \hat\epsilon F)^2 + (\eta e F)^2`, with
        :math:`\hat\epsilon` the pixel model-error fraction its residuals call for
        (:func:`madness_ppl.misfit.source_misfit`) and :math:`e` its ``edge_flux_frac``.
        ``False``: the population terms only.
    reference_band
        Band of the catalog's shapes (falls back to the middle band).
    shear_response
        Add each source's shape ``e1``, ``e2`` and its shear response ``R11`` ... ``R22``
        (:math:`R_{ak} = \partial e_a / \partial g_k`, metacalibration differentiated through
        the MAP, :func:`madness_ppl.shear.shear_response`) to the catalog. Off by default; its
        time is ``timings["shear"]`` (a Newton refit of the field on a second noise
        realisation, ~0.5-1x the fit: ``benchmarks/shear_response.py``).
    shear_seed
        Seed of that second noise realisation (field ``i`` of a batch uses
        ``(shear_seed, i)``).
    fit_options
        Further keywords of :func:`~madness_ppl.infer.fit_map` (``optimizer``,
        ``chunk_size``, ...).

    Examples
    --------
    >>> DeblendOptions(max_steps=50).replace(detect_threshold=5.0).detection.threshold
    5.0
    """

    detection: Detection = DEFAULT_DETECTION
    max_steps: int = 200
    tol: float = 1e-3
    method: str = "lbfgs"
    start: str = "refined"
    start_passes: int = 2
    precondition: bool = True
    refine: int = 8
    refine_method: str = "gauss-newton"
    refine_tol: float | None = None
    fit_sky: bool = False
    vectorize: bool | None = None
    errors: bool = True
    model_error: ArrayLike | None = None
    flux_error_floor: ArrayLike | None = None
    blend_error: ArrayLike | None = None
    adaptive_errors: bool = True
    reference_band: str = "r"
    shear_response: bool = False
    shear_seed: int = 0
    fit_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (_is_integer(self.max_steps) and self.max_steps >= 1):
            raise MadnessInputError(
                f"max_steps must be an integer >= 1, got {self.max_steps!r}", self.max_steps
            )
        for name in ("start_passes", "refine", "shear_seed"):
            value = getattr(self, name)
            if not (_is_integer(value) and value >= 0):
                raise MadnessInputError(f"{name} must be an integer >= 0, got {value!r}", value)
        if self.method not in ("lbfgs", "svi"):
            raise MadnessInputError(f"method must be 'lbfgs' or 'svi', got {self.method!r}")
        if self.refine_method not in ("gauss-newton", "lbfgs"):
            raise MadnessInputError(
                f"refine_method must be 'gauss-newton' or 'lbfgs', got {self.refine_method!r}"
            )
        if self.start not in ("refined", "deblender"):
            raise MadnessInputError(f"start must be 'refined' or 'deblender', got {self.start!r}")
        if not (np.isscalar(self.tol) and math.isfinite(self.tol) and self.tol > 0):
            raise MadnessInputError(f"tol must be a positive number, got {self.tol!r}", self.tol)
        if self.refine_tol is not None and not (
            np.isscalar(self.refine_tol) and self.refine_tol >= 0
        ):
            raise MadnessInputError(
                f"refine_tol must be a number >= 0 (inf: no step), got {self.refine_tol!r}",
                self.refine_tol,
            )
        if not isinstance(self.detection, Detection):
            raise MadnessInputError(
                f"detection must be a Detection, got {type(self.detection).__name__}"
            )

    @property
    def refine_tolerance(self) -> float:
        """The refinement's tolerance: ``refine_tol``, else :data:`REFINE_TOL_FACTOR` x ``tol``."""
        return REFINE_TOL_FACTOR * self.tol if self.refine_tol is None else self.refine_tol

    def replace(self, **changes: Any) -> DeblendOptions:
        """A copy with ``changes``: option names, ``detect_threshold``, ``detect_contrast``,
        ``detect_min_area`` or ``detect_nthresh`` (the :class:`Detection` fields), or any other
        keyword of
        :func:`~madness_ppl.infer.fit_map`, which joins ``fit_options``.
        """
        names = {f.name for f in dataclasses.fields(self)}
        detection = {
            _DETECTION_ALIASES[k]: changes.pop(k) for k in list(changes) if k in _DETECTION_ALIASES
        }
        fit_options = {k: changes.pop(k) for k in list(changes) if k not in names}
        if detection:
            changes["detection"] = dataclasses.replace(
                changes.get("detection", self.detection), **detection
            )
        if fit_options:
            changes["fit_options"] = {
                **changes.get("fit_options", self.fit_options),
                **fit_options,
            }
        return dataclasses.replace(self, **changes) if changes else self

    def settings(self) -> dict[str, Any]:
        """The options that differ from the defaults, as JSON-ready values (flat: the
        detection fields as ``detect_threshold``, ``detect_contrast``, ...)."""
        default = DeblendOptions()
        out: dict[str, Any] = {}
        for alias, name in _DETECTION_ALIASES.items():
            value = getattr(self.detection, name)
            if value != getattr(default.detection, name):
                out[alias] = _json_ready(value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "detection" or _same(value, getattr(default, f.name)):
                continue
            out[f.name] = _json_ready(value)
        return out


#: The Newton refinement stops at a tenth of L-BFGS's tolerance: on a tight blend of the
#: v0.3.1 prior (tests/test_refine.py) the Gauss-Newton predicted decrease at L-BFGS's
#: tolerance still left a 0.12-error flux shift from full convergence; at a tenth, 0.06.
REFINE_TOL_FACTOR = 0.1

#: ``refine_method="lbfgs"`` also stops when a Gauss-Newton step would move no flux by more
#: than this fraction of its Laplace error (issue #31's stability criterion is 0.1). The predicted
#: decrease alone cannot get there on bright dense fields: the decoder's float32 rounding
#: puts a floor of ~1 nat under it (a 38-galaxy field, stop 48).
REFINE_FLUX_TOL = 0.05


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return dict(a) == dict(b)
    return np.array_equal(np.asarray(a), np.asarray(b))


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    return np.asarray(value).tolist()


#: The default settings of every patch's fit in a batch run.
DEFAULT_OPTIONS = DeblendOptions()


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How :func:`~madness_ppl.batch.deblend_many` cuts, batches and fits.

    Parameters
    ----------
    prior
        Shipped prior name or directory (loaded once per worker).
    patch_size
        Side :math:`P` of the square patches in pixels (one compiled shape).
    margin
        Overlap :math:`m` on each side of a patch's core; default half the prior's stamp size.
    batch_size
        Patches fitted together in one vmapped program. A batch runs until its slowest patch
        converges, so on a CPU small batches are fastest (``benchmarks/throughput.py``: 3.1
        galaxies/s at 1-2, 2.3 at 4, 1.1 at 8 on 2 cores); accelerators want larger ones.
    bad_bits
        Which ``MASK`` bits mark bad pixels (default: the bad planes a Rubin/HSC mask header
        names, else any nonzero bit; see :func:`madness_ppl.fields.resolve_bad_bits`).
    zeropoint
        AB magnitude of a pixel value of 1 in every input (default: each file's header, see
        :func:`madness_ppl.units.electrons_per_unit`; electrons when it states none).
    options
        Detection, fit, error and measurement settings of every patch
        (:class:`~madness_ppl.options.DeblendOptions`). With ``shear_response`` the added noise
        of each batch is seeded by its id (``shear_seed`` is not used).
    """

    prior: str = "lsst"
    patch_size: int = 128
    margin: int | None = None
    batch_size: int = 2
    bad_bits: int | str | None = None
    zeropoint: float | None = None
    options: DeblendOptions = DEFAULT_OPTIONS

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size", "margin"):
            value = getattr(self, name)
            if value is None and name == "margin":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise MadnessInputError(
                    f"{name} must be an integer, got {value!r} ({type(value).__name__})"
                )
        if self.patch_size < 1:
            raise MadnessInputError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.batch_size < 1:
            raise MadnessInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.margin is not None and self.margin < 0:
            raise MadnessInputError(f"margin must be >= 0, got {self.margin}")
        if not isinstance(self.options, DeblendOptions):
            raise MadnessInputError(
                f"options must be a DeblendOptions, got {type(self.options).__name__}"
            )

    def settings(self) -> dict[str, Any]:
        """The configuration as JSON-ready values, in the run fingerprint's flat layout: the
        patch settings, ``max_steps``, ``detect_threshold`` and ``reference_band``, and any
        other option only when it differs from its default (so a run directory made before an
        option existed resumes)."""
        options = self.options
        out: dict[str, Any] = {
            "prior": self.prior,
            "patch_size": self.patch_size,
            "margin": self.margin,
            "batch_size": self.batch_size,
            "max_steps": options.max_steps,
            "detect_threshold": float(options.detection.threshold),
            "reference_band": options.reference_band,
        }
        for name in ("bad_bits", "zeropoint"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {**out, **options.settings()}

    def core_and_margin(self, stamp_size: int) -> tuple[int, int]:
        """Core side :math:`C = P - 2m` and margin :math:`m` for a prior of ``stamp_size``."""
        margin = stamp_size // 2 if self.margin is None else self.margin
        core = self.patch_size - 2 * margin
        if core < 1:
            raise MadnessInputError(
                f"patch_size {self.patch_size} leaves no core with a margin of {margin} pixels "
                f"on each side; use patch_size > {2 * margin}"
            )
        return core, margin
