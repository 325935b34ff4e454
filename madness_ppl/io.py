"""FITS input and output for the command line: fields, positions, deblending products.

**Fields** are read from

* a 3-D cube ``(bands, H, W)`` in the primary HDU or the first image extension, with the band
  names in the header keyword ``BANDS`` (comma separated) or ``BAND1``, ``BAND2``, ...; or
* one 2-D image HDU per band, named by its ``EXTNAME`` or ``BAND`` keyword.

An optional extension named ``VARIANCE`` (same layout as the cube) gives the per-pixel variance.

**Outputs** of ``madness-ppl deblend`` are assembled in a temporary directory next to the
destination and renamed into place (``os.replace``), so a failed or interrupted run never leaves
a half-written output directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from astropy.table import Table

__all__ = [
    "FieldData",
    "check_positions",
    "read_field",
    "read_positions",
    "write_field",
    "write_products",
    "write_table",
]


class FieldData(NamedTuple):
    """A field read from FITS: image ``(B, H, W)``, band names, optional variance, header."""

    image: np.ndarray
    bands: tuple[str, ...]
    variance: np.ndarray | None
    header: fits.Header


def _bands_from_header(header: fits.Header, n: int) -> tuple[str, ...] | None:
    if "BANDS" in header:
        names = tuple(b.strip() for b in str(header["BANDS"]).split(","))
    elif all(f"BAND{i + 1}" in header for i in range(n)):
        names = tuple(str(header[f"BAND{i + 1}"]).strip() for i in range(n))
    else:
        return None
    if len(names) != n:
        raise ValueError(f"header lists {len(names)} bands {names} for a cube of {n} planes")
    return names


def read_field(path: str | os.PathLike) -> FieldData:
    """Read a multi-band field (see the module docstring for the accepted layouts)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        hdus = fits.open(path, memmap=False)
    except OSError as err:
        raise ValueError(f"{path} is not a readable FITS file ({err})") from None
    with hdus:
        images = [h for h in hdus if getattr(h, "data", None) is not None and h.is_image]
        variance = None
        for h in images:
            if h.name == "VARIANCE":
                variance = np.asarray(h.data, np.float32)
        images = [h for h in images if h.name != "VARIANCE"]
        if not images:
            raise ValueError(f"{path} holds no image data")
        cube = next((h for h in images if h.data.ndim == 3), None)
        if cube is not None:
            image = np.asarray(cube.data, np.float32)
            bands = _bands_from_header(cube.header, image.shape[0])
            if bands is None:
                raise ValueError(
                    f"{path}: the cube header names no bands (add BANDS='g,r,i' or BAND1, BAND2, ...)"
                )
            header = cube.header.copy()
        else:
            planes = [h for h in images if h.data.ndim == 2]
            bands = tuple(str(h.header.get("BAND", h.name)).strip() for h in planes)
            if any(not b or b == "PRIMARY" for b in bands):
                raise ValueError(f"{path}: every per-band HDU needs an EXTNAME or BAND keyword")
            shapes = {h.data.shape for h in planes}
            if len(shapes) != 1:
                raise ValueError(f"{path}: the band images have different shapes {sorted(shapes)}")
            image = np.stack([np.asarray(h.data, np.float32) for h in planes])
            header = planes[0].header.copy()
    if variance is not None and variance.shape != image.shape:
        raise ValueError(f"{path}: VARIANCE shape {variance.shape} != image shape {image.shape}")
    if len(set(bands)) != len(bands):
        raise ValueError(f"{path}: duplicate band names {bands}")
    return FieldData(image, bands, variance, header)


def write_field(
    path: str | os.PathLike,
    image: np.ndarray,
    bands: tuple[str, ...] | list[str],
    *,
    variance: np.ndarray | None = None,
    overwrite: bool = False,
) -> None:
    """Write a ``(B, H, W)`` cube with ``BANDS`` in the header (and a ``VARIANCE`` extension)."""
    primary = fits.PrimaryHDU(np.asarray(image, np.float32))
    primary.header["BANDS"] = ",".join(bands)
    primary.header["BUNIT"] = "electron"
    hdus = [primary]
    if variance is not None:
        hdus.append(fits.ImageHDU(np.asarray(variance, np.float32), name="VARIANCE"))
    _atomic_fits(fits.HDUList(hdus), Path(path), overwrite=overwrite)


def _atomic_fits(hdul: fits.HDUList, path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = path.with_name(path.name + ".tmp")
    try:
        hdul.writeto(tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(table: Table, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``table`` to ``<stem>.fits`` and ``<stem>.ecsv``, each atomically (replacing)."""
    stem = Path(stem)
    paths = (stem.with_name(stem.name + ".fits"), stem.with_name(stem.name + ".ecsv"))
    for path, fmt in zip(paths, ("fits", "ascii.ecsv"), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        try:
            table.write(tmp, format=fmt, overwrite=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return paths


def read_positions(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read ``(N, 2)`` pixel positions from a table with columns ``x`` and ``y`` (FITS, ECSV or CSV).

    With ``shape = (H, W)``, positions off the image raise a ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv"}.get(path.suffix.lower())
    try:
        table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as err:  # astropy raises many types for unreadable tables
        raise ValueError(f"cannot read a positions table from {path}: {err}") from None
    names = {c.lower(): c for c in table.colnames}
    if "x" not in names or "y" not in names:
        raise ValueError(f"{path}: positions need columns x and y, found {table.colnames}")
    positions = np.stack(
        [np.asarray(table[names["x"]], float), np.asarray(table[names["y"]], float)], 1
    )
    return check_positions(positions, shape, source=str(path))


def check_positions(
    positions: np.ndarray, shape: tuple[int, int] | None = None, *, source: str = "positions"
) -> np.ndarray:
    """Return ``(N, 2)`` positions as float, or raise ``ValueError`` naming ``source`` for
    NaN/inf, or (with ``shape = (H, W)``) positions off the image, i.e. outside
    ``-0.5 <= x < W - 0.5``, ``-0.5 <= y < H - 0.5`` (the convention of
    :func:`madness_ppl.scene.validate_scene_inputs`)."""
    positions = np.asarray(positions, float).reshape(-1, 2)
    if not np.isfinite(positions).all():
        raise ValueError(f"{source}: positions contain NaN or inf")
    if shape is not None:
        height, width = shape
        off = (positions[:, 0] < -0.5) | (positions[:, 0] >= width - 0.5)
        off |= (positions[:, 1] < -0.5) | (positions[:, 1] >= height - 0.5)
        if off.any():
            rows = np.flatnonzero(off)
            raise ValueError(
                f"{source}: {len(rows)} position(s) off the {width}x{height} image, rows "
                f"{rows[:10].tolist()} (e.g. x={positions[rows[0], 0]:.1f}, y={positions[rows[0], 1]:.1f})"
            )
    return positions


def write_products(
    out: str | os.PathLike, result, *, overwrite: bool = False, figure: bool = True
) -> Path:
    """Write a :class:`~madness_ppl.deblend.DeblendResult` into the directory ``out`` atomically.

    Files: ``catalog.fits`` and ``catalog.ecsv``, ``sources.fits`` (per-source model cube
    ``(N, B, S, S)``), ``model.fits``, ``residual.fits`` (``(B, H, W)`` cubes with ``BANDS``) and
    ``deblend.png`` (asinh RGB of data / model / residual with source labels).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bands = list(result.bands)
        result.catalog.write(tmp / "catalog.fits")
        result.catalog.write(tmp / "catalog.ecsv")
        sources = fits.PrimaryHDU(np.asarray(result.sources, np.float32))
        sources.header["BANDS"] = ",".join(bands)
        sources.header["BUNIT"] = "electron"
        sources.header["COMMENT"] = "axis order (source, band, y, x); stamp centred on round(x, y)"
        sources.writeto(tmp / "sources.fits")
        write_field(tmp / "model.fits", result.model_image, bands)
        write_field(tmp / "residual.fits", result.residual, bands)
        if figure:
            from madness_ppl.plot import plot_panels

            data = result.model_image + np.nan_to_num(result.residual)
            noise = np.sqrt(np.median(result.variance, axis=(1, 2)))
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
        if out.exists():
            old = out.with_name(out.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
