r"""Pixel units of a field file, their conversion to the prior's electrons, and the survey check.

A prior works in the electrons of its survey (:class:`~madness_ppl.survey.Survey`: zero point
:math:`Z_b` and exposure :math:`t_b` per band). Real images come in other units: an HSC coadd in
fluxes on the AB zero point 27, a Rubin image in nJy, a raw frame in ADU. A pixel value
:math:`v` on the AB zero point :math:`z` has magnitude :math:`z - 2.5 \log_{10} v`, hence

.. math:: e_b = s_b\, v, \qquad s_b = t_b\, 10^{-0.4 (z - Z_b)},

electrons per file unit in band :math:`b` (:func:`electrons_per_unit`); variances scale by
:math:`s_b^2`. Magnitudes in the catalog are AB either way; fluxes are in electrons of the
prior's survey, and the catalog says so (``FLUXUNIT``) with :math:`s_b` (``ESCALE_<band>``) to
convert back.

:func:`check_survey` refuses a field whose header says it is from another survey or pixel scale
than the prior's: the prior's galaxies have that survey's pixel scale and bands, and fitting
them elsewhere gives a plausible-looking wrong catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from madness_ppl.errors import FieldFormatError

if TYPE_CHECKING:
    from astropy.io import fits

    from madness_ppl.prior import GalaxyPrior

__all__ = [
    "ELECTRON_UNITS",
    "JANSKY_ZEROPOINTS",
    "check_survey",
    "electrons_per_unit",
    "header_zeropoint",
]

#: ``BUNIT`` values that mean electrons (no conversion).
ELECTRON_UNITS = frozenset({"electron", "electrons", "e", "e-", "elec"})
#: AB zero points of flux-density units: :math:`m = z - 2.5 \log_{10} v`.
JANSKY_ZEROPOINTS = {"jy": 8.9, "mjy": 16.4, "ujy": 23.9, "njy": 31.4}
_ZEROPOINT_KEYS = ("MAGZERO", "MAGZP", "ZEROPT", "ZP", "PHOTZP")
#: Relative pixel-scale mismatch above which a field is refused.
PIXEL_SCALE_TOLERANCE = 0.02


def header_zeropoint(header: fits.Header | None) -> float | None:
    r"""The AB magnitude of a pixel value of 1 that a FITS header states, or ``None``.

    Read from ``FLUXMAG0`` (the flux of a magnitude-0 source, Rubin/HSC:
    :math:`z = 2.5 \log_{10} F_0`), else ``MAGZERO`` / ``MAGZP`` / ``ZEROPT`` / ``ZP`` /
    ``PHOTZP``, else a flux-density ``BUNIT`` (``nJy``: 31.4, ``uJy``: 23.9, ``mJy``: 16.4,
    ``Jy``: 8.9).
    """
    if header is None:
        return None
    if "FLUXMAG0" in header and float(header["FLUXMAG0"]) > 0:
        return 2.5 * float(np.log10(float(header["FLUXMAG0"])))
    for key in _ZEROPOINT_KEYS:
        if key in header:
            return float(header[key])
    unit = _unit(header)
    return JANSKY_ZEROPOINTS.get(unit.replace("µ", "u")) if unit else None


def _unit(header: fits.Header | None) -> str:
    if header is None or "BUNIT" not in header:
        return ""
    return str(header["BUNIT"]).strip().lower()


def electrons_per_unit(
    prior: GalaxyPrior,
    header: fits.Header | None = None,
    *,
    zeropoint: float | None = None,
    flux_scale: float | Sequence[float] | None = None,
) -> np.ndarray:
    r"""Electrons of the prior's survey per pixel unit of a field, one factor per prior band.

    :math:`s_b = t_b 10^{-0.4 (z - Z_b)}` for a field whose pixel value 1 has AB magnitude
    :math:`z`. In order of precedence: an explicit ``flux_scale`` (one number, or one per band
    in the prior's order); an explicit ``zeropoint`` :math:`z`; the header's zero point
    (:func:`header_zeropoint`); 1 when the header's ``BUNIT`` is electrons or absent.

    Raises
    ------
    madness_ppl.errors.FieldFormatError
        A non-positive or non-finite scale, a scale per band of the wrong length, a zero point
        for a prior of unknown survey, or a ``BUNIT`` (``adu``, ``count``, ...) with no zero
        point to convert it.
    """
    n_bands = len(prior.bands)
    if flux_scale is not None:
        scale = np.asarray(flux_scale, float)
        if scale.ndim == 0:
            scale = np.full(n_bands, float(scale))
        if scale.shape != (n_bands,):
            raise FieldFormatError(
                f"flux_scale has {scale.size} values for the prior's {n_bands} bands "
                f"{list(prior.bands)}",
                scale.shape,
            )
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise FieldFormatError(f"flux_scale must be positive and finite, got {scale}", scale)
        return scale
    z = zeropoint if zeropoint is not None else header_zeropoint(header)
    if z is None:
        unit = _unit(header)
        if unit and unit not in ELECTRON_UNITS:
            raise FieldFormatError(
                f"the field's pixels are in {header['BUNIT']!r} and its header states no zero "
                "point (FLUXMAG0, MAGZERO, ...): give the AB magnitude of a pixel value of 1 "
                "(--zeropoint) or the electrons per unit (--flux-scale)",
                unit,
            )
        return np.ones(n_bands)
    if not np.isfinite(z):
        raise FieldFormatError(f"zero point must be finite, got {z}", z)
    from madness_ppl.survey import survey_of

    survey = survey_of(prior)
    if survey is None:
        raise FieldFormatError(
            f"a zero point needs the prior's survey, and {prior.config.survey!r} is unknown: "
            "give --flux-scale (electrons per pixel unit) instead",
            prior.config.survey,
        )
    return np.array([float(survey.mag_to_electrons(z, b)) for b in prior.bands])


def field_pixel_scale(header: fits.Header | None, wcs: Any = None) -> float | None:
    """Arcseconds per pixel stated by a field: its ``PIXSCALE`` card, else its celestial WCS."""
    if header is not None and "PIXSCALE" in header:
        return float(header["PIXSCALE"])
    if wcs is not None:
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
    return None


def check_survey(
    prior: GalaxyPrior,
    bands: Sequence[str],
    header: fits.Header | None = None,
    wcs: Any = None,
    *,
    source: str = "the field",
) -> None:
    """Refuse a field that its header places in another survey or pixel scale than the prior's.

    The survey is the header's ``SURVEY`` card; the pixel scale its ``PIXSCALE`` card or its
    celestial WCS, compared with the prior's survey within :data:`PIXEL_SCALE_TOLERANCE`. A
    header that says neither passes (the noise-scale check still warns on a foreign depth).

    Raises
    ------
    madness_ppl.errors.FieldFormatError
        Naming the field's survey, bands and pixel scale and the prior's.
    """
    from madness_ppl.survey import survey_of

    survey = survey_of(prior)
    name = str(prior.config.survey)
    field_survey = (
        str(header["SURVEY"]).strip() if header is not None and "SURVEY" in header else ""
    )
    scale = field_pixel_scale(header, wcs)
    wrong_survey = bool(field_survey) and field_survey.lower() != name.lower()
    wrong_scale = (
        survey is not None
        and scale is not None
        and abs(scale / survey.pixel_scale - 1.0) > PIXEL_SCALE_TOLERANCE
    )
    if not (wrong_survey or wrong_scale):
        return
    have = f"{field_survey or 'a'} field (bands {', '.join(map(str, bands))}"
    have += f', {scale:.3g}"/pixel)' if scale is not None else ")"
    need = f"{name} bands {', '.join(prior.bands)}"
    if survey is not None:
        need += f' at {survey.pixel_scale:.3g}"/pixel'
    raise FieldFormatError(
        f"{source} is a{'n' if have[0].lower() in 'aeiou' else ''} {have}, but the prior models "
        f"{need}: use a prior trained for this survey (e.g. --prior {field_survey.lower() or name})"
        " or train one (madness-ppl train)",
        field_survey or scale,
    )
