r"""The PSFs a PSF-aware prior is trained on, and a bank of their difference kernels.

Training stamps are simulated once in the model frame (every band at the reference PSF
:math:`R`, a circular Gaussian of :data:`madness_ppl.psf.REFERENCE_FWHM_PIXELS` pixels); each
minibatch then observes every stamp through a PSF :math:`P` drawn from a
:class:`PSFDistribution`, by convolution with the difference kernel
:math:`\hat K = \hat P \hat R^* / (|\hat R|^2 + \lambda^2)` (:func:`madness_ppl.psf.difference_kernel`):

.. math::

    y^\mathrm{obs}_b = \mathrm{crop}_S\big(K_b \ast \mathrm{pad}_G(y^\mathrm{ref}_b)\big),

on a grid :math:`G` = 75 pixels for 45-pixel stamps (the observed light spread beyond the stamp
is computed and cropped away, as a survey cut-out would). Drawing the galaxy with galsim at
:math:`P` directly agrees with this to ~1e-3 of the peak for Kolmogorov and Moffat PSFs of FWHM
0.35"-1.7" (0.6 % of the flux for a 1.7" Kolmogorov PSF is lost by the 45-pixel truncation
of the model-frame stamp).

The distribution, per observation (one draw shared by the bands unless said otherwise):

* profile: Kolmogorov or Moffat with probability 1/2 each; Moffat
  :math:`\beta \sim U(2.5, 4.5)`;
* seeing factor :math:`s` applied to the survey's median FWHM :math:`\bar F_b` of every band:
  with probability 1/2 :math:`\ln s \sim N(0, 0.15^2)` (typical nights), otherwise
  :math:`\ln s \sim U(\ln(F_{\min} / \max_b \bar F_b),\ \ln(F_{\max} / \min_b \bar F_b))`
  (log-uniform, so that every band's FWHM spans :math:`[F_{\min}, F_{\max}]` = [0.35", 1.7"]);
* :math:`F_b = \mathrm{clip}(s \bar F_b,\ F_{\min},\ F_{\max})`;
* ellipticity (distortion) :math:`(e_1, e_2)` uniform in the disk :math:`|e| \le 0.05`,
  shared by the bands.

Because the reference PSF is round, the exact :math:`D_4` symmetry augmentation of
:mod:`madness_ppl.train.augment` still holds on the model-frame stamps (the observed PSF is
applied after it).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from madness_ppl import psf as _psf
from madness_ppl.survey import Survey

__all__ = [
    "KernelBank",
    "PSFDistribution",
    "PSFDraws",
    "draw_psf_parameters",
    "kernel_bank",
    "observe",
    "observe_in_batches",
    "psf_images_of",
    "sample_psfs",
]


@dataclasses.dataclass(frozen=True)
class PSFDistribution:
    """Distribution of observed PSFs (see the module docstring for the maths).

    Parameters
    ----------
    fwhm_range
        ``(min, max)`` FWHM in arcseconds of every band.
    moffat_fraction
        Probability of a Moffat profile (otherwise Kolmogorov).
    moffat_beta
        ``(min, max)`` of the uniform Moffat index.
    typical_fraction
        Probability that the seeing factor is log-normal around 1 (otherwise log-uniform
        over ``fwhm_range``).
    typical_sigma
        Standard deviation of :math:`\\ln s` of the log-normal part.
    max_ellipticity
        Radius of the disk of PSF ellipticities (distortion), shared by the bands.
    """

    fwhm_range: tuple[float, float] = (0.35, 1.7)
    moffat_fraction: float = 0.5
    moffat_beta: tuple[float, float] = (2.5, 4.5)
    typical_fraction: float = 0.5
    typical_sigma: float = 0.15
    max_ellipticity: float = 0.05

    def __post_init__(self) -> None:
        lo, hi = self.fwhm_range
        if not 0 < lo < hi:
            raise ValueError(f"fwhm_range must be 0 < min < max, got {self.fwhm_range}")
        if not 0 <= self.moffat_fraction <= 1 or not 0 <= self.typical_fraction <= 1:
            raise ValueError("moffat_fraction and typical_fraction must lie in [0, 1]")
        if not 0 <= self.max_ellipticity < 1:
            raise ValueError(f"max_ellipticity must lie in [0, 1), got {self.max_ellipticity}")


class PSFDraws(NamedTuple):
    """Parameters of ``n`` observations' PSFs (:func:`draw_psf_parameters`)."""

    fwhm: np.ndarray  # (n, B) arcsec
    moffat: np.ndarray  # (n,) bool
    beta: np.ndarray  # (n,) Moffat index (unused for Kolmogorov)
    e1: np.ndarray  # (n,)
    e2: np.ndarray  # (n,)


def draw_psf_parameters(
    distribution: PSFDistribution, survey: Survey, n: int, rng: np.random.Generator
) -> PSFDraws:
    """Draw the profile, per-band FWHM and ellipticity of ``n`` observations."""
    median = np.array([b.psf_fwhm for b in survey.bands], float)
    lo, hi = distribution.fwhm_range
    typical = rng.random(n) < distribution.typical_fraction
    log_s = np.where(
        typical,
        rng.normal(0.0, distribution.typical_sigma, n),
        rng.uniform(np.log(lo / median.max()), np.log(hi / median.min()), n),
    )
    fwhm = np.clip(np.exp(log_s)[:, None] * median[None], lo, hi)
    moffat = rng.random(n) < distribution.moffat_fraction
    beta = rng.uniform(*distribution.moffat_beta, n)
    radius = distribution.max_ellipticity * np.sqrt(rng.random(n))  # uniform in the disk
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return PSFDraws(fwhm, moffat, beta, radius * np.cos(angle), radius * np.sin(angle))


def sample_psfs(
    distribution: PSFDistribution,
    survey: Survey,
    n: int,
    rng: np.random.Generator,
    size: int = 75,
) -> np.ndarray:
    """Images of ``n`` PSFs drawn from ``distribution`` (:func:`madness_ppl.psf.psf_images`).

    Returns
    -------
    numpy.ndarray
        ``(n, B, size, size)`` float64 pixel-integrated images with unit sum per band.
    """
    return psf_images_of(draw_psf_parameters(distribution, survey, n, rng), survey, size)


def psf_images_of(draws: PSFDraws, survey: Survey, size: int) -> np.ndarray:
    """``(n, B, size, size)`` images of the PSFs of :func:`draw_psf_parameters`."""
    return np.stack(
        [
            _psf.psf_images(
                draws.fwhm[i],
                pixel_scale=survey.pixel_scale,
                size=size,
                profile="moffat" if draws.moffat[i] else "kolmogorov",
                beta=float(draws.beta[i]),
                e1=float(draws.e1[i]),
                e2=float(draws.e2[i]),
            )
            for i in range(len(draws.fwhm))
        ]
    )


class KernelBank(NamedTuple):
    r"""Difference kernels from the reference PSF to ``n`` observed PSFs.

    Attributes
    ----------
    fourier
        ``(n, B, G, G // 2 + 1)`` complex64 :math:`\hat K` (:class:`madness_ppl.psf.PSFKernel`).
    descriptor
        ``(n, B, 3)`` float32 PSF descriptors the encoder reads
        (:func:`madness_ppl.psf.psf_descriptor`).
    fwhm
        ``(n, B)`` FWHM in arcseconds.
    """

    fourier: np.ndarray
    descriptor: np.ndarray
    fwhm: np.ndarray

    def __len__(self) -> int:  # the number of PSFs, not of NamedTuple fields
        return int(self.fourier.shape[0])

    @property
    def grid(self) -> int:
        """Side ``G`` of the kernels' grid."""
        return int(self.fourier.shape[-2])


def training_kernel_grid(stamp_size: int) -> int:
    """Kernel grid of a training bank for ``stamp_size`` stamps: the stamp plus 15 pixels (3")
    on each side, rounded up to a fast FFT size (75 for 45-pixel stamps: holds a 1.7" PSF's
    light spread out of the stamp)."""
    return next(g for g in _psf._GRIDS if g >= stamp_size + 30)


def kernel_bank(
    distribution: PSFDistribution,
    survey: Survey,
    n: int,
    *,
    seed: int = 0,
    grid: int = 75,
    reference_fwhm_pixels: float = _psf.REFERENCE_FWHM_PIXELS,
) -> KernelBank:
    """A seeded bank of ``n`` observed PSFs and their difference kernels on a ``grid`` side.

    The PSF images are drawn on the kernel grid itself (75 pixels = 15" at 0.2"/px hold the
    wings of a 1.7" Moffat of beta 2.5 to ~0.3 % of its flux).
    """
    rng = np.random.default_rng([seed, 28])
    draws = draw_psf_parameters(distribution, survey, n, rng)
    images = psf_images_of(draws, survey, grid)
    reference = _psf.reference_psf(survey.n_bands, grid, fwhm_pixels=reference_fwhm_pixels)
    fourier = np.stack(
        [
            np.asarray(
                _psf.difference_kernel(image, reference, grid=grid, bands=survey.band_names).fourier
            )
            for image in images
        ]
    ).astype(np.complex64)
    descriptor = _psf.psf_descriptor(images, reference_fwhm=reference_fwhm_pixels)
    return KernelBank(fourier, descriptor.astype(np.float32), draws.fwhm.astype(np.float32))


def observe(stamps: jax.Array, kernel: jax.Array) -> jax.Array:
    """Observe model-frame stamps ``(..., B, S, S)`` through kernels ``(..., B, G, G//2+1)``:
    the central ``S x S`` crop of :func:`madness_ppl.psf.convolve_stamps` (traceable)."""
    size, grid = stamps.shape[-1], kernel.shape[-2]
    lo = (grid - size) // 2
    full = _psf.convolve_stamps(stamps, kernel)
    return full[..., lo : lo + size, lo : lo + size]


@jax.jit
def _observe_jit(stamps, kernel):
    return observe(stamps, kernel)


def observe_in_batches(
    stamps: np.ndarray, bank: KernelBank, index: np.ndarray, batch: int = 256
) -> np.ndarray:
    """:func:`observe` of ``stamps[i]`` through ``bank`` kernel ``index[i]`` (host arrays)."""
    out = np.empty(stamps.shape, np.float32)
    for s in range(0, len(stamps), batch):
        kernel = jnp.asarray(bank.fourier[index[s : s + batch]])
        out[s : s + batch] = np.asarray(_observe_jit(jnp.asarray(stamps[s : s + batch]), kernel))
    return out
