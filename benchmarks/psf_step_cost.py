"""Cost of the PSF in the MAP (issue #28): one L-BFGS step of v0.3 with the field's PSF against
one step of v0.2 at its own frame (no convolution), on the same fields, in one process.

Run: ``python -m benchmarks psf_step_cost [--repeats 3]``. Writes ``results/psf_step_cost.{json,md}``.

Fields: LSST in-distribution blends with 4 and 8 galaxies (80 px) and 16 (160 px), observed at the
median PSF and at 1.5x its FWHM (Kolmogorov, given as FWHMs). ms per step = the ``fit`` timing of
``deblend(errors=False)`` over its L-BFGS steps; each configuration runs ``repeats`` times
alternating the two priors and the first (compiling) run is dropped; the median is reported.
"""

from __future__ import annotations

import argparse
import subprocess
import warnings

import numpy as np

from benchmarks._common import write_results

CASES = ((4, 80), (8, 80), (16, 160))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--repeats", "1", "--factors", "1.0"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5])
    args = parser.parse_args(argv)

    from madness_ppl.deblend import deblend
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    v02, v03 = GalaxyPrior.load("lsst-v0.2"), GalaxyPrior.load("lsst")
    rows = []
    for factor in args.factors:
        fwhm = factor * np.array([survey.band(b).psf_fwhm for b in survey.band_names])
        for n, size in CASES:
            config = BlendConfig(field_size=size, n_galaxies=(n, n), margin=8)
            blend = make_blend(survey, rng=np.random.default_rng(n), config=config)
            per: dict[str, list[float]] = {"v0.2": [], "v0.3": []}
            for _ in range(args.repeats + 1):
                for name, prior, options in (("v0.2", v02, {}), ("v0.3", v03, {"psf": fwhm})):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = deblend(
                            blend.field,
                            blend.variance,
                            blend.positions,
                            prior=prior,
                            errors=False,
                            refine=0,
                            **options,
                        )
                    per[name].append(result.timings["fit"] / int(result.fit.n_steps))
            a, b = np.median(per["v0.2"][1:]), np.median(per["v0.3"][1:])
            rows.append(
                {
                    "psf_factor": factor,
                    "galaxies": n,
                    "field": size,
                    "ms_per_step_v02": 1e3 * a,
                    "ms_per_step_v03_psf": 1e3 * b,
                    "ratio": b / a,
                }
            )
            print(rows[-1], flush=True)
    lines = [
        "| PSF FWHM / median | galaxies | field (px) | v0.2 ms / step (no convolution) | "
        "v0.3 + PSF ms / step | ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['psf_factor']:.1f} | {r['galaxies']} | {r['field']} | {r['ms_per_step_v02']:.2f} | "
        f"{r['ms_per_step_v03_psf']:.2f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines += [
        "",
        f"Command: `python -m benchmarks psf_step_cost --repeats {args.repeats}`; code {commit}. "
        "Target (issue #28): a step with the PSF convolution <= 1.3x a v0.2 step.",
    ]
    write_results(
        "psf_step_cost", {"args": vars(args), "commit": commit, "rows": rows}, "\n".join(lines)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
