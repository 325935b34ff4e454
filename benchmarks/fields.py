"""The benchmark field sets: one definition of each, drawn by every study that uses it.

A field set is a galaxy population, a layout (field size, how many galaxies, margin) and a PSF.
:data:`SETS` holds them all; ``python -m benchmarks --sets`` prints the table below from it.
Seeds belong to the studies (each says which it draws): a set maps a seed or a
``numpy.random.Generator`` to a field, so one seed gives one field in every study.

Populations:

* ``in-distribution``: :class:`madness_ppl.simulate.CatalogConfig` defaults observed with the
  LSST PSFs of :meth:`madness_ppl.survey.Survey.lsst` (the shipped priors were trained on exactly
  these).
* ``out-of-distribution``: larger galaxies with a steeper size-magnitude law and more scatter
  (median disk half-light radius 0.8" at i = 22, slope 0.15, log-normal scatter 0.6, so more
  galaxies overflow the 45-pixel stamp), per-component shape dispersion 0.30 instead of 0.22,
  half bulge-dominated instead of a quarter, observed with PSFs 15 % wider in every band.

Colour gradients (red bulge, bluer disk) are on in both: the simulator has no switch for them.

Layouts: a number of galaxies drawn uniformly in ``n_galaxies``, or Poisson with mean
``density_factor`` x :func:`madness_ppl.simulate.expected_density` of the population x the field's
area; centres at least ``margin`` pixels from the edges (``tight``: within the central 40 x 40
pixels, so nearest neighbours are often < 1").

PSFs: the population's survey PSF, or (``psf-*`` sets) one PSF per field: Moffat (beta uniform
in 2.5-4.5) or Kolmogorov with equal odds, FWHM = a factor drawn uniformly in ``psf_widths``
times the LSST FWHM of each band; the population's own 15 % widening does not apply there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

IN_DISTRIBUTION = "in-distribution"
OUT_OF_DISTRIBUTION = "out-of-distribution"
POPULATIONS = (IN_DISTRIBUTION, OUT_OF_DISTRIBUTION)
OOD_CATALOG = {
    "size_median": 0.8,
    "size_slope": 0.15,
    "size_scatter": 0.6,
    "shape_sigma": 0.30,
    "early_fraction": 0.5,
}
OOD_PSF_SCALE = 1.15
#: side (pixels) of the PSF images of a ``psf-*`` field, as the studies have always drawn them
PSF_IMAGE_SIZE = 61


def _check_population(population: str) -> None:
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")


def survey_for(population: str, base=None):
    """The survey ``base`` (default LSST) as observed for ``population``.

    Out of distribution every band's PSF FWHM is multiplied by :data:`OOD_PSF_SCALE`.
    """
    from madness_ppl.survey import Survey

    _check_population(population)
    survey = Survey.lsst() if base is None else base
    if population == OUT_OF_DISTRIBUTION:
        bands = tuple(
            dataclasses.replace(b, psf_fwhm=b.psf_fwhm * OOD_PSF_SCALE) for b in survey.bands
        )
        survey = dataclasses.replace(survey, bands=bands)
    return survey


def catalog_config_for(population: str):
    """The population's :class:`~madness_ppl.simulate.CatalogConfig` (None: the defaults)."""
    from madness_ppl.simulate import CatalogConfig

    _check_population(population)
    return CatalogConfig(**OOD_CATALOG) if population == OUT_OF_DISTRIBUTION else None


class Field(NamedTuple):
    """One drawn field of a :class:`FieldSet`.

    Attributes
    ----------
    blend
        The :class:`madness_ppl.simulate.Blend` (image, variance, true positions and stamps).
    survey
        The survey as observed (the population's PSF widths).
    psf_objects
        A ``psf-*`` field's galsim PSF per band; None where the field has the survey's PSF.
    psf_info
        A ``psf-*`` field's PSF draw: ``factor``, ``profile`` and (Moffat) ``beta``; else empty.
    """

    blend: Any
    survey: Any
    psf_objects: dict | None
    psf_info: dict

    def psf_images(self, size: int = PSF_IMAGE_SIZE, bands=None) -> np.ndarray:
        """``(B, size, size)`` unit-sum images of the PSF the field was drawn with.

        Parameters
        ----------
        size
            Side of each image in pixels.
        bands
            Band names in the order wanted (default: the survey's).
        """
        if self.psf_objects is None:
            return self.survey.psf_images(size, bands)
        images = []
        for band in self.survey.band_names if bands is None else bands:
            image = (
                self.psf_objects[band]
                .drawImage(nx=size, ny=size, scale=self.survey.pixel_scale)
                .array
            )
            images.append(image / image.sum())
        return np.stack(images)


@dataclasses.dataclass(frozen=True)
class FieldSet:
    """A population, a layout and a PSF (module docstring).

    Attributes
    ----------
    name
        The set's name in tables and on command lines.
    population
        One of :data:`POPULATIONS`.
    field_size
        Default side of the field in pixels (a study may draw another).
    n_galaxies
        ``(low, high)`` galaxies per field, uniform; or None for a Poisson density.
    density_factor
        The Poisson mean in units of the population's expected density (when
        ``n_galaxies`` is None).
    margin
        Least distance (pixels) of a galaxy centre from the field's edge.
    psf_widths
        ``(low, high)`` range of the per-field PSF width factor; None: the survey's PSF.
    summary
        One line saying what the set is for.
    """

    name: str
    population: str
    field_size: int
    n_galaxies: tuple[int, int] | None = None
    density_factor: float = 1.0
    margin: int = 5
    psf_widths: tuple[float, float] | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        _check_population(self.population)

    def config(self, field_size: int | None = None):
        """The :class:`madness_ppl.simulate.BlendConfig` of the layout.

        Parameters
        ----------
        field_size
            Side in pixels (default :attr:`field_size`).
        """
        from madness_ppl.simulate import BlendConfig, expected_density

        size = self.field_size if field_size is None else field_size
        if self.n_galaxies is not None:
            return BlendConfig(field_size=size, n_galaxies=self.n_galaxies, margin=self.margin)
        density = self.density_factor * expected_density(catalog_config_for(self.population))
        return BlendConfig(field_size=size, density=density, margin=self.margin)

    def survey(self, base=None):
        """The survey the set's fields are observed with (``base``: default LSST)."""
        if self.psf_widths is not None:  # the per-field PSF replaces the population's
            return survey_for(IN_DISTRIBUTION, base)
        return survey_for(self.population, base)

    def draw(self, seed, *, field_size: int | None = None, base=None) -> Field:
        """Draw one field.

        Parameters
        ----------
        seed
            Anything :func:`numpy.random.default_rng` takes (a ``Generator`` is used as is).
            A ``psf-*`` set draws its PSF first, then the galaxies, from the same stream.
        field_size
            Side in pixels (default :attr:`field_size`).
        base
            The survey to observe with (default LSST).
        """
        from madness_ppl.simulate import make_blend

        rng = np.random.default_rng(seed)
        survey = self.survey(base)
        objects, info, psf = None, {}, None
        if self.psf_widths is not None:
            objects, info = _draw_psf(rng, self.psf_widths, survey)
            psf = objects.__getitem__
        blend = make_blend(
            survey,
            rng=rng,
            config=self.config(field_size),
            catalog_config=catalog_config_for(self.population),
            psf=psf,
        )
        return Field(blend, survey, objects, info)

    def describe(self) -> dict[str, str]:
        """The set's row of the table (:func:`markdown_table`)."""
        if self.n_galaxies is not None:
            galaxies = f"{self.n_galaxies[0]}-{self.n_galaxies[1]}"
        else:
            galaxies = f"Poisson, {self.density_factor:g} x expected density"
        if self.psf_widths is None:
            psf = "survey" + (f" x {OOD_PSF_SCALE:g}" if self.population != IN_DISTRIBUTION else "")
        else:
            low, high = self.psf_widths
            psf = f"per field, {low:g}{f'-{high:g}' if high != low else ''} x survey"
        return {
            "set": self.name,
            "population": self.population,
            "field (px)": str(self.field_size),
            "galaxies": galaxies,
            "margin (px)": str(self.margin),
            "PSF": psf,
            "used for": self.summary,
        }


def _draw_psf(rng: np.random.Generator, widths: tuple[float, float], survey):
    """One field's PSF: a galsim object per band (module docstring) and what was drawn."""
    import galsim

    factor = rng.uniform(*widths)
    moffat = rng.random() < 0.5
    beta = rng.uniform(2.5, 4.5)
    objects = {}
    for band in survey.band_names:
        fwhm = factor * survey.band(band).psf_fwhm
        objects[band] = (
            galsim.Moffat(beta=beta, fwhm=fwhm) if moffat else galsim.Kolmogorov(fwhm=fwhm)
        )
    info = {"factor": float(factor), "profile": "moffat" if moffat else "kolmogorov"}
    if moffat:
        info["beta"] = float(beta)
    return objects, info


def _sets(*sets: FieldSet) -> dict[str, FieldSet]:
    return {s.name: s for s in sets}


_IN, _OUT = IN_DISTRIBUTION, OUT_OF_DISTRIBUTION
_TIGHT = {"field_size": 80, "n_galaxies": (2, 6), "margin": 20}
#: every field set, by name
SETS: dict[str, FieldSet] = _sets(
    FieldSet("lsst", _IN, 205, summary="survey depth and density: the headline comparison"),
    FieldSet("dense", _IN, 205, density_factor=1.5, summary="the headline, 1.5x as crowded"),
    FieldSet("ood", _OUT, 205, summary="the headline layout, a population the prior never saw"),
    FieldSet("ood-dense", _OUT, 205, density_factor=1.5, summary="both shifts at once"),
    FieldSet("low", _IN, 205, n_galaxies=(8, 15), summary="map_speed's earlier sparse layout"),
    FieldSet(
        "high",
        _IN,
        205,
        n_galaxies=(12, 20),
        summary="fixed counts: map_speed, priors, laplace_coverage, error_model's lsst",
    ),
    FieldSet(
        "high-ood",
        _OUT,
        205,
        n_galaxies=(12, 20),
        summary="fixed counts out of distribution: priors, laplace_coverage, error_model's ood",
    ),
    FieldSet("crowded", _IN, 128, density_factor=3.0, summary="error_model's dense"),
    FieldSet("tight", _IN, **_TIGHT, summary="tight blends (#31): tight, error_model"),
    FieldSet("tight-ood", _OUT, **_TIGHT, summary="tight blends out of distribution"),
    FieldSet("psf-narrow", _IN, 128, psf_widths=(0.5, 0.7), summary="seeing better than trained"),
    FieldSet(
        "psf-median", _IN, 128, psf_widths=(1.0, 1.0), summary="median seeing, other profiles"
    ),
    FieldSet("psf-wide", _IN, 128, psf_widths=(1.4, 1.8), summary="seeing worse than trained"),
    FieldSet(
        "psf-narrow-ood", _OUT, 128, psf_widths=(0.5, 0.7), summary="psf-narrow, ood galaxies"
    ),
    FieldSet(
        "psf-median-ood", _OUT, 128, psf_widths=(1.0, 1.0), summary="psf-median, ood galaxies"
    ),
    FieldSet("psf-wide-ood", _OUT, 128, psf_widths=(1.4, 1.8), summary="psf-wide, ood galaxies"),
)


def field_set(name: str, population: str = IN_DISTRIBUTION) -> FieldSet:
    """The set ``name`` for ``population`` (``"tight"`` out of distribution is ``tight-ood``).

    Raises
    ------
    KeyError
        Naming the known sets, when there is no such set.
    """
    _check_population(population)
    key = name if population == IN_DISTRIBUTION or name.endswith("-ood") else f"{name}-ood"
    if key not in SETS:
        raise KeyError(f"no field set {key!r}; known: {', '.join(SETS)}")
    return SETS[key]


def markdown_table() -> str:
    """The table of every set, as in ``benchmarks/README.md``."""
    rows = [s.describe() for s in SETS.values()]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)
