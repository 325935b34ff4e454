r"""Shapes and shear responses of deblended galaxies: metacalibration, differentiated through the MAP.

A MAP under a prior shrinks faint galaxies toward the prior's typical (rounder) shapes, so a
shape measured on the deblended model carries less of an applied shear than it should (the
shear benchmark: ~80 %). Metacalibration (Huff & Mandelbaum 2017; Sheldon & Huff 2017)
measures the *response* :math:`R = \partial e / \partial g` of the whole pipeline to a shear of
the image and divides it out: :math:`\langle g \rangle \approx \langle R \rangle^{-1}
\langle e \rangle`. Here the image shear is infinitesimal and the pipeline is differentiated,
not rerun.

**The sheared image.** A shear :math:`g` of the sky before the PSF :math:`P` changes the image
:math:`I = P \ast G` by :math:`\delta I = g_k\, \mathcal D_k I` with

.. math::

    \mathcal D_k I = -\nabla\cdot\big(I\, M_k\, (\mathbf x - \bar{\mathbf c}(\mathbf x))\big)
                     - \mathcal F^{-1}\big[\hat I\, \hat Q_k\big], \qquad
    \hat Q_k = \frac{(M_k \mathbf k)\cdot\nabla_{\mathbf k} \hat P}{\hat P},
    \qquad M_1 = \begin{pmatrix}1&0\\0&-1\end{pmatrix},\ M_2 = \begin{pmatrix}0&1\\1&0\end{pmatrix}:

the first term shears the light, the second un-shears the PSF that the first sheared with it
(:math:`P \ast \mathcal D(P^{-1} \ast I)`, the metacal "deconvolve, shear, reconvolve" in the
limit :math:`g \to 0`, where no dilated PSF is needed). Each pixel's light is sheared about
the centre :math:`\bar{\mathbf c}(\mathbf x)` of the source that owns it (the light-weighted
mean of the sources' stamp centres, :func:`ownership_centres`), so every galaxy is sheared about
its own centre and stays where the catalog put it, as the detections of a sheared sky would
follow it (positions are an input of the fit). :math:`\hat Q_k` is set to 0 where
:math:`|\hat P| < 10^{-5}\hat P(0)` (pure noise there; the model, band-limited by the PSF,
does not see those frequencies).

**Through the MAP.** The fit minimises :math:`L(z; I) = \tfrac12 \sum_p W_p (m_p(z) - I_p)^2 -
\sum_i \log p(z_i)`. At its optimum :math:`\nabla_z L = 0`; differentiating that condition
(implicit function theorem),

.. math::

    \frac{\partial z^\star}{\partial g_k} = H^{-1} J^\top W\, \mathcal D_k I, \qquad
    H = J^\top W J + \sum_p W_p (m_p - I_p)\, \nabla^2 m_p + \nabla^2\Big[-\sum_i \log p(z_i)\Big],

the exact Hessian (Gauss-Newton plus the residual curvature, block-diagonal per source, plus the
flow's), with :math:`J` the observed stamps' Jacobians the Laplace errors use; its eigenvalues
below 1, the curvature of a unit-normal latent prior, are raised to 1 (as the Newton refinement
does): directions the data leave flat, where the flow is flat or concave, would otherwise get
an unbounded response. Two linear solves
per field (one per shear component) give every source's response,
:math:`R_{j,ak} = \partial e_{j,a} / \partial z_j \cdot \partial z_j^\star / \partial g_k`.

**The shape** :math:`e` is the Gaussian-weighted second-moment ellipticity of the decoded galaxy
in the prior's model frame (before the field's PSF: the model frame's PSF is a round
1.5-pixel Gaussian, so no PSF anisotropy enters :math:`e`), summed over the lensing bands:

.. math::

    Q_{ab} = \sum_{\mathbf x} w(\mathbf x)\, f(\mathbf x)\, x_a x_b, \quad
    w = e^{-|\mathbf x|^2 / 2 s^2}, \qquad
    e = \Big(\frac{Q_{11} - Q_{22}}{Q_{11} + Q_{22}}, \frac{2 Q_{12}}{Q_{11} + Q_{22}}\Big),

smooth in :math:`z` (unlike KSB/HSM's iterations), so :math:`\partial e / \partial z` is exact.
Any such estimator works: the response calibrates whatever it measures.

**Noise** (metacal's "fixnoise"). Shearing the image shears its noise too, and an estimator
that is nonlinear in the pixels responds to the sheared noise's correlations: a bias of order
:math:`\sigma^2`. As in metacal, a second noise field :math:`n'` of the same variance is added
to the image and given the opposite derivative: the fit is rerun (Newton steps warm-started
from the deblended solution) on :math:`I + n'` with variance :math:`2\sigma^2`, and the
derivative image is :math:`\mathcal D_k (I - n')`; the noise-response terms of :math:`n` and
:math:`n'` then cancel in expectation. :math:`e` and :math:`R` both come from that fit (their
noise is :math:`\sqrt 2` larger; the catalog's fluxes do not).

Why one module of ~600 lines: the shape estimator, its derivative under an image shear and the
response through the MAP use one convention for the shear operator and its weights; split, the
sign and weight conventions would have two homes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from madness_ppl.blas import one_blas_thread
from madness_ppl.cutouts import add_stamps, extract_cutouts, nearest_pixel, paste_stamps
from madness_ppl.errors import MadnessInputError
from madness_ppl.galaxy_model import GalaxyModel, ScoredGalaxyModel
from madness_ppl.likelihood import inverse_variance
from madness_ppl.psf import PSFKernel, convolve_stamps
from madness_ppl.refine import newton_refine
from madness_ppl.scene import bucket_size
from madness_ppl.uncertainty import gauss_newton_precision

__all__ = [
    "DEFAULT_SHEAR_BANDS",
    "DEFAULT_WEIGHT_FWHM",
    "SHEAR_MATRICES",
    "ShearResponse",
    "add_shear_columns",
    "moments_ellipticity",
    "observed_psf",
    "ownership_centres",
    "shear_derivative",
    "shear_response",
]

#: :math:`M_1, M_2`: the generators of the two shear components.
SHEAR_MATRICES = np.array([[[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]])
#: FWHM of the moments' Gaussian weight, arcseconds (the DES "wmom" choice).
DEFAULT_WEIGHT_FWHM = 1.2
#: Bands summed for the shape, those of them the prior has (else its middle band).
DEFAULT_SHEAR_BANDS = ("r", "i", "z")
#: :math:`\hat Q` is zeroed where :math:`|\hat P|` is below this fraction of :math:`\hat P(0)`.
_PSF_FLOOR = 1e-5
#: Relative floor of the ownership weight (a Gaussian of the stamp's scale around each
#: source), so that every pixel of a stamp has an owner even where the models vanish.
_OWNERSHIP_FLOOR = 1e-4
#: Eigenvalues of the Hessian below this are raised to it in the implicit solve: the curvature
#: of the unit-normal latent prior, as in :func:`~madness_ppl.refine.newton_refine`. Directions
#: the data and the flow leave (nearly) flat or concave would otherwise get an unbounded
#: response (measured on 205-pixel LSST fields with a floor of 1e-3: ~5 % of the responses
#: above 10, up to 2e3, while the median stays 0.85).
_CURVATURE_FLOOR = 1.0


class ShearResponse(NamedTuple):
    r"""Output of :func:`shear_response`.

    Attributes
    ----------
    e
        ``(n, 2)`` ellipticities :math:`(e_1, e_2)` of the decoded galaxies (noise-added fit).
    R
        ``(n, 2, 2)`` responses :math:`R_{ak} = \partial e_a / \partial g_k`.
    z
        ``(n, d)`` latents of the noise-added fit.
    steps
        Newton steps the noise-added fit took from the given latents.
    converged
        Whether that fit met its tolerance.
    """

    e: np.ndarray
    R: np.ndarray
    z: np.ndarray
    steps: int
    converged: bool


# --------------------------------------------------------------------------------------------
# The image derivative
# --------------------------------------------------------------------------------------------
def observed_psf(prior: GalaxyModel, psf: PSFKernel | None) -> np.ndarray | None:
    r"""The observed PSF :math:`P_b = K_b \ast R_b` of a field, ``(B, G, G)`` float64, centred.

    ``psf``: the field's difference kernels (:func:`madness_ppl.psf.field_kernel`); ``None``
    means the field is at the model frame's PSF :math:`R` (:meth:`~madness_ppl.prior.GalaxyPrior.reference_psf`).
    A prior without a model-frame PSF (e.g. :class:`~madness_ppl.toy.LinearGaussianPrior`)
    has :math:`R = \delta`; with no kernel either, the result is ``None`` (no PSF).
    """
    method = getattr(prior, "reference_psf", None)
    reference = method() if callable(method) else None
    if reference is None:
        if psf is None:
            return None
        reference = np.ones((len(prior.bands), 1, 1))
    reference = np.asarray(reference, np.float64)
    reference = reference / reference.sum(axis=(-2, -1), keepdims=True)
    if psf is None:
        return reference
    grid = psf.grid
    on_grid = np.zeros((*reference.shape[:-2], grid, grid))
    size = reference.shape[-1]
    half = min(size, grid) // 2
    c_in, c_out = size // 2, grid // 2
    on_grid[..., c_out - half : c_out + half + 1, c_out - half : c_out + half + 1] = reference[
        ..., c_in - half : c_in + half + 1, c_in - half : c_in + half + 1
    ]
    transform = np.fft.rfft2(np.fft.ifftshift(on_grid, axes=(-2, -1)))
    transform = transform * np.asarray(psf.fourier, np.complex128)
    image = np.fft.fftshift(np.fft.irfft2(transform, s=(grid, grid)), axes=(-2, -1))
    return image / image.sum(axis=(-2, -1), keepdims=True)


def _odd_size(n: int) -> int:
    """The next odd size with prime factors 3, 5, 7 only (fast FFTs, no Nyquist bin)."""
    size = n | 1
    while True:
        m = size
        for p in (3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 2


@functools.lru_cache(maxsize=8)
def _psf_terms(psf_bytes: bytes, psf_shape: tuple, shape: tuple) -> np.ndarray:
    """:math:`\\hat Q_k` ``(2, B, Hp, Wp)`` of PSF images on the padded grid ``shape``."""
    psf = np.frombuffer(psf_bytes, np.float64).reshape(psf_shape)
    height, width = shape
    size = psf.shape[-1]
    centred = np.zeros((psf.shape[0], height, width))
    half = size // 2
    rows = np.arange(-half, size - half) % height
    cols = np.arange(-half, size - half) % width
    centred[:, rows[:, None], cols[None, :]] = psf  # centre at index (0, 0), wrapped
    y = np.fft.fftfreq(height) * height  # signed integer offsets from the centre
    x = np.fft.fftfreq(width) * width
    transform = np.fft.fft2(centred)
    d_kx = np.fft.fft2(-1j * x[None, None, :] * centred)
    d_ky = np.fft.fft2(-1j * y[None, :, None] * centred)
    ky = 2 * np.pi * np.fft.fftfreq(height)[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(width)[None, :]
    keep = np.abs(transform) > _PSF_FLOOR * np.abs(transform[:, :1, :1])
    safe = np.where(keep, transform, 1.0)
    q1 = np.where(keep, (kx * d_kx - ky * d_ky) / safe, 0.0)
    q2 = np.where(keep, (ky * d_kx + kx * d_ky) / safe, 0.0)
    return np.stack([q1, q2])


def ownership_centres(stamps: ArrayLike, positions: ArrayLike, shape: Sequence[int]) -> np.ndarray:
    r"""The centre :math:`\bar{\mathbf c}(\mathbf x)` each pixel's light is sheared about.

    .. math::

        \bar{\mathbf c}(\mathbf x) = \frac{\sum_i w_i(\mathbf x)\, \mathbf c_i}{\sum_i w_i(\mathbf x)},
        \qquad w_i = m_i^+ + \eta\, \max m_i\, e^{-|\mathbf x - \mathbf c_i|^2 / 2 (S/4)^2},

    over the sources whose stamp (side ``S``, centred on
    :func:`~madness_ppl.cutouts.nearest_pixel` of the source's position :math:`\mathbf c_i`)
    covers the pixel; :math:`m_i^+` is the positive
    part of the source's model summed over bands, :math:`\eta` a small floor. Pixels no stamp
    covers are their own centre (not sheared: no source's Jacobian reaches them).

    Parameters
    ----------
    stamps
        ``(n, B, S, S)`` observed stamps.
    positions
        ``(n, 2)`` positions ``(x, y)``.
    shape
        ``(H, W)`` of the field.

    Returns
    -------
    numpy.ndarray
        ``(2, H, W)``: :math:`\bar c_x, \bar c_y`.
    """
    stamps = np.asarray(stamps, np.float64)
    height, width = shape
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    centres = nearest_pixel(positions)  # where the stamps lie; the galaxies are at positions
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    if len(stamps) == 0:
        return np.stack([xs, ys])
    size = stamps.shape[-1]
    light = np.clip(stamps.sum(axis=1), 0.0, None)
    offsets = np.arange(size) - size // 2
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    floor = np.exp(-r2 / (2 * (size / 4) ** 2))
    weight = light + _OWNERSHIP_FLOOR * light.max(axis=(-2, -1), keepdims=True).clip(1e-30) * floor
    weight = weight[:, None]
    total = np.zeros((3, height, width))
    add_stamps(total[0:1], weight, centres)  # sum w, sum w c_x, sum w c_y
    add_stamps(total[1:2], weight * positions[:, 0, None, None, None], centres)
    add_stamps(total[2:3], weight * positions[:, 1, None, None, None], centres)
    owned = total[0] > 0
    safe = np.where(owned, total[0], 1.0)
    return np.stack([np.where(owned, total[1] / safe, xs), np.where(owned, total[2] / safe, ys)])


def shear_derivative(
    image: ArrayLike, psf: ArrayLike | None, centres: ArrayLike | None = None
) -> np.ndarray:
    r"""The derivative :math:`\mathcal D_k I` of an image with respect to a shear of the sky
    (see the module docstring), both components.

    Parameters
    ----------
    image
        ``(B, H, W)`` image (NaN/inf read as 0).
    psf
        ``(B, P, P)`` observed PSF images (odd ``P``, centred, unit sum); ``None``: no PSF
        (the image itself is sheared).
    centres
        ``(2, H, W)`` the centre each pixel is sheared about (:func:`ownership_centres`);
        default the field's centre for every pixel (a shear of the whole image).

    Returns
    -------
    numpy.ndarray
        ``(2, B, H, W)`` float64: :math:`\mathcal D_1 I, \mathcal D_2 I`.

    Examples
    --------
    A point source does not change under a shear of the sky (only the galaxy is sheared, not
    the PSF):

    >>> from madness_ppl.psf import reference_psf
    >>> psf = reference_psf(1, 21, fwhm_pixels=4.0)
    >>> star = np.zeros((1, 41, 41)); star[:, 10:31, 10:31] = psf
    >>> bool(np.abs(shear_derivative(star, psf)).max() < 1e-3 * star.max())
    True
    """
    image = np.asarray(image, np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be (bands, H, W), got shape {image.shape}")
    image = np.where(np.isfinite(image), image, 0.0)
    n_bands, height, width = image.shape
    if psf is not None:
        psf = np.asarray(psf, np.float64)
        if psf.ndim != 3 or psf.shape[0] != n_bands or psf.shape[1] != psf.shape[2]:
            raise ValueError(f"PSF images of shape {psf.shape} for an image of {n_bands} bands")
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    if centres is None:
        centres = np.stack([np.full_like(xs, (width - 1) / 2), np.full_like(ys, (height - 1) / 2)])
    margin = (0 if psf is None else psf.shape[-1] // 2) + 2
    shape = (_odd_size(height + 2 * margin), _odd_size(width + 2 * margin))
    padded = np.zeros((n_bands, *shape))
    padded[:, margin : margin + height, margin : margin + width] = image
    u = np.zeros(shape)
    v = np.zeros(shape)
    u[margin : margin + height, margin : margin + width] = xs - centres[0]
    v[margin : margin + height, margin : margin + width] = ys - centres[1]
    ky = 2j * np.pi * np.fft.fftfreq(shape[0])[:, None]
    kx = 2j * np.pi * np.fft.fftfreq(shape[1])[None, :]
    transform = np.fft.fft2(padded)
    q = (
        np.zeros((2, 1, 1, 1))
        if psf is None
        else _psf_terms(np.ascontiguousarray(psf).tobytes(), psf.shape, shape)
    )
    out = np.empty((2, n_bands, height, width))
    for k, matrix in enumerate(SHEAR_MATRICES):
        flow_x = padded * (matrix[0, 0] * u + matrix[0, 1] * v)
        flow_y = padded * (matrix[1, 0] * u + matrix[1, 1] * v)
        divergence = kx * np.fft.fft2(flow_x) + ky * np.fft.fft2(flow_y)
        derivative = np.real(np.fft.ifft2(-divergence - transform * q[k]))
        out[k] = derivative[:, margin : margin + height, margin : margin + width]
    return out


# --------------------------------------------------------------------------------------------
# The shape and its Jacobian
# --------------------------------------------------------------------------------------------
def moments_ellipticity(
    stamps: ArrayLike, sigma: float, centre: ArrayLike | None = None
) -> jax.Array:
    r"""Gaussian-weighted second-moment ellipticity of ``(..., S, S)`` images about pixel
    ``S // 2`` plus ``centre`` (``(..., 2)`` sub-pixel ``(x, y)``; default 0), see the module
    docstring; ``sigma`` is the weight's width in pixels.

    Returns ``(..., 2)``.

    >>> import galsim
    >>> img = galsim.Gaussian(sigma=3.0).shear(e1=0.2).drawImage(nx=31, ny=31, scale=1.0).array
    >>> e = moments_ellipticity(img, 1e6)  # unweighted moments: e is the profile's distortion
    >>> round(float(e[0]), 2), round(float(e[1]), 2)  # (pixels add 1/12 to both moments)
    (0.2, 0.0)
    """
    stamps = jnp.asarray(stamps)
    size = stamps.shape[-1]
    offsets = jnp.arange(size, dtype=stamps.dtype) - size // 2
    dy, dx = offsets[:, None], offsets[None, :]
    if centre is not None:  # (..., 2) sub-pixel (x, y) of the galaxy from the stamp's centre
        centre = jnp.asarray(centre, stamps.dtype)
        dx = dx - centre[..., 0, None, None]
        dy = dy - centre[..., 1, None, None]
    weighted = stamps * jnp.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    q11 = jnp.sum(weighted * dx**2, axis=(-2, -1))
    q22 = jnp.sum(weighted * dy**2, axis=(-2, -1))
    q12 = jnp.sum(weighted * dx * dy, axis=(-2, -1))
    trace = q11 + q22
    return jnp.stack([(q11 - q22) / trace, 2 * q12 / trace], axis=-1)


@jax.jit
def _shape_and_jacobian(
    prior: GalaxyModel, z: jax.Array, band_weights: jax.Array, sigma: jax.Array, offsets: jax.Array
):
    """``e`` ``(n, 2)`` of the decoded latents (moments about their sub-pixel ``offsets``
    ``(n, 2)`` from the stamp centre) and ``de/dz`` ``(n, 2, d)``."""

    def shape(latent, offset):
        stamp = prior.decode(latent[None])[0]
        return moments_ellipticity(jnp.tensordot(band_weights, stamp, axes=1), sigma, offset)

    return jax.vmap(shape)(z, offsets), jax.vmap(jax.jacfwd(shape))(z, offsets)


@jax.jit
def _residual_curvature(
    prior: GalaxyModel, z: jax.Array, weighted: jax.Array, psf: PSFKernel | None
):
    r""":math:`\nabla^2_{z_i} \sum_p c_{ip}\, m_{ip}(z_i)` per source: the residual part of the
    exact Hessian, with ``weighted`` :math:`c_i = W (m - I)` on source *i*'s stamp."""

    def contraction(latent, c):
        stamp = prior.decode(latent[None])
        if psf is not None:
            stamp = convolve_stamps(stamp, psf.fourier)
        return jnp.vdot(c, stamp[0])

    return jax.vmap(jax.hessian(contraction))(z, weighted)


def _padded(z: np.ndarray) -> jax.Array:
    n, d = z.shape
    out = np.zeros((bucket_size(n), d), np.float32)
    out[:n] = z
    return jnp.asarray(out)


def _check_shapes(
    z: np.ndarray, positions: np.ndarray, field: np.ndarray, variance: np.ndarray
) -> None:
    """Refuse latents, positions, field and variance whose shapes do not describe one field."""
    if z.ndim != 2 or positions.shape != (len(z), 2):
        raise MadnessInputError(
            f"need latents (n, d) and positions (n, 2); got shapes {z.shape} and {positions.shape}",
            positions.shape,
        )
    if field.ndim != 3 or variance.shape != field.shape:
        raise MadnessInputError(
            f"need a (bands, H, W) field and a variance of its shape; got {field.shape} and "
            f"{variance.shape}",
            variance.shape,
        )


# --------------------------------------------------------------------------------------------
# The response
# --------------------------------------------------------------------------------------------
def shear_response(
    prior: ScoredGalaxyModel,
    z: ArrayLike,
    positions: ArrayLike,
    field: ArrayLike,
    variance: ArrayLike,
    *,
    psf: PSFKernel | None = None,
    pixel_mask: ArrayLike | None = None,
    bands: Sequence[str] = DEFAULT_SHEAR_BANDS,
    weight_fwhm: float = DEFAULT_WEIGHT_FWHM,
    pixel_scale: float | None = None,
    noise_correction: bool = True,
    seed: int | Sequence[int] = 0,
    max_steps: int = 20,
    tol: float = 1e-4,
) -> ShearResponse:
    r"""Shapes and shear responses of a deblended field's sources (see the module docstring).

    Parameters
    ----------
    prior
        The galaxy prior of the fit (``decode``, ``log_prob``, ``reference_psf``).
    z
        ``(n, d)`` MAP latents of the sources (e.g. ``DeblendResult.fit.params["z"][:n]``).
    positions
        ``(n, 2)`` positions ``(x, y)`` of the fit (stamps at the nearest pixel).
    field, variance
        ``(B, H, W)`` image and pixel variance of the fit; NaN/inf pixels are masked.
    psf
        The field's difference kernels, as in the fit (``None``: the model frame's PSF).
    pixel_mask
        Optional ``(B, H, W)`` or ``(H, W)`` booleans, ``False`` for pixels left out.
    bands
        Bands whose model-frame light is summed for the shape (those the prior has; its middle
        band when it has none of them).
    weight_fwhm
        FWHM of the moments' weight in arcseconds.
    pixel_scale
        Arcseconds per pixel; default the prior's survey's.
    noise_correction
        Add the second noise field and refit (metacal's fixnoise); ``False`` differentiates
        the given fit directly (no refit; biased by the noise's own response at low S/N).
    seed
        Seed of the added noise (anything :func:`numpy.random.default_rng` takes).
    max_steps
        Newton steps at most for the noise-added fit (:func:`~madness_ppl.refine.newton_refine`).
    tol
        Its tolerance (predicted decrease, nats per latent element).

    Returns
    -------
    ShearResponse

    Raises
    ------
    madness_ppl.errors.MadnessInputError
        Latents and positions of different counts, or a field and variance of other shapes.
    """
    z = np.asarray(z, np.float64)
    field = np.asarray(field, np.float64)
    variance = np.asarray(variance, np.float64)
    positions = np.asarray(positions, np.float64)
    _check_shapes(z, positions, field, variance)
    n, d = z.shape
    mask = np.isfinite(field) & np.isfinite(variance) & (variance > 0)
    if pixel_mask is not None:
        mask &= np.broadcast_to(np.asarray(pixel_mask, bool), field.shape)
    if n == 0:
        return ShearResponse(np.zeros((0, 2)), np.zeros((0, 2, 2)), z, 0, True)
    data = np.where(mask, field, 0.0)
    sigma = np.sqrt(np.where(mask, variance, 0.0))
    extra = np.zeros_like(data)
    if noise_correction:
        extra = sigma * np.random.default_rng(seed).standard_normal(field.shape)
        data, variance = data + extra, 2.0 * np.where(mask, variance, 1.0)
    fit = newton_refine(
        prior,
        z,
        positions,
        np.where(mask, data, np.nan),
        variance,
        psf=psf,
        max_steps=max_steps if noise_correction else 0,
        tol=tol,
    )
    z_fit = np.asarray(fit.z, np.float64)
    jac, hess = (np.asarray(a, np.float64) for a in fit.linearisation)
    observed = np.asarray(fit.observed, np.float64)
    centres = nearest_pixel(positions)
    size = jac.shape[-1]
    weight = inverse_variance(variance, mask)
    residual = paste_stamps(observed, positions, field.shape) - data
    weighted = extract_cutouts(weight * residual, centres, size, dtype=np.float32)
    padded_weighted = np.zeros((bucket_size(n), *weighted.shape[1:]), np.float32)
    padded_weighted[:n] = weighted
    curvature = np.asarray(
        _residual_curvature(prior, _padded(z_fit), jnp.asarray(padded_weighted), psf)
    )[:n]
    weights = extract_cutouts(weight, centres, size, dtype=np.float64)
    with one_blas_thread():
        precision = gauss_newton_precision(jac, hess + curvature, weights, centres)
        values, vectors = np.linalg.eigh(precision)
    values = np.maximum(values, _CURVATURE_FLOOR)
    owners = ownership_centres(observed, positions, field.shape[-2:])
    derivative = shear_derivative(
        np.where(mask, data - 2.0 * extra, 0.0), observed_psf(prior, psf), owners
    )
    rhs = np.stack(
        [
            np.einsum(
                "ndbyx,nbyx->nd",
                jac,
                extract_cutouts(weight * derivative[k], centres, size, dtype=np.float64),
            ).ravel()
            for k in range(2)
        ],
        axis=1,
    )  # (n d, 2)
    dz = (vectors @ ((vectors.T @ rhs) / values[:, None])).reshape(n, d, 2)
    band_weights = _band_weights(prior, bands)
    scale = pixel_scale if pixel_scale is not None else _pixel_scale(prior)
    width = weight_fwhm / scale / (2 * np.sqrt(2 * np.log(2)))
    offsets = np.asarray(positions, np.float64).reshape(-1, 2) - centres
    e, de_dz = _shape_and_jacobian(
        prior,
        _padded(z_fit),
        jnp.asarray(band_weights, jnp.float32),
        jnp.float32(width),
        _padded(offsets),
    )
    e = np.asarray(e, np.float64)[:n]
    response = np.einsum("nad,ndk->nak", np.asarray(de_dz, np.float64)[:n], dz)
    return ShearResponse(e, response, z_fit.astype(np.float32), fit.steps, bool(fit.converged))


def _band_weights(prior: GalaxyModel, bands: Sequence[str]) -> np.ndarray:
    """1 for the prior's bands among ``bands`` (its middle band when none), else 0."""
    names = list(prior.bands)
    chosen = [names.index(b) for b in bands if b in names] or [len(names) // 2]
    weights = np.zeros(len(names))
    weights[chosen] = 1.0
    return weights


def _pixel_scale(prior: GalaxyModel) -> float:
    from madness_ppl.survey import survey_of

    survey = survey_of(prior) if hasattr(prior, "config") else None
    if survey is None:
        raise ValueError("the prior's survey is unknown: pass pixel_scale= (arcsec per pixel)")
    return float(survey.pixel_scale)


def add_shear_columns(catalog: Any, response: ShearResponse) -> None:
    """Add ``e1``, ``e2`` and ``R11``, ``R12``, ``R21``, ``R22`` (described) to an astropy
    catalog with one row per source, in place."""
    what = "Gaussian-weighted (FWHM 1.2 arcsec) moments ellipticity of the model-frame galaxy"
    for a in range(2):
        catalog[f"e{a + 1}"] = response.e[:, a].astype(np.float32)
        catalog[f"e{a + 1}"].description = f"{what}, component {a + 1}"
        for k in range(2):
            name = f"R{a + 1}{k + 1}"
            catalog[name] = response.R[:, a, k].astype(np.float32)
            catalog[name].description = f"shear response d e{a + 1} / d g{k + 1}"
