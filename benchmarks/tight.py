"""Tight blends (issue #31): convergence, cost and path-independence of the MAP, with and without
the Newton refinement.

Run: ``python -m benchmarks tight [--fields 20] [--refine 0 3@1 8 50:lbfgs] [--scarlet2]``. Writes ``results/tight.{json,md}``;
records per (population, method) are kept in ``results/tight/`` and resumed.

The set (``tight`` of ``benchmarks/fields.py``): 80x80-pixel LSST fields with 2-6 galaxies whose
centres lie in the central 40x40 pixels (``BlendConfig(field_size=80, n_galaxies=(2, 6),
margin=20)``; nearest neighbours are often < 1"), in distribution (the simulator the priors were
trained on, other seeds) and out of it (``benchmarks/fields.py``: larger, rounder-or-flatter,
bulgier galaxies, PSF 15 % wider, which the fit is *not* told: the prior's default PSF is used,
as a user without a PSF model would). Positions are the true ones; the prior is the shipped
default.

Per field, ``deblend`` runs three times for each ``refine`` setting: defaults; to full
convergence (``tol=1e-5, max_steps=2000``); with one empty corner pixel masked. Reported:
L-BFGS steps and converged fraction, CPU seconds per galaxy of the default run (process time of
the whole call, after one warm-up field of each source-count bucket), the share of sources
whose r flux moves by <= 0.1 of its ``flux_r_err`` to full convergence and with the masked
pixel, and the r-flux 68 % width against the truth. Intervals: 95 % bootstrap over fields.
``--scarlet2`` adds scarlet2 (``madness_ppl/peers/scarlet2.py``, ``correct_fwhm=True``) on the same
fields with the survey PSFs, for the time ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import warnings

import numpy as np

import madness_ppl.deblend as deblend_module
from benchmarks import fields
from benchmarks._common import RESULTS, write_results
from benchmarks.fields import POPULATIONS
from madness_ppl.atomic import atomic_write_text
from madness_ppl.deblend import deblend
from madness_ppl.options import DeblendOptions
from madness_ppl.stats import abs68, field_bootstrap

DEFAULT_REFINE = DeblendOptions().refine
DEFAULT_TOL_FACTOR = deblend_module.REFINE_TOL_FACTOR
DEFAULT_METHOD = DeblendOptions().refine_method


def parse_method(spec: str) -> tuple[int, float, str]:
    """``"8"``: refine=8 with deblend's refinement tolerance and method; ``"3@1"``: refine=3
    stopping at 1 x L-BFGS's tolerance (``REFINE_TOL_FACTOR``) instead; ``"50:lbfgs"``: 50
    steps of ``refine_method="lbfgs"``."""
    spec, _, method = spec.partition(":")
    refine, _, factor = spec.partition("@")
    return int(refine), float(factor) if factor else DEFAULT_TOL_FACTOR, method or DEFAULT_METHOD


def method_label(
    refine: int, factor: float = DEFAULT_TOL_FACTOR, method: str = DEFAULT_METHOD
) -> str:
    default = refine == DEFAULT_REFINE and factor == DEFAULT_TOL_FACTOR and method == DEFAULT_METHOD
    return (
        f"refine={refine}"
        + (f", {method}" if refine and method != DEFAULT_METHOD else "")
        + (f", refinement tol {factor:g} x tol" if refine and factor != DEFAULT_TOL_FACTOR else "")
        + (" (L-BFGS only)" if refine == 0 else "")
        + (" (default)" if default else "")
    )


def record_name(refine: int, factor: float, method: str = DEFAULT_METHOD) -> str:
    suffix = f"_tolx{factor:g}" if refine and factor != DEFAULT_TOL_FACTOR else ""
    suffix += f"_{method}" if refine and method != "gauss-newton" else ""
    return f"refine={refine}{suffix}"


def make_fields(population: str, n_fields: int, seed: int) -> list:
    """The non-empty blends of the ``tight`` field set of ``population``, seeds ``[seed, k]``."""
    field_set = fields.field_set("tight", population)
    blends = [field_set.draw([seed, k]).blend for k in range(n_fields)]
    return [blend for blend in blends if len(blend.positions)]


def run_madness(
    prior, fields, refine: int, factor: float = DEFAULT_TOL_FACTOR, method: str = DEFAULT_METHOD
) -> list[dict]:
    def fit(field, blend, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tol = options.get("tol", 1e-3)
            return deblend(
                field,
                blend.variance,
                blend.positions,
                prior=prior,
                refine=refine,
                refine_tol=factor * tol,
                refine_method=method,
                **options,
            )

    warm = set()
    for blend in fields:  # compile every bucket once, outside the timings
        n = len(blend.positions)
        if n not in warm:
            fit(blend.field, blend)
            warm.add(n)
    out = []
    for blend in fields:
        tick = time.process_time()
        default = fit(blend.field, blend)
        seconds = time.process_time() - tick
        full = fit(blend.field, blend, tol=1e-5, max_steps=2000)
        masked_field = blend.field.copy()
        masked_field[:, 0, -1] = np.nan
        masked = fit(masked_field, blend)
        flux, err = np.asarray(default.catalog["flux_r"]), np.asarray(default.catalog["flux_r_err"])
        truth = blend.isolated[:, 2].sum(axis=(-1, -2))
        out.append(
            {
                "n": len(blend.positions),
                "steps": int(default.fit.n_steps),
                "converged": bool(np.all(default.catalog["converged"])),
                "cpu_s": seconds,
                "error": (flux / truth - 1).tolist(),
                "shift_full": (np.abs(full.catalog["flux_r"] - flux) / err).tolist(),
                "shift_mask": (np.abs(masked.catalog["flux_r"] - flux) / err).tolist(),
            }
        )
    return out


def run_scarlet2(fields) -> list[dict]:
    from madness_ppl.peers.scarlet2 import run_scarlet2 as runner
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    psfs = survey.psf_images(41)
    out = []
    for blend in fields:
        tick = time.process_time()
        result = runner(
            blend.field,
            blend.variance,
            blend.positions,
            psfs,
            list(survey.band_names),
            correct_fwhm=True,
        )
        seconds = time.process_time() - tick
        truth = blend.isolated[:, 2].sum(axis=(-1, -2))
        out.append(
            {
                "n": len(blend.positions),
                "steps": int(result["n_iter"]),
                "converged": bool(result["converged"]),
                "cpu_s": seconds,
                "error": (np.asarray(result["fluxes"])[:, 2] / truth - 1).tolist(),
                "n_fallback_init": int(result["n_fallback_init"]),
            }
        )
    return out


def bootstrap(records, statistic, *, n=1000, seed=0) -> tuple[float, float, float]:
    """``statistic(records)`` and its 95 % interval, resampling fields."""
    return field_bootstrap(records, statistic, n=n, seed=seed)


def _pooled(records, key):
    return np.concatenate([np.asarray(r[key], float) for r in records])


def _fmt(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--populations", "in-distribution", "--refine", "0"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="lsst")
    parser.add_argument("--fields", type=int, default=20)
    parser.add_argument("--populations", nargs="+", default=list(POPULATIONS))
    parser.add_argument("--seed", type=int, default=3100)
    parser.add_argument(
        "--refine",
        nargs="+",
        default=["0", str(DEFAULT_REFINE)],
        help="refine= values; N@F: refinement tolerance F x tol instead of deblend's",
    )
    parser.add_argument("--scarlet2", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="tables from stored records only")
    args = parser.parse_args(argv)

    from madness_ppl.prior import GalaxyPrior

    prior = GalaxyPrior.load(args.prior)
    specs = [parse_method(spec) for spec in args.refine]
    methods = {method_label(*spec): spec for spec in specs}
    if args.scarlet2:
        import scarlet2

        methods[f"scarlet2 {scarlet2.__version__}"] = None
    results = {}
    for population in args.populations:
        seed = args.seed + POPULATIONS.index(population)
        settings = {"fields": args.fields, "seed": seed, "prior": args.prior}
        # madness records also name the prior's version: a name such as "lsst" moves on
        versioned = {**settings, "prior_version": prior.config.version}
        results[population] = {}
        fields = None
        for label, spec in methods.items():
            name = "scarlet2" if spec is None else record_name(*spec)
            path = RESULTS / "tight" / f"{population}__{name}.json"
            wanted = settings if spec is None else {**versioned, "refine_tol_factor": spec[1]}
            if spec is not None and spec[0] and spec[2] != "gauss-newton":
                wanted["refine_method"] = spec[2]  # (records before stop 48: Gauss-Newton)
            if path.exists() and json.loads(path.read_text())["settings"] == wanted:
                results[population][label] = json.loads(path.read_text())["records"]
                continue
            if args.rebuild:
                raise SystemExit(f"--rebuild: no stored records for {population} / {label}")
            fields = fields or make_fields(population, args.fields, seed)
            records = run_scarlet2(fields) if spec is None else run_madness(prior, fields, *spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"settings": wanted, "records": records}, indent=1))
            results[population][label] = records
            print(population, label, "done", flush=True)

    lines = [
        "| population | method | fields / galaxies | median steps | converged | CPU s / galaxy "
        "[95 %] | time / scarlet2 | share within 0.1 err of full convergence | within 0.1 err "
        "with a masked empty pixel (max shift) | r-flux 68 % width [95 %] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = next((lab for lab in methods if lab.startswith("scarlet2")), None)
    for population, by_method in results.items():
        for label, recs in by_method.items():
            n_gal = sum(r["n"] for r in recs)
            per_gal = lambda rs: sum(r["cpu_s"] for r in rs) / max(sum(r["n"] for r in rs), 1)  # noqa: E731
            cpu = bootstrap(recs, per_gal)
            ratio = "-"
            if peer and label != peer:
                peer_recs = by_method[peer]
                pairs = list(zip(recs, peer_recs, strict=True))
                r = bootstrap(
                    pairs,
                    lambda ps, f=per_gal: f([a for a, _ in ps]) / f([b for _, b in ps]),
                )
                ratio = f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"
            if "shift_full" in recs[0]:
                full = bootstrap(recs, lambda rs: float(np.mean(_pooled(rs, "shift_full") <= 0.1)))
                mask = bootstrap(recs, lambda rs: float(np.mean(_pooled(rs, "shift_mask") <= 0.1)))
                full_s = _fmt(full)
                mask_s = f"{_fmt(mask)} ({_pooled(recs, 'shift_mask').max():.2f})"
            else:
                full_s = mask_s = "-"
            width = bootstrap(recs, lambda rs: abs68(_pooled(rs, "error")))
            converged = np.mean([r["converged"] for r in recs])
            steps = np.median([r["steps"] for r in recs])
            lines.append(
                f"| {population} | {label} | {len(recs)} / {n_gal} | {steps:.0f} | "
                f"{converged:.2f} | {_fmt(cpu)} | {ratio} | {full_s} | {mask_s} | {_fmt(width)} |"
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines += [
        "",
        f"Command: `python -m benchmarks tight --fields {args.fields} --refine "
        f"{' '.join(map(str, args.refine))}"
        f"{' --scarlet2' if args.scarlet2 else ''}`; prior {args.prior}; code {commit}. "
        "Steps: L-BFGS steps (scarlet2: its Adam steps, max_iter 1000, its own relative-change "
        "test for 'converged'). Shifts are in units of the default run's flux_r_err. Records are "
        "reused when their settings match (scarlet2's do not depend on the prior), so a time "
        "ratio may pair records of two runs on the same machine.",
    ]
    write_results(
        "tight", {"args": vars(args), "commit": commit, "results": results}, "\n".join(lines)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
