r"""Point sources (stars) in a blend: the PSF times free band fluxes, in a galaxy's latent slot.

A source marked as a point source keeps its ``(d,)`` slot of the source plate, so the fit,
the Newton refinement and the Laplace errors treat every source alike. Its first ``B``
elements :math:`u_b` are its band fluxes in units of its own flux noise,

.. math::

    F_b = u_b\, \sigma_b, \qquad
    \sigma_b = \Big(\sum_p O_b(p)^2\, w_b(p)\Big)^{-1/2}, \qquad
    s_b = F_b\, R_b,

with :math:`R` the prior's model-frame PSF (unit sum; the field's difference kernels bring it
to the field's PSF :math:`O = K \ast R` like any stamp), :math:`w` the pixel weights
(inverse variance, 0 where masked) around the source and :math:`\sigma_b` the error of the
PSF-fitted flux of an isolated point source: the likelihood's curvature along each
:math:`u_b` is 1 at any brightness, so the slot needs no preconditioning. The next two
elements :math:`v` are the star's offset from the pixel it is placed on,
:math:`\delta = v\, \sigma_\delta` pixels (a Fourier shift of :math:`R`, exact for a
Nyquist-sampled PSF), in units of its expected error
:math:`\sigma_\delta = (\sum_b F_b^2 \sum_p |\nabla O_b|^2 w_b / 2)^{-1/2}` at the
PSF-fitted start fluxes (clipped to [1e-4, 1] pixel): a bright star's centre is known to a
small fraction of a pixel and a galaxy decoder can absorb a sub-pixel offset in its latents,
but a PSF cannot. The prior is :math:`u_b \sim \mathcal N(0, 10^{12})` (flat for any S/N
below ~1e6; fluxes may go negative, the unbiased linear estimate of a faint star),
:math:`\delta \sim \mathcal N(0, 1)` pixel per axis, and the remaining :math:`d - B - 2`
elements, which draw nothing, :math:`\sim \mathcal N(0, 1)`: they sit at 0.

Why in a galaxy's slot rather than a separate site: the plate of ``(n, d)`` latents is what
:func:`~madness_ppl.infer.fit_map`, :func:`~madness_ppl.refine.newton_refine` and
:func:`~madness_ppl.uncertainty.laplace_flux_errors` are built on; a source's kind then is
one boolean per slot and a batch of fields keeps one program per source-count bucket.

Why one module of ~500 lines: everything a star needs (its drawing, its prior, its lone fit
that starts it, its slots in a batch, its fitted centre) is here, so that the scene, the
refinement, the errors and the pipeline each take one optional argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.typing import ArrayLike
from numpyro.distributions import constraints

from madness_ppl.cutouts import extract_cutouts, nearest_pixel
from madness_ppl.errors import MadnessInputError
from madness_ppl.galaxy_model import GalaxyModel
from madness_ppl.likelihood import inverse_variance
from madness_ppl.psf import PSFKernel, convolve_stamps

__all__ = [
    "FLUX_WIDTH",
    "PointSources",
    "batch_point_masks",
    "batch_point_sources",
    "decode_sources",
    "pad_points",
    "per_source",
    "point_image",
    "point_mask",
    "point_sources",
    "point_start",
    "source_latents",
    "source_log_prob",
    "star_centres",
    "start_point_slots",
]

#: Prior width of a point source's fluxes in units of their noise, :math:`u_b`.
FLUX_WIDTH = 1e6


class PointSources(NamedTuple):
    r"""Which sources of a plate are point sources, and how their slots draw them.

    Attributes
    ----------
    mask
        ``(n,)`` booleans, ``True`` for a point source.
    scale
        ``(n, B + 1)``: :math:`\sigma_b`, electrons per unit of :math:`u_b`, and
        :math:`\sigma_\delta`, pixels per unit of :math:`v` (all 1 for galaxies).
    image
        ``(B, S, S)`` the prior's model-frame PSF (unit sum per band).
    width
        Its Gaussian :math:`s` in pixels when it is one (:func:`gaussian_width`), else NaN.
    """

    mask: ArrayLike
    scale: ArrayLike
    image: ArrayLike
    width: ArrayLike = float("nan")


def _shifted_psf(points: PointSources, offset: jax.Array) -> jax.Array:
    r"""``(..., n, B, S, S)`` the model-frame PSF moved by ``offset`` ``(..., n, 2)`` pixels.

    A Gaussian model frame (``width`` :math:`s` finite; the reference frame of PSF-aware
    priors is undersampled, FWHM 1.5 pixels, so a Fourier shift would ring across the stamp)
    is drawn at its new centre, pixel-integrated:
    :math:`R(x, y) = g(x - \delta_x)\, g(y - \delta_y)`,
    :math:`g(t) = \Phi((t + 1/2) / s) - \Phi((t - 1/2) / s)`. Another (e.g. a survey's
    Nyquist-sampled PSF) is shifted in Fourier space.
    """
    image = jnp.asarray(points.image, offset.dtype)
    n_bands, size = image.shape[-3], image.shape[-1]
    width = jnp.asarray(points.width, offset.dtype)
    gaussian = jnp.isfinite(width)
    s = jnp.where(gaussian, width, 1.0)
    grid = jnp.arange(size, dtype=offset.dtype) - size // 2

    def profile(shift: jax.Array) -> jax.Array:  # (..., n) -> (..., n, S), unit sum
        t = grid - shift[..., None]
        g = jax.scipy.special.ndtr((t + 0.5) / s) - jax.scipy.special.ndtr((t - 0.5) / s)
        return g / jnp.sum(g, -1, keepdims=True)

    drawn = profile(offset[..., 1])[..., :, None] * profile(offset[..., 0])[..., None, :]
    drawn = jnp.broadcast_to(drawn[..., None, :, :], (*offset.shape[:-1], n_bands, size, size))
    shift_only = jnp.ones((n_bands, size, size // 2 + 1), jnp.complex64)
    moved = convolve_stamps(jnp.broadcast_to(image, drawn.shape), shift_only, shifts=offset)
    return jnp.where(gaussian, drawn, moved)


def _split(z: jax.Array, mask: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The point mask broadcast on ``z`` ``(..., n, d)`` and ``z`` with the other kind's slots
    zeroed, so that neither branch sees the other's values (a flow given a star's
    :math:`u \sim 10^4`, or a star given a galaxy's latents, could overflow, and
    ``jnp.where`` passes a non-finite gradient of the branch it does not take)."""
    mask = jnp.asarray(mask, bool)[..., None]
    return mask, jnp.where(mask, 0.0, z), jnp.where(mask, z, 0.0)


def decode_sources(prior: GalaxyModel, z: ArrayLike, points: PointSources | None) -> jax.Array:
    r"""Model-frame stamps ``(..., n, B, S, S)`` of the sources at latents ``z`` ``(..., n, d)``:
    ``prior.decode`` for galaxies, :math:`u_b \sigma_b R_b` shifted by :math:`v \sigma_\delta`
    for point sources; ``prior.decode(z)`` when ``points`` is ``None``."""
    z = jnp.asarray(z)
    if points is None:
        return prior.decode(z)
    mask, galaxy_z, point_z = _split(z, points.mask)
    n_bands = jnp.shape(points.image)[-3]
    scale = jnp.asarray(points.scale, z.dtype)
    flux = point_z[..., :n_bands] * scale[..., :n_bands]
    offset = point_z[..., n_bands : n_bands + 2] * scale[..., n_bands:]
    stars = flux[..., None, None] * _shifted_psf(points, offset)
    return jnp.where(mask[..., None, None], stars, prior.decode(galaxy_z))


def _point_log_prob(u: jax.Array, scale: jax.Array, n_bands: int) -> jax.Array:
    r""":math:`\log p(u)` of a point source's slot ``(..., d)``, up to a constant."""
    flux = u[..., :n_bands] / FLUX_WIDTH
    offset = u[..., n_bands : n_bands + 2] * scale[..., n_bands:]
    unused = u[..., n_bands + 2 :]
    return -0.5 * sum(jnp.sum(part**2, -1) for part in (flux, offset, unused))


def source_log_prob(prior: GalaxyModel, z: ArrayLike, points: PointSources | None) -> jax.Array:
    r""":math:`\log p(z_i)` of each source, ``(..., n)``: the flow for galaxies, the point prior
    (module docstring) for point sources. Also for one source under ``vmap``
    (:func:`per_source`)."""
    z = jnp.asarray(z)
    if points is None:
        return prior.log_prob(z)
    mask, galaxy_z, point_z = _split(z, points.mask)
    scale = jnp.asarray(points.scale, z.dtype)
    n_bands = jnp.shape(points.image)[-3]
    return jnp.where(
        mask[..., 0], _point_log_prob(point_z, scale, n_bands), prior.log_prob(galaxy_z)
    )


def per_source(function, z: jax.Array, points: PointSources | None) -> jax.Array:
    """``function(z_i, points_i)`` of each source ``i``, vmapped: ``points_i`` holds source
    ``i``'s mask and scale (the image is shared), ``None`` without point sources."""
    if points is None:
        return jax.vmap(lambda zi: function(zi, None))(z)
    return jax.vmap(function, in_axes=(0, PointSources(0, 0, None, None)))(z, points)


class _SourceLatents(dist.Distribution):
    """The latents of a plate of ``n`` sources of two kinds (:func:`source_latents`)."""

    support = constraints.real_vector

    def __init__(self, prior: GalaxyModel, points: PointSources, latent_dim: int):
        self.prior, self.points = prior, points
        n = jnp.shape(points.mask)[-1]
        super().__init__(batch_shape=(n,), event_shape=(latent_dim,))

    def sample(self, key: jax.Array, sample_shape: tuple = ()) -> jax.Array:
        galaxy_key, point_key = jax.random.split(key)
        shape = tuple(sample_shape) + self.batch_shape
        galaxies = self.prior.latent_distribution().sample(galaxy_key, shape)
        stars = jax.random.normal(point_key, shape + self.event_shape)  # fluxes ~ their noise
        return jnp.where(jnp.asarray(self.points.mask, bool)[..., None], stars, galaxies)

    def log_prob(self, value: ArrayLike) -> jax.Array:
        return source_log_prob(self.prior, value, self.points)


def source_latents(prior: GalaxyModel, points: PointSources | None) -> dist.Distribution:
    r"""The plate's latent distribution: ``prior.latent_distribution()`` without point sources,
    else one whose :math:`\log p` is :func:`source_log_prob` (batch shape ``(n,)``; a draw is
    a flow draw for a galaxy and unit-normal slots, fluxes at the noise level, for a star)."""
    if points is None:
        return prior.latent_distribution()
    return _SourceLatents(prior, points, prior.latent_dim)


def pad_points(points: PointSources | None, plate: int) -> PointSources | None:
    """``points`` of ``n`` sources padded to a plate of ``plate`` (padding: galaxies, scale 1)."""
    if points is None:
        return None
    mask = np.zeros(plate, bool)
    scale = np.ones((plate, np.shape(points.scale)[-1]), np.float32)
    n = len(np.asarray(points.mask))
    mask[:n], scale[:n] = np.asarray(points.mask), np.asarray(points.scale)
    return PointSources(mask, scale, np.asarray(points.image, np.float32), points.width)


def point_mask(selection: ArrayLike | None, n_sources: int) -> np.ndarray:
    """``(n,)`` booleans from a user's ``point_sources``: booleans, or indices of the positions.

    Raises
    ------
    MadnessInputError
        Wrong length, an index out of range or repeated, or a non-integer index.
    """
    if selection is None:
        return np.zeros(n_sources, bool)
    values = np.asarray(selection)
    if values.dtype == bool:
        if values.shape != (n_sources,):
            raise MadnessInputError(
                f"point_sources as booleans must have one per source ({n_sources}), got shape "
                f"{values.shape}",
                values.shape,
            )
        return values.copy()
    values = values.reshape(-1)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise MadnessInputError(
            f"point_sources must be booleans or integer indices of the positions, got {values}",
            values,
        )
    bad = values[(values < 0) | (values >= n_sources)]
    if bad.size:
        raise MadnessInputError(
            f"point_sources indices {bad.tolist()} are outside 0..{n_sources - 1} (the positions)",
            bad,
        )
    if len(np.unique(values)) != len(values):
        raise MadnessInputError(f"point_sources repeats an index: {values.tolist()}", values)
    mask = np.zeros(n_sources, bool)
    mask[values] = True
    return mask


def _observed_psf(image: np.ndarray, psf: PSFKernel | None) -> np.ndarray:
    """``(B, G, G)`` the model-frame PSF as the field sees it (through the kernels)."""
    if psf is None:
        return np.asarray(image, np.float64)
    return np.asarray(convolve_stamps(jnp.asarray(image, jnp.float32), psf.fourier), np.float64)


def point_image(prior: GalaxyModel) -> np.ndarray:
    """``(B, S, S)`` the prior's model-frame PSF (unit sum), what a point source's slot draws.

    Raises
    ------
    MadnessInputError
        The prior has no model-frame PSF (:meth:`~madness_ppl.prior.GalaxyPrior.reference_psf`
        is ``None`` or missing): a point source cannot be drawn with it.
    """
    reference = getattr(prior, "reference_psf", lambda: None)()
    if reference is None:
        raise MadnessInputError(
            "this prior's model frame has no PSF (unknown survey, no reference FWHM): point "
            "sources cannot be drawn with it",
            type(prior).__name__,
        )
    return np.asarray(reference, np.float32)


def _lone_star_fit(
    observed: np.ndarray, field: ArrayLike, weight: ArrayLike, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Each star fitted alone on its cutout: fluxes ``(k, B)``, offset ``(k, 2)`` from its
    nearest pixel and information :math:`\sum_p O_\delta^2 w` ``(k, B)``.

    Gauss-Newton on the offset :math:`\delta` with the fluxes solved linearly at each one
    (:math:`F_b = \sum O_\delta y w / \sum O_\delta^2 w`), from the sub-pixel part of the
    given position, steps clipped to half a pixel, :math:`|\delta| \le 1.5`: a start the joint
    fit can finish (its offset is in units of a bright star's centring error, ~1e-4 pixel, so
    a detection's 0.3-pixel error would be thousands of units away)."""
    grid = observed.shape[-1]
    cutout_w = extract_cutouts(weight, positions, grid).astype(np.float64)
    cutout_y = extract_cutouts(np.nan_to_num(np.asarray(field, np.float64)), positions, grid)
    transform = np.fft.rfft2(np.fft.ifftshift(observed, axes=(-2, -1)))
    ky = np.fft.fftfreq(grid)[:, None]
    kx = np.fft.rfftfreq(grid)[None, :]

    def psf_at(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        phase = np.exp(-2j * np.pi * (kx * delta[:, 0, None, None] + ky * delta[:, 1, None, None]))
        moved = transform[None] * phase[:, None]
        back = lambda t: np.fft.fftshift(np.fft.irfft2(t, s=(grid, grid)), axes=(-2, -1))  # noqa: E731
        return back(moved), back(moved * (-2j * np.pi * kx)), back(moved * (-2j * np.pi * ky))

    def fluxes(psf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # linear in the fluxes
        information = np.einsum("nbyx,nbyx->nb", cutout_w, psf**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.where(
                information > 0, (cutout_w * cutout_y * psf).sum((-1, -2)) / information, 0.0
            )
        return flux, information

    pixels = np.asarray(positions, np.float64)
    delta = pixels - np.floor(pixels + 0.5)
    for _ in range(8):
        psf, d_x, d_y = psf_at(delta)
        flux, _ = fluxes(psf)
        residual = cutout_y - flux[..., None, None] * psf
        # d model / d delta: the phase ramp's derivative, F (-2 pi i k) O_delta, back in space
        jac = flux[:, None, :, None, None] * np.stack([d_x, d_y], axis=1)
        normal = np.einsum("nibyx,njbyx,nbyx->nij", jac, jac, cutout_w)
        gradient = np.einsum("nibyx,nbyx->ni", jac, cutout_w * residual)
        normal += 1e-9 * np.eye(2) * np.trace(normal, axis1=1, axis2=2)[
            :, None, None
        ] + 1e-12 * np.eye(2)
        step = np.clip(np.linalg.solve(normal, gradient[..., None])[..., 0], -0.5, 0.5)
        delta = np.clip(delta + step, -1.5, 1.5)
    flux, information = fluxes(psf_at(delta)[0])
    return flux, delta, information


def gaussian_width(prior: GalaxyModel) -> float:
    """:math:`s` (pixels) of the prior's model-frame PSF when it is the reference Gaussian
    (``config.reference_fwhm_pixels``), else NaN."""
    fwhm = getattr(getattr(prior, "config", None), "reference_fwhm_pixels", None)
    return float("nan") if fwhm is None else float(fwhm) / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def point_sources(
    prior: GalaxyModel,
    mask: ArrayLike,
    positions: ArrayLike,
    field: ArrayLike,
    weight: ArrayLike,
    *,
    psf: PSFKernel | None = None,
) -> PointSources:
    r""":class:`PointSources` of one field: each point source's flux noise :math:`\sigma_b` and
    offset unit :math:`\sigma_\delta` (module docstring) from the pixel weights around it, its
    PSF-fitted fluxes and the PSF as observed.

    Parameters
    ----------
    prior
        The galaxy prior; :func:`point_image` is its model-frame PSF.
    mask
        ``(n,)`` booleans (:func:`point_mask`).
    positions
        ``(n, 2)`` positions ``(x, y)``.
    field
        ``(B, H, W)`` data (NaN where masked).
    weight
        ``(B, H, W)`` inverse variance, 0 where masked.
    psf
        The field's difference kernels, ``None`` in the model frame.

    Raises
    ------
    MadnessInputError
        The prior has no model-frame PSF or too few latents for a star's fluxes and offset,
        or a point source has no unmasked pixel in a band.
    """
    return _star_fit(prior, mask, positions, field, weight, psf)[0]


def _star_fit(
    prior: GalaxyModel,
    mask: ArrayLike,
    positions: ArrayLike,
    field: ArrayLike,
    weight: ArrayLike,
    psf: PSFKernel | None,
) -> tuple[PointSources, np.ndarray]:
    """:func:`point_sources` and the stars' starting slots ``(k, d)`` (:func:`point_start`),
    from one lone-star fit."""
    mask = np.asarray(mask, bool)
    image = point_image(prior)
    n_bands = image.shape[0]
    latent_dim = prior.latent_dim
    if latent_dim < n_bands + 2:
        raise MadnessInputError(
            f"a point source needs {n_bands + 2} latent elements (its {n_bands} fluxes and an "
            f"offset); this prior has {latent_dim}",
            latent_dim,
        )
    scale = np.ones((len(mask), n_bands + 1))
    start = np.zeros((int(mask.sum()), latent_dim), np.float32)
    if mask.any():
        observed = _observed_psf(image, psf)
        flux, offset, information = _lone_star_fit(
            observed, field, weight, np.asarray(positions, np.float64)[mask]
        )
        if np.any(information <= 0):
            rows, bands = np.nonzero(information <= 0)
            raise MadnessInputError(
                f"point source(s) {np.flatnonzero(mask)[rows].tolist()} have no unmasked pixel "
                f"in band index(es) {bands.tolist()}: their flux cannot be measured there",
                rows,
            )
        gy, gx = np.gradient(observed, axis=(-2, -1))
        slope = np.einsum(
            "nbyx,byx->nb",
            extract_cutouts(weight, np.asarray(positions)[mask], observed.shape[-1]),
            (gx**2 + gy**2) / 2,
        )
        offset_information = np.sum(flux**2 * slope, axis=-1)
        with np.errstate(divide="ignore"):
            offset_unit = np.clip(1.0 / np.sqrt(offset_information), 1e-4, 1.0)
        scale[mask] = np.column_stack([1.0 / np.sqrt(information), offset_unit])
        start = _slots(flux, offset, scale.astype(np.float32)[mask], latent_dim)
    return PointSources(mask, scale.astype(np.float32), image, gaussian_width(prior)), start


def point_start(
    points: PointSources,
    field: ArrayLike,
    positions: ArrayLike,
    weight: ArrayLike,
    latent_dim: int,
    *,
    psf: PSFKernel | None = None,
) -> np.ndarray:
    r"""Starting slots ``(k, d)`` of the ``k`` point sources: the PSF fit of each one alone
    (fluxes and offset, ``_lone_star_fit``) in the slot's units,
    :math:`u_b = F_b / \sigma_b`, :math:`v = \delta / \sigma_\delta` (the other elements 0)."""
    mask = np.asarray(points.mask, bool)
    if not mask.any():
        return np.zeros((0, latent_dim), np.float32)
    observed = _observed_psf(np.asarray(points.image), psf)
    pixels = np.asarray(positions, np.float64)[mask]
    flux, offset, _ = _lone_star_fit(observed, field, weight, pixels)
    return _slots(flux, offset, np.asarray(points.scale)[mask], latent_dim)


def _slots(flux: np.ndarray, offset: np.ndarray, scale: np.ndarray, latent_dim: int) -> np.ndarray:
    """Slots ``(k, d)`` holding fluxes ``(k, B)`` and offsets ``(k, 2)`` in their units
    ``scale`` ``(k, B + 1)`` (the other elements 0)."""
    scale = np.asarray(scale, np.float64)
    n_bands = flux.shape[-1]
    start = np.zeros((len(flux), latent_dim), np.float32)
    start[:, :n_bands] = flux / scale[:, :n_bands]
    start[:, n_bands : n_bands + 2] = offset / scale[:, n_bands:]
    return start


def star_centres(points: PointSources, z: ArrayLike, positions: ArrayLike) -> tuple:
    """The fitted centres ``(x, y)`` of the point sources: each one's pixel
    (:func:`~madness_ppl.cutouts.nearest_pixel`) plus its offset :math:`v \\sigma_\\delta`."""
    mask = np.asarray(points.mask, bool)
    n_bands = np.shape(points.image)[-3]
    slots = np.asarray(z, np.float64)[: len(mask)][mask]
    offset = slots[:, n_bands : n_bands + 2] * np.asarray(points.scale, np.float64)[mask, n_bands:]
    centre = nearest_pixel(np.asarray(positions)[mask]) + offset
    return centre[:, 0], centre[:, 1]


def batch_point_masks(
    point_sources: Sequence[ArrayLike | None] | None, positions: Sequence[np.ndarray]
) -> list[np.ndarray] | None:
    """Each field's ``(N_k,)`` point-source booleans (:func:`point_mask` of each entry of a
    batch's ``point_sources``), or ``None`` when no field has one."""
    if point_sources is None:
        return None
    if len(point_sources) != len(positions):
        raise MadnessInputError(
            f"point_sources has {len(point_sources)} entries for {len(positions)} fields",
            len(point_sources),
        )
    masks = [
        point_mask(p, len(np.asarray(q).reshape(-1, 2)))
        for p, q in zip(point_sources, positions, strict=True)
    ]
    return masks if any(m.any() for m in masks) else None


def batch_point_sources(
    prior: GalaxyModel,
    fields: np.ndarray,
    variances: np.ndarray,
    positions: Sequence[np.ndarray],
    points: list[np.ndarray] | None,
    psf: PSFKernel | None,
) -> tuple[list[PointSources | None], list[np.ndarray | None]]:
    """Each field's :class:`PointSources` (:func:`point_sources`) and its stars' starting
    slots (:func:`point_start`), from one lone-star fit per field; all ``None`` when no field
    has a point source (the galaxy-only program)."""
    if points is None:
        return [None] * len(fields), [None] * len(fields)
    fitted = [
        _star_fit(prior, m, p, f, inverse_variance(v, np.isfinite(f)), psf)
        for f, v, p, m in zip(fields, variances, positions, points, strict=True)
    ]
    return [star for star, _ in fitted], [start for _, start in fitted]


def start_point_slots(
    stars: list[PointSources | None],
    starts: list[np.ndarray | None],
    z_init: np.ndarray,
    scales: np.ndarray,
) -> None:
    """Put each field's point sources' starting slots (:func:`batch_point_sources`) into a
    batch's starting latents ``z_init`` ``(K, plate, d)``, with unit latent scales in
    ``scales`` (in place)."""
    for i, (points, start) in enumerate(zip(stars, starts, strict=True)):
        if points is None or not np.any(points.mask):
            continue
        mask = np.asarray(points.mask)
        z_init[i, : len(mask)][mask] = start
        scales[i, : len(mask)][mask] = 1.0
