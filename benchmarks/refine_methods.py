"""The refinement's two methods against a long optimum (issue #31): how far each leaves the
fluxes from the MAP it is meant to reach, and at what cost.

Run: ``python -m benchmarks refine_methods [--sets dense tight] [--seeds 3000 204]``. Writes
``results/refine_methods.{json,md}``.

Per field (field sets of ``benchmarks/fields.py``: ``dense``, 205 px at 1.5x the expected
density; ``tight``, 80 px with 2-6 galaxies; shipped prior, true positions, the survey PSFs),
``deblend`` runs with ``refine=0`` and its L-BFGS end point :math:`z_0` is refined by each
method of :func:`madness_ppl.refine.newton_refine` (``gauss-newton`` with the default 8 steps;
``lbfgs`` with 30 and 60 steps and the default flux-move stop), at ``deblend``'s refinement
tolerance. A reference optimum comes from ``lbfgs`` run for up to ``--reference-steps`` steps at
a tolerance of 1e-8 (it stops when its line search fails: the float32 decoder's noise floor).
For every source and band, the distance of the model flux to the reference's, in units of the
reference's pixel-noise Laplace error; reported: its largest value over sources in r and the
share of sources within 0.1 in r and in every band. Wall seconds of each refinement alone (one
process, warm: each method runs once before it is timed).

The reference is one optimum, not the optimum: on a dense field two long runs can stop at
optima a few nats apart, so the distances say how close a method gets to *a* converged
answer, not to the truth.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks._common import write_results

#: (label, newton_refine options) of the methods compared.
METHODS = (
    ("gauss-newton, 8 steps (default)", {"method": "gauss-newton", "max_steps": 8}),
    ("lbfgs, 30 steps", {"method": "lbfgs", "max_steps": 30}),
    ("lbfgs, 60 steps", {"method": "lbfgs", "max_steps": 60}),
)


def make_field(name: str, seed: int):
    """The blend of field set ``name`` (``dense`` at 205 px or ``tight``) with ``seed`` and its
    PSF images."""
    from benchmarks.deblend_vs_scarlet2 import _psf_images
    from benchmarks.fields import SETS

    return SETS[name].draw(seed).blend, _psf_images(41)


def run_field(prior, name: str, seed: int, reference_steps: int) -> dict:
    """Every method and the reference on one field: the record of :func:`main`'s table."""
    from madness_ppl.deblend import deblend
    from madness_ppl.options import REFINE_FLUX_TOL, DeblendOptions
    from madness_ppl.refine import newton_refine
    from madness_ppl.uncertainty import laplace_flux_errors

    blend, psfs = make_field(name, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = deblend(blend.field, blend.variance, blend.positions, prior=prior, psf=psfs, refine=0)
    n = len(blend.positions)
    z0 = np.asarray(fit.fit.params["z"])[:n]
    common = (prior, z0, blend.positions, blend.field, blend.variance)
    tol = DeblendOptions().refine_tolerance
    reference = newton_refine(
        *common, psf=fit.psf, max_steps=reference_steps, tol=1e-8, method="lbfgs"
    )
    errors = laplace_flux_errors(
        prior,
        reference.z,
        blend.positions,
        blend.variance,
        psf=fit.psf,
        linearisation=(reference.observed, *reference.linearisation),
    ).flux_err
    truth_flux = reference.stamps.sum(axis=(-2, -1))
    r = list(prior.bands).index("r")

    def distances(stamps: np.ndarray) -> np.ndarray:
        return np.abs(stamps.sum(axis=(-2, -1)) - truth_flux) / errors

    rows = {"L-BFGS alone (refine=0)": {"seconds": 0.0, "steps": 0, "evaluations": 0}}
    start = fit.sources if fit.model_frame is None else fit.model_frame  # model-frame stamps
    rows["L-BFGS alone (refine=0)"]["shift"] = distances(np.asarray(start)).tolist()
    for label, options in METHODS:
        flux_tol = REFINE_FLUX_TOL if options["method"] == "lbfgs" else 0.0
        kwargs = {"psf": fit.psf, "tol": tol, "flux_tol": flux_tol, **options}
        newton_refine(*common, **kwargs)  # compile and warm
        tick = time.perf_counter()
        out = newton_refine(*common, **kwargs)
        seconds = time.perf_counter() - tick
        rows[label] = {
            "seconds": seconds,
            "steps": out.steps,
            "evaluations": out.evaluations,
            "decrease": out.decrease,
            "shift": distances(out.stamps).tolist(),
        }
    return {
        "set": name,
        "seed": seed,
        "n_galaxies": n,
        "fit_steps": int(fit.fit.n_steps),
        "reference": {"steps": reference.steps, "decrease": reference.decrease},
        "r_index": r,
        "methods": rows,
    }


def table(records: list[dict]) -> str:
    lines = [
        "| set / seed (galaxies) | method | steps (loss evaluations) | seconds | max r shift "
        "| share r <= 0.1 | share all bands <= 0.1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        where = f"{rec['set']} / {rec['seed']} ({rec['n_galaxies']})"
        for label, row in rec["methods"].items():
            shift = np.asarray(row["shift"])
            r = shift[:, rec["r_index"]]
            lines.append(
                f"| {where} | {label} | {row['steps']} ({row['evaluations']}) | "
                f"{row['seconds']:.1f} | {r.max():.2f} | {np.mean(r <= 0.1):.2f} | "
                f"{np.mean(shift.max(axis=1) <= 0.1):.2f} |"
            )
    references = ", ".join(
        f"{rec['set']} / {rec['seed']}: {rec['reference']['steps']} steps, "
        f"{rec['reference']['decrease']:.1f} nats below L-BFGS's end point"
        for rec in records
    )
    lines += [
        "",
        "Shifts: |flux - reference flux| / the reference's pixel-noise Laplace error. "
        f"References: {references}.",
    ]
    return "\n".join(lines)


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--sets", "tight", "--seeds", "204", "--reference-steps", "5"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["dense", "tight"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[3000, 204])
    parser.add_argument("--reference-steps", type=int, default=2000)
    parser.add_argument("--prior", default="lsst")
    args = parser.parse_args(argv)
    if len(args.sets) != len(args.seeds):
        parser.error("one seed per set")

    from madness_ppl.prior import GalaxyPrior

    prior = GalaxyPrior.load(args.prior)
    records = []
    for name, seed in zip(args.sets, args.seeds, strict=True):
        records.append(run_field(prior, name, seed, args.reference_steps))
        print(name, seed, "done", flush=True)
    text = table(records)
    write_results("refine_methods", {"args": vars(args), "records": records}, text)
    print(text)


if __name__ == "__main__":
    main()
