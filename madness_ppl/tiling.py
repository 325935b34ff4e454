r"""The plan of :func:`madness_ppl.batch.deblend_many`: tiles cut into patches, patches into batches.

A tile (:func:`load_tile`) is covered by a regular grid of *cores* of side :math:`C = P - 2m`;
the patch of a core extends it by the margin :math:`m` on every side. Each source is owned by
one core and modelled in every patch that contains it (:func:`plan_patches`); patches are
grouped into fixed-shape batches of one source bucket (:func:`plan_batches`), each a
:class:`BatchSpec` of stacked cut-outs (:func:`batch_spec`). Nothing here fits anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from madness_ppl.cutouts import nearest_pixel
from madness_ppl.galaxy_model import GalaxyModel
from madness_ppl.options import DEFAULT_DETECTION, Detection
from madness_ppl.scene import bucket_size

__all__ = [
    "BatchSpec",
    "Patch",
    "PatchRef",
    "Tile",
    "batch_spec",
    "cut_patch",
    "load_tile",
    "plan_batches",
    "plan_patches",
]


class Tile(NamedTuple):
    """One input, ready to cut: background-subtracted ``field`` and ``variance`` ``(B, H, W)`` in
    the prior's band order, source ``positions`` ``(N, 2)`` in tile pixels, its ``name``, its
    celestial ``wcs`` (or ``None``) and its ``psf`` images ``(B, P, P)`` in the prior's band
    order (from the file's ``PSF`` planes; ``None``: the survey default) and which sources are
    stars (``(N,)`` booleans from the positions table's ``point_source`` column; ``None``:
    all galaxies)."""

    name: str
    field: np.ndarray
    variance: np.ndarray
    positions: np.ndarray
    wcs: Any = None
    psf: np.ndarray | None = None
    point_sources: np.ndarray | None = None


class Patch(NamedTuple):
    """A patch of a tile: its grid cell, its corner ``(y0, x0)`` in tile pixels, the tile ids of
    the sources it models (owned ones first) and how many of them it owns."""

    input: int
    row: int
    col: int
    y0: int
    x0: int
    sources: np.ndarray
    n_owned: int


def load_tile(
    path: str | os.PathLike,
    prior: GalaxyModel,
    *,
    positions: str | os.PathLike | np.ndarray | None = None,
    detection: Detection = DEFAULT_DETECTION,
    check_sky: bool = True,
    bad_bits: int | str | Sequence[str] | None = None,
    zeropoint: float | None = None,
) -> Tile:
    """Read a FITS field, estimate its noise and find its sources.

    Parameters
    ----------
    path
        FITS field (see :func:`madness_ppl.fields.read_field`); its variance / weight and mask
        planes are used, reordered with the bands.
    prior
        The galaxy prior (selects and orders the bands).
    positions
        A positions table file or an ``(N, 2)`` array in tile pixels; default: detected with
        sep on the signal-to-noise coadd of the whole tile.
    detection
        Detection settings (:class:`~madness_ppl.options.Detection`), used without
        ``positions``.
    check_sky
        Warn when a tile given with its variance has a background that is not zero
        (``False`` when a sky level is fitted).
    bad_bits
        Which ``MASK`` bits mark bad pixels (see :func:`madness_ppl.fields.resolve_bad_bits`).
    zeropoint
        AB magnitude of a pixel value of 1 (default: the header's; see
        :func:`madness_ppl.units.electrons_per_unit`).
    """
    from madness_ppl.io import check_positions, read_field, read_positions
    from madness_ppl.positions import read_point_flags
    from madness_ppl.prepare import field_for_prior, prepare_field, psf_for_prior
    from madness_ppl.units import electrons_per_unit

    data = read_field(path, bad_bits=bad_bits)
    scale = electrons_per_unit(prior, data.header, zeropoint=zeropoint)
    field, variance = field_for_prior(data, prior, scale, source=str(path))
    psf = psf_for_prior(data, prior)
    prepared = prepare_field(
        field,
        prior,
        variance,
        detection=detection if positions is None else None,
        check_sky=check_sky,
        source=str(path),
    )
    field, variance = prepared.field, prepared.variance
    stars = None
    if positions is None:
        pos = prepared.positions
    elif isinstance(positions, (str, os.PathLike)):
        pos = read_positions(positions, field.shape[-2:], wcs=data.wcs)
        stars = read_point_flags(positions)
    else:
        pos = check_positions(positions, field.shape[-2:], source=str(path))
    positions = np.asarray(pos, np.float64).reshape(-1, 2)
    return Tile(str(path), field, variance, positions, data.wcs, psf, stars)


def plan_patches(
    shape: tuple[int, int], positions: np.ndarray, core: int, margin: int, *, input: int = 0
) -> list[Patch]:
    r"""Cover a tile with patches and assign each source to exactly one.

    The core of grid cell :math:`(r, c)` spans rows :math:`[rC, (r+1)C)` and columns
    :math:`[cC, (c+1)C)`; its patch spans :math:`[rC - m, (r+1)C + m)` and likewise in
    :math:`x`. A source at :math:`(x, y)` sits on pixel
    :math:`(p_x, p_y) = (\lfloor x + 1/2 \rfloor, \lfloor y + 1/2 \rfloor)` (pixel centres are
    integers), is owned by the cell :math:`(\lfloor p_y / C \rfloor, \lfloor p_x / C \rfloor)`
    and is modelled by every patch whose span contains :math:`(p_x, p_y)`.

    Parameters
    ----------
    shape
        ``(H, W)`` of the tile.
    positions
        ``(N, 2)`` source positions ``(x, y)`` in pixels, inside the tile.
    core, margin
        :math:`C` and :math:`m`.
    input
        Index of the tile, stored in the patches.

    Returns
    -------
    list of Patch
        Patches owning at least one source, in row-major grid order.
    """
    height, width = shape
    positions = np.asarray(positions, float).reshape(-1, 2)
    n_rows, n_cols = -(-height // core), -(-width // core)
    pix = np.clip(nearest_pixel(positions), 0, np.array([width - 1, height - 1]))
    own_row, own_col = pix[:, 1] // core, pix[:, 0] // core
    patches = []
    for row in range(n_rows):
        for col in range(n_cols):
            owned = np.flatnonzero((own_row == row) & (own_col == col))
            if not len(owned):
                continue
            y0, x0 = row * core - margin, col * core - margin
            size = core + 2 * margin
            inside = (pix[:, 1] >= y0) & (pix[:, 1] < y0 + size)
            inside &= (pix[:, 0] >= x0) & (pix[:, 0] < x0 + size)
            inside[owned] = False
            sources = np.concatenate([owned, np.flatnonzero(inside)])
            patches.append(Patch(input, row, col, y0, x0, sources, len(owned)))
    return patches


def plan_batches(patches: Sequence[Patch], batch_size: int) -> list[list[int]]:
    """Group patch indices into batches of one source bucket each (deterministic order).

    Patches are sorted by (bucket of their modelled count, input, grid cell) and cut into
    groups of ``batch_size``; a short last group of a bucket repeats its final patch.
    """
    order = sorted(
        range(len(patches)),
        key=lambda i: (bucket_size(len(patches[i].sources)), *patches[i][:3]),
    )
    batches: list[list[int]] = []
    for bucket in sorted({bucket_size(len(patches[i].sources)) for i in order}):
        members = [i for i in order if bucket_size(len(patches[i].sources)) == bucket]
        for start in range(0, len(members), batch_size):
            group = members[start : start + batch_size]
            batches.append(group + [group[-1]] * (batch_size - len(group)))
    return batches


def cut_patch(tile: Tile, patch: Patch, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field, variance (NaN outside the tile) and positions of one patch."""
    bands, height, width = tile.field.shape
    field = np.full((bands, size, size), np.nan, np.float32)
    variance = np.ones((bands, size, size), np.float32)
    ys = slice(max(patch.y0, 0), min(patch.y0 + size, height))
    xs = slice(max(patch.x0, 0), min(patch.x0 + size, width))
    dst = (slice(None), slice(ys.start - patch.y0, ys.stop - patch.y0))
    dst += (slice(xs.start - patch.x0, xs.stop - patch.x0),)
    field[dst] = tile.field[:, ys, xs]
    variance[dst] = tile.variance[:, ys, xs]
    positions = tile.positions[patch.sources] - np.array([patch.x0, patch.y0], float)
    return field, variance, positions


class PatchRef(NamedTuple):
    """One patch of a batch: where it lies in its input and which catalog rows it reports."""

    patch: int
    input: int
    y0: int
    x0: int
    sources: list[int]
    n_owned: int
    report: bool


class BatchSpec(NamedTuple):
    """One unit of work for :func:`run_batch`: stacked patch cut-outs, their positions and
    (when a tile has any) which of their sources are stars."""

    id: int
    fields: np.ndarray
    variances: np.ndarray
    positions: list[np.ndarray]
    patches: list[PatchRef]
    psfs: list[np.ndarray | None] | None = None
    point_sources: list[np.ndarray] | None = None


def batch_spec(
    batch_id: int, members: list[int], patches: list[Patch], tiles: list[Tile], size: int
) -> BatchSpec:
    """The :class:`BatchSpec` of the patches ``members`` (indices into ``patches``), each cut
    ``size`` pixels square from its tile; a patch repeated to fill the batch reports once."""
    cuts = [cut_patch(tiles[patches[i].input], patches[i], size) for i in members]
    first = {i: members.index(i) for i in members}
    return BatchSpec(
        id=batch_id,
        fields=np.stack([c[0] for c in cuts]),
        variances=np.stack([c[1] for c in cuts]),
        positions=[c[2] for c in cuts],
        patches=[
            PatchRef(
                patch=int(i),
                input=patches[i].input,
                y0=patches[i].y0,
                x0=patches[i].x0,
                sources=patches[i].sources.tolist(),
                n_owned=patches[i].n_owned,
                report=first[i] == k,
            )
            for k, i in enumerate(members)
        ],
        psfs=[tiles[patches[i].input].psf for i in members],
        point_sources=_patch_stars(members, patches, tiles),
    )


def _patch_stars(members: list[int], patches: list[Patch], tiles: list[Tile]) -> list | None:
    """Each patch's point-source flags (its sources' rows of its tile's), or ``None`` when no
    tile of the batch has a star."""
    flags = [tiles[patches[i].input].point_sources for i in members]
    if all(f is None or not np.any(f) for f in flags):
        return None
    return [
        np.zeros(len(patches[i].sources), bool) if f is None else np.asarray(f)[patches[i].sources]
        for i, f in zip(members, flags, strict=True)
    ]
