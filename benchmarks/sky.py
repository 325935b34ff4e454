"""A background left in the image (issue #29): fluxes with and without the fitted sky.

Run: ``python -m benchmarks sky [--fields 8] [--offsets 0 0.1 0.2 0.4]``. Writes
``results/sky.{json,md}``.

Each field is an LSST galsim blend (80 x 80 pixels, 2-6 galaxies, ``BlendConfig(field_size=80,
n_galaxies=(2, 6), margin=10)``, the simulator the shipped prior was trained on, other seeds)
to which a constant level ``offset x sigma_b`` is added in every band (``sigma_b`` the median
pixel noise of band b). ``deblend`` runs with the field's variance (so no background is
estimated: the case of a sky subtraction that left a residual level), true positions, the
shipped prior and defaults, once as is and once with ``fit_sky=True``. Reported per offset:
the median and the 68 % error (:func:`madness_ppl.stats.abs68`) of the r-band relative flux
error against the noiseless isolated galaxies, over sources, with 95 % bootstrap intervals
over fields; the fitted sky against the added one; the CPU seconds per field.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks._common import write_results
from madness_ppl.deblend import deblend
from madness_ppl.prior import GalaxyPrior
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.stats import abs68, field_bootstrap
from madness_ppl.survey import Survey

SEED = 8100
CONFIG = BlendConfig(field_size=80, n_galaxies=(2, 6), margin=10)


def run_field(prior: GalaxyPrior, seed: int, offsets: list[float]) -> list[dict]:
    """One record per (offset, fit_sky) on the field of ``seed``."""
    survey = Survey.lsst()
    blend = make_blend(survey, config=CONFIG, rng=np.random.default_rng(seed))
    r = survey.band_names.index("r")
    truth = blend.isolated.sum(axis=(-2, -1))[:, r]
    sigma = np.sqrt(np.median(blend.variance, axis=(1, 2)))
    records = []
    for offset in offsets:
        field = blend.field + (offset * sigma)[:, None, None]
        for fit_sky in (False, True):
            tick = time.process_time()
            with warnings.catch_warnings():  # the background warning is the point here
                warnings.simplefilter("ignore")
                result = deblend(
                    field, blend.variance, blend.positions, prior=prior, fit_sky=fit_sky
                )
            flux = np.asarray(result.catalog["flux_r"], np.float64)
            records.append(
                {
                    "seed": seed,
                    "offset": offset,
                    "fit_sky": fit_sky,
                    "relative_error": (flux / truth - 1).tolist(),
                    "sky_r_sigma": None if result.sky is None else float(result.sky[r] / sigma[r]),
                    "cpu_s": time.process_time() - tick,
                }
            )
    return records


def table(records: list[dict], offsets: list[float]) -> tuple[str, list[dict]]:
    rows, lines = (
        [],
        [
            "| added sky (sigma) | fit_sky | median r flux error [95 %] | 68 % error [95 %] | "
            "fitted r sky (sigma), median | CPU s / field |",
            "|---|---|---|---|---|---|",
        ],
    )
    for offset in offsets:
        for fit_sky in (False, True):
            chosen = [r for r in records if r["offset"] == offset and r["fit_sky"] == fit_sky]
            groups = [np.asarray(r["relative_error"]) for r in chosen]

            def pooled(gs, f):
                return f(np.concatenate(gs)) if gs else float("nan")

            med = field_bootstrap(groups, lambda gs: pooled(gs, np.median))
            err = field_bootstrap(groups, lambda gs: pooled(gs, abs68))
            skies = [r["sky_r_sigma"] for r in chosen if r["sky_r_sigma"] is not None]
            sky = float(np.median(skies)) if skies else None
            cpu = float(np.mean([r["cpu_s"] for r in chosen]))
            rows.append(
                {
                    "offset": offset,
                    "fit_sky": fit_sky,
                    "median": med,
                    "abs68": err,
                    "sky_r_sigma": sky,
                    "cpu_s": cpu,
                    "n_fields": len(chosen),
                    "n_sources": int(sum(len(g) for g in groups)),
                }
            )
            lines.append(
                f"| {offset:g} | {'yes' if fit_sky else 'no'} | {med[0]:+.3f} [{med[1]:+.3f}, "
                f"{med[2]:+.3f}] | {err[0]:.3f} [{err[1]:.3f}, {err[2]:.3f}] | "
                f"{'' if sky is None else f'{sky:+.3f}'} | {cpu:.1f} |"
            )
    n_fields = rows[0]["n_fields"] if rows else 0
    n_sources = rows[0]["n_sources"] if rows else 0
    text = (
        f"r-band flux errors of `deblend` on {n_fields} LSST blends ({n_sources} galaxies; "
        "80 x 80 px, 2-6 galaxies, the simulator the prior was trained on) with a constant "
        "level added in every band, given the field's variance (no background estimated), "
        "with and without `fit_sky`. Intervals: 95 % bootstrap over fields.\n\n" + "\n".join(lines)
    )
    return text, rows


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--offsets", "0.2"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    args = parser.parse_args(argv)
    prior = GalaxyPrior.load("lsst")
    records = []
    for k in range(args.fields):
        records += run_field(prior, SEED + k, args.offsets)
        print(f"field {k + 1}/{args.fields} done", flush=True)
    text, rows = table(records, args.offsets)
    write_results("sky", {"settings": vars(args), "rows": rows, "records": records}, text)
    print(text)


if __name__ == "__main__":
    main()
