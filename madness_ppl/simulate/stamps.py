"""Drawing galaxies with galsim: PSF-convolved multi-band stamps and the survey noise model.

A galaxy of the catalog (see :mod:`madness_ppl.simulate.catalog`) is drawn in band *b* as

.. math::

    I_b = \\mathrm{PSF}_b * \\left[f^{\\rm bulge}_b\\, \\mathrm{DeV}(r_b, g_b)
          + (f_b - f^{\\rm bulge}_b)\\, \\mathrm{Exp}(r_d, g_d)\\right] * \\mathrm{pixel},

integrated over pixels of the survey's scale. The noise is the Gaussian approximation of
sky + source Poisson noise on the sky-subtracted image,
:math:`y = I + \\epsilon,\\ \\epsilon \\sim \\mathcal{N}(0,\\ S_{\\rm pix} + \\max(I, 0))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from astropy.table import Table

from madness_ppl.errors import MadnessInputError
from madness_ppl.likelihood import pixel_variance
from madness_ppl.survey import Survey

if TYPE_CHECKING:
    import galsim

__all__ = [
    "IsolatedStamps",
    "PSFMaker",
    "add_noise",
    "dataset_psf",
    "draw_galaxy",
    "draw_isolated",
    "galaxy_parameters",
]

#: A PSF per band name, as a galsim object of unit flux (arcsecond units).
PSFMaker = Callable[[str], "galsim.GSObject"]
#: Names of the PSFs a simulated dataset can be drawn with (:func:`dataset_psf`).
DATASET_PSFS = ("survey", "reference")


def dataset_psf(name: str, survey: Survey) -> PSFMaker | None:
    """The PSF a simulated dataset is drawn with, by name.

    ``"survey"``: the survey's default PSF of each band (``None``, what :func:`draw_galaxy`
    uses without an override); ``"reference"``: the model frame of PSF-aware priors, a
    circular Gaussian of FWHM :data:`madness_ppl.psf.REFERENCE_FWHM_PIXELS` pixels in every
    band (``galsim.Gaussian(fwhm=REFERENCE_FWHM_PIXELS * pixel_scale)``), from which any PSF
    of FWHM >= 0.35" is reached by convolution (:mod:`madness_ppl.train.psfs`).
    """
    if name == "survey":
        return None
    if name == "reference":
        import galsim

        from madness_ppl.psf import REFERENCE_FWHM_PIXELS

        gaussian = galsim.Gaussian(fwhm=REFERENCE_FWHM_PIXELS * survey.pixel_scale)
        return lambda band: gaussian
    raise MadnessInputError(f"unknown dataset PSF {name!r}; use one of {DATASET_PSFS}", name)


class IsolatedStamps(NamedTuple):
    """Isolated galaxies, one stamp each.

    Attributes
    ----------
    noiseless
        ``(n, bands, S, S)`` PSF-convolved images in electrons.
    noisy
        Same plus sky + Poisson noise.
    offsets
        ``(n, 2)`` sub-pixel ``(dx, dy)`` of each galaxy's centre from the stamp's central pixel.
    catalog
        The galaxies' catalog rows.
    """

    noiseless: np.ndarray
    noisy: np.ndarray
    offsets: np.ndarray
    catalog: Table


def galaxy_parameters(catalog: Table, survey: Survey) -> dict[str, np.ndarray]:
    """Columns of a catalog needed to draw it, as plain float arrays (fast row access)."""
    missing = [
        name
        for name in ("disk_hlr", "bulge_hlr", "g1", "g2", "bulge_g1", "bulge_g2")
        if name not in catalog.colnames
    ]
    missing += [f"flux_{b}" for b in survey.band_names if f"flux_{b}" not in catalog.colnames]
    if missing:
        raise MadnessInputError(
            f"catalog lacks columns {missing} needed to draw survey {survey.name}"
        )
    keys = ["disk_hlr", "bulge_hlr", "g1", "g2", "bulge_g1", "bulge_g2"]
    out = {k: np.asarray(catalog[k], dtype=float) for k in keys}
    out["flux"] = np.stack([np.asarray(catalog[f"flux_{b}"], float) for b in survey.band_names], 1)
    out["bulge_flux"] = np.stack(
        [np.asarray(catalog[f"bulge_flux_{b}"], float) for b in survey.band_names], 1
    )
    return out


def draw_galaxy(
    params: dict[str, np.ndarray],
    index: int,
    survey: Survey,
    *,
    stamp_size: int,
    offset: tuple[float, float] = (0.0, 0.0),
    shear: tuple[float, float] | None = None,
    psf: PSFMaker | None = None,
) -> np.ndarray:
    """Draw galaxy ``index`` of ``params`` (from :func:`galaxy_parameters`) in every band.

    Parameters
    ----------
    params
        Column arrays of the catalog.
    index
        Row to draw.
    survey
        Survey (bands, PSFs, pixel scale).
    stamp_size
        Side of the square stamp in pixels (odd, so that the centre is a pixel).
    offset
        ``(dx, dy)`` shift of the galaxy centre from the central pixel, in pixels.
    shear
        Optional applied (lensing) reduced shear :math:`(g_1, g_2)`, the same for bulge and
        disk, applied to the intrinsic profile about its own centre before the PSF
        (``galsim.GSObject.shear``): the observed ellipticity is
        :math:`\\varepsilon = (\\varepsilon_s + g) / (1 + g^* \\varepsilon_s)` in complex
        notation. ``None`` (default) draws the unsheared galaxy (identical to before).

    Returns
    -------
    numpy.ndarray
        ``(bands, stamp_size, stamp_size)`` float32 image in electrons.
    """
    import galsim

    i = index
    disk = galsim.Exponential(half_light_radius=params["disk_hlr"][i]).shear(
        g1=params["g1"][i], g2=params["g2"][i]
    )
    bulge = galsim.DeVaucouleurs(half_light_radius=params["bulge_hlr"][i]).shear(
        g1=params["bulge_g1"][i], g2=params["bulge_g2"][i]
    )
    psf = psf or survey.psf
    out = np.empty((survey.n_bands, stamp_size, stamp_size), dtype=np.float32)
    for k, band in enumerate(survey.band_names):
        f_bulge = params["bulge_flux"][i, k]
        f_disk = params["flux"][i, k] - f_bulge
        profile = galsim.Add([bulge.withFlux(f_bulge), disk.withFlux(f_disk)])
        if shear is not None:
            profile = profile.shear(g1=shear[0], g2=shear[1])
        image = galsim.Convolve(profile, psf(band)).drawImage(
            nx=stamp_size, ny=stamp_size, scale=survey.pixel_scale, offset=offset
        )
        out[k] = image.array
    return out


def add_noise(
    image: np.ndarray, sky_variance: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Add sky + source Poisson noise (Gaussian approximation) to a noiseless image.

    Parameters
    ----------
    image
        ``(..., bands, H, W)`` noiseless image in electrons.
    sky_variance
        ``(bands,)`` per-pixel sky variance in electrons².
    rng
        Seeded generator.

    Returns
    -------
    noisy, variance
        The noisy image (float32) and the true per-pixel variance
        :math:`\\sigma^2 = S + \\max(I, 0)` used to draw it.
    """
    variance = pixel_variance(image, sky_variance, dtype=np.float32)
    noise = rng.standard_normal(image.shape).astype(np.float32) * np.sqrt(variance)
    return (image + noise).astype(np.float32), variance.astype(np.float32)


def draw_isolated(
    catalog: Table,
    survey: Survey,
    *,
    rng: np.random.Generator,
    stamp_size: int = 45,
    max_jitter: float = 0.5,
    psf: PSFMaker | None = None,
) -> IsolatedStamps:
    """Draw every galaxy of ``catalog`` alone on its own stamp, with and without noise.

    Parameters
    ----------
    catalog
        From :func:`madness_ppl.simulate.catalog.make_catalog`.
    survey
        The survey.
    rng
        Seeded generator (sub-pixel jitter and noise).
    stamp_size
        Odd stamp side in pixels.
    max_jitter
        Centroids are drawn uniformly within ``±max_jitter`` pixels of the central pixel.
    psf
        Optional PSF per band (:func:`draw_galaxy`); ``None``: the survey's.
    """
    check_stamp_size(stamp_size)
    n = len(catalog)
    params = galaxy_parameters(catalog, survey)
    offsets = rng.uniform(-max_jitter, max_jitter, size=(n, 2))
    noiseless = np.empty((n, survey.n_bands, stamp_size, stamp_size), dtype=np.float32)
    for i in range(n):
        noiseless[i] = draw_galaxy(
            params, i, survey, stamp_size=stamp_size, offset=tuple(offsets[i]), psf=psf
        )
    noisy, _ = add_noise(noiseless, survey.sky_variance, rng)
    return IsolatedStamps(noiseless, noisy, offsets, catalog)


def check_stamp_size(stamp_size: int) -> None:
    """Raise a clear error unless ``stamp_size`` is a positive odd integer."""
    if int(stamp_size) != stamp_size or stamp_size <= 0 or stamp_size % 2 == 0:
        raise MadnessInputError(f"stamp_size must be a positive odd integer, got {stamp_size}")
