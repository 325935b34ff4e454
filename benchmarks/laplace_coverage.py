"""Laplace flux errors of ``deblend``: model-error calibration and coverage on galsim blends.

Run: ``python benchmarks/laplace_coverage.py [--isolated 300] [--fields 12] [--write-prior]``.
Writes ``results/laplace_coverage.{json,md}``; with ``--write-prior`` also stores the calibrated
model-error fractions in the shipped prior's ``config.json`` (``metadata["model_error"]``).

Protocol
--------
* Calibration (held-out isolated galaxies, seeds 900000+, never used for training or testing):
  one LSST galaxy per 61 x 61-pixel field, deblended with true position and variance. The
  per-pixel fraction :math:`\\epsilon_b` makes the reconstruction residuals consistent with the
  noise (:func:`madness_ppl.uncertainty.calibrate_model_error`); then, with it, the flux
  fraction :math:`\\kappa_b` is the smallest value for which
  :math:`|F - F_\\mathrm{true}| < \\sqrt{\\sigma_\\mathrm{Laplace}^2 + (\\kappa_b F)^2}` holds for
  68 % of the galaxies (:math:`F` the model flux on the 45-pixel stamp, :math:`F_\\mathrm{true}`
  that of the noiseless isolated stamp).
* Coverage (galsim blends, seeds 5000+, 205 x 205 pixels, 12-20 galaxies, true positions and
  variance; in distribution: the prior's own simulator): fraction of sources whose true flux
  lies within the 68 % (1 sigma) and 90 % (1.645 sigma) intervals, per band, for the Laplace
  errors alone and with the calibrated model-error terms, overall and for blended sources
  (blendedness >= 0.1); binomial standard errors. Time of the errors relative to the MAP fit
  from ``DeblendResult.timings`` (same run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import write_results

SEED_ISOLATED, SEED_BLENDS = 900_000, 5_000
Z68, Z90 = 1.0, 1.6449


def _isolated(prior, n: int):
    from madness_ppl.deblend import deblend, extract_cutouts
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    config = BlendConfig(field_size=61, n_galaxies=(1, 1), margin=20)
    out = {"residual": [], "model": [], "variance": [], "field": []}
    blends = []
    for k in range(n):
        blend = make_blend(survey, rng=np.random.default_rng(SEED_ISOLATED + k), config=config)
        result = deblend(blend.field, blend.variance, blend.positions, prior=prior, errors=False)
        out["residual"].append(extract_cutouts(result.residual, blend.positions, 45)[0])
        out["variance"].append(extract_cutouts(blend.variance, blend.positions, 45)[0])
        out["model"].append(result.sources[0])
        blends.append(blend)
    return {k: np.stack(v) for k, v in out.items() if v}, blends


def _calibrate(prior, n: int) -> dict:
    from madness_ppl.deblend import deblend
    from madness_ppl.uncertainty import calibrate_model_error

    stamps, blends = _isolated(prior, n)
    pixel = [
        calibrate_model_error(
            stamps["residual"][:, b], stamps["model"][:, b], stamps["variance"][:, b]
        )
        for b in range(len(prior.bands))
    ]
    flux, true, err = [], [], []
    for blend in blends:
        result = deblend(
            blend.field,
            blend.variance,
            blend.positions,
            prior=prior,
            model_error=pixel,
            flux_error_floor=0.0,
        )
        flux.append([result.catalog[f"flux_{b}"][0] for b in prior.bands])
        err.append([result.catalog[f"flux_{b}_err"][0] for b in prior.bands])
        true.append(blend.isolated[0].sum(axis=(-1, -2)))
    flux, true, err = (np.asarray(a, np.float64) for a in (flux, true, err))
    kappa = []
    for b in range(len(prior.bands)):
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            inside = np.abs(flux[:, b] - true[:, b]) < np.hypot(err[:, b], mid * flux[:, b])
            lo, hi = (mid, hi) if np.mean(inside) < 0.68 else (lo, mid)
        kappa.append(hi)
    return {
        "pixel_fraction": [round(float(x), 5) for x in pixel],
        "flux_fraction": [round(float(x), 5) for x in kappa],
        "galaxies": n,
        "seeds": f"{SEED_ISOLATED}..{SEED_ISOLATED + n - 1}",
        "laplace_only_coverage68": [
            float(np.mean(np.abs(flux[:, b] - true[:, b]) < err[:, b]))
            for b in range(len(prior.bands))
        ],
    }


def _coverage(prior, n_fields: int, calibration: dict) -> dict:
    from madness_ppl import measure
    from madness_ppl.deblend import deblend
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    config = BlendConfig(field_size=205, n_galaxies=(12, 20), margin=5)
    variants = {
        "Laplace": {"model_error": 0.0, "flux_error_floor": 0.0},
        "Laplace + model error": {
            "model_error": calibration["pixel_fraction"],
            "flux_error_floor": calibration["flux_fraction"],
        },
    }
    z = {name: [] for name in variants}
    beta, seconds = [], {"fit": 0.0, "errors": 0.0}
    for k in range(n_fields):
        blend = make_blend(survey, rng=np.random.default_rng(SEED_BLENDS + k), config=config)
        true = blend.isolated.sum(axis=(-1, -2))
        beta.append(measure.blendedness(blend.isolated, blend.positions, blend.field.shape[-2:]))
        for name, options in variants.items():
            result = deblend(blend.field, blend.variance, blend.positions, prior=prior, **options)
            cat = result.catalog
            flux = np.stack([np.asarray(cat[f"flux_{b}"]) for b in prior.bands], axis=1)
            err = np.stack([np.asarray(cat[f"flux_{b}_err"]) for b in prior.bands], axis=1)
            z[name].append((flux - true) / err)
            if k > 0 and name == "Laplace":  # the first field pays the compilation
                seconds["fit"] += result.timings["fit"]
                seconds["errors"] += result.timings["errors"]
        print(f"field {k}: {len(blend.positions)} galaxies", flush=True)
    beta = np.concatenate(beta)
    rows = {}
    for name in variants:
        zz = np.concatenate(z[name])
        rows[name] = {}
        for b, band in enumerate(prior.bands):
            entry = {}
            for label, sel in (("all", np.ones(len(zz), bool)), ("blended", beta >= 0.1)):
                n = int(sel.sum())
                for level, cut in (("68", Z68), ("90", Z90)):
                    p = float(np.mean(np.abs(zz[sel, b]) < cut)) if n else float("nan")
                    entry[f"{label}_{level}"] = p
                    entry[f"{label}_{level}_se"] = (
                        float(np.sqrt(p * (1 - p) / n)) if n else float("nan")
                    )
                entry[f"{label}_n"] = n
            rows[name][band] = entry
    return {"rows": rows, "error_seconds_fraction_of_fit": seconds["errors"] / seconds["fit"]}


def _write_prior(calibration: dict) -> Path:
    from madness_ppl.atomic import atomic_write_text

    path = Path(__file__).parent.parent / "madness_ppl" / "weights" / "lsst" / "config.json"
    document = json.loads(path.read_text())
    document["config"]["metadata"]["model_error"] = {
        "pixel_fraction": calibration["pixel_fraction"],
        "flux_fraction": calibration["flux_fraction"],
        "calibrated_by": "python benchmarks/laplace_coverage.py --write-prior "
        f"(held-out isolated galaxies, seeds {calibration['seeds']})",
    }
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--isolated", type=int, default=300, help="calibration galaxies")
    parser.add_argument("--fields", type=int, default=12, help="blended fields for coverage")
    parser.add_argument("--write-prior", action="store_true", help="store the calibration")
    args = parser.parse_args()

    from madness_ppl.prior import GalaxyPrior

    prior = GalaxyPrior.load("lsst")
    calibration = _calibrate(prior, args.isolated)
    coverage = _coverage(prior, args.fields, calibration)
    if args.write_prior:
        _write_prior(calibration)

    bands = list(prior.bands)
    lines = [
        f"Model-error calibration on {calibration['galaxies']} held-out isolated galaxies "
        f"(seeds {calibration['seeds']}):",
        "",
        "| | " + " | ".join(bands) + " |",
        "|---|" + "---|" * len(bands),
        "| pixel fraction ε | "
        + " | ".join(f"{x:.4f}" for x in calibration["pixel_fraction"])
        + " |",
        "| flux fraction κ | "
        + " | ".join(f"{x:.4f}" for x in calibration["flux_fraction"])
        + " |",
        "| isolated 68 % coverage, Laplace (ε only) | "
        + " | ".join(f"{x:.2f}" for x in calibration["laplace_only_coverage68"])
        + " |",
        "",
        f"Coverage on {args.fields} galsim blends (12-20 galaxies, in distribution), "
        "nominal 0.68 / 0.90, ± binomial standard error:",
        "",
        "| errors | band | n | 68 % | 90 % | blended n | blended 68 % | blended 90 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, per_band in coverage["rows"].items():
        for band, e in per_band.items():
            lines.append(
                f"| {name} | {band} | {e['all_n']} | {e['all_68']:.3f} ± {e['all_68_se']:.3f} | "
                f"{e['all_90']:.3f} ± {e['all_90_se']:.3f} | {e['blended_n']} | "
                f"{e['blended_68']:.3f} ± {e['blended_68_se']:.3f} | "
                f"{e['blended_90']:.3f} ± {e['blended_90_se']:.3f} |"
            )
    lines += [
        "",
        "Laplace errors cost "
        f"{100 * coverage['error_seconds_fraction_of_fit']:.0f} % of the MAP fit's time "
        "(same run, fields after the first).",
    ]
    write_results(
        "laplace_coverage",
        {"protocol": __doc__, "calibration": calibration, "coverage": coverage},
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
