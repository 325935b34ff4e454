"""madness_ppl MAP vs scarlet2 vs no deblending, on the same simulated LSST blends.

Run: ``python benchmarks/deblend_vs_scarlet2.py [--fields 50] [--field-size 205]``
(scarlet2 from the ``bench`` extra). Writes ``results/deblend_vs_scarlet2.{json,md}`` and
``results/deblend_vs_scarlet2.png``.

Protocol
--------
* Fields: LSST 10-year depth, ``field_size`` pixels (205 = 41"), two densities: "low" with 8-15
  and "high" with 12-20 galaxies (i < 25.3), ``fields`` per density, seeds ``0..fields-1``
  (``1000 + k`` for high), galaxy centres at least 5 pixels from the edges.
* Every method gets the same field, the same *true* positions and the same true variance map;
  scarlet2 gets the same PSF images; madness_ppl uses the shipped prior (PSF learned).
* Each method runs in its own process (its peak resident memory is that process's maximum RSS),
  fields one after the other; wall time is measured per field and includes compilation
  (first field) as a user would see it; "steady" times exclude the first field.
* Per galaxy, against its noiseless isolated truth stamp: r-band aperture flux residual
  (radius 5 pixels = 1", centred on the true position) relative to the true aperture flux, g-r
  aperture colour residual, SSIM and cosine similarity of the r-band stamp, KSB ellipticity
  residual :math:`|g - g_\\mathrm{true}|` (PSF corrected), and blendedness. "no deblending" uses
  the blended field itself (aperture photometry on the blend; its cutout for SSIM/cosine/shape).
* "+ flux re-distribution" rows measure the same fits on scarlet's re-distributed stamps,
  :math:`d_i = y\\,m_i / \\sum_j m_j` (:func:`madness_ppl.deblend.redistribute_flux`): the data
  split in proportion to the models, so only the models' relative shapes matter (same times).
* Summaries: bias (median), 68 % width (half the 16-84 % range) and the fraction of > 3 sigma
  outliers (|residual flux| > 3 x the aperture's noise sigma), overall and per blendedness bin.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import itertools

from _common import RESULTS, write_results

DENSITIES = {"low": (8, 15), "high": (12, 20)}
SEED_OFFSET = {"low": 0, "high": 1000}
APERTURE = 5.0
BLEND_BINS = (0.0, 0.01, 0.1, 0.5, 1.0)
LABELS = {
    "madness": "madness_ppl MAP",
    "scarlet2": "scarlet2",
    "blend": "no deblending",
    "madness+redist": "madness_ppl + flux re-distribution",
    "scarlet2+redist": "scarlet2 + flux re-distribution",
}


def _fields(density: str, n_fields: int, field_size: int):
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    config = BlendConfig(field_size=field_size, n_galaxies=DENSITIES[density], margin=5)
    for k in range(n_fields):
        seed = SEED_OFFSET[density] + k
        yield seed, make_blend(survey, rng=np.random.default_rng(seed), config=config)


def _psf_images(size: int = 41) -> np.ndarray:
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    images = [
        survey.psf(b).drawImage(nx=size, ny=size, scale=survey.pixel_scale).array
        for b in survey.band_names
    ]
    return np.stack([im / im.sum() for im in images]).astype(np.float32)


def _stamps_madness(blend, state):
    from madness_ppl.deblend import deblend

    result = deblend(
        blend.field, blend.variance, blend.positions, prior=state["prior"], **state["options"]
    )
    return result.sources, {
        "converged": bool(result.fit.converged),
        "steps": int(result.fit.n_steps),
        "timings": result.timings,
    }


def _stamps_scarlet2(blend, state):
    from peers.scarlet2_runner import run_scarlet2

    out = run_scarlet2(
        blend.field,
        blend.variance,
        blend.positions,
        state["psfs"],
        list(state["bands"]),
        stamp_size=45,
    )
    return out["models"], {"converged": out["converged"]}


def _stamps_blend(blend, state):
    from madness_ppl.deblend import extract_cutouts

    return extract_cutouts(blend.field, blend.positions, 45), {}


def worker(
    method: str, density: str, n_fields: int, field_size: int, out: Path, options: dict
) -> None:
    """Run one method on the fields of one density; write per-galaxy rows to ``out``."""
    from madness_ppl.deblend import redistribute_flux
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    bands = survey.band_names
    r, g = bands.index("r"), bands.index("g")
    psf_r = _psf_images(45)[r]
    state = {"bands": bands, "psfs": _psf_images(41), "options": options}
    if method == "madness":
        from madness_ppl.prior import GalaxyPrior

        state["prior"] = GalaxyPrior.load(options.pop("prior", "lsst"))
    run = {"madness": _stamps_madness, "scarlet2": _stamps_scarlet2, "blend": _stamps_blend}[method]
    rows, rows_redist, times = [], [], []
    for seed, blend in _fields(density, n_fields, field_size):
        t0 = time.perf_counter()
        stamps, info = run(blend, state)
        times.append(time.perf_counter() - t0)
        stamps = np.asarray(stamps, np.float64)
        common = (blend, seed, info, r, g, psf_r)
        rows += _rows(stamps, method == "blend", *common)
        if method != "blend":
            redist = redistribute_flux(blend.field, stamps, blend.positions)
            rows_redist += _rows(redist, False, *common)
        print(
            f"{method} {density} seed {seed}: {len(blend.positions)} galaxies, {times[-1]:.2f} s",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "rows_redistributed": rows_redist,
                "field_seconds": times,
                "peak_rss_mb": peak,
            }
        )
    )


def _rows(stamps, on_blend, blend, seed, info, r, g, psf_r) -> list[dict]:
    """Per-galaxy metric rows of one field's estimated stamps (``on_blend``: the field itself)."""
    from madness_ppl import measure

    offsets = blend.positions - np.rint(blend.positions)
    centres = 22.0 + offsets
    beta = measure.blendedness(blend.isolated, blend.positions, blend.field.shape[-2:])
    true_shear = measure.hsm_shear(blend.isolated[:, r], psf_r)
    est_shear = measure.hsm_shear(stamps[:, r], psf_r)
    true_variance = np.stack([blend.variance[:, round(y), round(x)] for x, y in blend.positions])
    rows = []
    for i in range(len(blend.positions)):
        c = centres[i : i + 1]
        true_ap = measure.aperture_flux(blend.isolated[i], c, APERTURE)[0][0]
        if on_blend:
            est_ap = measure.aperture_flux(blend.field, blend.positions[i : i + 1], APERTURE)[0][0]
        else:
            est_ap = measure.aperture_flux(stamps[i], c, APERTURE)[0][0]
        sigma_ap = np.sqrt(np.pi * APERTURE**2 * true_variance[i, r])
        rows.append(
            {
                "seed": seed,
                "galaxy": i,
                "n_galaxies": len(blend.positions),
                "blendedness": float(beta[i]),
                "i_mag": float(blend.catalog["i_mag"][i]),
                "true_flux_r": float(true_ap[r]),
                "flux_r": float(est_ap[r]),
                "sigma_flux_r": float(sigma_ap),
                "true_gr": float(-2.5 * np.log10(max(true_ap[g], 1e-9) / max(true_ap[r], 1e-9))),
                "gr": float(-2.5 * np.log10(max(est_ap[g], 1e-9) / max(est_ap[r], 1e-9)))
                if est_ap[g] > 0 and est_ap[r] > 0
                else float("nan"),
                "ssim_r": float(measure.ssim(stamps[i, r], blend.isolated[i, r])),
                "cosine_r": float(measure.cosine_similarity(stamps[i, r], blend.isolated[i, r])),
                "dg": float(np.hypot(*(est_shear[i] - true_shear[i]))),
                **dict(info.items()),
            }
        )
    return rows


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    true, est = np.array([r["true_flux_r"] for r in rows]), np.array([r["flux_r"] for r in rows])
    sigma = np.array([r["sigma_flux_r"] for r in rows])
    rel = (est - true) / true
    p16, p50, p84 = np.nanpercentile(rel, [16, 50, 84])
    colour = np.array([r["gr"] - r["true_gr"] for r in rows])
    c16, c50, c84 = np.nanpercentile(colour, [16, 50, 84])
    return {
        "n": len(rows),
        "flux_bias": float(p50),
        "flux_width68": float(0.5 * (p84 - p16)),
        "flux_median_abs": float(np.nanmedian(np.abs(rel))),
        "outlier_3sigma": float(np.mean(np.abs(est - true) > 3 * sigma)),
        "colour_bias": float(c50),
        "colour_width68": float(0.5 * (c84 - c16)),
        "ssim_median": float(np.nanmedian([r["ssim_r"] for r in rows])),
        "cosine_median": float(np.nanmedian([r["cosine_r"] for r in rows])),
        "dg_median": float(np.nanmedian([r["dg"] for r in rows])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=50, help="fields per density")
    parser.add_argument("--field-size", type=int, default=205)
    parser.add_argument("--methods", nargs="+", default=["madness", "scarlet2", "blend"])
    parser.add_argument("--densities", nargs="+", default=["low", "high"])
    parser.add_argument("--madness-options", default="{}", help="JSON options for deblend()")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the figure from the results JSON"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use results/.dvs_<method>_<density>.json of workers already run (e.g. in parallel, "
        "each pinned to a core with taskset) instead of running them",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "DENSITY", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    options = json.loads(args.madness_options)
    if args.replot:
        payload = json.loads((RESULTS / "deblend_vs_scarlet2.json").read_text())
        _figure(payload, LABELS)
        return
    if args.worker:
        method, density, out = args.worker
        worker(method, density, args.fields, args.field_size, Path(out), options)
        return

    RESULTS.mkdir(exist_ok=True)
    results: dict = {}
    for method in args.methods:
        for density in args.densities:
            out = RESULTS / f".dvs_{method}_{density}.json"
            if args.reuse and out.exists():
                results[(method, density)] = json.loads(out.read_text())
                _add_redistributed(results, method, density)
                continue
            cmd = [
                sys.executable,
                __file__,
                "--fields",
                str(args.fields),
                "--field-size",
                str(args.field_size),
                "--madness-options",
                args.madness_options,
                "--worker",
                method,
                density,
                str(out),
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            results[(method, density)] = json.loads(out.read_text())
            _add_redistributed(results, method, density)

    label = LABELS
    payload = {
        "protocol": __doc__,
        "fields_per_density": args.fields,
        "field_size": args.field_size,
        "madness_options": options,
        "methods": {},
    }
    lines = [
        "| method | density | galaxies | r flux bias | r flux 68% width | median abs | >3σ outliers | "
        "g-r bias | g-r 68% width | SSIM | cosine | median abs Δg | s / field | s / galaxy (steady) | peak RSS MB |",
        "|---" * 15 + "|",
    ]
    for (method, density), res in results.items():
        rows = res["rows"]
        s = _summary(rows)
        times = np.array(res["field_seconds"])
        seeds = [r["seed"] for r in rows]
        after_first = sum(1 for seed in seeds if seed != seeds[0]) if seeds else 0
        steady = times[1:].sum() / after_first if after_first else times.sum() / max(len(rows), 1)
        by_bin = {}
        beta = np.array([r["blendedness"] for r in rows])
        for lo, hi in itertools.pairwise(BLEND_BINS):
            sel = [
                r
                for r, b in zip(rows, beta, strict=True)
                if lo <= b < hi or (hi == 1.0 and b == 1.0)
            ]
            by_bin[f"{lo}-{hi}"] = _summary(sel)
        payload["methods"][f"{method}/{density}"] = {
            "summary": s,
            "by_blendedness": by_bin,
            "field_seconds": res["field_seconds"],
            "seconds_per_field": float(times.mean()),
            "seconds_per_galaxy_steady": float(steady),
            "peak_rss_mb": res["peak_rss_mb"],
            "rows": rows,
        }
        lines.append(
            f"| {label[method]} | {density} | {s['n']} | {s['flux_bias']:+.3f} | {s['flux_width68']:.3f} | "
            f"{s['flux_median_abs']:.3f} | {s['outlier_3sigma']:.2f} | {s['colour_bias']:+.3f} | "
            f"{s['colour_width68']:.3f} | {s['ssim_median']:.3f} | {s['cosine_median']:.3f} | "
            f"{s['dg_median']:.3f} | {times.mean():.2f} | {steady:.3f} | {res['peak_rss_mb']:.0f} |"
        )
    table = "\n".join(lines)
    table += "\n\n" + _blendedness_table(payload, label)
    write_results("deblend_vs_scarlet2", payload, table)
    _figure(payload, label)
    for method in args.methods:
        for density in args.densities:
            (RESULTS / f".dvs_{method}_{density}.json").unlink(missing_ok=True)
    print(table)


def _add_redistributed(results: dict, method: str, density: str) -> None:
    res = results[(method, density)]
    if res["rows_redistributed"]:
        results[(method + "+redist", density)] = {**res, "rows": res["rows_redistributed"]}


def _blendedness_table(payload: dict, label: dict) -> str:
    lines = [
        "r-band flux 68 % width by blendedness (n in brackets):",
        "",
        "| method | density | " + " | ".join(f"β {k}" for k in _bins()) + " |",
        "|---|---|" + "---|" * len(_bins()),
    ]
    for key, res in payload["methods"].items():
        method, density = key.split("/")
        cells = []
        for k in _bins():
            s = res["by_blendedness"][k]
            cells.append(f"{s['flux_width68']:.3f} ({s['n']})" if s else "-")
        lines.append(f"| {label[method]} | {density} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bins() -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in itertools.pairwise(BLEND_BINS)]


def _figure(payload: dict, label: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madness_ppl.plot import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, res in payload["methods"].items():
        method, density = key.split("/")
        rows = res["rows"]
        beta = np.array([r["blendedness"] for r in rows])
        rel = np.array([(r["flux_r"] - r["true_flux_r"]) / r["true_flux_r"] for r in rows])
        ssim = np.array([r["ssim_r"] for r in rows])
        order = np.argsort(beta)
        for ax, values in ((axes[0], np.abs(rel)), (axes[1], ssim)):
            bins = np.array_split(order, max(len(order) // 40, 1))
            xs = [np.median(beta[b]) for b in bins]
            ys = [np.nanmedian(values[b]) for b in bins]
            ax.plot(
                xs, ys, "o-" if density == "high" else "s--", label=f"{label[method]} ({density})"
            )
    for ax in axes:
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks([0.0, 0.01, 0.1, 1.0], ["0", "0.01", "0.1", "1"])
        ax.set_xlabel("blendedness (medians of bins of 40 galaxies)")
    axes[0].set(ylabel="median |r-band flux residual|", yscale="log")
    axes[1].set(ylabel="median SSIM (r band)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, str(RESULTS / "deblend_vs_scarlet2.png"))


if __name__ == "__main__":
    main()
