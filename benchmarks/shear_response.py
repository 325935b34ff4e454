"""Calibrated shear through the deblender: m and c of the metacalibrated madness_ppl shapes.

Run: ``taskset -c 0 python -m benchmarks shear_response [--fields 12] [--field-size 205]``.
Writes ``results/shear_response.{json,md,png}``. Resumable: every finished layout is appended to
``results/shear_response/<prior>_<field size>.jsonl``; ``--tables-only`` rebuilds the outputs.

Protocol
--------
* **Fields**: the ring test of ``shear.py`` (same layouts, seeds from 17000, same four variants:
  intrinsic shapes as drawn or rotated by 90 degrees x applied shear
  :math:`g = \\pm(0.02, 0.02)` on every galaxy, one noise realisation shared by the four).
  The test galaxies come from the same simulator (catalog and galsim profiles) as the
  prior's training set: an in-distribution test.
* **Isolated rows** (``--isolated-fields N``): the first N layouts also drawn on a grid 64
  pixels apart (``shear.py``'s isolated variant: same galaxies, shears and noise seed, no
  neighbours), fitted the same way: what blending adds to the calibration error.
* **Fit**: ``deblend(field, variance, true positions, prior=..., errors=False)`` (survey PSF),
  then :func:`madness_ppl.shear.shear_response` on its MAP with the same PSF kernel:

  - ``metacal``: the noise-corrected response (a second noise field of the same variance,
    seeded by the layout so that the four variants share it; Newton refit; derivative image
    :math:`\\mathcal D(I - n')`);
  - ``map``: ``noise_correction=False`` (the deblender's own MAP differentiated, no refit).

* **Estimator**: :math:`\\hat g_k = \\langle e_k \\rangle / \\langle R_{kk} \\rangle` over a
  selection, e the Gaussian-weighted (FWHM 1.2") moments ellipticity of the decoded model-frame
  galaxy (r+i+z); :math:`\\langle R \\rangle` over the four variants. With the ring pairs,
  :math:`m_k = \\langle (e^+_k - e^-_k)/2 \\rangle / (g \\langle R_{kk} \\rangle) - 1`,
  :math:`c_k = \\langle (e^+_k + e^-_k)/2 \\rangle / \\langle R_{kk} \\rangle`. All galaxies
  count (no cuts: a cut on a sheared quantity would need its own response).
* **Errors**: bootstrap over layouts (1000 resamples; numerator and denominator resampled
  together). Costs: seconds of the deblend and of the response per field, same process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, machine_of_records, records_by_seed, write_results
from benchmarks.shear import FIRST_SEED, MAG_BINS, SHEAR, VARIANTS, variant_fields
from madness_ppl.machine import describe_machine

OUT_DIR = RESULTS / "shear_response"
N_BOOT = 1000
ESTIMATORS = ("metacal", "map")
BLEND_EDGES = (0.0, 0.01, 0.1, 1.0)


def _records_file(prior: str, field_size: int, isolated: bool) -> Path:
    return OUT_DIR / f"{prior}{'-isolated' if isolated else ''}_{field_size}.jsonl"


def load_records(prior: str, field_size: int, isolated: bool = False) -> dict[int, dict]:
    """Finished layouts (the last record of a seed wins; torn lines skipped)."""
    return records_by_seed(_records_file(prior, field_size, isolated))


def run(
    prior_name: str,
    seeds: list[int],
    field_size: int,
    isolated_seeds: int = 0,
    blended: bool = True,
) -> None:
    """Deblend and measure every variant of layouts ``seeds``; one JSON line per layout; the
    first ``isolated_seeds`` layouts also on their isolated grid."""
    from rich.progress import Progress

    from madness_ppl import GalaxyPrior, measure
    from madness_ppl.deblend import deblend
    from madness_ppl.psf import field_kernel
    from madness_ppl.shear import shear_response

    prior = GalaxyPrior.load(prior_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = field_kernel(prior, None)
    todo = [(s, False) for s in seeds if s not in load_records(prior_name, field_size)]
    todo = todo if blended else []
    done_grid = load_records(prior_name, field_size, isolated=True)
    todo += [(s, True) for s in seeds[:isolated_seeds] if s not in done_grid]
    todo.sort()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with Progress() as bar:
        task = bar.add_task("shear response", total=len(todo))
        for seed, isolated in todo:
            record = {"seed": seed, "variants": [], "prior": prior_name, "isolated": isolated}
            for blend in variant_fields(seed, field_size, isolated=isolated):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = deblend(
                        blend.field, blend.variance, blend.positions, prior=prior, errors=False
                    )
                t1 = time.perf_counter()
                n = len(blend.positions)
                z = np.asarray(res.fit.params["z"][:n])
                args = (prior, z, blend.positions, blend.field, blend.variance)
                meta = shear_response(*args, psf=kernel, seed=seed)
                t2 = time.perf_counter()
                plain = shear_response(*args, psf=kernel, noise_correction=False)
                t3 = time.perf_counter()
                record["variants"].append(
                    {
                        "metacal": {"e": meta.e.tolist(), "R": meta.R.tolist()},
                        "map": {"e": plain.e.tolist(), "R": plain.R.tolist()},
                        "refit_steps": meta.steps,
                        "refit_converged": meta.converged,
                        "seconds": {"deblend": t1 - t0, "metacal": t2 - t1, "map": t3 - t2},
                        "blendedness": measure.blendedness(
                            blend.isolated, blend.positions, blend.field.shape[-2:]
                        ).tolist(),
                    }
                )
            record["n_galaxies"] = n
            record["i_mag"] = np.asarray(blend.catalog["i_mag"], float).tolist()
            record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record["cpus"] = [describe_machine()["cpu"]]
            record["cores_used"] = [len(os.sched_getaffinity(0))]
            with _records_file(prior_name, field_size, isolated).open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.advance(task)
            if not sys.stdout.isatty():
                where = " (isolated grid)" if isolated else ""
                print(f"shear response seed {seed}{where}: {n} galaxies", flush=True)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def rows(records: list[dict], estimator: str) -> dict[str, np.ndarray]:
    """Per galaxy x rotation: half-difference and half-sum of e, mean R diagonal, and labels."""
    d, s, r, group, mag, beta, rmax = [], [], [], [], [], [], []
    for k, rec in enumerate(records):
        e = np.array([v[estimator]["e"] for v in rec["variants"]])  # (4, n, 2)
        R = np.array([v[estimator]["R"] for v in rec["variants"]])  # (4, n, 2, 2)
        diag = np.diagonal(R, axis1=-2, axis2=-1).mean(axis=0)  # (n, 2) over the 4 variants
        blend = np.mean([v["blendedness"] for v in rec["variants"]], axis=0)
        for plus, minus in ((0, 1), (2, 3)):  # (rotation 0: +g, -g), (rotation 90: +g, -g)
            d.append((e[plus] - e[minus]) / 2)
            s.append((e[plus] + e[minus]) / 2)
            r.append(diag)
            group.append(np.full(len(diag), k))
            mag.append(rec["i_mag"])
            beta.append(blend)
            rmax.append(np.abs(np.diagonal(R, axis1=-2, axis2=-1)).max(axis=(0, 2)))
    cat = np.concatenate
    return {
        "d": cat(d),
        "s": cat(s),
        "R": cat(r),
        "group": cat(group),
        "i_mag": cat(mag),
        "blendedness": cat(beta),
        "R_max": cat(rmax),
    }


def bias(table: dict[str, np.ndarray], select: np.ndarray, seed: int = 0) -> dict:
    """m, c (per component) with bootstrap errors over layouts, and the mean response."""
    d, s, r, g = (table[k][select] for k in ("d", "s", "R", "group"))
    groups = np.unique(g)
    if len(groups) == 0:
        return {"n": 0}
    sums = np.array([[d[g == k].sum(0), s[g == k].sum(0), r[g == k].sum(0)] for k in groups])
    counts = np.array([np.sum(g == k) for k in groups])

    def stats(w: np.ndarray):
        tot, n = np.tensordot(w, sums, axes=1), w @ counts
        mean_d, mean_s, mean_r = tot / n
        return mean_d / (SHEAR * mean_r) - 1, mean_s / mean_r, mean_r

    m, c, mean_r = stats(np.ones(len(groups)))
    rng = np.random.default_rng(seed)
    boot = [
        stats(np.bincount(rng.integers(0, len(groups), len(groups)), minlength=len(groups)))
        for _ in range(N_BOOT)
    ]
    m_b, c_b = np.array([b[0] for b in boot]), np.array([b[1] for b in boot])
    return {
        "n": int(len(d) // 2),
        "fields": len(groups),
        "m": m.tolist(),
        "m_err": m_b.std(0).tolist(),
        "m_ci95": np.percentile(m_b, [2.5, 97.5], axis=0).T.tolist(),
        "c": c.tolist(),
        "c_err": c_b.std(0).tolist(),
        "mean_R": mean_r.tolist(),
    }


def summarise(prior: str, field_size: int, n_fields: int) -> dict:
    records = load_records(prior, field_size)
    chosen = [records[s] for s in sorted(records) if s < FIRST_SEED + n_fields]
    grid = load_records(prior, field_size, isolated=True)
    grid_chosen = [grid[s] for s in sorted(grid) if s < FIRST_SEED + n_fields]
    out: dict = {
        "prior": prior,
        "fields": len(chosen),
        "isolated_fields": len(grid_chosen),
        "estimators": {},
    }
    if not chosen:
        return out
    for recs, suffix in ((chosen, ""), (grid_chosen, ", isolated")):
        if not recs:
            continue
        for estimator in ESTIMATORS:
            table = rows(recs, estimator)
            every = np.ones(len(table["d"]), bool)
            by_mag = {
                f"{lo}-{hi}": bias(table, (table["i_mag"] >= lo) & (table["i_mag"] < hi))
                for lo, hi in itertools.pairwise(MAG_BINS)
            }
            by_blend = {
                f"{lo}-{hi}": bias(
                    table,
                    (table["blendedness"] >= lo) & (table["blendedness"] < hi + (hi == 1.0)),
                )
                for lo, hi in itertools.pairwise(BLEND_EDGES)
            }
            bounded = table["R_max"] < 2.0
            out["estimators"][estimator + suffix] = {
                "all": bias(table, every),
                "R_below_2": bias(table, bounded),
                "fraction_R_above_2": float(1 - bounded.mean()),
                "i_mag": by_mag,
                "blendedness": by_blend,
            }
    seconds = np.array(
        [
            [v["seconds"][k] for k in ("deblend", "metacal", "map")]
            for r in chosen
            for v in r["variants"]
        ]
    )
    galaxies = sum(r["n_galaxies"] for r in chosen) * len(VARIANTS)
    out["seconds_per_galaxy"] = dict(
        zip(("deblend", "metacal", "map"), (seconds.sum(0) / galaxies).tolist(), strict=True)
    )
    out["cost_ratio_metacal_to_deblend"] = float(seconds[:, 1].sum() / seconds[:, 0].sum())
    out["refit_converged_fraction"] = float(
        np.mean([v["refit_converged"] for r in chosen for v in r["variants"]])
    )
    out["records"] = chosen + grid_chosen
    return out


def _pm(stats: dict, key: str, k: int) -> str:
    if not stats.get("n"):
        return "-"
    return f"{stats[key][k]:+.3f} ± {stats[key + '_err'][k]:.3f}"


def tables(payload: dict) -> str:
    lines = [
        f"Ring test (shear.py's layouts and variants, g = ±{SHEAR}) on {payload['field_size']}-pixel"
        f" LSST fields, prior `{payload['prior']}`: {payload['fields']} layouts blended, the first"
        f" {payload['isolated_fields']} on their isolated grid (rows `, isolated`: the same"
        " galaxies, shears and noise seed 64 pixels apart). In-distribution:"
        " the galaxies come from the prior's training simulator. ± : bootstrap standard deviation"
        " over layouts.",
        "",
        "| estimator | galaxies | m1 | m2 | c1 | c2 | <R11> | <R22> |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, est in payload["estimators"].items():
        a = est["all"]
        lines.append(
            f"| {name} | {a['n']} | {_pm(a, 'm', 0)} | {_pm(a, 'm', 1)} | {_pm(a, 'c', 0)} "
            f"| {_pm(a, 'c', 1)} | {a['mean_R'][0]:.3f} | {a['mean_R'][1]:.3f} |"
        )
    lines += [
        "",
        "Diagnostic, not an estimator (a cut on R is itself sheared and would need its own"
        " response): m of the galaxies whose |R11|, |R22| stay below 2 in all four variants.",
        "",
        "| estimator | galaxies with a response above 2 | m1 | m2 |",
        "|---|---|---|---|",
    ]
    for name, est in payload["estimators"].items():
        b = est["R_below_2"]
        lines.append(
            f"| {name} | {100 * est['fraction_R_above_2']:.1f} % | {_pm(b, 'm', 0)} "
            f"| {_pm(b, 'm', 1)} |"
        )
    for split, title in (("i_mag", "i magnitude"), ("blendedness", "blendedness")):
        keys = list(next(iter(payload["estimators"].values()))[split])
        lines += ["", f"m = (m1 + m2) / 2 by {title} (galaxies):", ""]
        lines += ["| estimator | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, est in payload["estimators"].items():
            cells = []
            for k in keys:
                b = est[split][k]
                if not b.get("n"):
                    cells.append("-")
                    continue
                m = np.mean(b["m"])
                err = np.hypot(*b["m_err"]) / 2
                cells.append(f"{m:+.3f} ± {err:.3f} ({b['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sec = payload["seconds_per_galaxy"]
    lines += [
        "",
        f"Cost per galaxy: deblend {sec['deblend']:.3f} s, metacal response {sec['metacal']:.3f} s"
        f" (x{payload['cost_ratio_metacal_to_deblend']:.2f} the deblend), MAP-only response"
        f" {sec['map']:.3f} s; noise-added refits converged: "
        f"{100 * payload['refit_converged_fraction']:.0f} %.",
    ]
    return "\n".join(lines) + "\n"


def _figure(payload: dict) -> None:
    """m vs i magnitude and vs blendedness, per estimator, with bootstrap 1-sigma bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madness_ppl.plot import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, split, xlabel in zip(
        axes, ("i_mag", "blendedness"), ("i magnitude", "blendedness β"), strict=True
    ):
        for j, (name, est) in enumerate(payload["estimators"].items()):
            keys = [k for k, b in est[split].items() if b.get("n", 0) >= 5]
            xs = [i + 0.1 * (j - 0.5) for i, k in enumerate(est[split]) if k in keys]
            ys = [np.mean(est[split][k]["m"]) for k in keys]
            errs = [np.hypot(*est[split][k]["m_err"]) / 2 for k in keys]
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", ms=4, capsize=2, color=f"C{j}", label=name)
        ax.axhspan(-0.005, 0.005, color="0.85", label="±0.005 (issue target)")
        ax.axhline(0, color="k", lw=0.5)
        bins = list(next(iter(payload["estimators"].values()))[split])
        ax.set_xticks(range(len(bins)), bins)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("m = (m1 + m2) / 2 of <R>⁻¹<e>  (bootstrap 1σ)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"calibrated shear through madness_ppl ({payload['fields']} layouts, prior "
        f"{payload['prior']})",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, str(RESULTS / "shear_response.png"))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--field-size", "64"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=12)
    parser.add_argument("--field-size", type=int, default=205)
    parser.add_argument("--prior", default="lsst")
    parser.add_argument(
        "--isolated-fields", type=int, default=0, help="layouts also fitted on their isolated grid"
    )
    parser.add_argument(
        "--isolated-only", action="store_true", help="fit only the isolated grids (a 2nd process)"
    )
    parser.add_argument(
        "--rebuild", "--tables-only", dest="tables_only", action="store_true", help="tables only"
    )
    args = parser.parse_args(argv)
    if not args.tables_only:
        seeds = [FIRST_SEED + k for k in range(args.fields)]
        run(args.prior, seeds, args.field_size, args.isolated_fields, not args.isolated_only)
    payload = {"protocol": __doc__, "shear": SHEAR, "field_size": args.field_size}
    payload.update(summarise(args.prior, args.field_size, args.fields))
    records = payload.pop("records", [])
    table = tables(payload)
    if payload.get("estimators"):
        _figure(payload)
    write_results("shear_response", payload, table, machine=machine_of_records(records, "the run"))
    print(table)


if __name__ == "__main__":
    main()
