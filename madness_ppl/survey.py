"""Survey descriptions: bands, photometric calibration, sky noise and PSFs.

A :class:`Survey` is plain data. ``Survey.lsst()`` (and any other survey known to the
`surveycodex <https://github.com/aboucaud/surveycodex>`_ package, via :meth:`Survey.from_surveycodex`)
is built from surveycodex's published numbers, so adding a survey needs data only.

Photometric conventions (AB magnitudes, full-depth co-added exposure, gain in e-/ADU):

.. math::

    N_e(m) = t_\\mathrm{exp}\\, 10^{-0.4\\,(m - m_\\mathrm{zp})},
    \\qquad
    S_\\mathrm{pix} = t_\\mathrm{exp}\\, 10^{-0.4\\,(\\mu_\\mathrm{sky} - m_\\mathrm{zp})}\\, p^2,

where :math:`m_\\mathrm{zp}` is the magnitude giving one electron per second, :math:`\\mu_\\mathrm{sky}`
the sky surface brightness in mag/arcsec² and :math:`p` the pixel scale in arcsec. The sky noise per
pixel is Poisson, :math:`\\sigma_\\mathrm{sky} = \\sqrt{S_\\mathrm{pix}}` electrons (plus read noise if set).

The PSF of each band is a Kolmogorov atmosphere convolved with the telescope's obscured Airy pattern;
the atmospheric width is solved for so that the *total* FWHM equals the survey's quoted PSF FWHM
(for a space telescope the Airy core dominates and the atmospheric part shrinks towards zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from madness_ppl.errors import FieldFormatError, MadnessInputError

if TYPE_CHECKING:
    from madness_ppl.galaxy_model import GalaxyModel

__all__ = ["Band", "Survey", "match_bands", "survey_of"]

_ARCSEC_PER_RADIAN = 180.0 / math.pi * 3600.0


@dataclasses.dataclass(frozen=True)
class Band:
    """One filter of a survey.

    Parameters
    ----------
    name
        Band name as used in headers and catalogs (``"r"``).
    zeropoint
        AB magnitude that gives one electron per second.
    sky_brightness
        Sky surface brightness in AB mag / arcsec².
    exposure_time
        Total (co-added) exposure time in seconds.
    psf_fwhm
        Full width at half maximum of the PSF in arcsec.
    effective_wavelength
        Effective wavelength in nm (sets the Airy diffraction width).
    bandpass
        Throughput curve used to compute galaxy colours: a file name in galsim's ``share/bandpasses``
        (``"LSST_r.dat"``) or a ``(blue_nm, red_nm)`` top-hat.
    """

    name: str
    zeropoint: float
    sky_brightness: float
    exposure_time: float
    psf_fwhm: float
    effective_wavelength: float
    bandpass: str | tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Survey:
    """An imaging survey: pixel grid, telescope and bands.

    Parameters
    ----------
    name
        Survey name (``"LSST"``).
    pixel_scale
        Pixel scale in arcsec / pixel.
    bands
        The survey's bands, in wavelength order.
    mirror_diameter
        Primary mirror diameter in m (for the Airy PSF component).
    obscuration
        Linear central obscuration of the pupil (0 for an unobscured pupil).
    gain
        Electrons per ADU.
    read_noise
        Read noise in electrons per pixel of the co-add (0 for sky-dominated co-adds).

    Examples
    --------
    >>> survey = Survey.lsst()
    >>> survey.band_names
    ('u', 'g', 'r', 'i', 'z', 'y')
    >>> round(float(survey.mag_to_electrons(25.0, "r")))
    98614
    """

    name: str
    pixel_scale: float
    bands: tuple[Band, ...]
    mirror_diameter: float
    obscuration: float = 0.0
    gain: float = 1.0
    read_noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.bands:
            raise MadnessInputError(f"survey {self.name!r} has no bands")
        names = [b.name for b in self.bands]
        if len(set(names)) != len(names):
            raise MadnessInputError(f"survey {self.name!r} has duplicate band names: {names}")
        if self.pixel_scale <= 0:
            raise MadnessInputError(f"pixel_scale must be positive, got {self.pixel_scale}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_surveycodex(
        cls,
        name: str,
        *,
        bandpasses: dict[str, str | tuple[float, float]] | None = None,
        read_noise: float = 0.0,
    ) -> Survey:
        """Build a survey from the surveycodex tables.

        Parameters
        ----------
        name
            A surveycodex survey name (``"LSST"``, ``"HSC"``, ``"Euclid_VIS"``, ...).
        bandpasses
            Throughput per band name used for galaxy colours. Defaults to galsim's LSST curve of the
            same letter when it exists, else a top-hat ``lambda_eff * (1 -/+ 0.1)``.
        read_noise
            Read noise in electrons per pixel.
        """
        import surveycodex

        try:
            sc = surveycodex.get_survey(name)
        except Exception as err:  # surveycodex raises a bare ValueError-like error
            raise MadnessInputError(
                f"unknown survey {name!r}; surveycodex knows {list(surveycodex.available_surveys)}"
            ) from err
        bandpasses = dict(bandpasses or {})
        obscuration = getattr(sc, "obscuration", 0.0)
        bands = []
        for band_name in sc.available_filters:
            f = sc.get_filter(band_name)
            wavelength = float(f.effective_wavelength.to_value("nm"))
            bandpass = bandpasses.get(band_name) or _default_bandpass(band_name, wavelength)
            bands.append(
                Band(
                    name=band_name,
                    zeropoint=float(f.zeropoint.value),
                    sky_brightness=float(f.sky_brightness.value),
                    exposure_time=float(f.full_exposure_time.to_value("s")),
                    psf_fwhm=float(f.psf_fwhm.to_value("arcsec")),
                    effective_wavelength=wavelength,
                    bandpass=bandpass,
                )
            )
        return cls(
            name=sc.name,
            pixel_scale=float(sc.pixel_scale.to_value("arcsec")),
            bands=tuple(bands),
            mirror_diameter=float(sc.mirror_diameter.to_value("m")),
            obscuration=float(getattr(obscuration, "value", obscuration)),
            gain=float(sc.gain.value),
            read_noise=read_noise,
        )

    @classmethod
    def lsst(cls) -> Survey:
        """The Rubin LSST 10-year co-add (ugrizy, 0.2"/pixel)."""
        return cls.from_surveycodex("LSST")

    @classmethod
    def hsc(cls) -> Survey:
        """The HSC-SSP wide survey (grizy, 0.168"/pixel); LSST throughputs approximate HSC's."""
        return cls.from_surveycodex("HSC")

    @classmethod
    def euclid_vis(cls) -> Survey:
        """Euclid VIS (one broad band IE, 0.1"/pixel), with a 550-900 nm top-hat throughput."""
        return cls.from_surveycodex("Euclid_VIS", bandpasses={"IE": (550.0, 900.0)})

    @classmethod
    def named(cls, name: str) -> Survey:
        """Look a survey up by case-insensitive name (``"lsst"``, ``"hsc"``, ``"euclid_vis"``)."""
        builders = {"lsst": cls.lsst, "hsc": cls.hsc, "euclid_vis": cls.euclid_vis}
        key = name.lower()
        if key in builders:
            return builders[key]()
        return cls.from_surveycodex(name)

    # ------------------------------------------------------------------ band lookup
    @property
    def band_names(self) -> tuple[str, ...]:
        """Band names in survey order."""
        return tuple(b.name for b in self.bands)

    @property
    def n_bands(self) -> int:
        """Number of bands."""
        return len(self.bands)

    def band(self, name: str) -> Band:
        """Return the band called ``name`` (error listing the valid names otherwise)."""
        return self.bands[self.band_index(name)]

    def band_index(self, name: str) -> int:
        """Index of band ``name`` in :attr:`bands`."""
        names = self.band_names
        if name not in names:
            raise MadnessInputError(
                f"unknown band {name!r} for survey {self.name}; bands are {names}"
            )
        return names.index(name)

    def select_bands(self, names: Sequence[str]) -> Survey:
        """A survey restricted to the given bands (in the given order)."""
        return dataclasses.replace(self, bands=tuple(self.band(n) for n in names))

    # ------------------------------------------------------------------ photometry
    def mag_to_electrons(self, mag: np.ndarray | float, band: str) -> np.ndarray:
        r"""Total electrons of a source of AB magnitude ``mag`` in ``band``.

        :math:`N_e = t_\mathrm{exp} 10^{-0.4 (m - m_\mathrm{zp})}`.
        """
        b = self.band(band)
        return b.exposure_time * 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - b.zeropoint))

    def electrons_to_mag(self, electrons: np.ndarray | float, band: str) -> np.ndarray:
        r"""AB magnitude of a total flux in electrons; ``nan`` for non-positive fluxes.

        :math:`m = m_\mathrm{zp} - 2.5 \log_{10}(N_e / t_\mathrm{exp})`.
        """
        b = self.band(band)
        e = np.asarray(electrons, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(e > 0, b.zeropoint - 2.5 * np.log10(e / b.exposure_time), np.nan)

    @property
    def sky_level(self) -> np.ndarray:
        """Mean sky background per pixel in electrons, one value per band."""
        return np.array(
            [
                b.exposure_time
                * 10.0 ** (-0.4 * (b.sky_brightness - b.zeropoint))
                * self.pixel_scale**2
                for b in self.bands
            ]
        )

    @property
    def sky_variance(self) -> np.ndarray:
        """Per-pixel noise variance of an empty sky (Poisson sky + read noise²), per band."""
        return self.sky_level + self.read_noise**2

    @property
    def sky_sigma(self) -> np.ndarray:
        """Per-pixel noise standard deviation of an empty sky, per band, in electrons."""
        return np.sqrt(self.sky_variance)

    # ------------------------------------------------------------------ PSF
    def psf(self, band: str):
        """The PSF of ``band`` as a galsim object with unit flux.

        A Kolmogorov atmosphere convolved with the obscured Airy pattern of the mirror,
        the atmospheric FWHM solved so that the total FWHM equals ``band.psf_fwhm``.
        """
        b = self.band(band)
        return _psf(b.psf_fwhm, b.effective_wavelength, self.mirror_diameter, self.obscuration)

    def psf_images(self, size: int, bands: Sequence[str] | None = None) -> np.ndarray:
        r"""``(B, size, size)`` pixel-integrated images of :meth:`psf` at the survey's pixel
        scale, centred, one per band (all bands, or ``bands`` in that order), each normalised
        to unit sum over the stamp: :math:`P_b / \sum P_b`."""
        names = self.band_names if bands is None else tuple(bands)
        images = np.stack(
            [self.psf(b).drawImage(nx=size, ny=size, scale=self.pixel_scale).array for b in names]
        ).astype(np.float64)
        return images / images.sum(axis=(-2, -1), keepdims=True)


def _default_bandpass(name: str, wavelength_nm: float) -> str | tuple[float, float]:
    if name in ("u", "g", "r", "i", "z", "y", "Y"):
        return f"LSST_{name.lower()}.dat"
    return (0.9 * wavelength_nm, 1.1 * wavelength_nm)


@functools.lru_cache(maxsize=64)
def _psf(fwhm: float, wavelength_nm: float, diameter: float, obscuration: float):
    import galsim

    lam_over_diam = wavelength_nm * 1e-9 / diameter * _ARCSEC_PER_RADIAN
    airy = galsim.Airy(lam_over_diam=lam_over_diam, obscuration=obscuration)
    airy_fwhm = _measured_fwhm(airy, fwhm)
    if airy_fwhm >= fwhm:
        return airy
    # Secant iterations on the atmospheric FWHM, starting from the quadrature guess.
    atm = math.sqrt(fwhm**2 - airy_fwhm**2)
    for _ in range(4):
        psf = galsim.Convolve(galsim.Kolmogorov(fwhm=atm), airy)
        err = _measured_fwhm(psf, fwhm) / fwhm
        if abs(err - 1.0) < 1e-3:
            break
        atm = atm / err
    return galsim.Convolve(galsim.Kolmogorov(fwhm=atm), airy)


def _measured_fwhm(obj, expected_fwhm: float) -> float:
    scale = expected_fwhm / 40.0
    n = 201
    image = obj.drawImage(nx=n, ny=n, scale=scale, method="no_pixel")
    return float(image.calculateFWHM())


def survey_of(prior: GalaxyModel) -> Survey | None:
    """The prior's survey (``prior.config.survey``) restricted to its bands, or ``None`` for a
    model that names no survey or one this module does not know."""
    name = getattr(getattr(prior, "config", None), "survey", None)
    if name is None:
        return None
    try:
        return Survey.named(name).select_bands(prior.bands)
    except ValueError:
        return None


def match_bands(have: Sequence[str], need: Sequence[str]) -> list[int]:
    """Indices into ``have`` of each band in ``need``.

    Exact names match first, else a case-insensitive match that is unique (FITS upper-cases
    EXTNAMEs). Raises :class:`~madness_ppl.errors.FieldFormatError` naming the bands that are
    missing.
    """
    have = [str(b) for b in have]
    lower: dict[str, list[int]] = {}
    for i, b in enumerate(have):
        lower.setdefault(b.lower(), []).append(i)
    index, missing = [], []
    for b in need:
        if b in have:
            index.append(have.index(b))
        elif len(lower.get(b.lower(), [])) == 1:
            index.append(lower[b.lower()][0])
        else:
            missing.append(b)
    if missing:
        raise FieldFormatError(
            f"the field lacks bands {missing} needed by the prior (it has {have}; "
            f"the prior needs {list(need)})",
            missing,
        )
    return index
