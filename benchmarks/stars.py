"""Stars in blends (issue #29): a star fitted by the galaxy prior vs as a point source.

Run: ``python -m benchmarks stars [--fields 10] [--mags 17 19 21 23]``. Writes
``results/stars.{json,md}``.

Each field is an LSST galsim blend (80 x 80 pixels, 2-5 galaxies, ``BlendConfig(field_size=80,
n_galaxies=(2, 5), margin=10)``, the simulator the shipped prior was trained on, other seeds)
plus one star of the same AB magnitude in every band (a flat spectrum: the galaxy prior has no
stellar colours to lean on, the point source needs none), drawn with the survey's PSF at a
uniform sub-pixel position within 25 pixels of the centre, with Poisson noise from all
sources. ``deblend`` runs with the true galaxy positions and the star's position off by
N(0, 0.3) pixel per axis (a detection's centroid error), the field's variance,
the survey's default PSF (what it assumes when given none) and the shipped prior, once as is
(the star is fitted as a galaxy) and once with ``point_sources=[star]``. Reported per star
magnitude: the star's r flux error (median and 68 % width, :func:`madness_ppl.stats.abs68`),
the reduced chi2 on its footprint (pixels where the noiseless star exceeds 3 sigma of the sky),
the share of its r flux errors covering the truth, its centre error (the given position as a
galaxy, the fitted one as a point source), the
galaxies' r flux 68 % width and median, L-BFGS steps and CPU seconds per field. Intervals: 95 %
bootstrap over fields.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks._common import write_results
from madness_ppl.deblend import deblend
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import place_stamps
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.stats import abs68, field_bootstrap
from madness_ppl.survey import Survey

SEED = 8300
CONFIG = BlendConfig(field_size=80, n_galaxies=(2, 5), margin=10)
METHODS = ("as a galaxy", "point source")


def star_field(survey: Survey, mag: float, seed: int):
    """The field, its variance, the positions (star last), the star's true fluxes and
    position, its footprint and the galaxies' true r fluxes."""
    rng = np.random.default_rng(seed)
    blend = make_blend(survey, config=CONFIG, rng=rng)
    flux = np.array([survey.mag_to_electrons(mag, b) for b in survey.band_names])
    where = 40.0 + rng.uniform(-25, 25, size=(1, 2))
    star = np.asarray(
        place_stamps((flux[:, None, None] * survey.psf_images(45))[None], where, (80, 80))
    )
    sky = blend.variance - blend.noiseless
    variance = sky + blend.noiseless + star
    field = blend.noiseless + star + np.sqrt(variance) * rng.normal(size=variance.shape)
    footprint = star.sum(0) > 3 * np.sqrt(sky.mean(0))
    r = survey.band_names.index("r")
    given = where + rng.normal(0.0, 0.3, size=(1, 2))  # a detection's centroid error
    positions = np.concatenate([blend.positions, given])
    galaxies = blend.isolated.sum(axis=(-2, -1))[:, r]
    return (
        field.astype(np.float32),
        variance.astype(np.float32),
        positions,
        flux,
        where[0],
        footprint,
        galaxies,
    )


def run_field(prior: GalaxyPrior, mag: float, seed: int) -> list[dict]:
    """One record per method on the field of ``seed`` with a star of magnitude ``mag``."""
    survey = Survey.lsst()
    field, variance, positions, flux, where, footprint, galaxies = star_field(survey, mag, seed)
    r = prior.bands.index("r")
    star = len(positions) - 1
    records = []
    for method in METHODS:
        tick = time.process_time()
        with warnings.catch_warnings():  # the default-PSF warning is expected here
            warnings.simplefilter("ignore")
            result = deblend(
                field,
                variance,
                positions,
                prior=prior,
                point_sources=[star] if method == "point source" else None,
            )
        catalog = result.catalog
        fitted = np.asarray(catalog["flux_r"], np.float64)
        error = np.asarray(catalog["flux_r_err"], np.float64)
        chi2 = result.residual**2 / variance
        records.append(
            {
                "seed": seed,
                "mag": mag,
                "method": method,
                "star_error": float(fitted[star] / flux[r] - 1),
                "star_covered": bool(abs(fitted[star] - flux[r]) < error[star]),
                "star_chi2": float(np.mean(chi2[:, footprint])),
                "star_offset_px": float(
                    np.hypot(catalog["x"][star] - where[0], catalog["y"][star] - where[1])
                ),
                "galaxy_error": (fitted[:star] / galaxies - 1).tolist(),
                "field_chi2": float(np.mean(chi2)),
                "steps": int(result.fit.n_steps),
                "converged": bool(np.all(catalog["converged"])),
                "cpu_s": time.process_time() - tick,
            }
        )
    return records


def _interval(value: tuple[float, float, float], fmt: str) -> str:
    return f"{value[0]:{fmt}} [{value[1]:{fmt}}, {value[2]:{fmt}}]"


def table(records: list[dict], mags: list[float]) -> tuple[str, list[dict]]:
    """The markdown table and its rows (one per magnitude and method)."""
    lines = [
        "| star mag | fitted | star r flux error, median | star 68 % width | star covered by "
        "its error | star chi2 / pixel | star centre error (px) | galaxies' r 68 % width | "
        "galaxies' median | steps | converged | CPU s / field |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for mag in mags:
        for method in METHODS:
            chosen = [r for r in records if r["mag"] == mag and r["method"] == method]
            if not chosen:
                continue
            star = [np.array([r["star_error"]]) for r in chosen]
            galaxies = [np.asarray(r["galaxy_error"]) for r in chosen]
            row = {
                "mag": mag,
                "method": method,
                "n_fields": len(chosen),
                "n_galaxies": int(sum(len(g) for g in galaxies)),
                "star_median": field_bootstrap(star, lambda g: np.median(np.concatenate(g))),
                "star_abs68": field_bootstrap(star, lambda g: abs68(np.concatenate(g))),
                "star_covered": float(np.mean([r["star_covered"] for r in chosen])),
                "star_chi2": field_bootstrap(
                    [np.array([r["star_chi2"]]) for r in chosen],
                    lambda g: np.median(np.concatenate(g)),
                ),
                "star_offset_px": float(np.median([r["star_offset_px"] for r in chosen])),
                "galaxy_abs68": field_bootstrap(galaxies, lambda g: abs68(np.concatenate(g))),
                "galaxy_median": field_bootstrap(galaxies, lambda g: np.median(np.concatenate(g))),
                "steps": float(np.median([r["steps"] for r in chosen])),
                "converged": float(np.mean([r["converged"] for r in chosen])),
                "cpu_s": float(np.mean([r["cpu_s"] for r in chosen])),
            }
            rows.append(row)
            centre = f"{row['star_offset_px']:.3f}"
            lines.append(
                f"| {mag:g} | {method} | {_interval(row['star_median'], '+.4f')} | "
                f"{_interval(row['star_abs68'], '.4f')} | {row['star_covered']:.2f} | "
                f"{_interval(row['star_chi2'], '.2f')} | {centre} | "
                f"{_interval(row['galaxy_abs68'], '.3f')} | "
                f"{_interval(row['galaxy_median'], '+.3f')} | {row['steps']:.0f} | "
                f"{row['converged']:.2f} | {row['cpu_s']:.1f} |"
            )
    n_fields = rows[0]["n_fields"] if rows else 0
    text = (
        f"A star of each magnitude (flat spectrum, survey PSF, sub-pixel position) in {n_fields} "
        "LSST blends per magnitude (80 x 80 px, 2-5 galaxies from the simulator the prior was "
        "trained on), deblended with true galaxy positions and the star's off by N(0, 0.3) px per "
        "axis, fitted as a galaxy (default) or as a point "
        "source (`point_sources=`). Star chi2: reduced, all bands, on the pixels where the "
        "noiseless star exceeds 3 sigma of the sky; its median over fields. Covered: share of "
        "fields whose star r flux is within its `flux_r_err`. Intervals: 95 % bootstrap over "
        "fields.\n\n" + "\n".join(lines)
    )
    return text, rows


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--mags", "19"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=10)
    parser.add_argument("--mags", type=float, nargs="+", default=[17.0, 19.0, 21.0, 23.0])
    args = parser.parse_args(argv)
    prior = GalaxyPrior.load("lsst")
    records = []
    for mag in args.mags:
        for k in range(args.fields):
            records += run_field(prior, mag, SEED + k)
        print(f"mag {mag:g}: {args.fields} fields done", flush=True)
    text, rows = table(records, args.mags)
    write_results("stars", {"settings": vars(args), "rows": rows, "records": records}, text)
    print(text)


if __name__ == "__main__":
    main()
