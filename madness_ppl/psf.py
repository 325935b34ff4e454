r"""Point-spread functions and the model frame: the galaxy prior draws galaxies at a narrow
*reference* PSF :math:`R_b`; the scene convolves each band with the difference kernel
:math:`K_b` to the observed PSF :math:`P_b`,

.. math::

    \hat K_b(\mathbf k) = \frac{\hat P_b(\mathbf k)\, \hat R_b^*(\mathbf k)}
                                {|\hat R_b(\mathbf k)|^2 + \lambda^2},
    \qquad m^\mathrm{obs}_b = K_b \ast m^\mathrm{model}_b ,

regularised Fourier division on an odd pixel grid (an odd grid has no Nyquist bin, whose
coefficient vanishes for images centred on a pixel corner and would make the division
ill-posed). :math:`\lambda` is tiny (:data:`REGULARISATION` of :math:`\max|\hat R|`): for a PSF
wider than the reference, :math:`|\hat K| \le 1` at every frequency and the regulariser never
acts; a PSF narrower than the reference in some band has :math:`|\hat K| > 1` somewhere (it would
have to sharpen the model) and is refused with :class:`PSFError`, naming the band.

Why a Gaussian of FWHM 1.5 pixels (:data:`REFERENCE_FWHM_PIXELS`; 0.30" at LSST's 0.2"/px).
Measured with galsim on a 65-pixel grid (``/work/exp/ref_psf.py`` in the development notes):
for FWHM 0.30" every Kolmogorov or Moffat (beta 2.5-4.5, ellipticity 0.05) PSF of FWHM >= 0.35"
gives :math:`\max|\hat K| \le 1.00` and a kernel whose negative lobes hold < 0.5 % of its flux;
a 0.35" reference already needs :math:`|\hat K|` up to 1.4-1.9 for 0.35" PSFs (sharpening),
while 0.25" is more aliased (:math:`|\hat R|` = 0.32 at the Nyquist frequency vs 0.17). So the
model frame is band-limited at the pixel scale to within a modest aliasing and every PSF of the
training distribution (FWHM ~0.35"-1.7") is a smoothing of it.

Two ways to apply the kernel, same result to the kernel's far tails: per stamp
(:func:`convolve_stamps`, each stamp padded to the kernel grid ``G``; what the per-source
catalog, errors and starts use) or once per field (:func:`with_field_transform`: the stamps are
placed on a model-frame canvas with a margin of the kernel's 98 % radius and the canvas is
convolved once per band). The scene takes the field path when it moves fewer pixels through the
FFTs: ``n (G^2 - S^2) >`` canvas area for ``n`` sources of side ``S``.

PSF images follow the FITS/galsim convention: pixel-integrated (what ``galsim`` draws with its
default method, what survey pipelines ship), centred on the central pixel for odd sizes and on
the central pixel corner for even sizes; they are normalised to unit sum here.

Why one module of ~700 lines: the reference PSF, the PSF checks, the difference kernels and the
convolutions share one grid convention (odd grids, centred kernels), so a PSF change is a change
of this file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.errors import MadnessInputError
from madness_ppl.galaxy_model import GalaxyModel

__all__ = [
    "MAX_KERNEL_GAIN",
    "REFERENCE_FWHM_PIXELS",
    "PSFError",
    "PSFKernel",
    "check_psf",
    "convolve_canvas",
    "convolve_stamps",
    "difference_kernel",
    "field_canvas",
    "field_kernel",
    "kernel_grid",
    "kernel_image",
    "psf_descriptor",
    "psf_images",
    "reference_psf",
    "with_field_transform",
]

#: FWHM of the Gaussian reference PSF of the model frame, in pixels (see the module docstring).
REFERENCE_FWHM_PIXELS = 1.5
#: :math:`\lambda` of the Fourier division, relative to :math:`\max|\hat R|`.
REGULARISATION = 1e-3
#: Largest :math:`|\hat K|` accepted (at frequencies where the PSF has power): above it the
#: observed PSF is narrower than the reference and the kernel would sharpen the model.
MAX_KERNEL_GAIN = 1.2
#: Grids on which kernels are built (odd; sizes with small prime factors for the FFT).
_GRIDS = (45, 51, 55, 63, 75, 81, 99, 105, 125, 135, 165, 189, 225)


class PSFError(MadnessInputError):
    """A PSF is unusable: non-finite, empty, of the wrong shape or narrower than the model's."""


class PSFKernel(NamedTuple):
    r"""Difference kernels of one field, ready for :func:`convolve_stamps`.

    Attributes
    ----------
    fourier
        ``(B, G, G // 2 + 1)`` complex :math:`\hat K_b` on the ``rfft2`` grid of an odd side
        ``G`` (the kernel's centre at pixel ``G // 2``).
    descriptor
        ``(B, 3)`` :func:`psf_descriptor` of the observed PSF, for PSF-aware encoders
        (``None`` when not computed).
    field
        ``(B, L_y, L_x // 2 + 1)`` the kernels' ``rfft2`` on the model-frame canvas of one
        field shape (even sides, centre at index 0; :func:`with_field_transform`), or
        ``None``: the scene convolves stamp by stamp.
    """

    fourier: jax.Array
    descriptor: jax.Array | None = None
    field: jax.Array | None = None

    @property
    def grid(self) -> int:
        """Side ``G`` of the (odd) grid of the kernel."""
        return int(self.fourier.shape[-2])


# --------------------------------------------------------------------------------------------
# PSF images
# --------------------------------------------------------------------------------------------
def reference_psf(
    n_bands: int, size: int, *, fwhm_pixels: float = REFERENCE_FWHM_PIXELS
) -> np.ndarray:
    r"""The model frame's reference PSF: a pixel-integrated circular Gaussian, every band.

    .. math::

        R(x, y) = \int_\mathrm{pixel} \frac{1}{2\pi s^2}
        e^{-(x^2 + y^2) / 2 s^2}, \qquad s = \mathrm{FWHM} / (2 \sqrt{2 \ln 2}).

    Parameters
    ----------
    n_bands
        Number of bands ``B``.
    size
        Side of the image (odd).
    fwhm_pixels
        FWHM in pixels.

    Returns
    -------
    numpy.ndarray
        ``(B, size, size)`` float64, each band summing to 1 (to the drawn area).

    Examples
    --------
    >>> r = reference_psf(2, 15)
    >>> r.shape, round(float(r[0].sum()), 6), bool(r[0, 7, 7] == r.max())
    ((2, 15, 15), 1.0, True)
    """
    return np.broadcast_to(_gaussian_image(size, fwhm_pixels), (n_bands, size, size)).copy()


@functools.lru_cache(maxsize=32)
def _gaussian_image(size: int, fwhm_pixels: float) -> np.ndarray:
    import galsim

    image = galsim.Gaussian(fwhm=fwhm_pixels).drawImage(nx=size, ny=size, scale=1.0).array
    return image.astype(np.float64) / image.sum()


def psf_images(
    fwhm: ArrayLike,
    *,
    pixel_scale: float,
    size: int = 45,
    profile: str = "kolmogorov",
    beta: float = 3.5,
    e1: ArrayLike = 0.0,
    e2: ArrayLike = 0.0,
) -> np.ndarray:
    r"""Pixel-integrated PSF images from a FWHM per band (galsim).

    Parameters
    ----------
    fwhm
        ``(B,)`` FWHM in arcseconds (a scalar: one band).
    pixel_scale
        Arcseconds per pixel.
    size
        Odd image side.
    profile
        ``"kolmogorov"`` (atmospheric turbulence, :math:`\hat P \propto e^{-(k/k_0)^{5/3}}`),
        ``"moffat"`` (:math:`(1 + r^2/\alpha^2)^{-\beta}`) or ``"gaussian"``.
    beta
        Moffat index.
    e1, e2
        Ellipticity (distortion) per band or shared.

    Returns
    -------
    numpy.ndarray
        ``(B, size, size)`` float64, each band with unit sum.
    """
    import galsim

    fwhm = np.atleast_1d(np.asarray(fwhm, float))
    if fwhm.ndim != 1 or not np.all(np.isfinite(fwhm) & (fwhm > 0)):
        raise PSFError(f"PSF FWHM must be positive and finite, one per band; got {fwhm}", fwhm)
    e1 = np.broadcast_to(np.asarray(e1, float), fwhm.shape)
    e2 = np.broadcast_to(np.asarray(e2, float), fwhm.shape)
    makers = {
        "kolmogorov": lambda f: galsim.Kolmogorov(fwhm=f),
        "moffat": lambda f: galsim.Moffat(beta=beta, fwhm=f),
        "gaussian": lambda f: galsim.Gaussian(fwhm=f),
    }
    if profile not in makers:
        raise PSFError(f"unknown PSF profile {profile!r}; use one of {sorted(makers)}", profile)
    out = np.empty((len(fwhm), size, size))
    for b, f in enumerate(fwhm):
        obj = makers[profile](float(f))
        if e1[b] or e2[b]:
            obj = obj.shear(e1=float(e1[b]), e2=float(e2[b]))
        image = obj.drawImage(nx=size, ny=size, scale=pixel_scale).array
        out[b] = image / image.sum()
    return out


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def check_psf(psf: ArrayLike, bands: Sequence[str], *, stamp_size: int | None = None) -> np.ndarray:
    """Validate per-band PSF images and normalise each band to unit sum.

    Parameters
    ----------
    psf
        ``(B, P, P)`` images (any odd or even ``P``), bands in the order of ``bands``.
    bands
        Band names (for the count and the messages).
    stamp_size
        The prior's stamp side: a PSF whose FWHM (from its second moments) exceeds a third
        of it is refused, since a galaxy convolved with it cannot be told apart within a stamp.

    Returns
    -------
    numpy.ndarray
        ``(B, P, P)`` float64, unit sum per band.

    Raises
    ------
    PSFError
        Wrong number of dimensions or bands, non-square, NaN/inf pixels, a band that sums to
        zero or less.
    """
    array = np.asarray(psf, dtype=np.float64)
    if array.ndim == 2 and len(bands) == 1:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise PSFError(
            f"psf must be square images per band (bands, P, P), got shape {array.shape}",
            array.shape,
        )
    if array.shape[0] != len(bands):
        raise PSFError(
            f"psf has {array.shape[0]} band images but the prior has {len(bands)} bands "
            f"{tuple(bands)}",
            array.shape,
        )
    for b, band in enumerate(bands):
        image = array[b]
        if not np.all(np.isfinite(image)):
            raise PSFError(
                f"PSF of band {band!r} has {int((~np.isfinite(image)).sum())} NaN/inf pixels"
            )
        total = image.sum()
        if not total > 0:
            kind = "all zero" if not np.any(image) else f"total {total:.3g} <= 0"
            raise PSFError(f"PSF of band {band!r} is {kind}: it cannot be normalised", total)
    array = array / array.sum(axis=(-2, -1), keepdims=True)
    if stamp_size is not None:
        for b, band in enumerate(bands):
            fwhm = _moment_fwhm(array[b])
            if fwhm > stamp_size / 3:
                raise PSFError(
                    f"PSF of band {band!r} has a FWHM of ~{fwhm:.1f} px (second moments), more "
                    f"than a third of the prior's {stamp_size}-px stamps: too wide to deblend "
                    "with this prior (is the PSF image in another pixel scale?)",
                    fwhm,
                )
    return array


# --------------------------------------------------------------------------------------------
# Difference kernels
# --------------------------------------------------------------------------------------------
def _on_grid(images: np.ndarray, grid: int) -> np.ndarray:
    """Centre ``(B, P, P)`` images on a ``(B, G, G)`` grid (crop or pad; even ``P`` images,
    centred on a pixel corner, are first shifted by half a pixel in Fourier space)."""
    size = images.shape[-1]
    if size % 2 == 0:  # centre at (P/2 - 1/2): shift by +1/2 so that it is at pixel P/2 of P+1
        padded = np.zeros((*images.shape[:-2], size + 1, size + 1))
        padded[..., :size, :size] = images
        k = np.fft.fftfreq(size + 1)
        ramp = np.exp(-2j * np.pi * 0.5 * (k[:, None] + k[None, :]))
        images = np.real(np.fft.ifft2(np.fft.fft2(padded) * ramp))
        size += 1
    out = np.zeros((*images.shape[:-2], grid, grid))
    half = min(size, grid) // 2
    c_in, c_out = size // 2, grid // 2
    out[..., c_out - half : c_out + half + 1, c_out - half : c_out + half + 1] = images[
        ..., c_in - half : c_in + half + 1, c_in - half : c_in + half + 1
    ]
    return out


def _centred_rfft(images: np.ndarray) -> np.ndarray:
    """``rfft2`` of images centred at pixel ``G // 2`` of an odd grid, phase referenced to it."""
    return np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)))


def kernel_grid(kernel: np.ndarray, stamp_size: int, *, enclosed: float = 0.98) -> int:
    """Odd grid side for the convolved stamps: the stamp plus, on each side, the radius
    holding ``enclosed`` of the widest band's PSF flux (from :data:`_GRIDS`).

    Light of the kernel beyond that radius is not lost: the convolution is circular on the
    grid, so it lands, faint and spread, on the stamp's opposite side. With 0.98, a
    Kolmogorov PSF of FWHM 0.5" / 0.8" / 1.2" / 1.6" gets a 63 / 75 / 81 / 99-pixel grid for
    45-pixel stamps (99 % would need 75 / 81 / 99 / 125: the Kolmogorov wings are heavy).
    """
    need = stamp_size + 2 * int(np.ceil(_enclosed_radius(kernel, enclosed)))
    return next((g for g in _GRIDS if g >= need), need | 1)


def _enclosed_radius(images: np.ndarray, enclosed: float) -> float:
    """Largest over bands of the radius (pixels, from the centre of the square images)
    holding ``enclosed`` of each image's absolute flux."""
    images = np.abs(np.asarray(images, np.float64))
    size = images.shape[-1]
    y, x = np.indices(images.shape[-2:]) - (size - 1) / 2.0
    radius = np.hypot(x, y).ravel()
    order = np.argsort(radius)
    widest = 0.0
    for image in images.reshape(-1, size, size):
        flux = np.cumsum(image.ravel()[order]) / image.sum()
        widest = max(widest, radius[order][min(np.searchsorted(flux, enclosed), len(order) - 1)])
    return widest


def _smooth_even(n: int) -> int:
    """Smallest even integer ``>= n`` with no prime factor above 5 (a fast FFT size)."""
    m = max(2, n + (n % 2))
    while True:
        r = m
        for q in (2, 3, 5):
            while r % q == 0:
                r //= q
        if r == 1:
            return m
        m += 2


def field_canvas(field_shape: Sequence[int], margin: int) -> tuple[int, int]:
    """Even, FFT-friendly canvas sides holding ``field_shape`` plus ``margin`` on each side."""
    return tuple(_smooth_even(int(n) + 2 * int(margin)) for n in field_shape)  # type: ignore[return-value]


def with_field_transform(
    kernel: PSFKernel,
    field_shape: Sequence[int],
    *,
    n_sources: int,
    stamp_size: int,
    enclosed: float = 0.98,
) -> PSFKernel:
    r"""``kernel`` with its transform on a field's model-frame canvas, when that is cheaper.

    The canvas holds the field plus a margin :math:`m` (the kernels' ``enclosed`` radius) on
    each side, with even FFT-friendly sides :math:`L_y, L_x` (:func:`field_canvas`; the field
    starts at ``((L_y - H) // 2, (L_x - W) // 2)``). The kernel image is put with its centre
    at index 0 (wrapping), so that

    .. math::

        m^\mathrm{obs} = \mathrm{crop}\,\mathcal F^{-1}ig[\mathcal F[\mathrm{canvas}]\,
        \hat K^{(L)}ig]

    is the convolution of everything placed on the canvas; kernel light beyond :math:`m`
    wraps into the opposite margin, and only beyond :math:`2m` into the field (as the
    per-stamp convolution wraps beyond its grid).

    Parameters
    ----------
    kernel
        The field's kernels (:func:`field_kernel`).
    field_shape
        ``(H, W)``.
    n_sources, stamp_size
        Sources in the scene (its plate size) and the model-frame stamp side ``S``: the field
        transform is attached only when it moves fewer pixels through the FFTs than the
        per-stamp path, :math:`L_y L_x < n (G^2 - S^2)` (the placement's own sub-pixel shifts
        on ``S x S`` stamps remain in both).
    enclosed
        Flux fraction of the kernels inside the margin.

    Returns
    -------
    PSFKernel
        With ``field`` set, or ``kernel`` unchanged (``field=None``) when the per-stamp path is
        cheaper.
    """
    image = kernel_image(kernel)
    margin = int(np.ceil(_enclosed_radius(image, enclosed)))
    ly, lx = field_canvas(field_shape, margin)
    if ly * lx >= n_sources * (kernel.grid**2 - stamp_size**2):
        return kernel._replace(field=None)
    centre = kernel.grid // 2
    half_y, half_x = min(centre, (ly - 1) // 2), min(centre, (lx - 1) // 2)
    wrapped = np.zeros((image.shape[0], ly, lx))
    rows = np.arange(-half_y, half_y + 1) % ly
    cols = np.arange(-half_x, half_x + 1) % lx
    wrapped[:, rows[:, None], cols[None, :]] = image[
        :, centre - half_y : centre + half_y + 1, centre - half_x : centre + half_x + 1
    ]
    transform = np.fft.rfft2(wrapped).astype(np.complex64)
    return kernel._replace(field=jnp.asarray(transform))


def difference_kernel(
    psf: ArrayLike,
    reference: ArrayLike | None,
    *,
    grid: int,
    bands: Sequence[str] | None = None,
) -> PSFKernel:
    r"""Difference kernels :math:`\hat K_b = \hat P_b \hat R_b^* / (|\hat R_b|^2 + \lambda^2)`.

    Parameters
    ----------
    psf
        ``(B, P, P)`` observed PSFs (unit sum: :func:`check_psf`).
    reference
        ``(B, Q, Q)`` reference PSFs of the model frame (unit sum), or ``None`` for a model
        frame without PSF (a delta function: :math:`K = P`).
    grid
        Odd side ``G`` of the kernel grid (:func:`kernel_grid`).
    bands
        Band names for the messages.

    Returns
    -------
    PSFKernel

    Raises
    ------
    PSFError
        When :math:`|\hat K_b|` exceeds :data:`MAX_KERNEL_GAIN` where the observed PSF has
        power (:math:`|\hat P_b| > 10^{-3}`): the observed PSF is narrower than the reference.

    Examples
    --------
    Two Gaussians: :math:`\sigma_K^2 = \sigma_P^2 - \sigma_R^2` exactly.

    >>> import numpy as np
    >>> r = reference_psf(1, 45)
    >>> p = psf_images([0.8], pixel_scale=0.2, profile="gaussian")
    >>> k = difference_kernel(p, r, grid=45)
    >>> k.grid, round(float(abs(k.fourier[0, 0, 0])), 4)  # flux kept (regulariser: 1e-6)
    (45, 1.0)
    """
    psf = np.asarray(psf, np.float64)
    if grid % 2 == 0:
        raise ValueError(f"the kernel grid must be odd, got {grid}")
    names = list(bands) if bands is not None else [f"plane {b}" for b in range(len(psf))]
    p_hat = _centred_rfft(_on_grid(psf, grid))
    if reference is None:
        return PSFKernel(jnp.asarray(p_hat.astype(np.complex64)))
    r_hat = _centred_rfft(_on_grid(np.asarray(reference, np.float64), grid))
    lam2 = (REGULARISATION * np.abs(r_hat).max(axis=(-2, -1), keepdims=True)) ** 2
    k_hat = p_hat * np.conj(r_hat) / (np.abs(r_hat) ** 2 + lam2)
    gain = np.where(np.abs(p_hat) > 1e-3, np.abs(k_hat), 0.0).max(axis=(-2, -1))
    for b in np.flatnonzero(gain > MAX_KERNEL_GAIN):
        size_p, size_r = _half_max_fwhm(psf[b]), _half_max_fwhm(np.asarray(reference)[b])
        raise PSFError(
            f"PSF of band {names[b]!r} (FWHM ~{size_p:.2f} px at half maximum) is "
            f"narrower than the prior's model-frame PSF (~{size_r:.2f} px): it cannot be "
            f"reached by convolution (|K| up to {gain[b]:.2f} > {MAX_KERNEL_GAIN}; "
            f"{100 * (1 - size_p / size_r):.0f} % narrower). Use a prior with a narrower "
            "reference PSF, or pass the PSF the image really has",
            gain[b],
        )
    return PSFKernel(jnp.asarray(k_hat.astype(np.complex64)))


def _half_max_fwhm(image: np.ndarray, upsample: int = 8) -> float:
    """FWHM (pixels) of the core: the diameter of the disc whose area is that of the image
    above half its maximum, on a bilinearly ``upsample``-d grid. Unlike moments it is not
    inflated by a Kolmogorov PSF's wings (a 1.25-px Kolmogorov: 1.38 here, 2.4 from HSM)."""
    from scipy import ndimage

    fine = ndimage.zoom(np.asarray(image, np.float64), upsample, order=1)
    return float(2.0 * np.sqrt((fine >= 0.5 * fine.max()).sum() / np.pi) / upsample)


def _moment_fwhm(image: np.ndarray) -> float:
    """Gaussian-equivalent FWHM (pixels) from adaptive moments (galsim HSM), or from the
    unweighted second moments when HSM fails."""
    import galsim

    try:
        mom = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(image, np.float64)))
        return float(2.3548 * mom.moments_sigma)
    except galsim.GalSimError:
        y, x = np.indices(image.shape)
        w = image / image.sum()
        xc, yc = (w * x).sum(), (w * y).sum()
        return float(2.3548 * np.sqrt(0.5 * (w * ((x - xc) ** 2 + (y - yc) ** 2)).sum()))


def psf_descriptor(psf: ArrayLike, *, reference_fwhm: float = REFERENCE_FWHM_PIXELS) -> np.ndarray:
    r"""A few numbers per band describing a PSF, for PSF-aware encoders.

    .. math::

        d_b = \big(\log(\sigma_b / \sigma_R),\ e_{1,b},\ e_{2,b}\big)

    from galsim's adaptive moments (:math:`\sigma` the moments size, :math:`e` the distortion),
    :math:`\sigma_R` that of the reference Gaussian.

    Parameters
    ----------
    psf
        ``(B, P, P)`` or ``(N, B, P, P)`` PSF images.

    Returns
    -------
    numpy.ndarray
        ``(B, 3)`` or ``(N, B, 3)`` float32.
    """
    import galsim

    array = np.asarray(psf, np.float64)
    flat = array.reshape(-1, *array.shape[-2:])
    out = np.zeros((len(flat), 3))
    sigma_r = reference_fwhm / 2.3548
    for i, image in enumerate(flat):
        try:
            mom = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(image)))
            out[i] = (
                np.log(mom.moments_sigma / sigma_r),
                mom.observed_shape.e1,
                mom.observed_shape.e2,
            )
        except galsim.GalSimError:
            out[i] = np.log(_moment_fwhm(image) / 2.3548 / sigma_r), 0.0, 0.0
    return out.reshape(*array.shape[:-2], 3).astype(np.float32)


def field_kernel(
    prior: GalaxyModel,
    psf: ArrayLike | None,
    *,
    profile: str = "kolmogorov",
    pixel_scale: float | None = None,
    source: str = "the field",
) -> PSFKernel | None:
    """The difference kernel of a field observed with ``psf``, for a prior's model frame.

    Parameters
    ----------
    prior
        A galaxy prior: ``bands``, ``stamp_size`` and ``reference_psf()`` (``None``, or no such
        method: a PSF-free model frame) are used.
    psf
        ``(B, P, P)`` PSF images in the prior's band order; or ``(B,)`` FWHMs in arcseconds
        (drawn as ``profile`` with :func:`psf_images`); or ``None``: the prior's survey's
        default PSF, with a :class:`~madness_ppl.errors.MadnessInputWarning` saying so.
    profile
        Profile of PSFs given by FWHM: ``"kolmogorov"``, ``"moffat"`` (beta 3.5) or
        ``"gaussian"``.
    pixel_scale
        Arcseconds per pixel, for FWHMs (default: the prior's survey's).
    source
        Name of the field in messages.

    Returns
    -------
    PSFKernel or None
        ``None`` when the observed PSF equals the model frame's (nothing to convolve: a
        v0.2 prior on a field at its survey's median PSF).
    """
    import warnings

    from madness_ppl.errors import MadnessInputWarning

    bands = tuple(prior.bands)
    reference = prior.reference_psf() if hasattr(prior, "reference_psf") else None
    from madness_ppl.survey import survey_of

    survey = survey_of(prior) if hasattr(prior, "config") else None
    if psf is None:
        if survey is None:
            raise PSFError(
                f"{source}: no PSF given and the prior's survey is unknown; pass psf= "
                "(images per band or FWHMs)"
            )
        warnings.warn(
            f"{source}: no PSF given; using the {survey.name} default PSF of each band (FWHM "
            + ", ".join(f'{b} {survey.band(b).psf_fwhm:.2f}"' for b in bands)
            + "). Pass psf= (images or FWHMs) when the image has another PSF",
            MadnessInputWarning,
            stacklevel=3,
        )
        images = survey.psf_images(prior.stamp_size, bands)
    else:
        array = np.asarray(psf, np.float64)
        if array.ndim <= 1:
            if array.size != len(bands):
                raise PSFError(
                    f"{source}: {array.size} PSF FWHMs for {len(bands)} bands {bands}", array
                )
            scale = pixel_scale if pixel_scale is not None else getattr(survey, "pixel_scale", None)
            if scale is None:
                raise PSFError(f"{source}: PSF FWHMs need a pixel_scale (unknown survey)")
            images = psf_images(
                array.ravel(), pixel_scale=scale, size=prior.stamp_size, profile=profile
            )
        else:
            images = array
    images = check_psf(images, bands, stamp_size=None if psf is None else prior.stamp_size)
    if reference is not None and _same_psf(images, reference):
        return None
    grid = kernel_grid(images, prior.stamp_size)
    kernel = difference_kernel(images, reference, grid=grid, bands=bands)
    if getattr(prior, "psf_aware", False):
        kernel = kernel._replace(descriptor=jnp.asarray(psf_descriptor(images)))
    return kernel


def kernel_image(kernel: PSFKernel) -> np.ndarray:
    """The kernels in real space, ``(B, G, G)`` centred at ``G // 2``."""
    grid = kernel.grid
    image = np.fft.irfft2(np.asarray(kernel.fourier), s=(grid, grid))
    return np.fft.fftshift(image, axes=(-2, -1))


def _same_psf(images: np.ndarray, reference: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether two unit-sum PSF stacks agree on a common grid to ``tol`` (max abs pixel)."""
    grid = max(images.shape[-1], reference.shape[-1]) | 1
    a, b = _on_grid(images, grid), _on_grid(np.asarray(reference, np.float64), grid)
    return bool(np.abs(a - b).max() <= tol * b.max())


# --------------------------------------------------------------------------------------------
# Convolution (JAX, inside the scene and the training loss)
# --------------------------------------------------------------------------------------------
def convolve_stamps(
    stamps: ArrayLike, kernel: ArrayLike, *, shifts: ArrayLike | None = None
) -> jax.Array:
    r"""Convolve model-frame stamps with difference kernels (and shift them), on the kernel grid.

    .. math::

        \tilde s = \mathcal F^{-1}\big[\mathcal F[\mathrm{pad}_G(s)]\,\hat K\,
        e^{-2\pi i (k_x \delta_x + k_y \delta_y)}\big]

    The stamp is zero-padded to the kernel's grid ``G`` (centre kept at ``G // 2``), so the
    light the PSF spreads beyond the stamp is kept; the convolution is circular on ``G``
    (:func:`kernel_grid` makes ``G`` hold the PSF's flux).

    Parameters
    ----------
    stamps
        ``(..., B, S, S)`` model-frame stamps (odd ``S <= G``).
    kernel
        ``(..., B, G, G // 2 + 1)`` complex :attr:`PSFKernel.fourier` (broadcast over the
        leading axes).
    shifts
        Optional ``(..., 2)`` sub-pixel shifts ``(dx, dy)`` applied in the same transform.

    Returns
    -------
    jax.Array
        ``(..., B, G, G)``.
    """
    stamps = jnp.asarray(stamps)
    kernel = jnp.asarray(kernel)
    grid, size = kernel.shape[-2], stamps.shape[-1]
    lo = (grid - size) // 2
    pad = [(0, 0)] * (stamps.ndim - 2) + [(lo, grid - size - lo)] * 2
    padded = jnp.pad(stamps, pad)
    transform = jnp.fft.rfft2(jnp.fft.ifftshift(padded, axes=(-2, -1))) * kernel
    if shifts is not None:
        shifts = jnp.asarray(shifts, stamps.dtype)
        fy = jnp.fft.fftfreq(grid).astype(stamps.dtype)
        fx = jnp.fft.rfftfreq(grid).astype(stamps.dtype)
        dx = shifts[..., 0][..., None, None, None]
        dy = shifts[..., 1][..., None, None, None]
        transform = transform * jnp.exp(-2j * jnp.pi * (fy[:, None] * dy + fx[None, :] * dx))
    out = jnp.fft.fftshift(jnp.fft.irfft2(transform, s=(grid, grid)), axes=(-2, -1))
    return out.astype(stamps.dtype)


def convolve_canvas(canvas: ArrayLike, field_transform: ArrayLike) -> jax.Array:
    r"""Convolve a ``(B, L_y, L_x)`` model-frame canvas with :attr:`PSFKernel.field`
    (:func:`with_field_transform`): :math:`\mathcal F^{-1}[\mathcal F[c]\,\hat K^{(L)}]`."""
    canvas = jnp.asarray(canvas)
    size = canvas.shape[-2:]
    out = jnp.fft.irfft2(jnp.fft.rfft2(canvas) * jnp.asarray(field_transform), s=size)
    return out.astype(canvas.dtype)
