"""Galaxy priors side by side, in one run: held-out metrics and deblending of the same blends.

Run: ``python -m benchmarks priors --priors lsst-v0.1.0 lsst [--heldout 2000] [--fields 20]``.
Writes ``results/priors.{json,md}``; the ship rule of a new default prior reads this file.

Part 1, held-out isolated stamps (simulated here, seed ``--seed``; the training sets used other
seeds of the same simulator, so these rows are *in-distribution*): every metric of
:func:`madness_ppl.train.evaluate.held_out_reconstruction` and
:func:`~madness_ppl.train.evaluate.sample_metrics`, with the project's targets beside them,
each prior in its own frame as its model card measures it: a plain prior (v0.1.0, v0.2) on
stamps drawn with the survey's PSF; a PSF-aware prior (v0.3) on model-frame stamps of the same
galaxies observed through fixed round Kolmogorov PSFs of 0.6, 1 and 1.6 x the survey's median
FWHM (its headline rows: the median PSF; the flux width at each PSF in its own row).

Part 2, deblending: LSST fields of ``--field-size`` pixels with 12-20 galaxies (the "high" density
of ``deblend_vs_scarlet2.py``, same seeds ``1000 + k``), each prior's MAP fit from the *true*
positions, variance and PSFs (``madness_ppl.deblend.deblend``, default settings, ``psf=`` the
images the field was drawn with, as ``deblend_vs_scarlet2`` passes them), r-band model flux and
SSIM against the noiseless isolated truth, per blendedness bin.  Two populations:

* ``in-distribution``: the training simulator's population and PSFs;
* ``out-of-distribution``: a population the priors never saw (larger galaxies with a steeper
  size-magnitude law and more scatter, rounder-to-more-elliptical shapes with shape dispersion
  0.30, half bulge-dominated) observed with PSFs 15 % wider than in training.

Intervals: 95 % bootstrap over *fields* (galaxies of one field are not independent), 1000
resamples; the ratio of two priors' widths is bootstrapped on the same resampled fields.
scarlet2 on the same 12-20-galaxy layouts: ``map_speed`` (its "high" density, seeds
``1000 + k``); on survey-density fields: ``deblend_vs_scarlet2``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks._common import RESULTS, write_results
from benchmarks.deblend_vs_scarlet2 import _centre_crop, _psf_images, _rows
from benchmarks.fields import field_set
from madness_ppl.stats import field_bootstrap, median, width68

BLEND_BINS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 1.01))
#: How each frame of :func:`heldout` is described under the table.
FRAMES = {
    "survey": "(stamps drawn with the survey's PSF)",
    "reference": "(model-frame stamps observed through round Kolmogorov PSFs; rows: median PSF)",
}
TARGETS = {
    "r flux 68 % width, i < 23": "<= 0.03",
    "r flux width / noise-only width": "<= 1.3",
    "chi2 / pixel": "<= 1.05",
    "band flux ratio, i < 23": "within 0.95-1.05",
    "colour 68 % width, i < 23": "<= 0.05 mag",
    "KS flux / size / ellipticity": "<= 0.1",
}


def heldout(prior, n: int, seed: int) -> dict:
    """Held-out metrics of one prior on ``n`` freshly simulated isolated stamps, in the
    prior's own frame (:func:`madness_ppl.train.evaluate.held_out_reconstruction`): a plain
    prior on stamps drawn with the survey's PSF, a PSF-aware one on model-frame stamps
    observed through the fixed narrow / median / wide PSFs of its model card. The same
    catalog, offsets and noise seed for every prior."""
    from madness_ppl.simulate import draw_isolated, make_catalog
    from madness_ppl.simulate.stamps import dataset_psf
    from madness_ppl.survey import Survey
    from madness_ppl.train import evaluate

    survey = Survey.lsst()
    frame = "reference" if prior.psf_aware else "survey"
    rng = np.random.default_rng(seed)
    stamps = draw_isolated(
        make_catalog(n, survey, rng=rng),
        survey,
        rng=rng,
        stamp_size=prior.config.stamp_size,
        psf=dataset_psf(frame, survey),
    )
    i_mag = np.asarray(stamps.catalog["i_mag"])
    rec, _, _ = evaluate.held_out_reconstruction(
        prior, stamps.noisy, stamps.noiseless, survey, i_mag=i_mag, seed=seed
    )
    samples, _ = evaluate.sample_metrics(prior, stamps.noiseless, survey.pixel_scale)
    return {"frame": frame, "reconstruction": rec, "samples": samples}


def deblend_fields(prior, population: str, n_fields: int, field_size: int) -> dict:
    """Per-galaxy rows and per-field times of one prior's MAP fits on one population."""
    from madness_ppl.deblend import deblend

    fields_of = field_set("high", population)
    survey = fields_of.survey()
    bands = survey.band_names
    r, g = bands.index("r"), bands.index("g")
    psf_r = _psf_images(45, survey)[r]
    rows, times, steps = [], [], []
    for k in range(n_fields):
        seed = 1000 + k if population == "in-distribution" else 5000 + k
        field = fields_of.draw(seed, field_size=field_size)
        blend = field.blend
        t0 = time.perf_counter()
        result = deblend(  # the PSFs the field was drawn with, as deblend_vs_scarlet2 passes
            blend.field, blend.variance, blend.positions, prior=prior, psf=field.psf_images(41)
        )
        times.append(time.perf_counter() - t0)
        steps.append(int(result.fit.n_steps))
        info = {"converged": bool(result.fit.converged), "steps": int(result.fit.n_steps)}
        stamps = _centre_crop(np.asarray(result.sources, np.float64), blend.isolated.shape[-1])
        rows += _rows(stamps, False, blend, seed, info, r, g, psf_r)
        print(f"  {population} field {k}: {len(blend.positions)} galaxies, {times[-1]:.2f} s")
    return {"rows": rows, "field_seconds": times}


def _rel(rows: list[dict]) -> np.ndarray:
    return np.array([(r["flux_r"] - r["true_flux_r"]) / r["true_flux_r"] for r in rows])


def _bootstrap(rows_by_prior: dict[str, list[dict]], n_boot: int = 1000) -> dict:
    """Width68 of the r-flux error and median SSIM per prior, and width ratios to the first prior,
    with 95 % intervals from resampling fields (:func:`field_bootstrap`, paired across priors)."""
    names = list(rows_by_prior)
    seeds = sorted({r["seed"] for r in rows_by_prior[names[0]]})
    by_seed = {
        name: {s: [r for r in rows if r["seed"] == s] for s in seeds}
        for name, rows in rows_by_prior.items()
    }

    def statistics(picked: list[int]) -> list[float]:
        out = []
        for name in names:
            rows = [r for s in picked for r in by_seed[name][s]]
            first = [r for s in picked for r in by_seed[names[0]][s]]
            width, width_first = width68(_rel(rows)), width68(_rel(first))
            ssim = median([r["ssim_r"] for r in rows])
            out += [width, ssim, width / width_first if width_first > 0 else np.nan]
        return out

    _, low, high = field_bootstrap(seeds, statistics, n=n_boot, seed=0)
    out = {}
    for k, (name, rows) in enumerate(rows_by_prior.items()):
        ci = [[float(low[3 * k + j]), float(high[3 * k + j])] for j in range(3)]
        out[name] = {
            "n": len(rows),
            "flux_width68": width68(_rel(rows)),
            "flux_bias": median(_rel(rows)),
            "ssim_median": median([r["ssim_r"] for r in rows]),
            "width_ci95": ci[0],
            "ssim_ci95": ci[1],
            "width_ratio_to_first": width68(_rel(rows)) / width68(_rel(rows_by_prior[names[0]])),
            "width_ratio_ci95": ci[2],
        }
    return out


def _bins(rows: list[dict]) -> dict[str, list[dict]]:
    return {
        f"{lo:g}-{min(hi, 1.0):g}": [r for r in rows if lo <= r["blendedness"] < hi]
        for lo, hi in BLEND_BINS
    }


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--priors", "lsst", "--heldout", "20", "--fields", "1", "--field-size", "64"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--priors", nargs="+", default=["lsst-v0.1.0", "lsst"])
    parser.add_argument("--heldout", type=int, default=2000, help="held-out isolated stamps")
    parser.add_argument("--fields", type=int, default=20, help="fields per population")
    parser.add_argument("--field-size", type=int, default=205)
    parser.add_argument("--seed", type=int, default=777, help="seed of the held-out stamps")
    parser.add_argument("--name", default="priors", help="results file name")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse cached per-prior fits (results/.priors_*)"
    )
    args = parser.parse_args(argv)

    from madness_ppl.prior import GalaxyPrior

    priors = {name: GalaxyPrior.load(name) for name in args.priors}
    payload: dict = {
        "protocol": __doc__,
        "priors": {n: p.config.version for n, p in priors.items()},
        "heldout": {},
        "deblending": {},
        "settings": vars(args),
    }
    for name, prior in priors.items():
        print(f"held-out metrics: {name}", flush=True)
        payload["heldout"][name] = heldout(prior, args.heldout, args.seed)

    for population in ("in-distribution", "out-of-distribution"):
        rows_by_prior, times = {}, {}
        for name, prior in priors.items():
            cache = RESULTS / f".priors_{name}_{population}_{args.fields}_{args.field_size}.json"
            if args.reuse and cache.exists():
                res = json.loads(cache.read_text())
            else:
                print(f"deblending, {population}: {name}", flush=True)
                res = deblend_fields(prior, population, args.fields, args.field_size)
                cache.write_text(json.dumps(res))
            rows_by_prior[name], times[name] = res["rows"], res["field_seconds"]
        entry = {"all": _bootstrap(rows_by_prior), "by_blendedness": {}, "times": times}
        binned = {name: _bins(rows) for name, rows in rows_by_prior.items()}
        for label in binned[args.priors[0]]:
            per = {name: binned[name][label] for name in rows_by_prior}
            if min(len(v) for v in per.values()) >= 5:
                entry["by_blendedness"][label] = _bootstrap(per)
        entry["rows"] = rows_by_prior
        payload["deblending"][population] = entry

    write_results(args.name, payload, _table(payload, args))


def _table(payload: dict, args) -> str:
    lines = [
        f"Held-out isolated stamps: {args.heldout}, simulated with seed {args.seed} "
        "(same simulator as training: in-distribution), each prior in its own frame: "
        + ", ".join(f"{n} {FRAMES[h['frame']]}" for n, h in payload["heldout"].items())
        + ".",
        "",
        "| metric | target | " + " | ".join(payload["heldout"]) + " |",
        "|---|---|" + "---|" * len(payload["heldout"]),
    ]
    cells: dict[str, list[str]] = {}
    for h in payload["heldout"].values():
        rec, smp = h["reconstruction"], h["samples"]
        fb, f = rec["r_aperture_flux_rel_error_bright"], rec["r_aperture_flux_rel_error"]
        noise = rec["noise_only_flux_rel_error"]
        values = {
            "r flux 68 % width, i < 23": f"{fb['width68']:.4f}",
            "r flux 68 % width, all": f"{f['width68']:.4f}",
            "noise-only width, all": f"{noise['width68']:.4f}",
            "r flux width / noise-only width": f"{f['width68'] / noise['width68']:.2f}",
            "chi2 / pixel": f"{rec['chi2_per_pixel']:.3f}",
            "band flux ratio, i < 23": ", ".join(
                f"{b} {v:.2f}" for b, v in rec["band_flux_ratio_median"].items()
            ),
            "colour 68 % width, i < 23": ", ".join(
                f"{c} {v:.3f}" for c, v in rec["colour_width68"].items()
            ),
            "ellipticity RMS error, brighter half": f"{rec['shape_bright_half']['e_rms']:.3f}",
            "median |e| recon / truth, brighter half": (
                f"{rec['shape_bright_half']['e_median_recon']:.3f} / "
                f"{rec['shape_bright_half']['e_median_truth']:.3f}"
            ),
            "r flux 68 % width by PSF (0.6 / 1 / 1.6 x median FWHM)": (
                " / ".join(f"{v['r_flux_width68']:.4f}" for v in rec["by_psf"].values())
                if "by_psf" in rec
                else "-"
            ),
            "KS flux / size / ellipticity": " / ".join(
                f"{smp[k]['ks']:.3f}" for k in ("flux", "size", "ellipticity")
            ),
        }
        for key, value in values.items():
            cells.setdefault(key, []).append(value)
    for key, values in cells.items():
        lines.append(f"| {key} | {TARGETS.get(key, '')} | " + " | ".join(values) + " |")

    for population, entry in payload["deblending"].items():
        lines += [
            "",
            f"Deblending, {population}: {args.fields} fields of {args.field_size} px, 12-20 "
            "galaxies, true positions; r-band MAP model flux vs isolated truth; "
            "95 % bootstrap intervals over fields.",
            "",
            "| blendedness | prior | galaxies | flux 68 % width [95 %] | width / first [95 %] "
            "| SSIM median [95 %] |",
            "|---|---|---|---|---|---|",
        ]
        for label, stats in [("all", entry["all"]), *entry["by_blendedness"].items()]:
            for name, s in stats.items():
                lines.append(
                    f"| {label} | {name} | {s['n']} | {s['flux_width68']:.3f} "
                    f"[{s['width_ci95'][0]:.3f}, {s['width_ci95'][1]:.3f}] "
                    f"| {s['width_ratio_to_first']:.2f} [{s['width_ratio_ci95'][0]:.2f}, "
                    f"{s['width_ratio_ci95'][1]:.2f}] | {s['ssim_median']:.3f} "
                    f"[{s['ssim_ci95'][0]:.3f}, {s['ssim_ci95'][1]:.3f}] |"
                )
        times = ", ".join(
            f"{name} {np.sum(t):.0f} s" for name, t in entry["times"].items() if len(t)
        )
        lines.append(f"\nWall time of the fits (compilation included): {times}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
