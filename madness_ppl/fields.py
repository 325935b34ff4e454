"""FITS field files: read an image with its variance, mask, PSF and WCS planes; write one.

A field (:func:`read_field`) holds an image with optional variance (or inverse-variance
weight), mask and PSF planes, found by ``EXTNAME`` in any HDU order:

* the image: a 3-D cube ``(bands, H, W)`` (HDU ``IMAGE``/``SCI`` or any unnamed one) with the
  band names in ``BANDS`` (comma separated) or ``BAND1``, ``BAND2``, ...; or one 2-D image HDU
  per band, named by its ``EXTNAME`` or ``BAND`` keyword; or one file per band;
* ``VARIANCE`` / ``VAR``, or ``WEIGHT`` / ``IVAR`` (inverse variance);
* ``MASK``: an integer bit plane; which bits are bad is an option (default: the bad planes a
  Rubin/HSC header names, :data:`DEFAULT_BAD_PLANES`, else any nonzero bit);
* ``PSF``: a cube ``(bands, P, P)`` (or :func:`read_psf` from its own file).

Masked pixels are NaN in the returned image and drop out of the likelihood. A celestial WCS in
the header is returned too; catalogs then get ``ra`` and ``dec``.

Why one module of ~620 lines: reading and writing share the layout rules above (EXTNAMEs, band
keywords, mask planes), which must not drift apart; positions and products live in
:mod:`madness_ppl.positions` and :mod:`madness_ppl.products`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from madness_ppl.atomic import atomic_write
from madness_ppl.errors import FieldFormatError, MadnessInputError

__all__ = [
    "DEFAULT_BAD_PLANES",
    "MAX_DEBLEND_PIXELS",
    "FieldData",
    "read_field",
    "read_psf",
    "resolve_bad_bits",
    "write_field",
]


IMAGE_NAMES = frozenset({"IMAGE", "SCI"})
VARIANCE_NAMES = frozenset({"VARIANCE", "VAR"})
WEIGHT_NAMES = frozenset({"WEIGHT", "IVAR", "INVVAR", "WHT"})
MASK_NAMES = frozenset({"MASK"})
PSF_NAMES = frozenset({"PSF"})
_ROLES = {
    **dict.fromkeys(PSF_NAMES, "psf"),
    **dict.fromkeys(VARIANCE_NAMES, "variance"),
    **dict.fromkeys(WEIGHT_NAMES, "weight"),
    **dict.fromkeys(MASK_NAMES, "mask"),
}
#: Largest field ``madness-ppl deblend`` accepts (pixels per band); use ``deblend-many`` above.
MAX_DEBLEND_PIXELS = 2048 * 2048


class FieldData(NamedTuple):
    """A field read from FITS.

    Attributes
    ----------
    image
        ``(B, H, W)`` float32, NaN where a pixel is masked (mask bits, zero weight, NaN/inf
        data).
    bands
        Band names, one per plane, in the file's order.
    variance
        ``(B, H, W)`` per-pixel variance (from a ``VARIANCE`` plane or ``1 / WEIGHT``), NaN where
        masked; ``None`` when the file has neither.
    header
        Header of the image HDU (with the WCS, if any).
    mask
        ``(B, H, W)`` boolean, ``True`` where a pixel is masked; ``None`` when nothing is.
    wcs
        The celestial :class:`astropy.wcs.WCS` of the header, or ``None``.
    psf
        ``(B, P, P)`` PSF images in the order of ``bands`` (from a ``PSF`` cube or ``PSF_<band>``
        planes), or ``None`` when the file has none.
    """

    image: np.ndarray
    bands: tuple[str, ...]
    variance: np.ndarray | None
    header: fits.Header
    mask: np.ndarray | None = None
    wcs: Any = None
    psf: np.ndarray | None = None


def _bands_from_header(header: fits.Header, n: int, path: Any = "field") -> tuple[str, ...] | None:
    if "BANDS" in header:
        names = tuple(b.strip() for b in str(header["BANDS"]).split(","))
    elif all(f"BAND{i + 1}" in header for i in range(n)):
        names = tuple(str(header[f"BAND{i + 1}"]).strip() for i in range(n))
    else:
        return None
    if len(names) != n:
        raise FieldFormatError(
            f"{path}: header lists {len(names)} bands {names} for a cube of {n} planes", names
        )
    return names


def _role(name: str) -> tuple[str, str | None]:
    """``(role, band)`` of an HDU from its EXTNAME: ``VARIANCE_G`` -> ``("variance", "G")``."""
    name = name.upper()
    if name in IMAGE_NAMES:
        return "image", None
    if name in _ROLES:
        return _ROLES[name], None
    head, _, tail = name.partition("_")
    if tail and head in _ROLES:
        return _ROLES[head], tail
    if tail and head in IMAGE_NAMES:
        return "image", tail
    return "band", None


def _plane_band(hdu, primary: fits.Header | None) -> str | None:
    for header in (hdu.header, primary):
        if header is None:
            continue
        for key in ("BAND", "FILTER"):
            if key in header and str(header[key]).strip():
                return str(header[key]).strip()
    return None


#: Mask planes that mark a pixel bad by default when the ``MASK`` header names its planes
#: (``MP_<NAME>``, the Rubin/HSC convention): no usable value in some input. ``DETECTED`` (a
#: source is there) and the coadd's ``CR`` / ``INTRP`` (one input exposure was repaired, the
#: coadd pixel is good) are information, not damage, and stay in the fit.
DEFAULT_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "SUSPECT", "UNMASKEDNAN")


def resolve_bad_bits(bad_bits: int | str | Sequence[str] | None, header: fits.Header) -> int:
    """The integer bit mask of "bad" mask bits.

    ``None`` (default): the planes of :data:`DEFAULT_BAD_PLANES` that the mask header names
    when it names any (``MP_<NAME>`` keywords, the Rubin/HSC convention: a ``DETECTED`` bit
    must not mask the sources), else every bit (any nonzero mask value is bad). An ``int``:
    that bit mask (``0x5`` = bits 0 and 2). A string of digits (``"5"``, ``"0x5"``) is read as
    an int; any other string (``"BAD,SAT,CR"``) or a sequence of names lists mask planes by
    name, looked up in the ``MP_<NAME>`` keywords.
    """
    if bad_bits is None:
        named = [name for name in DEFAULT_BAD_PLANES if f"MP_{name}" in header]
        if not any(str(k).startswith("MP_") for k in header):
            return -1
        bad_bits = named
    if isinstance(bad_bits, str):
        text = bad_bits.strip()
        try:
            return int(text, 0)
        except ValueError:
            bad_bits = [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(bad_bits, (int, np.integer)):
        return int(bad_bits)
    value = 0
    for name in bad_bits:
        key = f"MP_{str(name).upper()}"
        if key not in header:
            known = sorted(k[3:] for k in header if str(k).startswith("MP_"))
            raise FieldFormatError(
                f"mask plane {name!r} is not defined in the MASK header (known: {known}); "
                "pass bit numbers as an integer mask instead (e.g. 0x5)",
                name,
            )
        value |= 1 << int(header[key])
    return value


def read_field(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    bad_bits: int | str | Sequence[str] | None = None,
) -> FieldData:
    """Read a multi-band field with its optional variance / weight and mask planes.

    Planes are found by ``EXTNAME``, in any HDU order:

    * **image**: an HDU named ``IMAGE`` or ``SCI``, or else a 3-D cube ``(bands, H, W)`` in any
      unnamed HDU, or else one 2-D HDU per band named by its ``BAND`` keyword or ``EXTNAME``.
      A cube names its bands in the header keyword ``BANDS`` (``"g,r,i"``) or ``BAND1``,
      ``BAND2``, ... (in its own or the primary header); a single 2-D ``IMAGE`` plane names its
      band with ``BAND`` or ``FILTER``.
    * **variance**: ``VARIANCE`` or ``VAR``; or **inverse variance**: ``WEIGHT``, ``IVAR``,
      ``INVVAR`` or ``WHT`` (zero weight = no data).
    * **mask**: ``MASK``, an integer bit plane; a pixel is bad where ``mask & bad_bits != 0``
      (see :func:`resolve_bad_bits`; default: the bad planes a Rubin/HSC header names, else
      any nonzero bit). A 2-D mask applies to every band.

    Each auxiliary plane is either a cube of the image's shape (its own ``BANDS`` keyword, if
    any, gives its band order) or one 2-D HDU per band named ``VARIANCE_<band>`` (``MASK_g``,
    ...) or carrying a ``BAND`` keyword. All planes are returned in the image's band order.
    ``path`` may also be a list of files, one band each (e.g. Rubin/HSC exposures with
    ``IMAGE``, ``MASK`` and ``VARIANCE`` HDUs and the band in ``BAND`` or ``FILTER``).

    Masked pixels (mask bits, zero weight, NaN/inf data) are set to NaN in ``image`` and
    ``variance``: they do not enter the likelihood. A variance <= 0 or non-finite (or a
    negative weight) on an unmasked pixel is kept, and refused by the fit with a message
    naming the band, row and column: it is a damaged input, not a mask.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    madness_ppl.errors.FieldFormatError
        An unreadable, truncated or ambiguous file, naming the file and the problem.
    """
    if not isinstance(path, (str, os.PathLike)):
        return _read_band_files([Path(p) for p in path], bad_bits)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise FieldFormatError(f"{path} is a directory, not a FITS file", str(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False) as hdus:
                hdus.verify("silentfix")
                planes = _load_planes(hdus, path)
        for w in caught:
            if "truncated" in str(w.message):
                raise FieldFormatError(f"{path} is truncated ({w.message})", str(path))
        size, span = path.stat().st_size, max(planes[2], default=0)
        with open(path, "rb") as fh:
            plain = fh.read(6) == b"SIMPLE"  # not gzip / bzip2 compressed
            fh.seek(span)
            tail = fh.read() if plain and size > span else b""
        # trailing zero blocks are padding; anything else is an HDU astropy could not read
        if plain and (size % 2880 or size < span or tail.strip(b"\0 ")):
            # a FITS file is a whole number of 2880-byte blocks; a cut inside a header makes
            # astropy drop the last HDUs without a word
            raise FieldFormatError(
                f"{path} is truncated or damaged: {size} bytes, but its readable HDUs span "
                f"{span} (FITS files are whole 2880-byte blocks)",
                size,
            )
        planes = planes[:2]
    except (OSError, TypeError, ValueError, IndexError, KeyError, VerifyError) as err:
        if isinstance(err, MadnessInputError):
            raise
        raise FieldFormatError(
            f"{path} is not a readable FITS file ({type(err).__name__}: {err})", str(path)
        ) from None
    return _assemble(planes, path, bad_bits)


def _read_band_files(paths: list[Path], bad_bits) -> FieldData:
    if not paths:
        raise FieldFormatError("no field files given", paths)
    parts = [read_field(p, bad_bits=bad_bits) for p in paths]
    for p, part in zip(paths, parts, strict=True):
        if len(part.bands) != 1 and len(paths) > 1:
            raise FieldFormatError(
                f"{p}: a per-band file must hold one band, it holds {part.bands}", part.bands
            )
    if len(parts) == 1:
        return parts[0]
    shapes = {part.image.shape for part in parts}
    if len(shapes) != 1:
        raise FieldFormatError(f"the band files have different shapes {sorted(shapes)}", shapes)
    bands = tuple(b for part in parts for b in part.bands)
    if len(set(bands)) != len(bands):
        raise FieldFormatError(f"duplicate band names {bands} in {[str(p) for p in paths]}", bands)
    has_var = {part.variance is not None for part in parts}
    if len(has_var) != 1:
        raise FieldFormatError("some band files have a variance plane and some do not", paths)
    image = np.concatenate([part.image for part in parts])
    variance = None if False in has_var else np.concatenate([part.variance for part in parts])
    masks = [np.zeros(part.image.shape, bool) if part.mask is None else part.mask for part in parts]
    mask = np.concatenate(masks)
    return FieldData(
        image, bands, variance, parts[0].header, mask if mask.any() else None, parts[0].wcs
    )


class _Plane(NamedTuple):
    index: int
    name: str
    role: str
    band: str | None
    data: np.ndarray
    header: fits.Header


def _load_planes(hdus: fits.HDUList, path: Path) -> tuple[list[_Plane], fits.Header, list]:
    primary = hdus[0].header if len(hdus) else fits.Header()
    planes = []
    # where each HDU ends in the file (header + data + padding, as read from disk: a
    # tile-compressed CompImageHDU's filebytes() counts its decompressed image instead)
    spans = []
    for i in range(len(hdus)):
        info = hdus.fileinfo(i)
        spans.append(info["datLoc"] + info["datSpan"] if info else hdus[i].filebytes())
    for i, h in enumerate(hdus):
        if not h.is_image or h.header.get("NAXIS", 0) == 0:
            continue
        data = h.data  # may raise on a truncated file
        if data is None:
            continue
        if data.ndim not in (2, 3):
            raise FieldFormatError(
                f"{path}: HDU {i} ({h.name}) has {data.ndim} dimensions {data.shape}; expected "
                "a 2-D plane (H, W) or a 3-D cube (bands, H, W)",
                data.shape,
            )
        role, band = _role(h.name if h.name != "PRIMARY" else "")
        if role == "band":
            band = _plane_band(h, None) or (h.name if h.name not in ("", "PRIMARY") else None)
        elif band is None and data.ndim == 2:
            band = _plane_band(h, primary if i else None)
        planes.append(_Plane(i, h.name, role, band, np.array(data), h.header.copy()))
    return planes, primary, spans


def _image_of(planes: list, primary: Any, path: Path) -> tuple[np.ndarray, tuple[str, ...], Any]:
    """The ``(bands, H, W)`` image, its band names and header, from a cube or from one 2-D
    plane per band; refuses layouts that are ambiguous (two cubes, a cube and band planes of the
    same band, unnamed or duplicate bands, planes of different shapes)."""
    images = [p for p in planes if p.role == "image"]
    if not images:
        images = [p for p in planes if p.role == "band"]
    if not images:
        raise FieldFormatError(f"{path} holds no image data", str(path))
    cubes = [p for p in images if p.data.ndim == 3]
    if len(cubes) > 1:
        names = [f"HDU {p.index} ({p.name})" for p in cubes]
        raise FieldFormatError(f"{path}: several image cubes {names}; name one IMAGE", names)
    if cubes:
        cube = cubes[0]
        extra = [p for p in images if p is not cube and p.role == "image"]
        if extra:
            names = [f"HDU {p.index} ({p.name})" for p in extra]
            raise FieldFormatError(
                f"{path}: an image cube (HDU {cube.index}) and other image planes {names}; "
                "keep one layout",
                names,
            )
        image = np.asarray(cube.data, np.float32)
        bands = _bands_from_header(cube.header, image.shape[0], path)
        if bands is None:
            bands = _bands_from_header(primary, image.shape[0], path)
        if bands is None:
            raise FieldFormatError(
                f"{path}: the cube header names no bands (add BANDS='g,r,i' or BAND1, BAND2, ...)",
                str(path),
            )
        header = cube.header
    else:
        two_d = [p for p in images if p.data.ndim == 2]
        bands = tuple(p.band or "" for p in two_d)
        if any(not b for b in bands):
            unnamed = [f"HDU {p.index}" for p in two_d if not p.band]
            raise FieldFormatError(
                f"{path}: 2-D image plane(s) {unnamed} name no band; give each per-band HDU an "
                "EXTNAME or a BAND keyword, or write a (bands, H, W) cube with BANDS",
                unnamed,
            )
        shapes = {p.data.shape for p in two_d}
        if len(shapes) != 1:
            raise FieldFormatError(
                f"{path}: the band images have different shapes {sorted(shapes)}", shapes
            )
        image = np.stack([np.asarray(p.data, np.float32) for p in two_d])
        header = two_d[0].header
    if cubes:
        clash = [
            p
            for p in planes
            if p.role == "band"
            and p.data.ndim == 2
            and str(p.band).lower() in {b.lower() for b in bands}
        ]
        if clash:
            raise FieldFormatError(
                f"{path}: HDU {clash[0].index} ({clash[0].name}) is a second image of band "
                f"{clash[0].band!r}, which the cube (HDU {cube.index}) already holds",
                clash[0].name,
            )
    if len({b.lower() for b in bands}) != len(bands):
        raise FieldFormatError(f"{path}: duplicate band names {bands}", bands)
    return image, tuple(bands), header


def _assemble(loaded, path: Path, bad_bits) -> FieldData:
    """The :class:`FieldData` of a file's classified planes: the image (a cube or one plane per
    band), its variance or weight and mask planes, bad pixels set to NaN, and the PSF."""
    planes, primary = loaded
    image, bands, header = _image_of(planes, primary, path)
    aux = {}
    for role in ("variance", "weight", "mask"):
        found = [p for p in planes if p.role == role]
        if found:
            aux[role] = _aux_cube(found, role, bands, image.shape, path)
    if "variance" in aux and "weight" in aux:
        raise FieldFormatError(
            f"{path} has both a variance and an inverse-variance (WEIGHT) plane; keep one",
            str(path),
        )
    bad = ~np.isfinite(image)
    variance = None
    if "variance" in aux:
        variance = np.asarray(aux["variance"], np.float32)
    elif "weight" in aux:
        weight = np.asarray(aux["weight"], np.float64)
        bad |= weight == 0  # zero weight: no data
        with np.errstate(divide="ignore", invalid="ignore"):
            # a negative or NaN weight gives an invalid variance, refused by the fit
            variance = np.where(weight > 0, 1.0 / np.where(weight > 0, weight, 1.0), -1.0)
            variance = np.where(np.isfinite(weight), variance, np.nan).astype(np.float32)
    if "mask" in aux:
        mask_planes = [p for p in planes if p.role == "mask"]
        bits = resolve_bad_bits(bad_bits, mask_planes[0].header)
        bad |= (aux["mask"] & bits) != 0
    image = np.where(bad, np.float32(np.nan), image).astype(np.float32)
    if variance is not None:
        variance = np.where(bad, np.float32(np.nan), variance).astype(np.float32)
    psf_planes = [p for p in planes if p.role == "psf"]
    psf = _psf_cube(psf_planes, tuple(bands), path) if psf_planes else None
    return FieldData(
        image,
        tuple(bands),
        variance,
        header.copy(),
        bad if bad.any() else None,
        _wcs_of(header),
        psf,
    )


def _psf_cube(planes: list, bands: tuple[str, ...], path: Any) -> np.ndarray:
    """PSF images of ``bands`` from a ``PSF`` cube (bands named by ``BANDS``/``BANDn`` in its
    header, else taken to be the image's order) or ``PSF_<band>`` planes."""
    from madness_ppl.survey import match_bands

    cubes = [p for p in planes if p.data.ndim == 3]
    if cubes:
        if len(planes) > 1:
            raise FieldFormatError(f"{path}: several PSF HDUs with a PSF cube; keep one layout")
        cube = np.asarray(cubes[0].data, np.float64)
        have = _bands_from_header(cubes[0].header, cube.shape[0], path)
        if have is None:
            if cube.shape[0] != len(bands):
                raise FieldFormatError(
                    f"{path}: the PSF cube has {cube.shape[0]} planes for {len(bands)} image "
                    "bands and names none (add BANDS='g,r,i' to its header)",
                    cube.shape,
                )
            return cube
        return cube[match_bands(have, bands)]
    named = [p for p in planes if p.band]
    if len(named) != len(planes):
        raise FieldFormatError(f"{path}: 2-D PSF planes must be named PSF_<band>")
    have = [p.band for p in named]
    sizes = {p.data.shape for p in named}
    if len(sizes) != 1:
        raise FieldFormatError(f"{path}: PSF planes of different shapes {sorted(sizes)}", sizes)
    return np.stack([np.asarray(named[i].data, np.float64) for i in match_bands(have, bands)])


def read_psf(path: str | os.PathLike, bands: Sequence[str]) -> np.ndarray:
    """PSF images of ``bands`` from a FITS file: a ``PSF`` HDU (cube, bands named by its
    ``BANDS`` header) or ``PSF_<band>`` planes, else the file's single image cube or plane
    (``madness-ppl deblend --psf psf.fits``).

    Returns
    -------
    numpy.ndarray
        ``(B, P, P)`` float64 images in the order of ``bands`` (normalised later, by
        :func:`madness_ppl.psf.check_psf`).
    """
    path = Path(path)
    with fits.open(path, memmap=False) as hdus:
        planes, _, _ = _load_planes(hdus, path)
    psf_planes = [p for p in planes if p.role == "psf"]
    if not psf_planes:  # a plain file: its image planes are the PSF
        psf_planes = [p._replace(role="psf") for p in planes if p.role in ("image", "band")]
        psf_planes = [p._replace(band=p.band or _plane_band_name(p)) for p in psf_planes]
    if not psf_planes:
        raise FieldFormatError(f"{path} holds no PSF image", str(path))
    return _psf_cube(psf_planes, tuple(bands), path)


def _plane_band_name(plane) -> str | None:
    return plane.header.get("BAND") or plane.header.get("FILTER")


def _aux_cube(
    found: list[_Plane], role: str, bands: tuple[str, ...], shape: tuple, path: Path
) -> np.ndarray:
    """One auxiliary plane (variance, weight or mask) as a ``(B, H, W)`` cube in band order."""
    label = role.upper()
    n, height, width = shape

    def as_values(p: _Plane) -> np.ndarray:
        data = np.asarray(p.data)
        if role != "mask":
            return data.astype(np.float64)
        if data.dtype.kind == "f":
            finite = np.isfinite(data)
            if not (finite.all() and np.array_equal(data, np.round(data))):
                raise FieldFormatError(
                    f"{path}: the MASK plane (HDU {p.index}) must hold integer bit values, it "
                    f"holds non-integer floats",
                    str(path),
                )
            data = data.astype(np.int64)
        elif data.dtype.kind not in "iub":
            raise FieldFormatError(f"{path}: MASK has dtype {data.dtype}", data.dtype)
        return data.astype(np.int64)

    cubes = [p for p in found if p.data.ndim == 3]
    if cubes:
        if len(found) > 1:
            raise FieldFormatError(
                f"{path}: several {label} planes (HDUs {[p.index for p in found]})",
                [p.index for p in found],
            )
        p = cubes[0]
        if p.data.shape != shape:
            raise FieldFormatError(
                f"{path}: {label} shape {p.data.shape} != image shape {shape}", p.data.shape
            )
        values = as_values(p)
        own = _bands_from_header(p.header, p.data.shape[0], path)
        if own is not None and [b.lower() for b in own] != [b.lower() for b in bands]:
            lowered = [b.lower() for b in own]
            if sorted(lowered) != sorted(b.lower() for b in bands) or len(set(lowered)) != n:
                raise FieldFormatError(
                    f"{path}: {label} bands {own} are not the image's bands {bands}", own
                )
            values = values[[lowered.index(b.lower()) for b in bands]]
        return values
    for p in found:
        if p.data.shape != (height, width):
            raise FieldFormatError(
                f"{path}: {label} plane (HDU {p.index}) shape {p.data.shape} != image plane "
                f"shape {(height, width)}",
                p.data.shape,
            )
    if len(found) == 1 and (found[0].band is None or n == 1):
        if role == "mask" or n == 1:
            return np.broadcast_to(as_values(found[0]), shape).copy()
        raise FieldFormatError(
            f"{path}: a single 2-D {label} plane for {n} bands; give a (bands, H, W) cube or one "
            f"{label}_<band> HDU per band",
            str(path),
        )
    by_band = {}
    upper = {b.upper(): b for b in bands}
    for p in found:
        band = p.band if p.band in bands else upper.get(str(p.band).upper())
        if band is None or band in by_band:
            raise FieldFormatError(
                f"{path}: {label} plane HDU {p.index} ({p.name}) matches no single image band "
                f"{bands}",
                p.name,
            )
        by_band[band] = as_values(p)
    missing = [b for b in bands if b not in by_band]
    if missing:
        raise FieldFormatError(f"{path}: no {label} plane for bands {missing}", missing)
    return np.stack([by_band[b] for b in bands])


def _wcs_of(header: fits.Header):
    """The celestial WCS of ``header`` (2-D, dropping a band axis), or ``None``."""
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception:  # a malformed WCS is reported as absent, not fatal
            return None
    return wcs if wcs.has_celestial else None


def write_field(
    path: str | os.PathLike,
    image: np.ndarray,
    bands: tuple[str, ...] | list[str],
    *,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    header: fits.Header | None = None,
    overwrite: bool = False,
    survey: Any = None,
) -> None:
    """Write a ``(B, H, W)`` cube in electrons with ``BANDS`` in the header (and ``VARIANCE`` /
    ``MASK`` extensions; ``header`` cards such as a WCS are added to the primary header).

    With ``survey`` (a :class:`~madness_ppl.survey.Survey`), its name and pixel scale go in the
    ``SURVEY`` and ``PIXSCALE`` cards, so a prior of another survey refuses the file
    (:func:`madness_ppl.units.check_survey`)."""
    primary = fits.PrimaryHDU(np.asarray(image, np.float32), header=header)
    primary.header["BANDS"] = ",".join(bands)
    primary.header["BUNIT"] = "electron"
    if survey is not None:
        primary.header["SURVEY"] = (survey.name, "survey whose electrons the pixels are")
        primary.header["PIXSCALE"] = (survey.pixel_scale, "arcsec per pixel")
    hdus = [primary]
    if variance is not None:
        hdus.append(fits.ImageHDU(np.asarray(variance, np.float32), name="VARIANCE"))
    if mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(mask, np.int32), name="MASK"))
    _atomic_fits(fits.HDUList(hdus), Path(path), overwrite=overwrite)


def _atomic_fits(hdul: fits.HDUList, path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    atomic_write(path, lambda tmp: hdul.writeto(tmp, overwrite=True))
