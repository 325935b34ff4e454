r"""NumPyro building blocks for blend scenes, and the ready-made blend model.

A scene explains an observed multi-band field :math:`y` (shape ``(B, H, W)``, electrons) as a
sum of galaxies, each a decoded latent vector placed at its position:

.. math::

    z_i \sim p(z), \qquad
    m = \sum_{i=1}^{n} \mathrm{place}\big(f(z_i), p_i\big), \qquad
    y_{bhw} \sim \mathcal{N}\big(m_{bhw}, \sigma^2_{bhw}\big).

Every piece is a plain function that can be called inside any NumPyro model, so a user can
write a variant of :func:`blend_model` (a sky background, a star, free positions...) in a
few lines: see ``examples/custom_scene.py``.

Conventions (``docs/conventions.md``): images are ``(bands, H, W)``; a stamp's centre is
index ``S // 2``; the pixel ``[:, i, j]`` has its centre at ``x = j, y = i``; positions are
``(n, 2)`` arrays of ``(x, y)``.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from numpyro.infer.util import log_density
>>> from madness_ppl.toy import LinearGaussianPrior
>>> prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=15, latent_dim=4)
>>> field = jnp.zeros((2, 32, 32)); variance = jnp.ones((2, 32, 32))
>>> positions = jnp.array([[10.0, 12.0], [20.0, 16.0]])
>>> lp, trace = log_density(
...     blend_model, (field, positions, variance, prior), {}, {"z": jnp.zeros((2, 4))}
... )
>>> trace["model_image"]["value"].shape
(2, 32, 32)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.typing import ArrayLike
from numpyro import handlers

from madness_ppl.errors import MadnessInputError
from madness_ppl.galaxy_model import GalaxyModel
from madness_ppl.likelihood import gaussian_likelihood, pixel_variance
from madness_ppl.psf import PSFKernel, convolve_canvas, convolve_stamps

__all__ = [
    "BLEND_SITE_DIMS",
    "SOURCE_PLATE",
    "BlendInputs",
    "blend_model",
    "bucket_size",
    "default_variance",
    "galaxy_latents",
    "gaussian_likelihood",
    "observe_stamps",
    "pad_sources",
    "place_stamps",
    "prepare_blend",
    "render_image",
    "validate_scene_inputs",
]

SOURCE_PLATE = "sources"
"""Name of the plate over sources used by :func:`galaxy_latents` and :func:`blend_model`."""


# --------------------------------------------------------------------------------------------
# Placing stamps
# --------------------------------------------------------------------------------------------
def place_stamps(
    stamps: ArrayLike,
    positions: ArrayLike,
    field_shape: Sequence[int],
    *,
    subpixel: bool = True,
) -> jax.Array:
    r"""Sum stamps into a field, each centred at its position.

    Source :math:`i` with position :math:`p_i = (x_i, y_i)` is split into its nearest pixel
    :math:`(\lfloor y_i + 1/2 \rfloor, \lfloor x_i + 1/2 \rfloor)` and a fractional offset
    :math:`\delta_i = p_i - \lfloor p_i + 1/2 \rfloor \in [-1/2, 1/2)^2`. With ``subpixel``,
    the stamp :math:`s_i` is first shifted by :math:`\delta_i` with the Fourier shift theorem,

    .. math::

        \tilde s_i = \mathcal{F}^{-1}\big[\mathcal{F}[s_i](k_x, k_y)\,
        e^{-2\pi i (k_x \delta_x + k_y \delta_y)}\big],

    then its centre pixel ``S // 2`` is put on the nearest pixel and all stamps are added,

    .. math::

        m_{b,h,w} = \sum_i \tilde s_{i,b,\,h - \hat y_i + c,\, w - \hat x_i + c},
        \qquad c = \lfloor S / 2 \rfloor,

    keeping only pixels inside the field (a stamp partly or wholly outside the field is
    clipped; nothing wraps around).

    Parameters
    ----------
    stamps
        ``(n, B, S_y, S_x)``, electrons (odd sizes recommended: the centre is index ``S // 2``).
    positions
        ``(n, 2)`` pixel coordinates ``(x, y)`` of each stamp's centre.
    field_shape
        ``(H, W)`` of the output.
    subpixel
        Shift each stamp by its fractional offset (default) or round positions to the
        nearest pixel.

    Returns
    -------
    jax.Array
        ``(B, H, W)``.

    Notes
    -----
    *Scatter-add.* All stamps go into a canvas padded by ``max(S_y, S_x)`` on each side with
    a single vectorised ``.at[flat_index].add`` (no loop over sources, no ``(n, B, H, W)``
    intermediate); the integer position is clipped so that a stamp far outside the field lands
    wholly in the padding. The cost is ``O(n B S^2)`` whatever the field size.

    *Why Fourier and not bilinear.* A phase ramp leaves the zero-frequency coefficient
    untouched, so flux is conserved exactly, and it is exact for band-limited (Nyquist-sampled,
    PSF-convolved) stamps: it does not blur. Bilinear interpolation also conserves flux but
    convolves each stamp with an offset-dependent triangle kernel (a position-dependent blur
    that biases sizes and shapes), and its derivative with respect to position jumps at
    integer offsets. The Fourier shift is smooth in :math:`\delta` (gradients w.r.t.
    positions are exact and continuous) and costs two small FFTs per stamp. It is circular
    within the stamp: flux within half a pixel of a stamp's edge wraps to the other side,
    which is negligible for galaxy stamps that fall to the noise level at their edges.
    For odd ``S`` there is no Nyquist bin and the shifted stamp is exactly real.

    The result is differentiable with respect to ``stamps`` and, through the sub-pixel shift,
    ``positions`` (the integer part has zero derivative), and works under ``jit``/``vmap``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> stamp = jnp.zeros((1, 1, 3, 3)).at[0, 0, 1, 1].set(1.0)
    >>> place_stamps(stamp, jnp.array([[0.0, 1.0]]), (3, 3), subpixel=False)[0]
    Array([[0., 0., 0.],
           [1., 0., 0.],
           [0., 0., 0.]], dtype=float32)
    """
    return _place_stamps(
        jnp.asarray(stamps),
        jnp.asarray(positions),
        tuple(int(s) for s in field_shape),
        bool(subpixel),
    )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _place_stamps(
    stamps: jax.Array, positions: jax.Array, field_shape: tuple[int, int], subpixel: bool
) -> jax.Array:
    if stamps.ndim != 4:
        raise ValueError(f"stamps must be (n, B, S, S), got shape {stamps.shape}")
    if positions.shape != (stamps.shape[0], 2):
        raise ValueError(
            f"positions must have shape (n, 2) = {(stamps.shape[0], 2)}, got {positions.shape}"
        )
    _, n_bands, sy, sx = stamps.shape
    height, width = field_shape
    dtype = stamps.dtype if jnp.issubdtype(stamps.dtype, jnp.floating) else jnp.float32
    stamps = stamps.astype(dtype)
    positions = positions.astype(dtype)

    nearest = jnp.floor(positions + 0.5)
    if subpixel:
        stamps = _fourier_shift(stamps, positions - nearest)

    cy, cx = sy // 2, sx // 2
    pad = max(sy, sx)
    hp, wp = height + 2 * pad, width + 2 * pad
    # Clip so that a stamp far outside the field lies wholly in the padding; a non-finite
    # position is sent there too (the indices are then always in bounds).
    nearest = jnp.where(jnp.isfinite(nearest), nearest, -(2.0**20))
    iy = jnp.clip(nearest[:, 1], cy - sy, height + cy).astype(jnp.int32)
    ix = jnp.clip(nearest[:, 0], cx - sx, width + cx).astype(jnp.int32)
    rows = iy[:, None] - cy + pad + jnp.arange(sy, dtype=jnp.int32)  # (n, S_y)
    cols = ix[:, None] - cx + pad + jnp.arange(sx, dtype=jnp.int32)  # (n, S_x)
    band = jnp.arange(n_bands, dtype=jnp.int32) * (hp * wp)
    flat = band[None, :, None, None] + rows[:, None, :, None] * wp + cols[:, None, None, :]
    canvas = jnp.zeros(n_bands * hp * wp, dtype)
    canvas = canvas.at[flat.reshape(-1)].add(stamps.reshape(-1), mode="promise_in_bounds")
    canvas = canvas.reshape(n_bands, hp, wp)
    return canvas[:, pad : pad + height, pad : pad + width]


def _fourier_shift(stamps: jax.Array, shifts: jax.Array) -> jax.Array:
    """Shift ``(n, B, S_y, S_x)`` stamps by ``(n, 2)`` offsets ``(dx, dy)`` (Fourier)."""
    sy, sx = stamps.shape[-2:]
    fy = jnp.fft.fftfreq(sy).astype(stamps.dtype)
    fx = jnp.fft.rfftfreq(sx).astype(stamps.dtype)
    dx = shifts[:, 0, None, None, None]
    dy = shifts[:, 1, None, None, None]
    phase = jnp.exp(-2j * jnp.pi * (fy[:, None] * dy + fx[None, :] * dx))
    shifted = jnp.fft.irfft2(jnp.fft.rfft2(stamps) * phase, s=(sy, sx))
    return shifted.astype(stamps.dtype)


def observe_stamps(
    stamps: ArrayLike, positions: ArrayLike, psf: PSFKernel, *, subpixel: bool = True
) -> jax.Array:
    r"""Model-frame stamps as observed: convolved with the field's difference kernels and
    shifted by their sub-pixel offsets, in one Fourier transform
    (:func:`madness_ppl.psf.convolve_stamps`).

    Parameters
    ----------
    stamps
        ``(n, B, S, S)`` model-frame stamps.
    positions
        ``(n, 2)`` positions ``(x, y)``; the offsets :math:`p - \lfloor p + 1/2 \rfloor`
        are applied when ``subpixel``.
    psf
        The field's :class:`~madness_ppl.psf.PSFKernel` (grid ``G``).

    Returns
    -------
    jax.Array
        ``(n, B, G, G)`` observed stamps, centred at ``G // 2``.
    """
    stamps = jnp.asarray(stamps)
    positions = jnp.asarray(positions, stamps.dtype)
    shifts = positions - jnp.floor(positions + 0.5) if subpixel else None
    return convolve_stamps(stamps, psf.fourier, shifts=shifts)


def render_image(
    stamps: ArrayLike,
    positions: ArrayLike,
    field_shape: Sequence[int],
    *,
    subpixel: bool = True,
    psf: PSFKernel | None = None,
) -> jax.Array:
    r"""The model image of a field: stamps observed through the PSF and placed.

    .. math::

        m = \sum_i \mathrm{place}\big(K \ast f(z_i),\, p_i\big)

    Without ``psf`` this is :func:`place_stamps`. With it, either :func:`observe_stamps`
    (kernel and sub-pixel shift in one transform per stamp) and placement at the nearest
    pixel, or, when ``psf.field`` holds the kernels' transform on the field's canvas
    (:func:`madness_ppl.psf.with_field_transform`), placement on that model-frame canvas and
    one convolution per band (:func:`madness_ppl.psf.convolve_canvas`); the two agree but for
    the kernel's far tails.

    Parameters
    ----------
    stamps, positions, field_shape, subpixel
        As in :func:`place_stamps`.
    psf
        Optional :class:`~madness_ppl.psf.PSFKernel`.

    Returns
    -------
    jax.Array
        ``(B, H, W)``.
    """
    if psf is None:
        return place_stamps(stamps, positions, field_shape, subpixel=subpixel)
    if psf.field is None:
        observed = observe_stamps(stamps, positions, psf, subpixel=subpixel)
        return place_stamps(observed, positions, field_shape, subpixel=False)
    height, width = (int(n) for n in field_shape)
    canvas_y, canvas_x = psf.field.shape[-2], 2 * (psf.field.shape[-1] - 1)
    if canvas_y < height or canvas_x < width:
        raise ValueError(
            f"the PSF's field transform is for a canvas of {canvas_y}x{canvas_x} pixels, "
            f"smaller than the field ({height}x{width}): build it for this field shape"
        )
    oy, ox = (canvas_y - height) // 2, (canvas_x - width) // 2
    positions = jnp.asarray(positions) + jnp.asarray([ox, oy], jnp.asarray(positions).dtype)
    canvas = place_stamps(stamps, positions, (canvas_y, canvas_x), subpixel=subpixel)
    return convolve_canvas(canvas, psf.field)[:, oy : oy + height, ox : ox + width]


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------
def galaxy_latents(
    name: str,
    distribution: dist.Distribution,
    n_sources: int,
    *,
    source_mask: ArrayLike | None = None,
) -> jax.Array:
    r"""Sample one latent vector per source in the plate ``"sources"``.

    .. math::

        \log p(z) = \sum_{i=1}^{n} m_i \log p(z_i), \qquad m_i \in \{0, 1\}

    Padded sources (``source_mask == False``) contribute nothing to the log density (via
    :func:`numpyro.handlers.mask`), so a fixed-size plate can hold a variable number of
    galaxies (:func:`pad_sources`). Their latents still exist (with zero gradient): multiply
    what they produce by the mask.

    Parameters
    ----------
    name
        Sample site name.
    distribution
        Prior of one source's latent: ``batch_shape == ()``, ``event_shape == (d,)``
        (e.g. ``prior.latent_distribution()``).
    n_sources
        Plate size (static).
    source_mask
        Optional ``(n_sources,)`` booleans, ``True`` for real sources.

    Returns
    -------
    jax.Array
        ``(n_sources, d)``. With ``n_sources == 0`` no site is created (NumPyro plates must be
        non-empty) and an empty ``(0, d)`` array is returned.
    """
    if n_sources == 0:
        # NumPyro plates must be non-empty; with no source there is no latent site at all.
        shape = (0, *distribution.batch_shape, *distribution.event_shape)
        return jnp.zeros(shape, jnp.result_type(float))
    mask_ctx = (
        handlers.mask(mask=jnp.asarray(source_mask, bool))
        if source_mask is not None
        else contextlib.nullcontext()
    )
    with numpyro.plate(SOURCE_PLATE, n_sources), mask_ctx:
        return numpyro.sample(name, distribution)


def default_variance(field: ArrayLike, sky_variance: ArrayLike) -> jax.Array:
    r"""The MADNESS per-pixel variance, :math:`\sigma^2 = \sigma^2_\mathrm{sky} + \max(y, 0)`.

    Parameters
    ----------
    field
        ``(B, H, W)`` electrons.
    sky_variance
        Scalar, per band ``(B,)``, or a full ``(B, H, W)`` map (electrons²: sky level
        plus read noise).

    Returns
    -------
    jax.Array
        ``(B, H, W)``; held fixed during a fit. Non-finite data pixels give non-finite
        variance there: mask them.
    """
    field = jnp.asarray(field)
    return pixel_variance(field, sky_variance, dtype=field.dtype, xp=jnp)


def blend_model(
    field: ArrayLike,
    positions: ArrayLike,
    variance: ArrayLike,
    prior: GalaxyModel,
    *,
    source_mask: ArrayLike | None = None,
    pixel_mask: ArrayLike | None = None,
    subpixel: bool = False,
    model_error: ArrayLike = 0.0,
    psf: PSFKernel | None = None,
) -> None:
    r"""The MADNESS blend: latents from a learned prior, decoded, placed, summed, observed.

    .. math::

        z_i \sim p_\mathrm{flow}(z) \;(i \in \text{sources}),\qquad
        m = \sum_i \mathrm{place}\big(M_i\, f(z_i),\, p_i\big),\qquad
        y \sim \mathcal{N}(m, \sigma^2)

    The MAP of this model is the MADNESS objective

    .. math::

        \hat z = \arg\min_z \sum_{\text{pixels}}
        \frac{(y - m(z))^2}{2 \sigma^2} - \sum_i \log p_\mathrm{flow}(z_i).

    Sites: latent ``"z"`` ``(n, d)`` in plate ``"sources"``; deterministic ``"stamps"``
    (decoded stamps, ``(n, B, S, S)``, zero for padded sources), ``"flux"`` (per-source,
    per-band total flux ``(n, B)``) and ``"model_image"`` ``(B, H, W)``; observed ``"obs"``.

    Parameters
    ----------
    field
        ``(B, H, W)`` electrons (masked pixels may hold anything finite, see
        :func:`prepare_blend`), or ``None`` to *simulate* (NumPyro's ``obs=None``
        convention): ``"obs"`` is then drawn from the likelihood, so
        ``numpyro.infer.Predictive(blend_model, ...)(key, None, positions, variance, prior)``
        gives prior-predictive noisy fields (with ``posterior_samples=``, posterior-predictive
        ones); the image shape is taken from ``variance``.
    positions
        ``(n, 2)`` source centres ``(x, y)``; with ``n = 0`` the model is pure noise.
    variance
        ``(B, H, W)`` electrons², fixed (e.g. :func:`default_variance`).
    prior
        A :class:`~madness_ppl.galaxy_model.GalaxyModel`: ``latent_distribution()`` and
        ``decode(z) -> (..., B, S, S)`` are used (e.g. :class:`madness_ppl.prior.GalaxyPrior`,
        :class:`madness_ppl.toy.LinearGaussianPrior`).
    source_mask
        ``(n,)`` booleans, ``False`` for padding (see :func:`pad_sources`).
    pixel_mask
        Booleans ``(B, H, W)`` or ``(H, W)``, ``False`` for pixels to ignore.
    subpixel
        Place stamps at sub-pixel positions (Fourier shift) rather than the nearest pixel.
    model_error
        Model-error fraction :math:`\epsilon`: the likelihood variance becomes
        :math:`\sigma^2 + (\epsilon\, m)^2`, a per-pixel error proportional to the model for
        what the decoder cannot draw (:func:`madness_ppl.uncertainty.calibrate_model_error`;
        a prior may store one in ``config.metadata["model_error"]["pixel_fraction"]``), a
        scalar or one per band (checked by :func:`~madness_ppl.likelihood.model_error_fraction`
        unless traced). ``0`` (default) is the plain likelihood, unchanged.
    psf
        Difference kernels from the prior's model frame to the field's PSF
        (:func:`madness_ppl.psf.field_kernel`): each decoded stamp is convolved with them
        before it is placed (:func:`render_image`). ``None``: the field has the model frame's
        PSF. The ``"stamps"`` and ``"flux"`` sites stay in the model frame.

    Notes
    -----
    Inputs are *not* validated here (inside ``jit`` they are tracers): call
    :func:`prepare_blend` (or :func:`validate_scene_inputs`) first.
    """
    field = None if field is None else jnp.asarray(field)
    shape = jnp.shape(variance) if field is None else field.shape
    if len(shape) != 3:
        raise ValueError(
            f"the field (or, with field=None, the variance) must be (B, H, W), got shape {shape}"
        )
    positions = jnp.asarray(positions)
    n_sources = positions.shape[0]
    z = galaxy_latents("z", prior.latent_distribution(), n_sources, source_mask=source_mask)
    stamps = prior.decode(z)
    if source_mask is not None:
        stamps = stamps * jnp.asarray(source_mask, stamps.dtype)[:, None, None, None]
    numpyro.deterministic("stamps", stamps)
    numpyro.deterministic("flux", stamps.sum(axis=(-1, -2)))
    image = render_image(stamps, positions, shape[-2:], subpixel=subpixel, psf=psf)
    numpyro.deterministic("model_image", image)
    gaussian_likelihood(
        "obs", image, field, variance, pixel_mask=pixel_mask, model_error=model_error
    )


#: ArviZ dimension names of :func:`blend_model`'s sites, declared on the model as its
#: ``site_dims`` attribute (read by :func:`~madness_ppl.infer.sample_posterior`).
BLEND_SITE_DIMS: dict[str, tuple[str, ...]] = {
    "flux": (SOURCE_PLATE, "band"),
    "stamps": (SOURCE_PLATE, "band", "stamp_y", "stamp_x"),
    "model_image": ("band", "y", "x"),
    "obs": ("band", "y", "x"),
}
blend_model.site_dims = BLEND_SITE_DIMS  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Padding and validation (host side, outside jit)
# --------------------------------------------------------------------------------------------
def bucket_size(n: int) -> int:
    """Plate size for ``n`` sources: ``0, 1, 2, 4``, then the next even number up to 32, the
    next multiple of 4 up to 64, then the next multiple of 8.

    Bucketing bounds the number of compiled programs when fields hold different numbers of
    galaxies (the persistent compilation cache keeps them across processes), while the padded
    sources, which cost as much as real ones in every step (the step time is linear in the
    plate size: 1.7-1.8 ms per source for the shipped decoder's gradient on one CPU core), stay
    few: at most 1 between 5 and 32 sources (measured LSST fields hold 8-30), 3 up to 64, 7
    beyond. Buckets of 4 (the rule before) cost 23 % more per step for 13 sources on 16 slots.

    >>> [bucket_size(n) for n in (0, 1, 3, 5, 8, 9, 17, 20, 33, 65)]
    [0, 1, 4, 6, 8, 10, 18, 20, 36, 72]
    """
    if n < 0:
        raise MadnessInputError(f"number of sources must be >= 0, got {n}")
    if n <= 4:
        return 0 if n == 0 else 1 << (n - 1).bit_length()
    if n <= 32:
        return 2 * math.ceil(n / 2)
    if n <= 64:
        return 4 * math.ceil(n / 4)
    return 8 * math.ceil(n / 8)


def pad_sources(
    positions: ArrayLike,
    n_max: int | None = None,
    *,
    fill: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad positions to a fixed plate size and return the matching source mask.

    Parameters
    ----------
    positions
        ``(n, 2)`` positions ``(x, y)``.
    n_max
        Plate size; default :func:`bucket_size` ``(n)``. Must be ``>= n``.
    fill
        Coordinate given to padded sources (``0.0``: pixel (0, 0), inside any field).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Padded positions ``(n_max, 2)`` and ``source_mask`` ``(n_max,)`` (``True`` for the
        first ``n`` entries).

    >>> pos, mask = pad_sources([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> pos.shape, mask.tolist()
    ((4, 2), [True, True, True, False])
    """
    positions = np.asarray(positions, dtype=float)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise MadnessInputError(f"positions must have shape (n, 2), got {positions.shape}")
    n = positions.shape[0]
    size = bucket_size(n) if n_max is None else int(n_max)
    if size < n:
        raise MadnessInputError(f"n_max={size} is smaller than the number of sources {n}")
    padded = np.full((size, 2), fill, dtype=positions.dtype)
    padded[:n] = positions
    mask = np.zeros(size, dtype=bool)
    mask[:n] = True
    return padded, mask


def _band_label(b: int, prior: GalaxyModel | None) -> str:
    """``"band 'y' (plane 5 of the prior's bands)"``: a band named, not just an index."""
    bands = getattr(prior, "bands", None)
    if bands is not None and 0 <= b < len(bands):
        return f"band {bands[b]!r} (plane {b} in the prior's band order {tuple(bands)})"
    return f"plane {b}"


def validate_scene_inputs(
    field: ArrayLike,
    positions: ArrayLike,
    variance: ArrayLike,
    prior: GalaxyModel | None = None,
    *,
    source_mask: ArrayLike | None = None,
    pixel_mask: ArrayLike | None = None,
    mask_nonfinite: bool = True,
) -> np.ndarray | None:
    """Check a blend's inputs and return the effective pixel mask.

    Call this on the host, outside ``jit``. Raises :class:`ValueError` with a precise message
    for:

    * ``field`` not 3-D ``(B, H, W)``; ``B`` different from ``len(prior.bands)``;
    * ``variance`` (or ``pixel_mask``) of a shape that does not match the field;
    * NaN/inf pixels in ``field`` not covered by ``pixel_mask`` -- unless ``mask_nonfinite``
      (default), in which case they are added to the mask;
    * non-positive or non-finite ``variance`` in unmasked pixels;
    * ``positions`` not ``(n, 2)``, non-finite, or outside the field. The field covers pixel
      centres ``0 .. W-1`` and their half-pixel borders: ``-0.5 <= x < W - 0.5`` and
      ``-0.5 <= y < H - 0.5``; a source on the last row/column is fine. Padded sources
      (``source_mask == False``) are not checked.

    Zero sources (``positions.shape == (0, 2)``) is allowed: the model is then pure noise.

    Parameters
    ----------
    field, positions, variance, prior, source_mask, pixel_mask
        As in :func:`blend_model`; ``prior`` may be ``None`` to skip the band check.
    mask_nonfinite
        Mask NaN/inf data pixels automatically instead of raising.

    Returns
    -------
    numpy.ndarray or None
        Boolean ``(B, H, W)`` pixel mask (``True`` = use), or ``None`` when every pixel is
        used and no mask was given.
    """
    for label, value in (("field", field), ("positions", positions), ("variance", variance)):
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"validate_scene_inputs needs concrete arrays; {label} is a tracer")
    field = np.asarray(field)
    if field.ndim != 3:
        raise MadnessInputError(
            f"field must be 3-D (bands, height, width), got shape {field.shape}"
        )
    n_bands, height, width = field.shape
    if prior is not None and hasattr(prior, "bands"):
        n_prior = len(prior.bands)
        if n_prior != n_bands:
            raise MadnessInputError(
                f"field has {n_bands} bands but the prior has {n_prior} ({tuple(prior.bands)})"
            )
    variance = np.asarray(variance)
    if variance.shape != field.shape:
        raise MadnessInputError(
            f"variance shape {variance.shape} does not match field shape {field.shape}"
        )
    if pixel_mask is None:
        mask = np.ones(field.shape, dtype=bool)
    else:
        pm = np.asarray(pixel_mask, dtype=bool)
        if pm.shape not in (field.shape, field.shape[1:]):
            raise MadnessInputError(
                f"pixel_mask shape {pm.shape} must be {field.shape} or {field.shape[1:]}"
            )
        mask = np.broadcast_to(pm, field.shape).copy()
    bad_data = mask & ~np.isfinite(field)
    if bad_data.any():
        if not mask_nonfinite:
            b, i, j = np.argwhere(bad_data)[0]
            raise MadnessInputError(
                f"field has {int(bad_data.sum())} NaN/inf pixels not covered by pixel_mask "
                f"(first at {_band_label(b, prior)}, row {i}, column {j}); mask them or pass "
                "mask_nonfinite=True"
            )
        mask &= np.isfinite(field)
    bad_var = mask & ~(np.isfinite(variance) & (variance > 0))
    if bad_var.any():
        b, i, j = np.argwhere(bad_var)[0]
        raise MadnessInputError(
            f"variance must be finite and > 0 in unmasked pixels; {int(bad_var.sum())} are not "
            f"(first at {_band_label(b, prior)}, row {i}, column {j}: {variance[b, i, j]!r})"
        )

    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise MadnessInputError(
            f"positions must have shape (n_sources, 2) as (x, y), got {positions.shape}"
        )
    active = np.ones(positions.shape[0], bool)
    if source_mask is not None:
        active = np.asarray(source_mask, dtype=bool)
        if active.shape != (positions.shape[0],):
            raise MadnessInputError(
                f"source_mask shape {active.shape} does not match {positions.shape[0]} sources"
            )
    for i in np.flatnonzero(active):
        x, y = positions[i]
        if not (np.isfinite(x) and np.isfinite(y)):
            raise MadnessInputError(f"source {i} has a non-finite position (x={x}, y={y})")
        if not (-0.5 <= x < width - 0.5 and -0.5 <= y < height - 0.5):
            raise MadnessInputError(
                f"source {i} at (x={x}, y={y}) is outside the field: need -0.5 <= x < "
                f"{width - 0.5} and -0.5 <= y < {height - 0.5} (W={width}, H={height})"
            )
    if pixel_mask is None and mask.all():
        return None
    return mask


class BlendInputs(NamedTuple):
    """Validated, cleaned inputs of :func:`blend_model`.

    Use as ``fit_map(blend_model, *inputs.args, **inputs.kwargs)``.
    """

    field: jax.Array
    positions: jax.Array
    variance: jax.Array
    prior: GalaxyModel
    source_mask: jax.Array | None
    pixel_mask: jax.Array | None

    @property
    def args(self) -> tuple:
        """Positional arguments of :func:`blend_model`."""
        return (self.field, self.positions, self.variance, self.prior)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`blend_model` (the masks)."""
        return {"source_mask": self.source_mask, "pixel_mask": self.pixel_mask}


def prepare_blend(
    field: ArrayLike,
    positions: ArrayLike,
    variance: ArrayLike,
    prior: GalaxyModel,
    *,
    source_mask: ArrayLike | None = None,
    pixel_mask: ArrayLike | None = None,
    mask_nonfinite: bool = True,
    pad: bool | int = False,
) -> BlendInputs:
    """Validate and clean a blend's inputs on the host, ready for a jitted fit.

    Runs :func:`validate_scene_inputs`, replaces masked data by 0 and masked variance by 1
    (so the arrays are finite everywhere), and optionally pads the sources.

    Parameters
    ----------
    field, positions, variance, prior, source_mask, pixel_mask, mask_nonfinite
        See :func:`validate_scene_inputs`.
    pad
        ``False``: keep ``n`` sources; ``True``: pad to :func:`bucket_size` ``(n)``;
        an ``int``: pad to that plate size. Padding sets ``source_mask``.

    Returns
    -------
    BlendInputs
    """
    mask = validate_scene_inputs(
        field,
        positions,
        variance,
        prior,
        source_mask=source_mask,
        pixel_mask=pixel_mask,
        mask_nonfinite=mask_nonfinite,
    )
    field = np.asarray(field)
    variance = np.asarray(variance)
    if mask is not None:
        field = np.where(mask, field, 0.0).astype(field.dtype)
        variance = np.where(mask, variance, 1.0).astype(variance.dtype)
    positions = np.asarray(positions)
    smask = None if source_mask is None else np.asarray(source_mask, bool)
    if pad is not False:
        n_real = positions.shape[0]
        n_max = None if pad is True else int(pad)
        positions, new_mask = pad_sources(positions, n_max)
        if smask is not None:
            new_mask[:n_real] &= smask
        smask = new_mask
    dtype = jnp.asarray(field).dtype
    return BlendInputs(
        field=jnp.asarray(field),
        positions=jnp.asarray(positions, dtype),
        variance=jnp.asarray(variance),
        prior=prior,
        source_mask=None if smask is None else jnp.asarray(smask),
        pixel_mask=None if mask is None else jnp.asarray(mask),
    )
