"""Test populations shared by the benchmarks: the training simulator's, and one the priors never saw.

``in-distribution``: :class:`madness_ppl.simulate.CatalogConfig` defaults and the LSST PSFs of
:meth:`madness_ppl.survey.Survey.lsst` (the shipped priors were trained on exactly these).

``out-of-distribution``: larger galaxies with a steeper size-magnitude law and more scatter
(median disk half-light radius 0.8" at i = 22, slope 0.15, log-normal scatter 0.6, so more
galaxies overflow the 45-pixel stamp), per-component shape dispersion 0.30 instead of 0.22,
half bulge-dominated instead of a quarter, observed with PSFs 15 % wider in every band. Colour
gradients (red bulge, bluer disk) are on in both: the simulator has no switch for them.
"""

from __future__ import annotations

import dataclasses

OOD_CATALOG = {
    "size_median": 0.8,
    "size_slope": 0.15,
    "size_scatter": 0.6,
    "shape_sigma": 0.30,
    "early_fraction": 0.5,
}
OOD_PSF_SCALE = 1.15
POPULATIONS = ("in-distribution", "out-of-distribution")


def survey_for(population: str, base=None):
    """The survey ``base`` (default LSST) as observed for ``population`` (PSFs 15 % wider out
    of distribution)."""
    from madness_ppl.survey import Survey

    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
    survey = Survey.lsst() if base is None else base
    if population == "out-of-distribution":
        bands = tuple(
            dataclasses.replace(b, psf_fwhm=b.psf_fwhm * OOD_PSF_SCALE) for b in survey.bands
        )
        survey = dataclasses.replace(survey, bands=bands)
    return survey


def catalog_config_for(population: str):
    """The galaxy population's :class:`~madness_ppl.simulate.CatalogConfig` (None: defaults)."""
    from madness_ppl.simulate import CatalogConfig

    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
    return CatalogConfig(**OOD_CATALOG) if population == "out-of-distribution" else None
