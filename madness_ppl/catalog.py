"""The deblender's source catalog, and the checks and flux measures it rests on.

* :func:`source_catalog`: one astropy row per source (fluxes, redistributed fluxes, errors,
  magnitudes, flags, KSB shear, chi², matched-filter S/N, convergence);
* :func:`redistribute_flux`: scarlet's flux re-distribution of the data between the models;
* :func:`check_fit_quality`: warnings for sources with a bad chi², an unconverged fit or a
  model cut by its stamp (:func:`~madness_ppl.misfit.stamp_edge_fraction`);
* :func:`dead_bands`: bands the prior cannot model; :func:`matched_snr`: S/N under the model;
* :func:`fit_flags`: the ``fit_flags`` bit mask of reasons to doubt a row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from astropy.table import Table
from jax.typing import ArrayLike

from madness_ppl import likelihood, measure
from madness_ppl.cutouts import extract_cutouts, nearest_pixel, paste_stamps
from madness_ppl.error_budget import calibrated_fractions
from madness_ppl.errors import MadnessInputWarning
from madness_ppl.galaxy_model import GalaxyModel, zero_bands
from madness_ppl.misfit import SourceMisfit, source_misfit, stamp_edge_fraction
from madness_ppl.prior import GalaxyPrior
from madness_ppl.survey import Survey, survey_of

__all__ = [
    "MIN_OBSERVED_LIGHT",
    "TRUNCATION_WARNING",
    "check_fit_quality",
    "dead_bands",
    "fit_flags",
    "matched_snr",
    "redistribute_flux",
    "source_catalog",
]


def redistribute_flux(
    field: np.ndarray, sources: np.ndarray, positions: np.ndarray, *, eps: float = 1e-6
) -> np.ndarray:
    r"""Split the observed field between the sources in proportion to their models.

    With :math:`m_i` the model of source *i* and :math:`M = \sum_j m_j`, source *i* receives

    .. math::

        d_i = y \, \frac{m_i}{M} \quad \text{where } M > \epsilon \max M, \text{ else } 0,

    per band and pixel (scarlet's "flux re-distribution"). The :math:`d_i` add up to the data
    wherever a model is non-negligible, so a measurement on :math:`d_i` keeps the observed
    flux (and noise) and depends on the models only through their relative shapes; errors of
    the model's own amplitude cancel.

    Parameters
    ----------
    field
        ``(bands, H, W)`` data (NaN pixels count as 0).
    sources
        ``(N, bands, S, S)`` non-negative per-source models centred on ``nearest_pixel(positions)``.
    positions
        ``(N, 2)`` positions ``(x, y)`` in pixels.
    eps
        Relative floor of :math:`M` below which nothing is assigned.

    Returns
    -------
    numpy.ndarray
        ``(N, bands, S, S)`` redistributed stamps, on the same grid as ``sources``.
    """
    sources = np.asarray(sources, np.float64)
    size = sources.shape[-1]
    field = np.nan_to_num(np.asarray(field, np.float64))
    centres = nearest_pixel(positions)
    model = paste_stamps(sources, centres, field.shape)
    total = extract_cutouts(model, centres, size).astype(np.float64)
    data = extract_cutouts(field, positions, size).astype(np.float64)
    floor = eps * max(float(total.max(initial=0.0)), 0.0)
    ok = total > floor
    return np.where(ok, data * sources / np.where(ok, total, 1.0), 0.0)


def check_fit_quality(
    catalog: Table, *, threshold: float = 100.0, source: str = "the field"
) -> np.ndarray:
    r"""Warn about sources whose stamp's reduced :math:`\chi^2` exceeds ``threshold``, and
    about fits that did not converge.

    A galaxy model that misses the data by :math:`\sqrt{100} = 10\,\sigma` per pixel on
    average is not a measurement: an unmasked artefact (hot pixel, cosmic ray, satellite
    trail), a star, or a wrong variance map. Returns the ids of those sources (and warns with
    :class:`~madness_ppl.errors.MadnessInputWarning`).
    """
    if len(catalog) and "converged" in catalog.colnames:
        stuck = ~np.asarray(catalog["converged"], bool)
        if stuck.any():
            warnings.warn(
                f"{source}: the fit of {int(stuck.sum())} of {len(catalog)} source(s) did not "
                "converge within max_steps (catalog column converged = False): their fluxes "
                "depend on where the optimiser stopped; raise max_steps",
                MadnessInputWarning,
                stacklevel=3,
            )
    if len(catalog) and "edge_flux_frac" in catalog.colnames:
        cut = np.asarray(catalog["edge_flux_frac"], float) > TRUNCATION_WARNING
        if cut.any():
            ids = np.asarray(catalog["id"])[cut]
            warnings.warn(
                f"{source}: {int(cut.sum())} source(s) (ids {ids[:10].tolist()}) reach the edge "
                f"of the prior's stamp (edge_flux_frac up to "
                f"{np.max(np.asarray(catalog['edge_flux_frac'])[cut]):.2g}): they are larger "
                "than the stamp and their fluxes are lower bounds",
                MadnessInputWarning,
                stacklevel=3,
            )
    chi2 = np.asarray(catalog["chi2"], float) if len(catalog) else np.zeros(0)
    bad = np.flatnonzero(chi2 > threshold)
    if len(bad):
        ids = np.asarray(catalog["id"])[bad]
        warnings.warn(
            f"{source}: {len(bad)} source(s) (ids {ids[:10].tolist()}) have a reduced chi2 above "
            f"{threshold:g} (up to {np.nanmax(chi2[bad]):.3g}): their fluxes are unreliable; mask "
            "hot pixels, cosmic rays or stars (MASK plane) or check the variance",
            MadnessInputWarning,
            stacklevel=3,
        )
        return ids
    return np.zeros(0, np.int64)


#: ``edge_flux_frac`` above which a source is reported as truncated by its stamp.
TRUNCATION_WARNING = 0.01


def dead_bands(prior: GalaxyModel) -> tuple[str, ...]:
    """Bands in which the prior's decoder outputs exactly zero for every latent: such a band
    cannot be modelled, every source gets flux 0 there whatever the data
    (:meth:`~madness_ppl.prior.GalaxyPrior.dead_bands`, stored with a trained prior; other
    models: :func:`~madness_ppl.galaxy_model.zero_bands`)."""
    method = getattr(prior, "dead_bands", None)
    return tuple(method()) if callable(method) else zero_bands(prior)


def matched_snr(
    sources: np.ndarray, residual: np.ndarray, variance: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    r"""Matched-filter S/N of each source, :math:`\sum s\,d / \sigma^2 \big/
    \sqrt{\sum s^2 / \sigma^2}` over its stamp and all bands, with :math:`d` the data minus
    the other sources' models (the residual plus its own model) and masked pixels left out.
    Pure noise gives :math:`\mathcal N(0, 1)`."""
    n = len(positions)
    if not n:
        return np.zeros(0)
    size = sources.shape[-1]
    weight = likelihood.inverse_variance(variance, np.isfinite(residual))
    res = extract_cutouts(np.nan_to_num(residual), positions, size, dtype=np.float64)
    w = extract_cutouts(weight, positions, size, dtype=np.float64)
    own = np.asarray(sources, np.float64)
    signal = (own * (res + own) * w).sum((1, 2, 3))
    norm = np.sqrt((own**2 * w).sum((1, 2, 3)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, signal / norm, 0.0)


#: Below this share of a source's model light on unmasked pixels, its flux in a band is flagged.
MIN_OBSERVED_LIGHT = 0.5

#: Bits of the catalog's ``fit_flags`` column (0: nothing suspect).
FLAG_NOT_CONVERGED = 1
FLAG_TRUNCATED = 2
FLAG_POOR_FIT = 4
FLAG_LOW_SNR = 8
#: ``chi2_footprint`` above which a fit is flagged as poor (:data:`FLAG_POOR_FIT`).
POOR_FIT_CHI2 = 2.0
#: ``snr`` below which a source is flagged (:data:`FLAG_LOW_SNR`).
LOW_SNR = 5.0


def fit_flags(
    converged: ArrayLike, edge: ArrayLike, chi2_footprint: ArrayLike, snr: ArrayLike
) -> np.ndarray:
    r"""The catalog's ``fit_flags`` bit mask: which reasons to doubt a row hold.

    ========================  =====  =====================================================
    bit                       value  set when
    ========================  =====  =====================================================
    ``FLAG_NOT_CONVERGED``    1      the fit stopped at ``max_steps``
    ``FLAG_TRUNCATED``        2      ``edge_flux_frac`` > :data:`TRUNCATION_WARNING`
    ``FLAG_POOR_FIT``         4      ``chi2_footprint`` > :data:`POOR_FIT_CHI2`
    ``FLAG_LOW_SNR``          8      ``snr`` < :data:`LOW_SNR`
    ========================  =====  =====================================================

    Examples
    --------
    >>> fit_flags([True, False], [0.0, 0.05], [1.0, 3.0], [50.0, 2.0]).tolist()
    [0, 15]
    """
    converged, edge, chi2, snr = (np.asarray(a) for a in (converged, edge, chi2_footprint, snr))
    return (
        FLAG_NOT_CONVERGED * ~converged.astype(bool)
        + FLAG_TRUNCATED * (edge > TRUNCATION_WARNING)
        + FLAG_POOR_FIT * (chi2 > POOR_FIT_CHI2)
        + FLAG_LOW_SNR * (snr < LOW_SNR)
    ).astype(np.int16)


def source_catalog(
    prior: GalaxyPrior,
    positions: np.ndarray,
    sources: np.ndarray,
    model_image: np.ndarray,
    residual: np.ndarray,
    variance: np.ndarray,
    converged: np.ndarray,
    reference_band: str,
    flux_err: np.ndarray | None = None,
    model_frame: np.ndarray | None = None,
    misfit: SourceMisfit | None = None,
    point_sources: ArrayLike | None = None,
) -> Table:
    r"""The source catalog of a deblended field: one row per source.

    Columns: ``id``, ``x``, ``y``; per band ``flux_<band>`` (:math:`\sum_p m_{ib,p}`, the
    model's total flux in electrons), ``flux_<band>_redist`` (the data shared in proportion to
    the models, :func:`redistribute_flux`), ``flux_<band>_err`` (when ``flux_err`` is given),
    ``mag_<band>`` (AB, when the prior's survey is known) and ``flux_<band>_flag`` (a band the
    prior cannot model, or a source mostly on masked pixels); ``g1``, ``g2`` (KSB shear in the
    reference band, measured in the model frame); ``chi2`` (reduced over the stamp), ``snr``
    (:func:`matched_snr`), ``edge_flux_frac``, ``point_source``, ``converged``, ``chi2_footprint`` and
    ``fit_flags`` (:func:`fit_flags`). Each column carries a description; the header records
    ``BANDS``, ``PRIOR`` and, when they apply, ``ERRDOF`` and ``DEADBAND``.

    Parameters
    ----------
    prior
        The galaxy prior of the fit (bands, survey, reference PSF, calibration).
    positions
        ``(N, 2)`` source positions ``(x, y)``.
    sources
        ``(N, B, S, S)`` each source's model as observed.
    model_image, residual, variance
        ``(B, H, W)`` sum of the models, data minus model (NaN where masked), pixel variance.
    converged
        ``(N,)`` whether each source's fit converged.
    reference_band
        Band of the shapes (the middle band when the prior lacks it).
    flux_err
        ``(N, B)`` flux errors, or ``None`` for none.
    model_frame
        ``(N, B, S, S)`` the models before the field's PSF (shapes and truncation are measured
        there); ``None`` when ``sources`` are in the model frame.
    misfit
        Each source's misfit (:func:`~madness_ppl.misfit.source_misfit`), computed here when
        ``None``.
    point_sources
        ``(N,)`` booleans, ``True`` for a source fitted as a star
        (:mod:`madness_ppl.point_sources`): the ``point_source`` column, and its
        ``edge_flux_frac`` is 0 (a PSF is not cut by the stamp). ``None``: all galaxies.
    """
    n = len(positions)
    dead = dead_bands(prior)
    table = Table()
    table["id"] = np.arange(n, dtype=np.int64)
    table["x"], table["y"] = positions[:, 0].astype(float), positions[:, 1].astype(float)
    survey = survey_of(prior)
    flux = sources.sum(axis=(-1, -2)) if n else np.zeros((0, len(prior.bands)))
    data = np.nan_to_num(residual) + model_image  # masked pixels take the model's value
    shared = redistribute_flux(data, sources, positions).sum(axis=(-1, -2)) if n else flux
    size = sources.shape[-1] if n else prior.stamp_size
    inside = extract_cutouts(np.isfinite(residual).astype(np.float32), positions, size)
    light = np.abs(sources) if n else np.zeros((0, len(prior.bands), size, size))
    with np.errstate(invalid="ignore", divide="ignore"):
        # share of each source's model light, per band, on pixels with data
        seen = np.where(
            light.sum((-1, -2)) > 0, (light * inside).sum((-1, -2)) / light.sum((-1, -2)), 1.0
        )
    _band_columns(table, prior.bands, flux, shared, flux_err, seen, survey, dead)
    ref = (
        prior.bands.index(reference_band)
        if reference_band in prior.bands
        else len(prior.bands) // 2
    )
    reference_psf = prior.reference_psf() if hasattr(prior, "reference_psf") else None
    if reference_psf is not None and n:
        # shear is physical in the model frame: measured there, corrected for its PSF
        frame = sources if model_frame is None else model_frame
        shear = measure.hsm_shear(frame[:, ref], reference_psf[ref])
    else:
        shear = np.full((n, 2), np.nan)
    stars = np.zeros(n, bool) if point_sources is None else np.asarray(point_sources, bool)
    shear[stars] = np.nan  # a star has no shape to measure
    table["g1"], table["g2"] = shear[:, 0], shear[:, 1]
    _quality_columns(
        table, sources, residual, variance, positions, converged, inside, misfit, model_frame, stars
    )
    table["point_source"] = stars
    kind = table["point_source"]
    kind.description = (
        "fitted as a point source (the PSF times free fluxes; x, y are its fitted centre)"
    )
    tail_dof = float(calibrated_fractions(prior)["tail_dof"])
    if flux_err is not None and np.isfinite(tail_dof):
        table.meta["ERRDOF"] = tail_dof  # Student-t tails of the flux errors
    table.meta["BANDS"] = ",".join(prior.bands)
    table.meta["PRIOR"] = prior.config.survey
    if dead:
        table.meta["DEADBAND"] = ",".join(dead)
    return table


def _band_columns(
    table: Table,
    bands: Sequence[str],
    flux: np.ndarray,
    shared: np.ndarray,
    flux_err: np.ndarray | None,
    seen: np.ndarray,
    survey: Survey | None,
    dead: Sequence[str],
) -> None:
    """Add each band's ``flux``, ``flux_redist``, ``flux_err``, ``mag`` and ``flux_flag``
    columns (with their descriptions) to ``table``."""
    n = len(table)
    for b, band in enumerate(bands):
        table[f"flux_{band}"] = flux[:, b]
        table[f"flux_{band}"].description = f"model flux in {band}, electrons"
        table[f"flux_{band}_redist"] = shared[:, b]
        table[
            f"flux_{band}_redist"
        ].description = (
            f"data flux in {band} assigned in proportion to the models (redistribute_flux)"
        )
        if flux_err is not None:
            table[f"flux_{band}_err"] = flux_err[:, b]
            table[f"flux_{band}_err"].description = (
                f"68 % half-width of flux_{band}, electrons: the Laplace width at the MAP and "
                "the model-error terms (madness_ppl.uncertainty.flux_error_budget); other "
                "levels: interval_halfwidth(level, ERRDOF) times this"
            )
        if survey is not None:
            table[f"mag_{band}"] = survey.electrons_to_mag(flux[:, b], band)
        unseen = seen[:, b] < MIN_OBSERVED_LIGHT
        if band in dead or unseen.any():
            table[f"flux_{band}_flag"] = np.ones(n, bool) if band in dead else unseen
            table[f"flux_{band}_flag"].description = (
                f"True: the prior cannot model {band} (decoder output is zero for every latent)"
                if band in dead
                else f"True: less than {MIN_OBSERVED_LIGHT:.0%} of the source's model light in "
                f"{band} falls on unmasked pixels; flux_{band} is predicted from the other bands"
            )


def _quality_columns(
    table: Table,
    sources: np.ndarray,
    residual: np.ndarray,
    variance: np.ndarray,
    positions: np.ndarray,
    converged: np.ndarray,
    inside: np.ndarray,
    misfit: SourceMisfit | None,
    model_frame: np.ndarray | None,
    stars: np.ndarray,
) -> None:
    """Add the fit-quality columns to ``table``: ``chi2`` over the stamp, ``snr``,
    ``edge_flux_frac`` (0 for ``stars``), ``converged``, ``chi2_footprint`` and the
    ``fit_flags`` bit mask."""
    n, size = len(table), inside.shape[-1]
    # the residual is the data minus the model, NaN where masked
    chi2 = likelihood.chi2_map(residual, 0.0, variance)
    footprint = extract_cutouts(chi2, positions, size)
    weight = sources.sum(axis=1, keepdims=True) > 0 if n else np.zeros((0, 1, 1, 1), bool)
    mask = inside * weight
    with np.errstate(invalid="ignore", divide="ignore"):
        table["chi2"] = (footprint * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))
    table["snr"] = matched_snr(sources, residual, variance, positions)
    table["snr"].description = (
        "matched-filter S/N of the source in the data (its own model as the filter, the other "
        "sources' models subtracted, all bands); below ~5 the data barely support a source here"
    )
    edge = stamp_edge_fraction(sources if model_frame is None else model_frame)
    # a star's stamp is the PSF: it is not cut by the stamp (the kernel grid holds its wings)
    table["edge_flux_frac"] = np.where(stars, 0.0, edge)
    table["edge_flux_frac"].description = (
        "share of the source's model light (all bands, model frame) on its stamp's outermost "
        f"pixel ring; above {TRUNCATION_WARNING:.0%} the galaxy is cut by the prior's stamp and "
        "its fluxes are lower bounds"
    )
    table["converged"] = converged
    if misfit is None:
        misfit = source_misfit(sources, positions, residual, variance)
    table["chi2_footprint"] = misfit.chi2_bands
    table["chi2_footprint"].description = (
        "reduced chi2 of the residuals where the source is bright and owns the light (all "
        f"bands; 1 for noise); above {POOR_FIT_CHI2:g} the model misses the galaxy"
    )
    table["fit_flags"] = fit_flags(
        converged, table["edge_flux_frac"], table["chi2_footprint"], table["snr"]
    )
    table["fit_flags"].description = (
        "bit mask, 0 when nothing is suspect: 1 not converged, 2 truncated by the stamp, "
        f"4 chi2_footprint > {POOR_FIT_CHI2:g}, 8 snr < {LOW_SNR:g}"
    )
