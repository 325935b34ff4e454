"""Source positions: read them from a table file, or check an array or table given in code.

Positions are ``(N, 2)`` pixel coordinates ``(x, y)``, the centre of the first pixel at
``(0, 0)``; tables give them by column name (``x``/``y`` or ``ra``/``dec`` with the field's WCS),
never by column order. Anything unusable is a :class:`~madness_ppl.errors.PositionsError`
naming the file (or argument) and the rows; near-duplicates warn.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from madness_ppl.errors import MadnessInputWarning, PositionsError

__all__ = ["check_positions", "read_point_flags", "read_positions"]


def _read_table(path: str | os.PathLike) -> Table:
    """The table at ``path`` (FITS, ECSV, CSV or whitespace-separated text), or a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise PositionsError(f"{path} is a directory, not a positions table", str(path))
    fmt = {
        ".csv": "ascii.csv",
        ".ecsv": "ascii.ecsv",
        ".txt": "ascii.basic",  # whitespace-separated columns with a header line
        ".dat": "ascii.basic",
    }.get(path.suffix.lower())
    try:
        table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as err:  # astropy raises many types for unreadable tables
        detail = str(err).splitlines()[0] if str(err) else ""  # not astropy's format list
        raise PositionsError(
            f"cannot read a positions table from {path} ({type(err).__name__}: {detail}); "
            "use FITS, ECSV, CSV, or whitespace-separated .txt/.dat with a header line x y "
            "(or ra dec)",
            str(path),
        ) from None
    return table


def read_point_flags(path: str | os.PathLike) -> np.ndarray | None:
    """The boolean ``point_source`` column of a positions table (sources to fit as stars), or
    ``None`` when it has none. Integers 0/1 are accepted; anything else raises
    :class:`~madness_ppl.errors.PositionsError`."""
    table = _read_table(path)
    names = {c.lower(): c for c in table.colnames}
    if "point_source" not in names:
        return None
    column = np.ma.filled(np.asarray(table[names["point_source"]]), -1)
    if column.dtype == bool:
        return column
    if np.issubdtype(column.dtype, np.integer) and np.isin(column, (0, 1)).all():
        return column.astype(bool)
    raise PositionsError(
        f"{path}: the point_source column must be booleans or 0/1, got {column[:5].tolist()}",
        str(path),
    )


def read_positions(
    path: str | os.PathLike, shape: tuple[int, int] | None = None, *, wcs: Any = None
) -> np.ndarray:
    """Read ``(N, 2)`` pixel positions from a table (FITS, ECSV or CSV).

    The table has pixel columns ``x`` and ``y`` or sky columns ``ra`` and ``dec`` (degrees),
    converted to pixels with ``wcs`` (the field's, see :attr:`FieldData.wcs`). Empty cells,
    NaN/inf and (with ``shape = (H, W)``) positions off the image raise a
    :class:`~madness_ppl.errors.PositionsError` naming the file and rows; positions closer than
    half a pixel to another warn (:class:`~madness_ppl.errors.MadnessInputWarning`).
    """
    table = _read_table(path)
    path = Path(path)
    names = {c.lower(): c for c in table.colnames}
    if "x" in names and "y" in names:
        columns = (names["x"], names["y"])
    elif "ra" in names and "dec" in names:
        columns = (names["ra"], names["dec"])
        if wcs is None:
            raise PositionsError(
                f"{path}: positions are given in ra/dec but the field has no WCS; give pixel "
                "columns x and y",
                str(path),
            )
    else:
        raise PositionsError(
            f"{path}: positions need columns x and y (pixels) or ra and dec (degrees), found "
            f"{table.colnames}",
            table.colnames,
        )
    values = []
    for name in columns:
        column = table[name]
        missing = np.asarray(getattr(column, "mask", np.zeros(len(column), bool)), bool)
        if missing.any():
            rows = np.flatnonzero(missing)
            raise PositionsError(
                f"{path}: column {name} has {len(rows)} empty cell(s), rows {rows[:10].tolist()}",
                rows.tolist(),
            )
        try:
            values.append(np.asarray(column, float))
        except (TypeError, ValueError):
            raise PositionsError(
                f"{path}: column {name} is not numeric (dtype {column.dtype})", str(column.dtype)
            ) from None
    positions = np.stack(values, 1) if values[0].size else np.zeros((0, 2))
    if "ra" in (c.lower() for c in columns) and len(positions):
        bad = ~np.isfinite(positions).all(1)
        if bad.any():
            raise PositionsError(
                f"{path}: positions contain NaN or inf, rows {np.flatnonzero(bad)[:10].tolist()}",
                np.flatnonzero(bad).tolist(),
            )
        x, y = wcs.world_to_pixel_values(positions[:, 0], positions[:, 1])
        positions = np.stack([np.asarray(x, float), np.asarray(y, float)], 1)
    return check_positions(positions, shape, source=str(path))


def check_positions(
    positions: Any, shape: tuple[int, int] | None = None, *, source: str = "positions"
) -> np.ndarray:
    """Return ``(N, 2)`` positions ``(x, y)`` as float, or raise
    :class:`~madness_ppl.errors.PositionsError` naming ``source`` for a shape other than
    ``(N, 2)`` (an empty list is zero sources), NaN/inf, or (with ``shape = (H, W)``) positions
    off the image, i.e. outside ``-0.5 <= x < W - 0.5``, ``-0.5 <= y < H - 0.5`` (the
    convention of :func:`madness_ppl.scene.validate_scene_inputs`). Positions closer than half
    a pixel to another warn (:class:`~madness_ppl.errors.MadnessInputWarning`).

    A table with named columns (pandas ``DataFrame``, astropy ``Table``, numpy structured or
    record array, a mapping) is read by name, ``x`` and ``y`` (any case), never by column
    order; a table without both names is refused."""
    positions = _xy_columns(positions, source)
    try:
        positions = np.asarray(positions, float)
    except (TypeError, ValueError) as err:
        raise PositionsError(f"{source}: positions are not numeric ({err})", positions) from None
    if positions.size == 0:
        return np.zeros((0, 2))
    if positions.ndim != 2 or positions.shape[1] != 2:
        hint = ""
        if positions.ndim == 2 and positions.shape[0] == 2:
            hint = "; it looks like (2, N): pass positions.T"
        raise PositionsError(
            f"{source}: positions must have shape (N, 2) as (x, y) columns, got shape "
            f"{positions.shape}{hint}",
            positions.shape,
        )
    bad = ~np.isfinite(positions).all(1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise PositionsError(
            f"{source}: positions contain NaN or inf, rows {rows[:10].tolist()}", rows.tolist()
        )
    if shape is not None:
        height, width = shape
        off = (positions[:, 0] < -0.5) | (positions[:, 0] >= width - 0.5)
        off |= (positions[:, 1] < -0.5) | (positions[:, 1] >= height - 0.5)
        if off.any():
            rows = np.flatnonzero(off)
            raise PositionsError(
                f"{source}: {len(rows)} position(s) off the {width}x{height} image, rows "
                f"{rows[:10].tolist()} (e.g. x={positions[rows[0], 0]:.1f}, "
                f"y={positions[rows[0], 1]:.1f})",
                positions[rows].tolist(),
            )
    _warn_duplicates(positions, source)
    return positions


def _column_names(table: Any) -> list[str] | None:
    """Column names of a named table (DataFrame, astropy Table, structured array, mapping)."""
    if isinstance(table, np.ndarray):
        return list(table.dtype.names) if table.dtype.names else None
    if isinstance(table, dict):
        return [str(k) for k in table]
    names = getattr(table, "colnames", None)  # astropy Table
    if names is None and hasattr(table, "columns") and hasattr(table, "iloc"):  # pandas
        names = [str(c) for c in table.columns]
    return list(names) if names is not None else None


def _xy_columns(positions: Any, source: str) -> Any:
    """``(N, 2)`` array of the ``x`` and ``y`` columns of a named table; other input unchanged."""
    names = _column_names(positions)
    if names is None:
        return positions
    lower = {n.lower(): n for n in names}
    if "x" not in lower or "y" not in lower:
        raise PositionsError(
            f"{source}: a table of positions needs columns named x and y (pixels, any case); "
            f"it has {names}",
            names,
        )
    try:
        return np.stack(
            [np.asarray(positions[lower["x"]], float), np.asarray(positions[lower["y"]], float)],
            axis=-1,
        )
    except (TypeError, ValueError) as err:
        raise PositionsError(f"{source}: columns x and y are not numeric ({err})", names) from None


def _warn_duplicates(positions: np.ndarray, source: str, tol: float = 0.5) -> None:
    if len(positions) < 2:
        return
    from scipy.spatial import cKDTree

    pairs = sorted(cKDTree(positions).query_pairs(tol))
    if pairs:
        i, j = pairs[0]
        warnings.warn(
            f"{source}: {len(pairs)} pair(s) of positions closer than {tol} pixel (e.g. rows "
            f"{i} and {j} at x={positions[i, 0]:.2f}, y={positions[i, 1]:.2f}); duplicated "
            "sources split one galaxy's flux between them",
            MadnessInputWarning,
            stacklevel=3,
        )
