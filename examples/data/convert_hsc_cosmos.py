"""Convert scarlet's public HSC COSMOS test cutout to the madness_ppl FITS field layout.

Source: ``data/hsc_cosmos_35.npz`` of https://github.com/pmelchior/scarlet (MIT licence, added in
commit 2bfb5bf, "Add a good HSC cosmos example dataset", 2019-06-10; blob b63c8cd). It holds a
58 x 48 pixel g, r, i, z, y cutout of an HSC-SSP coadd in the COSMOS field (0.168"/pixel):
``images``, ``variance`` and ``mask`` cubes, the coadd PSF of each band (43 x 43, unit sum) and
scarlet's detection catalog (x, y).

Written here (``hsc_cosmos_35.fits``):

* primary HDU: the image cube ``(5, 58, 48)`` with ``BANDS = 'g,r,i,z,y'``; the pixel values are
  HSC coadd fluxes on the AB zero point 27 (``FLUXMAG0 = 10**(0.4 * 27)``, the HSC pipeline's
  convention: a pixel value f is magnitude 27 - 2.5 log10 f), which ``madness_ppl`` converts to
  the prior's electrons (``madness_ppl.prepare.flux_scale``);
* ``VARIANCE``: the coadd variance, same units squared;
* ``MASK``: the HSC bit plane unchanged, with ``MP_<NAME>`` keywords for the bits every HSC/LSST
  pipeline assigns the same way (0-8: BAD, SAT, INTRP, CR, EDGE, DETECTED, DETECTED_NEGATIVE,
  SUSPECT, NO_DATA); the higher bits are pipeline-configuration specific and left unnamed;
* ``PSF``: the PSF cube with ``BANDS``;
* ``CATALOG``: scarlet's detections (x, y, 0-based pixels), for comparison only.

There is no WCS in the source file, so none here. Run::

    python examples/data/convert_hsc_cosmos.py path/to/hsc_cosmos_35.npz examples/data/hsc_cosmos_35.fits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

MASK_PLANES = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
)
ZERO_POINT = 27.0


def convert(source: Path, target: Path) -> None:
    """Write ``target`` (FITS) from scarlet's ``hsc_cosmos_35.npz`` at ``source``."""
    data = np.load(source)
    bands = ",".join(str(b) for b in data["filters"])
    primary = fits.PrimaryHDU(data["images"].astype(np.float32))
    primary.header["BANDS"] = (bands, "band of each plane")
    primary.header["FLUXMAG0"] = (10 ** (0.4 * ZERO_POINT), "flux of a magnitude-0 source")
    primary.header["MAGZERO"] = (ZERO_POINT, "AB magnitude of a pixel value of 1")
    primary.header["SURVEY"] = ("HSC", "Hyper Suprime-Cam SSP coadd, COSMOS")
    primary.header["PIXSCALE"] = (0.168, "arcsec per pixel")
    primary.header["ORIGIN"] = "scarlet data/hsc_cosmos_35.npz (MIT), commit 2bfb5bf"
    variance = fits.ImageHDU(data["variance"].astype(np.float32), name="VARIANCE")
    mask = fits.ImageHDU(data["mask"].astype(np.int32), name="MASK")
    for bit, name in enumerate(MASK_PLANES):
        mask.header[f"MP_{name}"] = bit
    psf = fits.ImageHDU(data["psfs"].astype(np.float32), name="PSF")
    psf.header["BANDS"] = bands
    catalog = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="x", format="D", array=data["catalog"]["x"]),
            fits.Column(name="y", format="D", array=data["catalog"]["y"]),
        ],
        name="CATALOG",
    )
    fits.HDUList([primary, variance, mask, psf, catalog]).writeto(target, overwrite=True)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
