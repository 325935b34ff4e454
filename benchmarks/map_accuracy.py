"""MAP fit quality on simulated LSST blends with the shipped prior: Adam (reference) vs L-BFGS.

Run: ``python -m benchmarks map_accuracy [--fields 20] [--field-size 121]``.
Writes ``results/map_accuracy.{json,md}``.

For each field (true positions and true variance given to the fit): reduced chi² of the
deblending-encoder initialisation and of the MAP, the MAP step count and wall time (compilation
excluded: every method is first run on one warm-up field per source-count bucket that the
timed fields use, so no timed fit compiles), and per galaxy the r-band flux
residual of the MAP model (stamp sum vs the noiseless isolated stamp sum) and of aperture
photometry on the blend (1" radius aperture on the field vs on the isolated truth).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import write_results
from madness_ppl import measure
from madness_ppl.deblend import deblend, extract_cutouts
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import bucket_size, place_stamps
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey


def _init_chi2(prior, blend) -> float:
    z0 = prior.deblend_encode(extract_cutouts(blend.field, blend.positions, prior.stamp_size))
    image = np.asarray(
        place_stamps(prior.decode(z0), blend.positions, blend.field.shape[-2:], subpixel=False)
    )
    return float(np.mean((blend.field - image) ** 2 / blend.variance))


def warmup_fields(survey, field_size: int, counts: list[int]) -> list:
    """One blend per distinct :func:`~madness_ppl.scene.bucket_size` of ``counts``, each holding
    the largest count of its bucket among them (seeds 4999, 4998, ...; not timed)."""
    largest: dict[int, int] = {}
    for n in counts:
        largest[bucket_size(n)] = max(n, largest.get(bucket_size(n), 0))
    out = []
    for k, (_, n) in enumerate(sorted(largest.items())):
        config = BlendConfig(field_size=field_size, n_galaxies=(n, n), margin=5)
        out.append(make_blend(survey, rng=np.random.default_rng(4999 - k), config=config))
    return out


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--field-size", "64", "--n-galaxies", "2", "3"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prior", default="lsst")
    parser.add_argument("--fields", type=int, default=20)
    parser.add_argument("--field-size", type=int, default=121)
    parser.add_argument("--n-galaxies", type=int, nargs=2, default=[4, 10])
    parser.add_argument("--methods", nargs="+", default=["svi", "lbfgs"])
    args = parser.parse_args(argv)
    prior = GalaxyPrior.load(args.prior)
    survey = Survey.named(prior.config.survey).select_bands(prior.bands)
    r = prior.bands.index("r")
    config = BlendConfig(field_size=args.field_size, n_galaxies=tuple(args.n_galaxies), margin=5)
    blends = [
        make_blend(survey, rng=np.random.default_rng(5000 + k), config=config)
        for k in range(args.fields)
    ]
    # one warm-up field per source-count bucket the timed fields use, so that no timed fit
    # compiles (fields of one bucket share a program)
    warmups = warmup_fields(survey, args.field_size, [len(b.positions) for b in blends])

    results = {}
    for method in args.methods:
        for warm in warmups:
            deblend(warm.field, warm.variance, warm.positions, prior=prior, method=method)
        fields, galaxies = [], []
        for k, blend in enumerate(blends):
            t0 = time.perf_counter()
            res = deblend(blend.field, blend.variance, blend.positions, prior=prior, method=method)
            seconds = time.perf_counter() - t0
            true_flux = blend.isolated[:, r].sum((-1, -2))
            flux = np.asarray(res.catalog["flux_r"])
            centres = 22.0 + blend.positions - np.rint(blend.positions)
            true_ap = np.array(
                [
                    measure.aperture_flux(blend.isolated[i, r : r + 1], centres[i : i + 1], 5.0)[0][
                        0, 0
                    ]
                    for i in range(len(flux))
                ]
            )
            ap = measure.aperture_flux(blend.field[r : r + 1], blend.positions, 5.0)[0][:, 0]
            fields.append(
                {
                    "field": k,
                    "n": len(flux),
                    "chi2_init": _init_chi2(prior, blend),
                    "chi2_map": float(res.fit.reduced_chi2),
                    "steps": int(res.fit.n_steps),
                    "converged": bool(res.fit.converged),
                    "seconds": seconds,
                }
            )
            galaxies += [
                {
                    "field": k,
                    "rel_map": float(flux[i] / true_flux[i] - 1),
                    "rel_aperture": float(ap[i] / true_ap[i] - 1),
                }
                for i in range(len(flux))
            ]
            print(method, fields[-1], flush=True)
        rel_map = np.array([g["rel_map"] for g in galaxies])
        rel_ap = np.array([g["rel_aperture"] for g in galaxies])
        results[method] = {
            "fields": fields,
            "galaxies": galaxies,
            "median_abs_flux_residual_map": float(np.median(np.abs(rel_map))),
            "median_abs_flux_residual_aperture": float(np.median(np.abs(rel_ap))),
            "chi2_lowered_on_every_field": all(f["chi2_map"] < f["chi2_init"] for f in fields),
            "median_chi2_init": float(np.median([f["chi2_init"] for f in fields])),
            "median_chi2_map": float(np.median([f["chi2_map"] for f in fields])),
            "median_steps": float(np.median([f["steps"] for f in fields])),
            "seconds_per_galaxy": float(sum(f["seconds"] for f in fields) / len(galaxies)),
        }
    lines = [
        "| method | fields | galaxies | chi²/pix init (median) | chi²/pix MAP (median) | lowered on every field | "
        "median steps | median abs r flux residual: MAP | aperture on blend | s / galaxy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in results.items():
        lines.append(
            f"| {method} | {len(s['fields'])} | {len(s['galaxies'])} | {s['median_chi2_init']:.3f} | "
            f"{s['median_chi2_map']:.3f} | {s['chi2_lowered_on_every_field']} | {s['median_steps']:.0f} | "
            f"{s['median_abs_flux_residual_map']:.3f} | {s['median_abs_flux_residual_aperture']:.3f} | "
            f"{s['seconds_per_galaxy']:.3f} |"
        )
    table = "\n".join(lines)
    write_results(
        "map_accuracy",
        {
            "prior": args.prior,
            "field_size": args.field_size,
            "n_galaxies": args.n_galaxies,
            "results": results,
        },
        table,
    )
    print(table)


if __name__ == "__main__":
    main()
