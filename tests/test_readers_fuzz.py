"""Fuzz tests of the FITS field reader and the positions-table reader (issue 18).

Random HDU orders, band orders, layouts (cube / one HDU per band), dtypes, NaN/inf pixels,
variance or inverse-variance planes, 2-D or 3-D masks, and random damage. Each example must
either raise a typed :class:`~madness_ppl.errors.MadnessInputError` or give exactly the clean
reference (in the prior's band order, masked pixels NaN); never a silent difference.
"""

import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from astropy.io import fits
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st

from madness_ppl.deblend import field_for_prior
from madness_ppl.errors import MadnessInputError
from madness_ppl.io import read_field, read_positions

BANDS = ("g", "r", "i")
PRIOR = SimpleNamespace(bands=BANDS, config=SimpleNamespace(survey="lsst"))
H, W = 7, 9

DAMAGE = (
    None,
    "truncate",
    "variance_shape",
    "float_mask",
    "duplicate_band",
    "no_band_names",
    "four_d",
)


def _reference(seed: int, integer: bool):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, (3, H, W))
    if integer:
        image = np.round(image)
    variance = rng.uniform(1.0, 100.0, (3, H, W)).astype(np.float32)
    return image, variance


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    file_order=st.permutations(range(3)),
    aux_order=st.permutations(range(3)),
    hdu_order=st.permutations(range(3)),
    layout=st.sampled_from(["cube", "hdus"]),
    dtype=st.sampled_from(["float32", "float64", "int16", "int32"]),
    noise=st.sampled_from(["variance", "weight", None]),
    mask_kind=st.sampled_from([None, "2d", "3d"]),
    n_bad=st.integers(0, 4),
    bad_bits=st.sampled_from([None, 0x1, 0x6]),
    damage=st.sampled_from(DAMAGE),
)
def test_field_reader_is_exact_or_a_typed_error(
    seed, file_order, aux_order, hdu_order, layout, dtype, noise, mask_kind, n_bad, bad_bits, damage
):
    rng = np.random.default_rng(seed + 1)
    image, variance = _reference(seed, dtype.startswith("int"))
    expected_bad = np.zeros(image.shape, bool)
    stored = image.astype(dtype)
    if dtype.startswith("float") and n_bad:
        for _ in range(n_bad):  # NaN / inf pixels: masked
            b, y, x = rng.integers(0, [3, H, W])
            stored[b, y, x] = rng.choice([np.nan, np.inf, -np.inf])
            expected_bad[b, y, x] = True
    mask = None
    if mask_kind is not None:
        shape = (H, W) if mask_kind == "2d" else (3, H, W)
        mask = np.zeros(shape, np.int32)
        for _ in range(3):
            idx = tuple(rng.integers(0, shape))
            mask[idx] |= 1 << int(rng.integers(0, 3))
        bits = -1 if bad_bits is None else bad_bits
        hit = (mask & bits) != 0
        expected_bad |= np.broadcast_to(hit, image.shape)

    file_bands = [BANDS[k] for k in file_order]
    aux_bands = [BANDS[k] for k in aux_order]
    planes = []  # (kind, hdus)
    if layout == "cube":
        hdu = fits.ImageHDU(stored[list(file_order)], name="IMAGE")
        hdu.header["BANDS"] = ",".join(file_bands)
        planes.append(("image", [hdu]))
    else:
        planes.append(("image", [fits.ImageHDU(stored[k], name=BANDS[k]) for k in file_order]))
    if noise is not None:
        values = variance if noise == "variance" else 1.0 / variance
        name = "VARIANCE" if noise == "variance" else "WEIGHT"
        if layout == "cube":
            hdu = fits.ImageHDU(values[list(aux_order)].astype(np.float32), name=name)
            hdu.header["BANDS"] = ",".join(aux_bands)
            planes.append(("noise", [hdu]))
        else:
            planes.append(
                (
                    "noise",
                    [
                        fits.ImageHDU(values[k].astype(np.float32), name=f"{name}_{BANDS[k]}")
                        for k in aux_order
                    ],
                )
            )
    if mask is not None:
        if mask.ndim == 3:
            hdu = fits.ImageHDU(mask[list(aux_order)], name="MASK")
            hdu.header["BANDS"] = ",".join(aux_bands)
        else:
            hdu = fits.ImageHDU(mask, name="MASK")
        planes.append(("mask", [hdu]))
    ordered = [planes[k] for k in hdu_order if k < len(planes)]
    hdus = [fits.PrimaryHDU()] + [h for _, group in ordered for h in group]

    if damage == "variance_shape" and noise is not None:
        hdus.append(fits.ImageHDU(np.ones((2, 3), np.float32), name="VAR"))
    elif damage == "float_mask":
        hdus = [h for h in hdus if h.name != "MASK"]
        hdus.append(fits.ImageHDU(np.full((H, W), 0.5, np.float32), name="MASK"))
    elif damage == "duplicate_band":
        hdus.append(fits.ImageHDU(stored[0], name="IMAGE_" + file_bands[0]))
    elif damage == "no_band_names":
        for h in hdus:
            h.header.pop("BANDS", None)
            if h.name in ("G", "R", "I"):
                h.name = ""
    elif damage == "four_d":
        hdus.append(fits.ImageHDU(np.zeros((1, 1, 2, 2), np.float32), name="EXTRA"))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "field.fits"
        fits.HDUList(hdus).writeto(path)
        if damage == "truncate":
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) - 2880 - 100])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = read_field(path, bad_bits=bad_bits)
                field, var = field_for_prior(data, PRIOR)
        except MadnessInputError as err:
            assert damage is not None, f"clean input refused: {err}"
            assert str(path) in str(err) or "band" in str(err)
            return
    effective_damage = damage not in (None, "variance_shape") or (
        damage == "variance_shape" and noise is not None
    )
    assert not effective_damage or damage == "truncate", f"{damage} not detected"
    # the only damage allowed to pass is a truncation that left every plane intact
    expected = np.where(expected_bad, np.nan, image).astype(np.float32)
    np.testing.assert_array_equal(field, expected)
    if noise is None:
        assert var is None
    else:
        ok = ~expected_bad
        np.testing.assert_allclose(var[ok], variance[ok], rtol=1e-6)
        assert np.isnan(var[expected_bad]).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(0, 8),
    fmt=st.sampled_from(["csv", "ecsv", "fits"]),
    upper=st.booleans(),
    extra=st.booleans(),
    damage=st.sampled_from([None, "empty", "nan", "inf", "text", "off", "no_y"]),
)
def test_positions_reader_is_exact_or_a_typed_error(seed, n, fmt, upper, extra, damage):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.5, 30.0, (n, 2)).round(3)
    names = ("X", "Y") if upper else ("x", "y")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"pos.{fmt}"
        if damage in ("empty", "text") and n:
            if fmt != "csv":
                damage = None  # only a text table can hold these
            else:
                rows = [f"{a},{b}" for a, b in xy]
                rows[-1] = "," + rows[-1].split(",")[1] if damage == "empty" else "abc,1"
                path.write_text(f"{names[0]},{names[1]}\n" + "\n".join(rows) + "\n")
        if not path.exists():
            values = xy.copy()
            if damage == "nan" and n:
                values[-1, 0] = np.nan
            elif damage == "inf" and n:
                values[0, 1] = np.inf
            elif damage == "off" and n:
                values[0, 0] = 1e4
            table = Table({names[0]: values[:, 0], names[1]: values[:, 1]})
            if damage == "no_y":
                del table[names[1]]
            if extra:
                table["flux"] = np.ones(n)
            table.write(path, format={"csv": "ascii.csv", "ecsv": "ascii.ecsv"}.get(fmt, fmt))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # near-duplicate positions only warn
                got = read_positions(path, (40, 40))
        except MadnessInputError as err:
            assert damage is not None and (n or damage == "no_y"), err
            assert str(path) in str(err)
            return
    assert damage is None or not n, f"{damage} not detected"
    np.testing.assert_allclose(got, xy.reshape(-1, 2), atol=1e-9)
