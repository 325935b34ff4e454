"""Blended fields: many catalog galaxies drawn into one image, with their ground truth.

A field of ``H x W`` pixels holds ``N`` galaxies at positions :math:`p_i` (pixel coordinates,
see ``docs/conventions.md``). Each galaxy is drawn on its own ``S x S`` stamp centred on the
nearest pixel, :math:`\\mathrm{round}(p_i)`, with the sub-pixel remainder as galsim offset; the
stamps are added into the field (clipped at the edges) and the noise of
:func:`madness_ppl.simulate.stamps.add_noise` is added once to the sum. The truth keeps each
galaxy's noiseless stamp, so a deblender's per-source model can be compared pixel by pixel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from astropy.table import Table

from madness_ppl.cutouts import add_stamps
from madness_ppl.errors import MadnessInputError
from madness_ppl.simulate.catalog import CatalogConfig, make_catalog
from madness_ppl.simulate.stamps import (
    PSFMaker,
    add_noise,
    check_stamp_size,
    draw_galaxy,
    galaxy_parameters,
)
from madness_ppl.survey import Survey

__all__ = ["Blend", "BlendConfig", "add_stamps", "make_blend", "sample_positions"]


@dataclasses.dataclass(frozen=True)
class BlendConfig:
    """How blended fields are laid out.

    Parameters
    ----------
    field_size
        Side of the square field in pixels (``> 0``).
    n_galaxies
        ``(min, max)`` inclusive range of the galaxy count, drawn uniformly. Ignored when
        ``density`` is set.
    density
        Mean galaxies per arcmin²; the count is then Poisson with mean ``density * area``.
    max_shift
        Galaxies are placed uniformly in a square of half-side ``max_shift`` arcsec around the field
        centre (``None``: anywhere in the field, keeping ``margin`` pixels from the edges).
    min_separation
        Minimum distance between any two galaxies in arcsec (0 for none).
    margin
        Distance in pixels from the field edge kept free of centres when ``max_shift`` is None.
    central_galaxy
        Put galaxy 0 within ±0.5 pixel of the field centre (the deblending-encoder training layout).
    stamp_size
        Odd side of each galaxy's stamp in pixels.
    """

    field_size: int = 205
    n_galaxies: tuple[int, int] = (12, 20)
    density: float | None = None
    max_shift: float | None = None
    min_separation: float = 0.0
    margin: float = 0.0
    central_galaxy: bool = False
    stamp_size: int = 45

    def __post_init__(self) -> None:
        if int(self.field_size) != self.field_size or self.field_size <= 0:
            raise MadnessInputError(f"field_size must be a positive integer, got {self.field_size}")
        lo, hi = self.n_galaxies
        if lo < 0 or hi < lo:
            raise MadnessInputError(
                f"n_galaxies must be a range 0 <= min <= max, got {self.n_galaxies}"
            )
        if self.density is not None and not (self.density >= 0 and math.isfinite(self.density)):
            raise MadnessInputError(
                f"density must be a finite non-negative number, got {self.density}"
            )
        if self.max_shift is not None and self.max_shift < 0:
            raise MadnessInputError(f"max_shift must be non-negative, got {self.max_shift}")
        if self.min_separation < 0:
            raise MadnessInputError(
                f"min_separation must be non-negative, got {self.min_separation}"
            )
        if self.margin < 0 or 2 * self.margin >= self.field_size:
            raise MadnessInputError(
                f"margin {self.margin} leaves no room in a {self.field_size} px field"
            )
        check_stamp_size(self.stamp_size)


class Blend(NamedTuple):
    """A simulated blended field and its truth.

    Attributes
    ----------
    field
        ``(bands, H, W)`` noisy image (electrons, sky subtracted).
    variance
        ``(bands, H, W)`` true per-pixel noise variance.
    noiseless
        ``(bands, H, W)`` the sum of the galaxies without noise.
    isolated
        ``(N, bands, S, S)`` each galaxy alone, noiseless, on a stamp centred on ``round(position)``.
    positions
        ``(N, 2)`` true ``(x, y)`` centres in field pixels.
    catalog
        ``N`` rows of catalog with added ``x``, ``y`` columns.
    """

    field: np.ndarray
    variance: np.ndarray
    noiseless: np.ndarray
    isolated: np.ndarray
    positions: np.ndarray
    catalog: Table


#: Most galaxies a simulated field may hold on average (each costs a ``(B, H, W)`` image).
MAX_MEAN_GALAXIES = 5000


def mean_galaxy_count(config: BlendConfig, pixel_scale: float) -> float:
    """Mean galaxies per field for a ``density`` layout (``density * area``); raises
    :class:`~madness_ppl.errors.MadnessInputError` above :data:`MAX_MEAN_GALAXIES`, before
    anything is drawn or allocated."""
    area_arcmin2 = (config.field_size * pixel_scale / 60.0) ** 2
    mean = float(config.density) * area_arcmin2
    if mean > MAX_MEAN_GALAXIES:
        raise MadnessInputError(
            f"density {config.density:g} per arcmin² gives ~{mean:.3g} galaxies per "
            f"{area_arcmin2:.3g} arcmin² field (at most {MAX_MEAN_GALAXIES}); typical deep "
            "fields have 50-300 per arcmin²",
            config.density,
        )
    return mean


def _galaxy_count(config: BlendConfig, pixel_scale: float, rng: np.random.Generator) -> int:
    if config.density is None:
        lo, hi = config.n_galaxies
        return int(rng.integers(lo, hi + 1))
    return int(rng.poisson(mean_galaxy_count(config, pixel_scale)))


def sample_positions(
    n: int, config: BlendConfig, pixel_scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``n`` galaxy centres for a field laid out by ``config``.

    Centres are uniform in the allowed square; with ``min_separation`` they are drawn by
    sequential rejection, and an impossible request (the disks of radius ``min_separation / 2``
    cannot fit, or 1000 tries fail for one galaxy) raises ``ValueError``.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` positions ``(x, y)`` in pixels.
    """
    centre = (config.field_size - 1) / 2.0
    if config.max_shift is None:
        half = centre - config.margin
    else:
        half = min(config.max_shift / pixel_scale, centre)
    sep = config.min_separation / pixel_scale
    side = 2 * half + sep  # disks of diameter sep centred in the square fit in this square
    if n > 1 and sep > 0 and n * math.pi * (sep / 2) ** 2 > 0.9 * side**2:
        raise MadnessInputError(
            f'cannot place {n} galaxies {config.min_separation}" apart in a '
            f'{2 * half * pixel_scale:.1f}" square: density too high for min_separation'
        )
    positions = np.empty((n, 2))
    for i in range(n):
        for _ in range(1000):
            if i == 0 and config.central_galaxy:
                candidate = centre + rng.uniform(-0.5, 0.5, 2)
            else:
                candidate = centre + rng.uniform(-half, half, 2)
            if i == 0 or sep == 0 or np.min(np.hypot(*(positions[:i] - candidate).T)) >= sep:
                positions[i] = candidate
                break
        else:
            raise MadnessInputError(
                f'could not place galaxy {i + 1} of {n} at least {config.min_separation}" from '
                "the others after 1000 tries; lower the count/density or min_separation"
            )
    return positions


def _draw_size(params: dict[str, np.ndarray], i: int, survey: Survey, stamp_size: int) -> int:
    """Odd stamp side holding ~99 % of galaxy ``i``'s light (at least ``stamp_size``, at most 255).

    Galaxies larger than the truth stamp are drawn whole into the field (as on the sky) and only
    their truth stamp is cropped, so the field has no artificial square edges.
    """
    g = np.hypot(params["g1"][i], params["g2"][i])
    disk = 4.0 * params["disk_hlr"][i] / np.sqrt(max(1.0 - g, 0.05))
    bulge = 8.0 * params["bulge_hlr"][i]
    radius = max(disk, bulge) + 2.0 * max(b.psf_fwhm for b in survey.bands)
    side = 2 * int(np.ceil(radius / survey.pixel_scale)) + 1
    return int(min(max(side, stamp_size), 255))


def make_blend(
    survey: Survey,
    *,
    rng: np.random.Generator,
    config: BlendConfig | None = None,
    catalog_config: CatalogConfig | None = None,
    catalog: Table | None = None,
    positions: np.ndarray | None = None,
    shear: tuple[float, float] | None = None,
    psf: PSFMaker | None = None,
) -> Blend:
    """Simulate one blended field.

    Parameters
    ----------
    survey
        Bands, PSFs, pixel scale and noise.
    rng
        Seeded generator: the only randomness.
    config
        Field layout (size, galaxy count or density, shifts, separations).
    catalog_config
        Galaxy population; used when ``catalog`` is not given.
    catalog, positions
        Optional explicit galaxies and ``(x, y)`` pixel positions (both or neither).
    shear
        Optional reduced shear :math:`(g_1, g_2)` applied to every galaxy's profile about its
        own centre (see :func:`~madness_ppl.simulate.stamps.draw_galaxy`); positions are not
        sheared. ``None`` (default): no shear, the same field as before. The noise draws use
        ``rng`` after the catalog and positions, so passing ``catalog``, ``positions`` and a
        freshly seeded ``rng`` gives fields with different shears the same standard-normal
        noise draws (the variance still follows each image's Poisson term).
    psf
        Optional PSF per band name (a galsim object of unit flux, see
        :func:`~madness_ppl.simulate.stamps.draw_galaxy`); ``None`` (default): the survey's.

    Returns
    -------
    Blend
        The noisy field, its variance, noiseless sum, per-galaxy noiseless stamps, positions and
        catalog (with ``x``, ``y`` columns).
    """
    config = config or BlendConfig()
    if (catalog is None) != (positions is None):
        raise MadnessInputError("give both catalog and positions, or neither")
    if catalog is None:
        n = _galaxy_count(config, survey.pixel_scale, rng)
        catalog = make_catalog(n, survey, rng=rng, config=catalog_config)
        positions = sample_positions(n, config, survey.pixel_scale, rng)
    positions = np.asarray(positions, dtype=float).reshape(-1, 2)
    if len(positions) != len(catalog):
        raise MadnessInputError(f"{len(positions)} positions for {len(catalog)} catalog rows")
    size = config.field_size
    outside = (positions < -0.5) | (positions > size - 0.5)
    if outside.any():
        bad = int(np.argmax(outside.any(axis=1)))
        raise MadnessInputError(
            f"galaxy {bad} at {positions[bad]} lies outside the {size}x{size} field"
        )

    s = config.stamp_size
    params = galaxy_parameters(catalog, survey)
    centres = np.rint(positions).astype(int)
    isolated = np.empty((len(catalog), survey.n_bands, s, s), dtype=np.float32)
    noiseless = np.zeros((survey.n_bands, size, size), dtype=np.float32)
    for i in range(len(catalog)):
        offset = tuple(positions[i] - centres[i])
        big = _draw_size(params, i, survey, s)
        image = draw_galaxy(params, i, survey, stamp_size=big, offset=offset, shear=shear, psf=psf)
        add_stamps(noiseless, image[None], centres[i : i + 1])
        crop = (big - s) // 2
        isolated[i] = image[:, crop : crop + s, crop : crop + s]
    field, variance = add_noise(noiseless, survey.sky_variance, rng)
    catalog = catalog.copy(copy_data=False)
    catalog["x"], catalog["y"] = positions[:, 0], positions[:, 1]
    return Blend(field, variance, noiseless, isolated, positions, catalog)
