"""FITS input and output for the command line and scripts, in one namespace.

The work is done in three modules, re-exported here: :mod:`madness_ppl.fields` (field files:
image, variance/weight, mask, PSF planes, WCS), :mod:`madness_ppl.positions` (positions from a
table or an array) and :mod:`madness_ppl.products` (catalogs and the output directory of
``madness-ppl deblend``, written atomically).
"""

from __future__ import annotations

from madness_ppl.atomic import OUTPUT_MARKER, check_output_dir, new_output_dir, swap_into_place
from madness_ppl.fields import (
    MAX_DEBLEND_PIXELS,
    FieldData,
    read_field,
    read_psf,
    resolve_bad_bits,
    write_field,
)
from madness_ppl.positions import check_positions, read_positions
from madness_ppl.products import PRODUCT_FILES, add_sky_coordinates, write_products, write_table

__all__ = [
    "MAX_DEBLEND_PIXELS",
    "OUTPUT_MARKER",
    "PRODUCT_FILES",
    "FieldData",
    "add_sky_coordinates",
    "check_output_dir",
    "check_positions",
    "new_output_dir",
    "read_field",
    "read_positions",
    "read_psf",
    "resolve_bad_bits",
    "swap_into_place",
    "write_field",
    "write_products",
    "write_table",
]
