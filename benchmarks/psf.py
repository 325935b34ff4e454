"""Priors across seeing: fields observed with their own PSF, narrow, median or wide (issue #28).

Run: ``python -m benchmarks psf --priors lsst-v0.2 lsst [--scarlet2] [--fields 20] [--field-size 128]``.
Writes ``results/psf.{json,md}``; the records of each (set, population, method) are kept in
``results/psf/`` as they finish, so an interrupted run resumes where it stopped (records made
with other ``--fields/--field-size/--seed`` are recomputed). ``--rebuild`` only rewrites the
tables from the stored records.

Each field gets its own PSF: per band, the LSST median FWHM times a factor drawn once per field
from ``U(0.5, 0.7)`` (``psf-narrow``), ``1`` (``psf-median``) or ``U(1.4, 1.8)`` (``psf-wide``),
a Kolmogorov or a Moffat (beta ~ U(2.5, 4.5)) profile at random. Galaxies at
``expected_density()`` of each population (``benchmarks/fields.py``: the training simulator's,
and one the priors never saw), drawn by galsim directly with the field's PSF (not through the model
frame's convolution the PSF-aware training uses), fitted from the *true* positions and
variance with ``deblend`` defaults.

Each prior is given the field's true PSF images when it can use them (a PSF-aware prior
always; the v0.2 prior, whose model frame is the LSST median PSF, only when the PSF is wider in
every band); otherwise it fits as it would without one (its only option). Metric: the 68 %
quantile of ``|F_r / F_r,true - 1|`` over all galaxies and over blended ones (blendedness
> 0.1), with 95 % bootstrap intervals over *fields* (1000 resamples) and the ratio of two
priors' widths bootstrapped on the same resampled fields.

``--scarlet2`` adds scarlet2 (``madness_ppl/peers/scarlet2.py``: its documented recipe with
``correct_fwhm=True``, ``max_iter=1000``, ``e_rel=1e-4``) given the same true PSF images, with
its own Gaussian model PSF (sigma 0.7 px, narrower than every PSF here). CPU time is process
time of the whole call for every method, compilation included (madness compiles once per
source-count bucket and kernel grid in the process; scarlet2 once per scene).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import fields
from benchmarks._common import RESULTS, write_results
from benchmarks.fields import POPULATIONS
from madness_ppl.atomic import atomic_write_text
from madness_ppl.stats import abs68, field_bootstrap

#: the field sets of ``benchmarks/fields.py`` (their ``-ood`` twins out of distribution)
SETS = ("psf-narrow", "psf-median", "psf-wide")


def make_fields(name: str, population: str, n_fields: int, field_size: int, seed: int):
    """Fields ``[seed, k]`` of set ``name`` for ``population``: blend, PSF images, PSF draw and
    true blendedness of each."""
    from madness_ppl import measure

    field_set = fields.field_set(name, population)
    out = []
    for k in range(n_fields):
        field = field_set.draw([seed, k], field_size=field_size)
        blend = field.blend
        shape = blend.field.shape[-2:]
        out.append(
            {
                "blend": blend,
                "psf": field.psf_images(),
                "info": field.psf_info,
                "blendedness": measure.blendedness(blend.isolated, blend.positions, shape),
            }
        )
    return out


def wider_than(prior, images) -> bool:
    """Whether the v0.2-style model frame can reach ``images`` (every band wider)."""
    from madness_ppl.psf import PSFError, field_kernel

    try:
        field_kernel(prior, images)
    except PSFError:
        return False
    return True


def run_prior(prior, fields) -> list[dict]:
    from madness_ppl.deblend import deblend

    out = []
    for f in fields:
        blend = f["blend"]
        if not len(blend.positions):
            continue
        usable = prior.psf_aware or wider_than(prior, f["psf"])
        tick = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deblend(
                blend.field,
                blend.variance,
                blend.positions,
                prior=prior,
                psf=f["psf"] if usable else None,
            )
        seconds = time.process_time() - tick
        truth = blend.isolated[:, 2].sum(axis=(-1, -2))
        out.append(
            {
                "error": (np.asarray(result.catalog["flux_r"]) / truth - 1).tolist(),
                "blendedness": np.asarray(f["blendedness"]).tolist(),
                "psf_given": bool(usable),
                "cpu_s": seconds,
                "psf": f["info"],
            }
        )
    return out


def run_scarlet2(fields, bands) -> list[dict]:
    """scarlet2 on each field with the true PSF images (see the module docstring)."""
    from madness_ppl.peers.scarlet2 import run_scarlet2 as runner

    out = []
    for f in fields:
        blend = f["blend"]
        if not len(blend.positions):
            continue
        tick = time.process_time()
        result = runner(
            blend.field,
            blend.variance,
            blend.positions,
            f["psf"],
            list(bands),
            correct_fwhm=True,
        )
        seconds = time.process_time() - tick
        truth = blend.isolated[:, 2].sum(axis=(-1, -2))
        out.append(
            {
                "error": (np.asarray(result["fluxes"])[:, 2] / truth - 1).tolist(),
                "blendedness": np.asarray(f["blendedness"]).tolist(),
                "psf_given": True,
                "cpu_s": seconds,
                "psf": f["info"],
                "converged": bool(result["converged"]),
                "n_iter": int(result["n_iter"]),
                "n_fallback_init": int(result["n_fallback_init"]),
            }
        )
    return out


def record_path(key: str, label: str) -> Path:
    """Where the records of one (set / population, method) are kept."""
    slug = f"{key}__{label}".replace(" / ", "__").replace(" ", "_").replace("/", "_")
    return RESULTS / "psf" / f"{slug}.json"


def bootstrap(records_a, records_b=None, *, blended=False, n=1000, seed=0):
    """r-flux error width (``abs68``: 68th percentile of |error|) of ``records_a``'s fields, or
    the ratio of ``records_b``'s to it on the same fields, and its 95 % field-bootstrap
    interval."""

    def errors(records):
        out = []
        for r in records:
            e, b = np.asarray(r["error"]), np.asarray(r["blendedness"])
            out.extend(e[b > 0.1] if blended else e)
        return out

    if records_b is None:
        return field_bootstrap(records_a, lambda rs: abs68(errors(rs)), n=n, seed=seed)

    def ratio(pairs):
        a, b = zip(*pairs, strict=True)
        return abs68(errors(b)) / abs68(errors(a))

    return field_bootstrap(list(zip(records_a, records_b, strict=True)), ratio, n=n, seed=seed)


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    "--fields",
    "1",
    "--field-size",
    "64",
    "--sets",
    "psf-wide",
    "--populations",
    "in-distribution",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", default=["lsst"])
    parser.add_argument("--fields", type=int, default=10)
    parser.add_argument("--field-size", type=int, default=128)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--populations", nargs="+", default=list(POPULATIONS))
    parser.add_argument("--seed", type=int, default=2800)
    parser.add_argument("--scarlet2", action="store_true", help="add scarlet2 with true PSFs")
    parser.add_argument("--rebuild", action="store_true", help="tables from stored records only")
    args = parser.parse_args(argv)

    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.survey import Survey

    priors = {name: GalaxyPrior.load(name) for name in args.priors}
    labels = {name: f"{Path(name).name} (v{p.config.version})" for name, p in priors.items()}
    if args.scarlet2:
        import scarlet2

        labels["scarlet2"] = f"scarlet2 {scarlet2.__version__} (true PSFs)"
    results = {}
    for name in args.sets:
        for population in args.populations:
            # the fields of a (set, population) depend on their names, not on which others run
            field_seed = args.seed + 10 * SETS.index(name) + POPULATIONS.index(population)
            settings = {
                "fields": args.fields,
                "field_size": args.field_size,
                "seed": args.seed,
                "field_seed": field_seed,
            }
            key = f"{name} / {population}"
            results[key] = {}
            fields = None
            for method, label in labels.items():
                path = record_path(key, label)
                if path.exists():
                    stored = json.loads(path.read_text())
                    if stored["settings"] == settings:
                        results[key][label] = stored["records"]
                        continue
                if args.rebuild:
                    raise SystemExit(f"--rebuild: no stored records for {key} / {label}")
                if fields is None:
                    fields = make_fields(name, population, args.fields, args.field_size, field_seed)
                if method == "scarlet2":
                    records = run_scarlet2(fields, Survey.lsst().band_names)
                else:
                    records = run_prior(priors[method], fields)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(
                    path, json.dumps({"settings": settings, "records": records}, indent=1)
                )
                results[key][label] = records
            print(
                key,
                {
                    lab: abs68([e for r in recs for e in r["error"]])
                    for lab, recs in results[key].items()
                },
                flush=True,
            )

    first = labels[args.priors[0]]
    lines = [
        "| set / population | prior | PSF given | galaxies | r-flux 68 % width, all [95 %] | "
        "blended (b > 0.1) [95 %] | width ratio to " + first + " [95 %] | CPU s / galaxy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, by_prior in results.items():
        for label, recs in by_prior.items():
            n = sum(len(r["error"]) for r in recs)
            w, lo, hi = bootstrap(recs)
            wb, lob, hib = bootstrap(recs, blended=True)
            ratio = "-"
            if label != first:
                r, rlo, rhi = bootstrap(by_prior[first], recs)
                ratio = f"{r:.2f} [{rlo:.2f}, {rhi:.2f}]"
            given = sum(r["psf_given"] for r in recs)
            cpu = sum(r["cpu_s"] for r in recs) / max(n, 1)
            if "converged" in recs[0]:
                converged = sum(r["converged"] for r in recs)
                fallback = sum(r["n_fallback_init"] for r in recs)
                cpu_note = f"{cpu:.2f} ({converged}/{len(recs)} converged, {fallback} fallback)"
            else:
                cpu_note = f"{cpu:.2f}"
            lines.append(
                f"| {key} | {label} | {given}/{len(recs)} fields | {n} | {w:.3f} [{lo:.3f}, "
                f"{hi:.3f}] | {wb:.3f} [{lob:.3f}, {hib:.3f}] | {ratio} | {cpu_note} |"
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines += [
        "",
        f"Command: `python -m benchmarks psf --priors {' '.join(args.priors)}"
        f"{' --scarlet2' if args.scarlet2 else ''} --fields {args.fields} --field-size "
        f"{args.field_size}`; code {commit}. The in-distribution "
        "population is the one the priors were trained on (other seeds); the PSFs are drawn "
        "by galsim directly. 'PSF given': fields where the prior could take the true PSF.",
    ]
    payload = {"args": vars(args), "commit": commit, "results": results}
    write_results("psf", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
