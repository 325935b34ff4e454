"""Run the scarlet2 deblender on a field, as its documentation recommends.

Peer benchmark for ``madness_ppl`` (see ``design.md``, "Peers to measure against"). scarlet2 is
imported lazily and is meant to live in its own environment (it must not move the project's jax
pin); it was written and checked against

* scarlet2 0.5.1 (the newest release on PyPI), equinox 0.13.8, optax 0.2.8, numpyro 0.22.0,
  jax/jaxlib 0.10.2 (CPU). scarlet2 0.5.1 declares an unpinned ``jax`` dependency, so it installs
  alongside ``jax>=0.10,<0.11`` without upgrading it.

Recipe (the "Real-World Example" notebook ``docs/0-example.ipynb`` of scarlet2 v0.5.1, the
documented case with per-band PSFs):

1. ``obs = sc2.Observation(field, weights=1/variance, psf=psfs, channels=bands)``;
2. ``model_frame = sc2.Frame.from_observations(obs)``: the model frame gets scarlet2's default
   model PSF, a circular Gaussian with ``sigma = 0.7`` pixel;
3. inside ``with sc2.Scene(model_frame) as scene``, one ``sc2.Source(center, spectrum, morph)``
   per true position (``center`` in scarlet2's ``(y, x)`` order) with
   ``spectrum, morph = sc2.init.from_gaussian_moments(obs, center)``, falling back, as the
   notebook does, to ``sc2.init.pixel_spectrum(obs, center)`` and
   ``sc2.init.compact_morphology()`` when it fails (the notebook catches ``ValueError``; we also
   catch the ``AssertionError`` raised for a centre less than half a pixel inside the field edge);
4. ``sc2.Parameters``: every spectrum ``constraints.positive`` with step
   ``partial(sc2.relative_step, factor=0.05)``, every morphology ``constraints.unit_interval``
   with step ``partial(sc2.relative_step, factor=1e-3)`` (the notebook's "recommended
   configuration"); centres are fixed at the truth;
5. ``scene_ = scene.fit(obs, max_iter=max_iter, e_rel=e_rel)`` (Adam, stopped when the largest
   relative parameter change falls below ``e_rel``);
6. per-source model as observed: ``obs.render(scene_.evaluate_source(source))``; total flux:
   ``sc2.measure.flux(source)`` (the model-frame flux, unit-sum PSFs preserve it).

Departures: the initial spectrum is clipped to ``>= 1e-6`` and the morphology to
``[1e-6, 1 - 1e-6]`` before the constrained parameters are declared (``from_gaussian_moments`` and
``pixel_spectrum`` return negative fluxes in faint bands, and the positivity constraint then turns
them into NaN for the whole fit; scarlet2's ``main``-branch notebook adds exactly this clip, the
0.5.1 one does not). The rest leaves the fit unchanged: validation checks (on by default, they
print reports and run extra checks after the fit) are switched off during the call and restored
afterwards; the progress bar is off; optimiser steps are counted by wrapping
``scarlet2.infer._make_step`` (no extra work; 0.5.1 does not report them) to give ``converged``.
scarlet2 still prints "Zero or negative spectrum ..." lines to stdout from ``pixel_spectrum``.
scarlet2's unreleased ``main`` branch documents another initialisation,
``sc2.init.hierarchical_sources`` (starlets), with ``morph_step = 0.1``; this runner follows the
release.

PSF width caveat: without ``box_sizes``, ``from_gaussian_moments`` tries boxes of
``int(fwhm * 6 * 1.5**k)`` pixels with ``fwhm = sc2.measure.fwhm(obs.frame.psf()).min()``, and
``measure.fwhm`` takes the diameter of the half-maximum area as ``2 * sqrt(N) / pi`` instead of
``2 * sqrt(N / pi)``: ``1/sqrt(pi) ~ 0.56`` times the true width (also on ``main``). For the LSST
PSFs at 0.2 arcsec per pixel it returns 1.9-2.9 pixels (min 1.91, true ~3.4), so the trial boxes
are 11, 17, 25, 38, ... pixels instead of 20, 30, 45, 68, ...; the sources we inspected kept
11x11 boxes (fixed for the whole fit). We run it as documented; ``correct_fwhm=True`` passes the
box sizes computed with the right formula, to measure the effect.

Measured (scarlet2 0.5.1, jax 0.10.2 CPU, 2 cores shared with a training job, load 5-7; 10
fields of 80x80 pixels, 2-6 galaxies, ``make_blend`` seeds 0-9, 51 galaxies): r-band median
|flux error| 9.2 % against the catalogue flux, 8.6 % against the noiseless isolated-stamp sum;
``scene.fit`` 7.4 s per field (1.45 s per galaxy), whole call 14.7 s per field (the first field
pays ~50 s of eager-op compilation in the initialisation); no fit met ``e_rel=1e-4`` within 1000
steps (last max relative change 7e-4 to 1.2e-2); 19 of 51 sources fell back to the point-source
initialisation; peak RSS 1.55 -> 2.0 GB over the 10 fits. With ``correct_fwhm=True``: 12.9 %
(catalogue), 13.5 % (isolated), 6.0 s per field.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

__all__ = ["run_scarlet2"]

_TINY = 1e-6


def _cutout(image: np.ndarray, centre: tuple[int, int], size: int) -> np.ndarray:
    """``(B, size, size)`` stamp of ``image`` centred on pixel ``centre = (i, j)``, zero-padded."""
    n_bands, height, width = image.shape
    half = size // 2
    out = np.zeros((n_bands, size, size), dtype=image.dtype)
    i0, j0 = centre[0] - half, centre[1] - half
    ys, ye = max(i0, 0), min(i0 + size, height)
    xs, xe = max(j0, 0), min(j0 + size, width)
    if ys < ye and xs < xe:
        out[:, ys - i0 : ye - i0, xs - j0 : xe - j0] = image[:, ys:ye, xs:xe]
    return out


def run_scarlet2(
    field: np.ndarray,
    variance: np.ndarray,
    positions: np.ndarray,
    psfs: np.ndarray,
    bands: list[str],
    *,
    stamp_size: int = 45,
    max_iter: int = 1000,
    e_rel: float = 1e-4,
    correct_fwhm: bool = False,
    box_sizes: Sequence[Sequence[int]] | None = None,
    checkpoints: Sequence[int] = (),
) -> dict:
    """Deblend ``field`` with scarlet2, one source per true position.

    Parameters
    ----------
    field
        ``(B, H, W)`` sky-subtracted noisy image in electrons.
    variance
        ``(B, H, W)`` per-pixel noise variance in electrons²; weights are ``1 / variance``
        (zero where ``variance <= 0``).
    positions
        ``(N, 2)`` source centres ``(x, y)`` in pixels (pixel ``(i, j)`` has centre ``x=j, y=i``).
    psfs
        ``(B, P, P)`` unit-sum PSF images at the field's pixel scale, odd ``P``, centred.
    bands
        ``B`` band names.
    stamp_size
        Side of the returned per-source stamps (odd).
    max_iter, e_rel
        Passed to ``Scene.fit``.
    correct_fwhm
        Off (default): scarlet2 as documented. On: pass ``from_gaussian_moments`` the box sizes
        it would choose with the half-maximum diameter computed as ``2 * sqrt(N / pi)``, to
        measure what the ``measure.fwhm`` issue costs. Nothing else changes.
    box_sizes
        Per source, the candidate box sides ``from_gaussian_moments`` chooses from (e.g. one
        side from the source's true size); overrides ``correct_fwhm``.
    checkpoints
        Optimiser step counts at which every source's flux is recorded (``fluxes_at``), with
        the loss and the largest relative parameter change of every step (``loss_trace``,
        ``max_change_trace``): one run to ``max_iter`` then shows what any smaller
        ``max_iter``, or any ``e_rel``, would have returned (Adam's path does not depend on
        them). Empty (default): no per-step callback.

    Returns
    -------
    dict
        ``models``: ``(N, B, S, S)`` float32, each source's model as observed (convolved with the
        observation PSF, electrons) on a stamp centred on ``round(position)``, zero-padded outside
        the field; ``fluxes``: ``(N, B)`` total model flux per band (``sc2.measure.flux``);
        ``seconds``: wall time of ``scene.fit`` (includes its JIT compilation, which scarlet2 repeats
        for every new scene); ``seconds_total``: wall time of the whole call (observation, frame,
        initialisation, fit, rendering); ``converged``: whether the relative-change criterion
        stopped the fit before ``max_iter`` (``None`` when there is no source); ``n_iter``:
        optimiser steps taken; ``max_change``: the last step's largest relative parameter
        change (the quantity compared with ``e_rel``); ``n_fallback_init``: sources whose ``from_gaussian_moments``
        initialisation failed and used the point-source fallback. With ``checkpoints``:
        ``fluxes_at`` (step -> ``(N, B)`` fluxes, for the checkpoints reached), ``cpu_at``
        (step -> ``time.process_time()`` there), ``loss_trace`` and ``max_change_trace`` (one
        float per step).
    """
    field = np.asarray(field, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    positions = np.asarray(positions, dtype=float).reshape(-1, 2)
    psfs = np.asarray(psfs, dtype=np.float32)
    n_bands = field.shape[0]
    n_sources = len(positions)
    _check_inputs(field, variance, psfs, bands, stamp_size)
    if box_sizes is not None and len(box_sizes) != n_sources:
        raise ValueError(f"{len(box_sizes)} box-size lists for {n_sources} sources")
    if n_sources == 0:
        return {
            "models": np.zeros((0, n_bands, stamp_size, stamp_size), dtype=np.float32),
            "fluxes": np.zeros((0, n_bands), dtype=np.float32),
            "seconds": 0.0,
            "seconds_total": 0.0,
            "converged": None,
            "n_iter": 0,
            "max_change": None,
            "n_fallback_init": 0,
        }

    import jax
    import jax.numpy as jnp
    import scarlet2 as sc2
    import scarlet2.infer as sc2_infer
    import scarlet2.validation_utils as sc2_validation

    t_start = time.perf_counter()
    validation_state = sc2_validation.VALIDATION_SWITCH
    sc2.set_validation(False)
    try:
        weights = np.where(variance > 0, 1.0 / np.where(variance > 0, variance, 1.0), 0.0)
        obs = sc2.Observation(
            jnp.asarray(field),
            weights=jnp.asarray(weights, dtype=jnp.float32),
            psf=jnp.asarray(psfs),
            channels=list(bands),
        )
        model_frame = sc2.Frame.from_observations(obs)

        if box_sizes is not None:
            boxes = [list(b) for b in box_sizes]
        else:
            boxes = [_fwhm_boxes(obs) if correct_fwhm else None] * n_sources
        scene, n_fallback = _initial_scene(sc2, obs, model_frame, positions, boxes)
        _declare_parameters(sc2, scene)
        recorder = _Recorder(sc2, checkpoints) if checkpoints else None
        scene_, seconds, trace = _fit_counting_steps(
            sc2_infer, scene, obs, max_iter, e_rel, recorder
        )
        max_change = None
        if trace["convergence"] is not None:
            max_change = float(
                jax.tree_util.tree_reduce(
                    lambda a, b: jnp.maximum(a, b),
                    trace["convergence"],
                )
            )
        converged = max_change is not None and max_change < e_rel

        centres_ij = np.rint(positions[:, ::-1]).astype(int)
        models = np.zeros((n_sources, n_bands, stamp_size, stamp_size), dtype=np.float32)
        fluxes = np.zeros((n_sources, n_bands), dtype=np.float32)
        for k, source in enumerate(scene_.sources):
            observed = np.asarray(obs.render(scene_.evaluate_source(source)))
            models[k] = _cutout(observed, tuple(centres_ij[k]), stamp_size)
            fluxes[k] = np.asarray(sc2.measure.flux(source))
    finally:
        sc2.set_validation(validation_state)

    out = {
        "models": models,
        "fluxes": fluxes,
        "seconds": seconds,
        "seconds_total": time.perf_counter() - t_start,
        "converged": bool(converged),
        "n_iter": trace["n"],
        "max_change": max_change,
        "n_fallback_init": n_fallback,
    }
    if recorder is not None:
        out["fluxes_at"] = recorder.fluxes_at
        out["loss_trace"] = recorder.loss
        out["max_change_trace"] = recorder.max_change
        out["cpu_at"] = recorder.cpu_at
    return out


class _Recorder:
    """``Scene.fit``'s callback: the loss and largest relative change of every step, and every
    source's flux at the checkpoint steps."""

    def __init__(self, sc2: Any, checkpoints: Sequence[int]) -> None:
        self.sc2 = sc2
        self.checkpoints = set(int(c) for c in checkpoints)
        self.loss: list[float] = []
        self.max_change: list[float] = []
        self.fluxes_at: dict[int, np.ndarray] = {}
        self.cpu_at: dict[int, float] = {}

    def __call__(self, scene: Any, convergence: Any, loss: Any) -> None:
        import jax

        self.loss.append(float(loss))
        self.max_change.append(
            float(jax.tree_util.tree_reduce(lambda a, b: max(a, b), convergence))
        )
        step = len(self.loss)
        if step in self.checkpoints:
            fluxes = [np.asarray(self.sc2.measure.flux(src)) for src in scene.sources]
            self.fluxes_at[step] = np.asarray(fluxes, np.float32)
            self.cpu_at[step] = time.process_time()


def _fwhm_boxes(obs: Any) -> list[int]:
    """Initial box sides from the observation's PSF FWHM (scarlet2's ``correct_fwhm`` recipe):
    six FWHM, growing by 1.5x."""
    psf_model = np.asarray(obs.frame.psf())
    peak = psf_model.max(axis=(-2, -1), keepdims=True)
    n_half = (psf_model >= peak / 2).sum(axis=(-2, -1))
    fwhm = float((2 * np.sqrt(n_half / np.pi)).min())
    return [int(fwhm * 6.0 * 1.5**k) for k in range(10)]


def _initial_scene(
    sc2: Any,
    obs: Any,
    model_frame: Any,
    positions: np.ndarray,
    box_sizes: Sequence[list[int] | None],
) -> tuple[Any, int]:
    """One source per position, initialised from Gaussian moments, or (where that fails, as
    it does for blended sources) a compact morphology with the pixel spectrum; returns the
    scene and how many sources fell back."""
    import jax.numpy as jnp

    n_fallback = 0
    with sc2.Scene(model_frame) as scene:
        centres = jnp.asarray(positions[:, ::-1], dtype=jnp.float32)
        for centre, boxes in zip(centres, box_sizes, strict=True):
            try:
                spectrum, morph = sc2.init.from_gaussian_moments(obs, centre, box_sizes=boxes)
            except (ValueError, AssertionError):
                spectrum = sc2.init.pixel_spectrum(obs, centre)
                morph = sc2.init.compact_morphology()
                n_fallback += 1
            # The constrained parameters need a feasible start (scarlet2's ``main`` docs
            # clip like this; the 0.5.1 notebook does not, and a negative band gives NaN).
            spectrum = jnp.maximum(spectrum, _TINY)
            morph = jnp.clip(morph, _TINY, 1 - _TINY)
            sc2.Source(centre, spectrum, morph)
    return scene, n_fallback


def _declare_parameters(sc2: Any, scene: Any) -> None:
    """Every source's spectrum (positive) and morphology (in [0, 1]) as fitted parameters,
    with scarlet2's relative step sizes."""
    from numpyro.distributions import constraints

    spec_step = partial(sc2.relative_step, factor=0.05)
    morph_step = partial(sc2.relative_step, factor=1e-3)
    with sc2.Parameters(scene):
        for i, source in enumerate(scene.sources):
            sc2.Parameter(
                source.spectrum,
                name=f"spectrum:{i}",
                constraint=constraints.positive,
                stepsize=spec_step,
            )
            sc2.Parameter(
                source.morphology,
                name=f"morph:{i}",
                constraint=constraints.unit_interval,
                stepsize=morph_step,
            )


def _fit_counting_steps(
    sc2_infer: Any,
    scene: Any,
    obs: Any,
    max_iter: int,
    e_rel: float,
    callback: _Recorder | None = None,
) -> tuple[Any, float, dict[str, Any]]:
    """``scene.fit`` with its optimiser steps counted and the last convergence tree kept
    (scarlet2 0.5.1 returns neither; the wrapper only forwards the call); returns the fitted
    scene, the fit's seconds and ``{"n": steps, "convergence": tree}``."""
    import jax

    make_step = sc2_infer._make_step
    trace: dict[str, Any] = {"n": 0, "convergence": None}

    def counting_step(*args, **kwargs):
        out = make_step(*args, **kwargs)
        trace["n"] += 1
        trace["convergence"] = out[-1]
        return out

    sc2_infer._make_step = counting_step
    try:
        t_fit = time.perf_counter()
        fitted = scene.fit(
            obs, max_iter=max_iter, e_rel=e_rel, progress_bar=False, callback=callback
        )
        jax.block_until_ready(fitted)
        seconds = time.perf_counter() - t_fit
    finally:
        sc2_infer._make_step = make_step
    return fitted, seconds, trace


def _check_inputs(
    field: np.ndarray, variance: np.ndarray, psfs: np.ndarray, bands: list[str], stamp_size: int
) -> None:
    """Refuse a field, variance, PSFs, band names or stamp size that do not fit together."""
    n_bands = field.shape[0]
    if field.ndim != 3 or variance.shape != field.shape:
        raise ValueError(
            f"field {field.shape} and variance {variance.shape} must be equal (B, H, W)"
        )
    if psfs.ndim != 3 or psfs.shape[0] != n_bands or psfs.shape[1] % 2 == 0:
        raise ValueError(f"psfs must be (B, P, P) with odd P, got {psfs.shape}")
    if len(bands) != n_bands:
        raise ValueError(f"{len(bands)} band names for {n_bands} bands")
    if stamp_size % 2 == 0:
        raise ValueError(f"stamp_size must be odd, got {stamp_size}")
