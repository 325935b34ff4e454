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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.typing import ArrayLike
from numpyro import handlers

from madness_ppl.blend_inputs import (
    BlendInputs,
    bucket_size,
    pad_sources,
    prepare_blend,
    validate_scene_inputs,
)
from madness_ppl.galaxy_model import GalaxyModel
from madness_ppl.likelihood import gaussian_likelihood, pixel_variance
from madness_ppl.point_sources import (
    PointSources,
    decode_sources,
    gaussian_width,
    point_image,
    source_latents,
)
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
    "sky_background",
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


def sky_background(name: str, scale: ArrayLike) -> jax.Array:
    r"""A constant sky level per band, a latent site for scenes whose background is not zero.

    .. math::

        s_b \sim \mathcal{N}(0, \tau_b^2), \qquad m_{bp} \mathrel{+}= s_b

    Parameters
    ----------
    name
        Name of the sample site.
    scale
        ``(B,)`` prior widths :math:`\tau_b` (electrons per pixel), e.g. the pixel noise: a
        sky left over by a background subtraction is a fraction of it, and the likelihood
        of :math:`N` pixels measures it to :math:`\sigma/\sqrt N`.

    Returns
    -------
    jax.Array
        ``(B,)`` sky levels, to add to the model image.
    """
    scale = jnp.asarray(scale)
    return numpyro.sample(name, dist.Normal(jnp.zeros_like(scale), scale).to_event(1))


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
    sky_scale: ArrayLike | None = None,
    point_sources: ArrayLike | None = None,
    point_scale: ArrayLike | None = None,
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
    per-band total flux ``(n, B)``) and ``"model_image"`` ``(B, H, W)``; observed ``"obs"``;
    with ``sky_scale``, latent ``"sky"`` ``(B,)``.

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
    sky_scale
        With ``(B,)`` prior widths, a constant sky level per band is fitted too
        (:func:`sky_background`, latent site ``"sky"``), for fields whose background was not
        subtracted exactly; ``"model_image"`` then includes it. ``None`` (default): no sky.
    point_sources, point_scale
        ``(n,)`` booleans and ``(n, B)`` flux units :math:`\sigma_b`
        (:func:`~madness_ppl.point_sources.point_sources` computes both): the marked sources
        are stars, the prior's model-frame PSF times free band fluxes held in their latent
        slots (:mod:`madness_ppl.point_sources`). ``None`` (default): every source is a
        galaxy.

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
    points = None
    if point_sources is not None:
        points = PointSources(point_sources, point_scale, point_image(prior), gaussian_width(prior))
    z = galaxy_latents("z", source_latents(prior, points), n_sources, source_mask=source_mask)
    stamps = decode_sources(prior, z, points)
    if source_mask is not None:
        stamps = stamps * jnp.asarray(source_mask, stamps.dtype)[:, None, None, None]
    numpyro.deterministic("stamps", stamps)
    numpyro.deterministic("flux", stamps.sum(axis=(-1, -2)))
    image = render_image(stamps, positions, shape[-2:], subpixel=subpixel, psf=psf)
    if sky_scale is not None:
        sky = sky_background("sky", jnp.broadcast_to(jnp.asarray(sky_scale), shape[:1]))
        image = image + sky[:, None, None]
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
    "sky": ("band",),
}
blend_model.site_dims = BLEND_SITE_DIMS  # type: ignore[attr-defined]
