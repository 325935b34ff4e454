"""Deblending products on disk: the catalog and the output directory of ``madness-ppl deblend``.

Outputs are assembled in a temporary directory next to the destination and renamed into place
(``os.replace``), so a failed or interrupted run never leaves a half-written output directory.
Every output directory holds the marker file ``.madness-ppl-output``; ``overwrite`` replaces
only such a directory, and never one that contains the input.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from madness_ppl.atomic import (
    _PENDING,
    OUTPUT_MARKER,
    atomic_write,
    check_output_dir,
    new_output_dir,
    swap_into_place,
)
from madness_ppl.fields import write_field

__all__ = ["PRODUCT_FILES", "add_sky_coordinates", "write_products", "write_table"]


def write_table(table: Table, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``table`` to ``<stem>.fits`` and ``<stem>.ecsv``, each atomically (replacing)."""
    stem = Path(stem)
    paths = (stem.with_name(stem.name + ".fits"), stem.with_name(stem.name + ".ecsv"))
    for path, fmt in zip(paths, ("fits", "ascii.ecsv"), strict=True):
        atomic_write(path, lambda tmp, fmt=fmt: table.write(tmp, format=fmt, overwrite=True))
    return paths


PRODUCT_FILES = frozenset(
    {
        OUTPUT_MARKER,
        "catalog.fits",
        "catalog.ecsv",
        "sources.fits",
        "model.fits",
        "residual.fits",
        "deblend.png",
    }
)


def write_products(
    out: str | os.PathLike,
    result,
    *,
    overwrite: bool = False,
    figure: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
    wcs: Any = None,
    flux_scale: Any = None,
) -> Path:
    """Write a :class:`~madness_ppl.deblend.DeblendResult` into the directory ``out`` atomically.

    Files: ``catalog.fits`` and ``catalog.ecsv``, ``sources.fits`` (per-source model cube
    ``(N, B, S, S)``), ``model.fits``, ``residual.fits`` (``(B, H, W)`` cubes with ``BANDS``),
    ``deblend.png`` (asinh RGB of data / model / residual with source labels) and the marker
    :data:`OUTPUT_MARKER`. With ``wcs``, the catalog gets ``ra`` and ``dec`` columns (degrees)
    and the images the WCS keywords. Fluxes and images are in electrons (``FLUXUNIT``); with
    ``flux_scale`` (electrons per unit of the input file, per band) the catalog header keeps it
    as ``ESCALE_<band>`` to convert back.

    The directory is assembled beside ``out`` and swapped in (:func:`swap_into_place`); an
    existing ``out`` is replaced only with ``overwrite`` and only if madness-ppl wrote it and it
    does not contain one of ``inputs`` (:func:`check_output_dir`).
    """
    out = check_output_dir(out, overwrite=overwrite, known=PRODUCT_FILES, inputs=inputs)
    tmp = new_output_dir(out)
    try:
        bands = list(result.bands)
        catalog = result.catalog.copy()
        extra = wcs.to_header() if wcs is not None else fits.Header()
        if wcs is not None:
            catalog = add_sky_coordinates(catalog, wcs)
        catalog.meta["FLUXUNIT"] = "electron"
        if flux_scale is not None:
            for band, scale in zip(bands, np.asarray(flux_scale, float), strict=True):
                catalog.meta[f"ESCALE_{band}"] = float(scale)
        catalog.write(tmp / "catalog.fits")
        catalog.write(tmp / "catalog.ecsv")
        sources = fits.PrimaryHDU(np.asarray(result.sources, np.float32))
        sources.header["BANDS"] = ",".join(bands)
        sources.header["BUNIT"] = "electron"
        sources.header["COMMENT"] = "axis order (source, band, y, x); stamp centred on round(x, y)"
        sources.writeto(tmp / "sources.fits")
        write_field(tmp / "model.fits", result.model_image, bands, header=extra)
        write_field(tmp / "residual.fits", result.residual, bands, header=extra)
        if figure:
            from madness_ppl.plot import plot_panels

            data = result.model_image + np.nan_to_num(result.residual)
            noise = np.sqrt(np.nanmedian(result.variance, axis=(1, 2)))
            plot_panels(
                {
                    "data": data,
                    "model": result.model_image,
                    "residual": np.nan_to_num(result.residual),
                },
                bands,
                noise=noise,
                positions=result.positions,
                path=str(tmp / "deblend.png"),
                title=f"{len(result.positions)} sources",
            )
        swap_into_place(tmp, out, replace=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)
    return out


def add_sky_coordinates(catalog: Table, wcs: Any, *, input_column: str | None = None) -> Table:
    """A copy of ``catalog`` with ``ra`` and ``dec`` (degrees) from its ``x``, ``y`` and ``wcs``.

    Parameters
    ----------
    catalog
        Rows with pixel positions ``x``, ``y``.
    wcs
        The WCS of those pixels; with ``input_column``, one WCS (or ``None``) per input.
    input_column
        Column holding each row's input index into ``wcs`` (a catalog of several fields);
        rows of an input without a WCS get NaN.
    """
    catalog = catalog.copy()
    n = len(catalog)
    ra, dec = np.full(n, np.nan), np.full(n, np.nan)
    if input_column is None:
        groups = [(np.arange(n), wcs)]
    else:
        inputs = np.asarray(catalog[input_column])
        groups = [(np.flatnonzero(inputs == k), w) for k, w in enumerate(wcs)]
    for rows, w in groups:
        if w is not None and len(rows):
            x, y = np.asarray(catalog["x"])[rows], np.asarray(catalog["y"])[rows]
            ra[rows], dec[rows] = w.pixel_to_world_values(x, y)
    index = catalog.colnames.index("y") + 1 if "y" in catalog.colnames else len(catalog.colnames)
    catalog.add_column(ra, name="ra", index=index)
    catalog.add_column(dec, name="dec", index=index + 1)
    catalog["ra"].unit = catalog["dec"].unit = "deg"
    return catalog
