"""A seeded, CatSim-like galaxy population: bulge + disk profiles with realistic colours.

Every galaxy is a de Vaucouleurs bulge (Sersic n = 4) plus an exponential disk (Sersic n = 1),
both centred on the same point. The distributions, and where they come from:

* **i-band magnitude** (LSST ``i``, AB) follows the deep number counts
  :math:`N(<i) = 46 \\times 10^{0.31 (i - 25)}` arcmin⁻² (LSST Science Book 2009, eq. 3.7), i.e.
  :math:`dN/di \\propto 10^{0.31 i}`, sampled between ``mag_bright`` and ``mag_faint``
  (25.3 = the LSST "gold" sample; fainter background galaxies by raising ``mag_faint``).
* **redshift** given *i*: :math:`p(z \\mid i) \\propto z^2 e^{-z/z_0}` with
  :math:`z_0 = 0.0417\\, i - 0.744` (LSST Science Book eq. 3.8), a Gamma(3, z0) law, clipped to
  :math:`z \\le 4` and :math:`z_0 \\ge 0.02`.
* **morphological type**: 25 % bulge-dominated (bulge-to-total flux ratio in *i*,
  :math:`B/T \\sim U(0.5, 1)`, disk SED E) and 75 % disk-dominated (:math:`B/T \\sim U(0, 0.3)`,
  disk SED Sbc / Scd / Im with probabilities 0.4 / 0.35 / 0.25). Bulges always use the E template,
  so composite galaxies have a redder bulge than disk (a colour gradient), as in CatSim.
* **colours**: the Coleman-Wu-Weedman templates shipped with galsim, redshifted and integrated
  through each band's throughput (galsim's LSST curves by default): :math:`m_b = i + (m_b - m_i)_{\\rm SED}(z)`.
* **sizes**: disk half-light radius log-normal with median
  :math:`r_{50}(i) = 0.6'' \\times 10^{-0.1 (i - 22)}` and :math:`\\sigma_{\\ln r} = 0.45`
  (a size-magnitude relation close to HST/COSMOS measurements, e.g. Miller et al. 2013 for the
  disk scale length trend), clipped to [0.05", 3"]; bulge half-light radius
  :math:`r_b = r_d \\times U(0.3, 0.7)`.
* **ellipticities**: disk reduced shear :math:`(g_1, g_2) \\sim \\mathcal{N}(0, 0.22^2)` per
  component, truncated to :math:`|g| < 0.7` (the measured intrinsic shape noise of ~0.22-0.26);
  the bulge shares the position angle with half the disk's ellipticity.

Fluxes are stored in electrons per band for the survey's full exposure.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from astropy.table import Table

from madness_ppl.errors import MadnessInputError
from madness_ppl.survey import Survey

__all__ = [
    "SED_TEMPLATES",
    "CatalogConfig",
    "colour_table",
    "expected_density",
    "make_catalog",
    "rotate_shapes",
]

SED_TEMPLATES: tuple[str, ...] = ("E", "Sbc", "Scd", "Im")
_REDSHIFT_GRID = np.linspace(0.0, 4.0, 161)
_COUNT_SLOPE = 0.31
_COUNT_NORM = 46.0  # galaxies / arcmin^2 brighter than i = 25


@dataclasses.dataclass(frozen=True)
class CatalogConfig:
    """Parameters of the galaxy population (see the module docstring for the laws).

    Parameters
    ----------
    mag_bright, mag_faint
        i-band magnitude range.
    early_fraction
        Fraction of bulge-dominated galaxies.
    size_median, size_slope, size_scatter
        Disk half-light radius law: median ``size_median * 10**(-size_slope * (i - 22))`` arcsec,
        log-normal scatter ``size_scatter`` (natural log).
    shape_sigma, shape_max
        Per-component dispersion and truncation of the disk reduced shear.
    """

    mag_bright: float = 20.0
    mag_faint: float = 25.3
    early_fraction: float = 0.25
    size_median: float = 0.6
    size_slope: float = 0.1
    size_scatter: float = 0.45
    shape_sigma: float = 0.22
    shape_max: float = 0.7

    def __post_init__(self) -> None:
        if not self.mag_bright < self.mag_faint:
            raise MadnessInputError(
                f"mag_bright ({self.mag_bright}) must be brighter (smaller) than mag_faint "
                f"({self.mag_faint})"
            )
        if not 0.0 <= self.early_fraction <= 1.0:
            raise MadnessInputError(f"early_fraction must be in [0, 1], got {self.early_fraction}")
        if self.size_median <= 0 or self.size_scatter < 0:
            raise MadnessInputError("size_median must be positive and size_scatter non-negative")


def expected_density(config: CatalogConfig | None = None) -> float:
    """Mean number of galaxies per arcmin² in the configured magnitude range.

    :math:`n = 46\\,[10^{0.31 (i_f - 25)} - 10^{0.31 (i_b - 25)}]`.
    """
    c = config or CatalogConfig()
    return _COUNT_NORM * (
        10 ** (_COUNT_SLOPE * (c.mag_faint - 25.0)) - 10 ** (_COUNT_SLOPE * (c.mag_bright - 25.0))
    )


@functools.lru_cache(maxsize=16)
def colour_table(bandpasses: tuple[str | tuple[float, float], ...]) -> np.ndarray:
    """Colours :math:`m_b - m_i` of each SED template on the redshift grid.

    Parameters
    ----------
    bandpasses
        One throughput per band (a galsim share file name or a ``(blue, red)`` top-hat in nm).

    Returns
    -------
    numpy.ndarray
        Shape ``(len(SED_TEMPLATES), len(_REDSHIFT_GRID), n_bands)``, AB magnitude differences
        relative to the LSST i band.
    """
    import galsim

    reference = galsim.Bandpass("LSST_i.dat", "nm").withZeropoint("AB")
    bands = [_bandpass(b) for b in bandpasses]
    out = np.empty((len(SED_TEMPLATES), _REDSHIFT_GRID.size, len(bands)))
    for t, name in enumerate(SED_TEMPLATES):
        sed = galsim.SED(
            os.path.join(galsim.meta_data.share_dir, "SEDs", f"CWW_{name}_ext.sed"),
            wave_type="Ang",
            flux_type="flambda",
        )
        for k, z in enumerate(_REDSHIFT_GRID):
            shifted = sed.atRedshift(float(z))
            m_ref = shifted.calculateMagnitude(reference)
            out[t, k] = [shifted.calculateMagnitude(bp) - m_ref for bp in bands]
    return out


def _bandpass(spec: str | tuple[float, float]):
    import galsim

    if isinstance(spec, str):
        return galsim.Bandpass(spec, "nm").withZeropoint("AB")
    blue, red = (float(x) for x in spec)
    table = galsim.LookupTable([blue - 1.0, blue, red, red + 1.0], [0.0, 1.0, 1.0, 0.0], "linear")
    return galsim.Bandpass(table, "nm").withZeropoint("AB")


def _interp_colours(table: np.ndarray, template: np.ndarray, redshift: np.ndarray) -> np.ndarray:
    """Linear interpolation of the colour table at each galaxy's (template, z)."""
    pos = np.interp(redshift, _REDSHIFT_GRID, np.arange(_REDSHIFT_GRID.size))
    lo = np.floor(pos).astype(int).clip(0, _REDSHIFT_GRID.size - 2)
    w = (pos - lo)[:, None]
    return (1 - w) * table[template, lo] + w * table[template, lo + 1]


def make_catalog(
    n: int,
    survey: Survey,
    *,
    rng: np.random.Generator,
    config: CatalogConfig | None = None,
) -> Table:
    """Draw ``n`` galaxies from the population.

    Parameters
    ----------
    n
        Number of galaxies (``>= 0``).
    survey
        Survey whose bands set the per-band fluxes (electrons, full exposure).
    rng
        Seeded numpy generator (the only source of randomness).
    config
        Population parameters; defaults to :class:`CatalogConfig`.

    Returns
    -------
    astropy.table.Table
        One row per galaxy: ``i_mag``, ``redshift``, ``sed`` (disk template index), ``bulge_fraction``,
        ``disk_hlr``, ``bulge_hlr`` (arcsec), ``g1``, ``g2`` (disk reduced shear), ``bulge_g1``,
        ``bulge_g2``, and for each band *b* ``flux_b`` (total), ``bulge_flux_b`` (electrons).

    Examples
    --------
    >>> import numpy as np
    >>> from madness_ppl.survey import Survey
    >>> cat = make_catalog(3, Survey.lsst(), rng=np.random.default_rng(0))
    >>> len(cat), "flux_r" in cat.colnames
    (3, True)
    """
    if n < 0:
        raise MadnessInputError(f"number of galaxies must be non-negative, got {n}")
    c = config or CatalogConfig()

    # magnitude: inverse CDF of dN/dm ∝ 10^(a m) on [bright, faint]
    a = _COUNT_SLOPE
    lo, hi = 10 ** (a * c.mag_bright), 10 ** (a * c.mag_faint)
    i_mag = np.log10(lo + rng.uniform(size=n) * (hi - lo)) / a

    z0 = np.maximum(0.0417 * i_mag - 0.744, 0.02)
    redshift = np.minimum(rng.gamma(3.0, z0), _REDSHIFT_GRID[-1])

    early = rng.uniform(size=n) < c.early_fraction
    bulge_fraction = np.where(early, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.3, n))
    late_sed = rng.choice([1, 2, 3], size=n, p=[0.4, 0.35, 0.25])
    sed = np.where(early, 0, late_sed)

    median = c.size_median * 10 ** (-c.size_slope * (i_mag - 22.0))
    disk_hlr = np.clip(median * np.exp(c.size_scatter * rng.standard_normal(n)), 0.05, 3.0)
    bulge_hlr = np.clip(disk_hlr * rng.uniform(0.3, 0.7, n), 0.05, 3.0)

    g1, g2 = _truncated_shear(n, c.shape_sigma, c.shape_max, rng)

    bandpasses = tuple(b.bandpass for b in survey.bands)
    colours = colour_table(bandpasses)
    disk_colour = _interp_colours(colours, sed, redshift)
    bulge_colour = _interp_colours(colours, np.zeros(n, dtype=int), redshift)

    table = Table()
    table["id"] = np.arange(n, dtype=np.int64)
    table["i_mag"] = i_mag
    table["redshift"] = redshift
    table["sed"] = sed.astype(np.int16)
    table["bulge_fraction"] = bulge_fraction
    table["disk_hlr"] = disk_hlr
    table["bulge_hlr"] = bulge_hlr
    table["g1"], table["g2"] = g1, g2
    table["bulge_g1"], table["bulge_g2"] = 0.5 * g1, 0.5 * g2
    for k, band in enumerate(survey.band_names):
        bulge = survey.mag_to_electrons(i_mag + bulge_colour[:, k], band) * bulge_fraction
        disk = survey.mag_to_electrons(i_mag + disk_colour[:, k], band) * (1 - bulge_fraction)
        table[f"flux_{band}"] = bulge + disk
        table[f"bulge_flux_{band}"] = bulge
    table.meta["survey"] = survey.name
    table.meta["config"] = repr(c)
    return table


def rotate_shapes(catalog: Table, degrees: float) -> Table:
    """A copy of ``catalog`` with every galaxy's intrinsic shape rotated by ``degrees``.

    Disk and bulge reduced shears turn as spin-2 quantities,
    :math:`g \\to g\\,e^{2 i \\theta}` (complex :math:`g = g_1 + i g_2`); sizes, fluxes and
    positions are unchanged. With ``degrees = 90`` every ellipticity flips sign, the
    "ring test" partner whose shape noise cancels the original's in a shear average.

    Examples
    --------
    >>> import numpy as np
    >>> from madness_ppl.survey import Survey
    >>> cat = make_catalog(2, Survey.lsst(), rng=np.random.default_rng(0))
    >>> bool(np.allclose(rotate_shapes(cat, 90.0)["g1"], -cat["g1"]))
    True
    """
    phase = np.exp(2j * np.deg2rad(degrees))
    out = catalog.copy()
    for k1, k2 in (("g1", "g2"), ("bulge_g1", "bulge_g2")):
        g = (np.asarray(catalog[k1], float) + 1j * np.asarray(catalog[k2], float)) * phase
        out[k1], out[k2] = g.real, g.imag
    return out


def _truncated_shear(
    n: int, sigma: float, g_max: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Reduced shear components with a Gaussian law truncated to ``|g| < g_max`` (by rejection)."""
    g = rng.normal(0.0, sigma, size=(n, 2))
    bad = np.hypot(g[:, 0], g[:, 1]) >= g_max
    while bad.any():
        g[bad] = rng.normal(0.0, sigma, size=(int(bad.sum()), 2))
        bad = np.hypot(g[:, 0], g[:, 1]) >= g_max
    return g[:, 0], g[:, 1]
