"""Stamps and fields on the host (numpy): cut stamps out of a field, paste stamps into one.

The numpy counterparts of :func:`madness_ppl.scene.place_stamps`, for work outside the fit
(starting points, flux errors, catalogs): a stamp of odd side ``S`` is centred on the pixel
:func:`nearest_pixel` ``(position)`` (halves round up, exactly as in the fit), its centre being
index ``S // 2``; whatever falls outside the field is dropped (pasting) or reads as zero
(cutting).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = ["add_stamps", "extract_cutouts", "nearest_pixel", "paste_stamps"]


def nearest_pixel(positions: ArrayLike) -> np.ndarray:
    r"""Integer pixel ``(N, 2)`` a stamp at ``positions`` ``(x, y)`` is centred on:
    :math:`\lfloor p + 1/2 \rfloor`, the rounding of :func:`madness_ppl.scene.place_stamps`
    (halves round up; ``numpy.rint`` would round 12.5 down to 12 and put host-side stamps one
    pixel off the fitted model).

    >>> nearest_pixel([[12.5, 13.5], [-0.5, 2.49]]).tolist()
    [[13, 14], [0, 2]]
    """
    return np.floor(np.asarray(positions, np.float64) + 0.5).astype(int).reshape(-1, 2)


def extract_cutouts(
    field: ArrayLike, positions: ArrayLike, size: int, *, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """``(N, B, size, size)`` cutouts centred on :func:`nearest_pixel` ``(positions)``, zero
    outside the field.

    NaN/inf pixels read as 0.
    """
    field = np.nan_to_num(np.asarray(field, dtype))
    n_bands, height, width = field.shape
    half = size // 2
    padded = np.zeros((n_bands, height + 2 * half, width + 2 * half), dtype)
    padded[:, half : half + height, half : half + width] = field
    centres = nearest_pixel(positions)
    out = np.empty((len(centres), n_bands, size, size), dtype)
    for i, (cx, cy) in enumerate(centres):
        out[i] = padded[:, cy : cy + size, cx : cx + size]
    return out


def add_stamps(field: np.ndarray, stamps: np.ndarray, centres: np.ndarray) -> None:
    """Add ``(N, B, S, S)`` stamps centred on integer pixels ``centres`` (N, 2) into ``field`` in place.

    Parts of a stamp outside the field are dropped.
    """
    _, height, width = field.shape
    half = stamps.shape[-1] // 2
    for stamp, (cx, cy) in zip(stamps, centres.astype(int), strict=True):
        x0, y0 = cx - half, cy - half
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + stamp.shape[-1], width), min(y0 + stamp.shape[-2], height)
        if xs < xe and ys < ye:
            field[:, ys:ye, xs:xe] += stamp[:, ys - y0 : ye - y0, xs - x0 : xe - x0]


def paste_stamps(stamps: ArrayLike, positions: ArrayLike, shape: tuple) -> np.ndarray:
    """Sum of ``(N, B, S, S)`` stamps placed at :func:`nearest_pixel` ``(positions)`` on a
    ``(B, H, W)`` grid (float64; :func:`add_stamps` on zeros)."""
    stamps = np.asarray(stamps)
    canvas = np.zeros(shape)
    add_stamps(canvas, stamps, nearest_pixel(positions))
    return canvas


def model_shares(
    stamps: ArrayLike, positions: ArrayLike, valid: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Who owns each pixel's model light: the shares :math:`w_i = m_i / \sum_k m_k`.

    With ``(n, B, S, S)`` stamps :math:`m_i` placed at :func:`nearest_pixel` ``(positions)``,
    returns, each ``(n, B, S, S)`` float64 on the stamps' grids: the stamps with pixels
    outside ``valid`` set to 0 (``own``), the summed model of all sources (``total``), the
    share :math:`w_i` of ``own`` in ``total`` (0 where ``total`` is 0) and the booleans of
    ``valid`` (``inside``; False off the field).

    Parameters
    ----------
    stamps, positions
        As above.
    valid
        ``(B, H, W)`` booleans of the field's usable pixels (e.g. all True, or finite data).
    """
    stamps = np.asarray(stamps, np.float64)
    valid = np.asarray(valid, bool)
    size = stamps.shape[-1]
    centres = nearest_pixel(positions)
    total = extract_cutouts(
        paste_stamps(stamps, centres, valid.shape), centres, size, dtype=np.float64
    )
    inside = extract_cutouts(valid.astype(np.float64), centres, size, dtype=np.float64) > 0
    own = np.where(inside, stamps, 0.0)
    share = np.divide(own, total, out=np.zeros_like(own), where=total > 0)
    return own, total, share, inside
