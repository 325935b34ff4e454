r"""Field preparation shared by :func:`~madness_ppl.deblend.deblend` and
:func:`~madness_ppl.batch.load_tile`: check, noise, detection.

1. :func:`check_field` (an array) or :func:`field_for_prior` (a file's
   :class:`~madness_ppl.fields.FieldData`) puts the field in the prior's band order, non-finite
   pixels NaN (masked);
2. :func:`field_noise` estimates the sky level :math:`m_b` and noise :math:`\sigma_b` per band
   unless a variance map is given, and the variance
   :math:`V = \sigma_b^2 + \max(y - m_b, 0)` (:func:`~madness_ppl.likelihood.pixel_variance`);
   :func:`check_noise_scale` warns when :math:`\sigma_b` is far from the prior's survey;
3. sources are detected on the noise-weighted coadd (sep) unless positions are given.

:func:`prepare_field` runs steps 2 and 3: the one place to change how a field is prepared.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from madness_ppl import measure
from madness_ppl.errors import FieldFormatError, MadnessInputError, MadnessInputWarning
from madness_ppl.likelihood import pixel_variance
from madness_ppl.options import DEFAULT_DETECTION, Detection
from madness_ppl.survey import match_bands, survey_of

if TYPE_CHECKING:
    from madness_ppl.prior import GalaxyPrior

__all__ = [
    "PreparedField",
    "check_field",
    "check_noise_scale",
    "field_for_prior",
    "field_noise",
    "prepare_field",
    "psf_for_prior",
    "survey_of",
]


class PreparedField(NamedTuple):
    """Output of :func:`prepare_field`: ``float32`` ``field`` and ``variance`` ``(B, H, W)``,
    ``noise`` ``(B,)``, ``positions`` ``(N, 2)`` and ``timings`` (seconds of ``"noise"`` and
    ``"detection"``)."""

    field: np.ndarray
    variance: np.ndarray
    noise: np.ndarray
    positions: np.ndarray
    timings: dict[str, float]


def prepare_field(
    field: np.ndarray,
    prior: GalaxyPrior,
    variance: np.ndarray | None = None,
    *,
    detection: Detection | None = DEFAULT_DETECTION,
    check_sky: bool = True,
    source: str = "the field",
) -> PreparedField:
    """Noise, variance and sources of a checked field (in the prior's band order).

    Parameters
    ----------
    field
        ``(B, H, W)`` image in electrons from :func:`check_field` or :func:`field_for_prior`.
    prior
        The galaxy prior (its survey's sky noise is the yardstick of
        :func:`check_noise_scale`).
    variance
        Optional ``(B, H, W)`` variance map (see :func:`field_noise`).
    detection
        Detect the sources with sep (:func:`madness_ppl.measure.detect`) on the
        background-subtracted field with these settings; ``None`` when the caller has
        positions (``positions`` is then ``(0, 2)``).
    check_sky
        With a given ``variance``, warn when the background is not zero
        (:func:`check_sky_level`); ``False`` when the caller fits a sky level.
    source
        Name of the field in warnings.
    """
    start = time.perf_counter()
    if np.ma.isMaskedArray(variance):  # pixels masked in the variance leave the fit too
        field = np.where(np.ma.getmaskarray(variance), np.float32(np.nan), field)
        variance = np.ma.filled(np.ma.asarray(variance, dtype=np.float32), np.float32(1.0))
    given = variance is not None
    field, variance, noise = field_noise(field, variance, tuple(prior.bands))
    if given and check_sky:
        check_sky_level(field, variance, prior, source=source)
    check_noise_scale(noise, prior, source=source, stacklevel=4)
    noise_done = time.perf_counter()
    positions = (
        measure.detect(field, noise, **detection.sep_keywords()).positions
        if detection is not None
        else np.zeros((0, 2))
    )
    timings = {"noise": noise_done - start, "detection": time.perf_counter() - noise_done}
    return PreparedField(field, variance, noise, positions, timings)


#: Sky level (in units of the pixel noise) above which a field given with its variance warns.
MAX_SKY_LEVEL = 0.2


def check_sky_level(
    field: np.ndarray, variance: np.ndarray, prior: GalaxyPrior, *, source: str = "the field"
) -> None:
    """Warn when a field passed with its variance is not background-subtracted.

    With ``variance=`` the field is fitted as given (no sky is estimated); a leftover sky of
    a fraction of the noise per pixel is absorbed by the galaxy models (+0.3 sigma per pixel
    raised fluxes by 1.2-2x). The sigma-clipped median (:func:`madness_ppl.measure.estimate_noise`)
    of each band, in units of its median pixel noise, must stay below :data:`MAX_SKY_LEVEL`
    (galaxy light alone gives up to ~0.1 on tight or 3x-dense LSST fields).
    """
    level = np.zeros(len(field))
    for b, plane in enumerate(field):
        try:
            level[b] = measure.estimate_noise(plane[None])[0][0]
        except MadnessInputError:  # too few pixels with data in this band: nothing to check
            continue
    sigma = np.sqrt(np.nanmedian(np.where(variance > 0, variance, np.nan), axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = level / sigma
    bad = np.flatnonzero(np.abs(ratio) > MAX_SKY_LEVEL)
    if len(bad):
        bands = ", ".join(f"{prior.bands[b]} {ratio[b]:+.2f}" for b in bad)
        warnings.warn(
            f"{source}: the background is not zero (sigma-clipped median in units of the pixel "
            f"noise: {bands}); with variance= the field must be sky-subtracted, or the galaxy "
            "models absorb the sky (subtract it, or pass no variance to have it estimated)",
            MadnessInputWarning,
            stacklevel=4,
        )


def check_field(field: Any, prior: GalaxyPrior, bands: Sequence[str] | None) -> np.ndarray:
    """Check a ``(bands, H, W)`` field and return it as float32 in the prior's band order.

    Raises :class:`~madness_ppl.errors.FieldFormatError` naming the problem: not 3-D, band
    names that do not match the planes, bands the prior needs but the field lacks, or no finite
    pixel at all. Infinite pixels become NaN (masked), and so do the masked pixels of a
    :class:`numpy.ma.MaskedArray` (its mask is kept, not dropped).
    """
    field = masked_to_nan(field)
    if field.ndim != 3:
        raise FieldFormatError(
            f"field must be a (bands, height, width) image, got shape {field.shape}", field.shape
        )
    if bands is not None:
        bands = list(bands)
        if len(bands) != field.shape[0]:
            raise FieldFormatError(
                f"{len(bands)} band names given for a field with {field.shape[0]} bands", bands
            )
        field = field[match_bands(bands, prior.bands)]
    elif field.shape[0] != len(prior.bands):
        raise FieldFormatError(
            f"the field has {field.shape[0]} bands but the prior expects {len(prior.bands)} "
            f"{list(prior.bands)}; pass bands=... to select and order them",
            field.shape,
        )
    field = np.where(np.isfinite(field), field, np.float32(np.nan))
    if not np.isfinite(field).any():
        raise FieldFormatError("the field has no finite pixel")
    return field


def masked_to_nan(array: Any) -> np.ndarray:
    """``array`` as float32, with the masked pixels of a :class:`numpy.ma.MaskedArray` as NaN."""
    if np.ma.isMaskedArray(array):
        return np.ma.filled(np.ma.asarray(array, dtype=np.float32), np.float32(np.nan))
    return np.asarray(array, dtype=np.float32)


def field_for_prior(
    data: Any, prior: GalaxyPrior, scale: np.ndarray | None = None, *, source: str = "the field"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image and variance of a :class:`~madness_ppl.fields.FieldData` in the prior's band order,
    in the prior's electrons.

    The one path from a file to the fit (``madness-ppl deblend`` and
    :func:`madness_ppl.batch.load_tile`): a field whose header names another survey or pixel
    scale is refused (:func:`~madness_ppl.units.check_survey`); the image, variance and mask
    planes are all selected and reordered with the band names, masked pixels are NaN (they
    leave the likelihood); the image is multiplied by ``scale`` :math:`s_b` (electrons per
    pixel unit, default :func:`~madness_ppl.units.electrons_per_unit` of the header) and the
    variance by :math:`s_b^2`.
    """
    from madness_ppl.units import check_survey, electrons_per_unit

    check_survey(prior, data.bands, data.header, data.wcs, source=source)
    if scale is None:
        scale = electrons_per_unit(prior, data.header)
    scale = np.asarray(scale, np.float32)[:, None, None]
    image = np.asarray(data.image, np.float32)
    if data.mask is not None:
        image = np.where(data.mask, np.float32(np.nan), image)
    field = check_field(image, prior, data.bands) * scale
    variance = None
    if data.variance is not None:
        variance = np.asarray(data.variance, np.float32)[match_bands(data.bands, prior.bands)]
        variance = variance * scale**2
    return field, variance


def psf_for_prior(
    data: Any, prior: GalaxyPrior, psf_file: str | os.PathLike | None = None
) -> np.ndarray | None:
    """The field's PSF images in the prior's band order: from ``psf_file`` when given
    (:func:`~madness_ppl.fields.read_psf`), else the ``PSF`` planes of the field file
    (:class:`~madness_ppl.fields.FieldData` ``psf``), else ``None`` (the survey default is then
    used, with a warning, by :func:`madness_ppl.psf.field_kernel`)."""
    from madness_ppl.fields import read_psf

    images = read_psf(psf_file, data.bands) if psf_file is not None else data.psf
    if images is None:
        return None
    return np.asarray(images)[match_bands(data.bands, prior.bands)]


def check_noise_scale(
    noise: np.ndarray,
    prior: GalaxyPrior,
    *,
    factor: float = 10.0,
    source: str = "the field",
    stacklevel: int = 3,
) -> list[str]:
    """Warn when the measured per-band sky noise is ``factor`` times off the prior's survey.

    The prior works in electrons at its survey's depth: a field in ADU, not sky-subtracted, or
    of another depth has a noise far from the survey's sky noise
    (:attr:`madness_ppl.survey.Survey.sky_sigma`), and its galaxies are not the ones the prior
    knows. Returns the bands that disagree (and warns with
    :class:`~madness_ppl.errors.MadnessInputWarning`, ``stacklevel`` frames up).
    """
    survey = survey_of(prior)
    if survey is None:
        return []
    expected = np.asarray(survey.sky_sigma, float)
    noise = np.asarray(noise, float)
    ratio = noise / expected
    off = [b for b, r in zip(prior.bands, ratio, strict=True) if not (1 / factor <= r <= factor)]
    if off:
        detail = ", ".join(
            f"{b}: {n:.3g} vs {e:.3g}"
            for b, n, e, r in zip(prior.bands, noise, expected, ratio, strict=True)
            if b in off
        )
        warnings.warn(
            f"{source}: the measured sky noise differs by more than {factor:g}x from the "
            f"{prior.config.survey} survey the prior was trained on (electrons, measured vs "
            f"expected: {detail}); is the image in electrons (not ADU), sky-subtracted and of "
            "the survey's depth? The fluxes will not be meaningful otherwise",
            MadnessInputWarning,
            stacklevel=stacklevel,
        )
    return off


def field_noise(
    field: np.ndarray, variance: np.ndarray | None = None, bands: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Background-subtracted field, per-pixel variance and per-band noise of one field.

    Without ``variance``, the sky level :math:`m_b` and noise :math:`\sigma_b` of each band are
    estimated from *this* field (sigma-clipped, :func:`madness_ppl.measure.estimate_noise`),
    the level is subtracted and :math:`V_{b,p} = \sigma_b^2 + \max(y_{b,p} - m_b, 0)`
    (sky plus the source Poisson term, in electrons). With ``variance``, the field is kept and
    :math:`\sigma_b^2` is the median of the positive variances of band *b*.

    Parameters
    ----------
    field
        ``(bands, H, W)`` image in electrons (NaN/inf allowed: they are masked later).
    variance
        Optional ``(bands, H, W)`` variance map.

    Returns
    -------
    field, variance, noise
        ``float32`` arrays of shapes ``(B, H, W)``, ``(B, H, W)`` and ``(B,)``.
    """
    field = np.asarray(field, np.float32)
    if variance is None:
        level, noise = measure.estimate_noise(field, bands=bands)
        field = field - level[:, None, None].astype(np.float32)
        variance = pixel_variance(np.nan_to_num(field), noise**2)
    else:
        variance = np.asarray(variance, np.float32)
        if variance.shape != field.shape:
            raise FieldFormatError(
                f"variance shape {variance.shape} != field shape {field.shape}", variance.shape
            )
        noise = np.sqrt(np.nanmedian(np.where(variance > 0, variance, np.nan), axis=(1, 2)))
    return field, np.asarray(variance, np.float32), np.asarray(noise, np.float32)
