"""madness_ppl MAP vs scarlet2 vs no deblending, on the same simulated LSST blends.

Run: ``taskset -c 0 python benchmarks/deblend_vs_scarlet2.py [--fields 12] [--sets lsst dense ood]``
(scarlet2 from the ``bench`` extra). Writes ``results/deblend_vs_scarlet2.{json,md,png}``.
Resumable: every finished field is appended to
``results/deblend_vs_scarlet2/<method>_<set>_<field size>.jsonl`` (committed with the results); a
rerun, e.g. with more ``--fields``, fits only the missing fields, and ``--tables-only`` rebuilds
the JSON, markdown and figure from those files.

Protocol
--------
* Field sets (41" = 205-pixel LSST 10-year fields, galaxy count Poisson with mean
  ``density x area``, centres at least 5 pixels from the edges, i < 25.3):

  - ``lsst``: in-distribution population and PSFs at ``expected_density()`` (the expected
    LSST density of the project's catalog model, ~56 per arcmin², ~26 galaxies per field);
  - ``dense``: the same at 1.5 x that density;
  - ``ood`` / ``ood-dense``: the out-of-distribution population of ``benchmarks/fields.py``
    (a size law, shape dispersion and bulge fraction the priors never saw, PSFs 15 % wider) at
    the same two densities.

* Every method gets the same field, the same *true* positions and the same true variance map;
  scarlet2 gets the PSF images of the field's own survey (the wider ones out of distribution);
  madness_ppl uses the shipped prior (PSF learned from the training simulator: an
  out-of-distribution PSF is part of what the ``ood`` sets test).
* Each method runs in its own process, fields one after the other, as its documentation shows:
  madness_ppl ``deblend(field, variance, positions)`` at its defaults, scarlet2 through
  ``madness_ppl/peers/scarlet2.py`` (``fit(max_iter=1000, e_rel=1e-4)``). Wall time per
  field includes compilation on the first field of a process; "steady" times exclude those fields.
* Per galaxy, against its noiseless isolated truth stamp: r-band aperture flux residual
  (radius 5 pixels = 1", centred on the true position) relative to the true aperture flux, g-r
  aperture colour residual, SSIM and cosine similarity of the r-band stamp, KSB ellipticity
  residual :math:`|g - g_\\mathrm{true}|` (PSF corrected) and blendedness. "no deblending" uses
  the blended field itself (aperture photometry on the blend; its cutout for SSIM/shape).
* Two measurements of each fit, compared like for like only: **model** (photometry on each
  source's model) and **re-distributed** (scarlet's flux re-distribution,
  :math:`d_i = y\\,m_i / \\sum_j m_j`, :func:`madness_ppl.deblend.redistribute_flux`; it carries
  the noise, so its SSIM and cosine against the noiseless truth are lower by construction).
* Headline: galaxies with blendedness >= 0.1 ("blended"); all galaxies beside it.
* Summaries: bias (median), 68 % width (half the 16-84 % range), fraction of > 3 sigma outliers
  (|flux error| > 3 x the aperture's noise sigma). 95 % intervals: bootstrap over *fields*
  (galaxies of one field are not independent), 1000 resamples; the madness_ppl / scarlet2
  ratios are computed on the same resampled fields.
* Convergence: madness_ppl, the fit's own stopping rule met before ``max_steps``; scarlet2, its
  relative-change criterion ``e_rel`` met before ``max_iter``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, machine_of_records, run_study, write_results
from benchmarks.fields import SETS as FIELD_SETS
from madness_ppl.machine import describe_machine
from madness_ppl.stats import field_bootstrap, median, width68

APERTURE = 5.0
BLENDED = 0.1
BLEND_BINS = (0.0, 0.01, 0.1, 0.5, 1.0)
N_BOOT = 1000
#: the field sets (``benchmarks/fields.py``) and the first seed of each
FIRST_SEED = {"lsst": 2000, "dense": 3000, "ood": 6000, "ood-dense": 7000}
SETS = tuple(FIRST_SEED)
METHODS = ("madness", "scarlet2", "blend")
LABELS = {"madness": "madness_ppl", "scarlet2": "scarlet2", "blend": "no deblending"}
FIELDS_DIR = RESULTS / "deblend_vs_scarlet2"


#: the first seed of each field set of the earlier layout (8-15 / 12-20 galaxies per 41"),
#: kept for ``map_speed.py``
LEGACY_SEED_OFFSET = {"low": 0, "high": 1000}


def _fields(density: str, n_fields: int, field_size: int):
    """The fields of the earlier layout (sets ``low``, ``high``), as ``(seed, blend)``."""
    for k in range(n_fields):
        seed = LEGACY_SEED_OFFSET[density] + k
        yield seed, FIELD_SETS[density].draw(seed, field_size=field_size).blend


def legacy_worker(
    method: str, density: str, n_fields: int, field_size: int, out: Path, options: dict
) -> None:
    """The earlier worker interface (``--worker METHOD low|high OUT``) used by ``map_speed.py``:
    per-galaxy rows, per-field seconds and peak RSS of one method on one legacy density."""
    from madness_ppl.deblend import redistribute_flux
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    bands = survey.band_names
    r, g = bands.index("r"), bands.index("g")
    psf_r = _psf_images(45)[r]
    state = {"bands": bands, "psfs": _psf_images(41), "options": dict(options)}
    if method == "madness":
        from madness_ppl.prior import GalaxyPrior

        state["prior"] = GalaxyPrior.load(state["options"].pop("prior", "lsst"))
    run = {"madness": _stamps_madness, "scarlet2": _stamps_scarlet2, "blend": _stamps_blend}[method]
    rows, rows_redist, times, cpu_times = [], [], [], []
    for seed, blend in _fields(density, n_fields, field_size):
        t0, c0 = time.perf_counter(), time.process_time()
        stamps, info = run(blend, state)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # all threads; robust to other processes
        stamps = _centre_crop(np.asarray(stamps, np.float64), blend.isolated.shape[-1])
        info = {k: v for k, v in info.items() if k in ("converged", "steps", "timings")}
        common = (blend, seed, info, r, g, psf_r)
        rows += _rows(stamps, method == "blend", *common)
        if method != "blend":
            redist = redistribute_flux(blend.field, stamps, blend.positions)
            rows_redist += _rows(redist, False, *common)
        print(f"{method} {density} seed {seed}: {len(blend.positions)} galaxies", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    record = {
        "rows": rows,
        "rows_redistributed": rows_redist,
        "field_seconds": times,
        "field_cpu_seconds": cpu_times,
    }
    out.write_text(json.dumps({**record, "peak_rss_mb": peak}))


def field_seeds(name: str, n_fields: int) -> list[int]:
    return [FIRST_SEED[name] + k for k in range(n_fields)]


def make_field(name: str, seed: int, field_size: int):
    """The blend of field set ``name`` with ``seed`` (deterministic)."""
    return FIELD_SETS[name].draw(seed, field_size=field_size).blend


def _psf_images(size: int = 41, survey=None) -> np.ndarray:
    """``(B, size, size)`` unit-sum PSF images of ``survey`` (default LSST) at its pixel scale."""
    from madness_ppl.survey import Survey

    return (survey or Survey.lsst()).psf_images(size).astype(np.float32)


def _stamps_madness(blend, state):
    from madness_ppl.deblend import deblend

    result = deblend(
        blend.field,
        blend.variance,
        blend.positions,
        prior=state["prior"],
        psf=state["psfs"],  # the PSFs the fields were drawn with, as scarlet2 gets them
        **state["options"],
    )
    return result.sources, {
        "converged": bool(result.fit.converged),
        "steps": int(result.fit.n_steps),
        "timings": result.timings,
    }


def _stamps_scarlet2(blend, state):
    from madness_ppl.peers.scarlet2 import run_scarlet2

    out = run_scarlet2(
        blend.field, blend.variance, blend.positions, state["psfs"], list(state["bands"])
    )
    info = {k: out[k] for k in ("converged", "n_iter", "max_change", "n_fallback_init")}
    return out["models"], {**info, "fit_seconds": out["seconds"]}


def _stamps_blend(blend, state):
    from madness_ppl.deblend import extract_cutouts

    return extract_cutouts(blend.field, blend.positions, 45), {}


def _centre_crop(stamps: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` pixels of each stamp: a PSF-aware prior returns observed
    stamps wider than the truth's (their wings, outside every aperture used here)."""
    extra = stamps.shape[-1] - size
    if extra < 0 or extra % 2:
        raise ValueError(f"cannot centre a {stamps.shape[-1]}-px stamp on a {size}-px truth")
    lo = extra // 2
    return stamps[..., lo : lo + size, lo : lo + size]


def worker(method: str, name: str, seeds: list[int], field_size: int, options: dict) -> None:
    """Fit ``method`` on the fields ``seeds`` of set ``name``; one JSON per finished field."""
    from madness_ppl.deblend import redistribute_flux

    survey = FIELD_SETS[name].survey()
    bands = survey.band_names
    r, g = bands.index("r"), bands.index("g")
    psf_r = _psf_images(45, survey)[r]
    state = {"bands": bands, "psfs": _psf_images(41, survey), "options": dict(options)}
    if method == "madness":
        from madness_ppl.prior import GalaxyPrior

        state["prior"] = GalaxyPrior.load(state["options"].pop("prior", "lsst"))
        state["prior_version"] = state["prior"].config.version
    run = {"madness": _stamps_madness, "scarlet2": _stamps_scarlet2, "blend": _stamps_blend}[method]
    FIELDS_DIR.mkdir(parents=True, exist_ok=True)
    path = _fields_file(method, name, field_size)
    blends = {seed: make_field(name, seed, field_size) for seed in seeds}
    warmup: dict[int, float] = {}
    if method == "madness":
        # compile every source-count bucket first, on the field itself (not recorded), so that
        # every recorded time is a steady one; the compile cost is reported separately
        from madness_ppl.scene import bucket_size

        for blend in blends.values():
            bucket = bucket_size(len(blend.positions))
            if bucket not in warmup:
                t0 = time.perf_counter()
                run(blend, state)
                warmup[bucket] = time.perf_counter() - t0
    for k, seed in enumerate(seeds):
        blend = blends[seed]
        t0 = time.perf_counter()
        stamps, info = run(blend, state)
        seconds = time.perf_counter() - t0
        stamps = _centre_crop(np.asarray(stamps, np.float64), blend.isolated.shape[-1])
        common = (blend, seed, {}, r, g, psf_r)
        record = {
            "seed": seed,
            "n_galaxies": len(blend.positions),
            "seconds": seconds,
            # madness: every bucket was compiled before (warm-up); scarlet2 compiles every scene
            "first_in_process": k == 0 and method != "madness",
            "warmup_seconds_of_bucket": warmup.get(_bucket(len(blend.positions)))
            if method == "madness"
            else None,
            "info": info,
            "prior_version": state.get("prior_version"),
            "rows": _rows(stamps, method == "blend", *common),
            "rows_redistributed": []
            if method == "blend"
            else _rows(redistribute_flux(blend.field, stamps, blend.positions), False, *common),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "cpu": describe_machine()["cpu"],
            "cores_used": len(os.sched_getaffinity(0)),
        }
        with path.open("a") as f:  # one line per field; a torn last line is skipped on load
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(
            f"{method} {name} seed {seed}: {len(blend.positions)} galaxies, {seconds:.2f} s"
            + (f", converged {info['converged']}" if "converged" in info else ""),
            flush=True,
        )


def _bucket(n: int) -> int:
    from madness_ppl.scene import bucket_size

    return bucket_size(n)


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


# --------------------------------------------------------------------------------------------
# Summaries with bootstrap intervals over fields
# --------------------------------------------------------------------------------------------
STATS = {
    "flux_bias": lambda a: median(a["rel"]),
    "flux_width68": lambda a: width68(a["rel"]),
    "outlier_3sigma": lambda a: float(np.mean(a["outlier"])) if a["rel"].size else float("nan"),
    "colour_width68": lambda a: width68(a["dcol"]),
    "ssim_median": lambda a: median(a["ssim"]),
    "dg_median": lambda a: median(a["dg"]),
}
RATIO_STATS = ("flux_width68", "outlier_3sigma", "colour_width68", "dg_median")


def _arrays(rows: list[dict]) -> dict[str, np.ndarray]:
    true = np.array([r["true_flux_r"] for r in rows], float)
    est = np.array([r["flux_r"] for r in rows], float)
    sigma = np.array([r["sigma_flux_r"] for r in rows], float)
    return {
        "rel": (est - true) / true,
        "outlier": np.abs(est - true) > 3 * sigma,
        "dcol": np.array([r["gr"] - r["true_gr"] for r in rows], float),
        "ssim": np.array([r["ssim_r"] for r in rows], float),
        "dg": np.array([r["dg"] for r in rows], float),
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def bootstrap(
    rows_by_method: dict[str, list[dict]], seeds: list[int], select, n_boot: int = N_BOOT
) -> dict:
    """Point values and 95 % field-bootstrap intervals (:func:`madness_ppl.stats.field_bootstrap`)
    of :data:`STATS` for each method, and of madness / scarlet2 ratios on the same resampled
    fields, over the galaxies for which ``select(row)`` holds."""
    per_field = {
        m: {s: _arrays([r for r in rows if r["seed"] == s and select(r)]) for s in seeds}
        for m, rows in rows_by_method.items()
    }
    methods = list(rows_by_method)
    pairs = [
        (a, b)
        for a, b in (("madness", "scarlet2"), ("madness+redist", "scarlet2+redist"))
        if a in methods and b in methods
    ]

    def statistics(picked: list[int]) -> list[float]:
        values = {}
        for m in methods:
            sample = _concat([per_field[m][s] for s in picked])
            for k, f in STATS.items():
                values[m, k] = f(sample) if sample["rel"].size else np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = [np.divide(values[a, k], values[b, k]) for a, b in pairs for k in RATIO_STATS]
        return [values[m, k] for m in methods for k in STATS] + ratios

    value, low, high = field_bootstrap(seeds, statistics, n=n_boot, seed=0)
    cells = iter(zip(value, low, high, strict=True))
    out: dict = {}
    for m in methods:
        n = int(sum(per_field[m][s]["rel"].size for s in seeds))
        out[m] = {"n": n}
        for k in STATS:
            v, lo, hi = next(cells)
            out[m][k] = float(v)
            if n:
                out[m][f"{k}_ci95"] = [float(lo), float(hi)]
    out["ratios"] = {}
    for a, b in pairs:
        ratios = {}
        for k in RATIO_STATS:
            v, lo, hi = next(cells)
            ratios[k] = {"value": float(v), "ci95": [float(lo), float(hi)]}
        if out[a]["n"]:
            out["ratios"][f"{a}/{b}"] = ratios
    return out


def timing(records: dict[int, dict]) -> dict:
    """Seconds per galaxy over steady fields (not first in their process), with intervals."""
    steady = [r for r in records.values() if not r["first_in_process"]] or list(records.values())
    converged = [r["info"].get("converged") for r in records.values()]
    converged = [c for c in converged if c is not None]
    per_galaxy, low, high = field_bootstrap(steady, _seconds_per_galaxy, n=N_BOOT, seed=0)
    return {
        "fields": len(records),
        "steady_fields": len(steady),
        "seconds_per_field": float(np.mean([r["seconds"] for r in records.values()])),
        "seconds_per_galaxy_steady": per_galaxy,
        "seconds_per_galaxy_steady_ci95": [low, high],
        "converged_fields": int(sum(converged)),
        "galaxies": int(sum(r["n_galaxies"] for r in records.values())),
        # scarlet2: sources whose from_gaussian_moments start failed (compact 11x11 start)
        "fallback_init": int(sum(r["info"].get("n_fallback_init", 0) for r in records.values())),
        "convergence_rate": float(np.mean(converged)) if converged else None,
        "peak_rss_mb": float(max(r["peak_rss_mb"] for r in records.values())),
        "iterations": [r["info"].get("n_iter", r["info"].get("steps")) for r in records.values()],
        "warmup_seconds_per_bucket": median(
            np.array([r.get("warmup_seconds_of_bucket") or np.nan for r in records.values()])
        ),
    }


def _seconds_per_galaxy(records: list[dict]) -> float:
    return sum(r["seconds"] for r in records) / max(sum(r["n_galaxies"] for r in records), 1)


def time_ratio(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Seconds per galaxy of method ``a`` over method ``b`` on the fields steady for both
    (the same galaxies, so the ratio of their summed times), with a paired field-bootstrap
    interval."""
    seeds = [s for s in a if not a[s]["first_in_process"] and not b[s]["first_in_process"]]
    note = "paired resamples of the fields steady (not first in their process) for both methods"
    if not seeds:  # e.g. one field: scarlet2's only field compiled, so no ratio
        return {"value": float("nan"), "ci95": [float("nan")] * 2, "fields": 0, "note": note}
    value, low, high = field_bootstrap(
        seeds,
        lambda ss: sum(a[s]["seconds"] for s in ss) / sum(b[s]["seconds"] for s in ss),
        n=N_BOOT,
        seed=0,
    )
    return {"value": value, "ci95": [low, high], "fields": len(seeds), "note": note}


def _fmt(s: dict, key: str, digits: int = 3, sign: bool = False) -> str:
    value = s.get(key, float("nan"))
    lo, hi = s.get(f"{key}_ci95", [float("nan")] * 2)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(value)} [{f.format(lo)}, {f.format(hi)}]"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _fields_file(method: str, name: str, field_size: int) -> Path:
    return FIELDS_DIR / f"{method}_{name}_{field_size}.jsonl"


def load_records(method: str, name: str, seeds: list[int], field_size: int) -> dict[int, dict]:
    """Finished fields of ``method`` on set ``name`` among ``seeds`` (the last record wins)."""
    path = _fields_file(method, name, field_size)
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    wanted = set(seeds)
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a field interrupted while being written
        if record["seed"] in wanted:
            out[record["seed"]] = record
    return out


def summarise(sets: list[str], n_fields: int, methods: list[str], field_size: int) -> dict:
    payload: dict = {"sets": {}}
    for name in sets:
        records = {
            m: load_records(m, name, field_seeds(name, n_fields), field_size) for m in methods
        }
        # like-for-like: only fields every method finished
        seeds = sorted(set.intersection(*(set(r) for r in records.values())))
        if not seeds:
            continue
        rows = {}
        for m in methods:
            rows[m] = [row for s in seeds for row in records[m][s]["rows"]]
            if m != "blend":
                rows[f"{m}+redist"] = [
                    row for s in seeds for row in records[m][s]["rows_redistributed"]
                ]
        entry = {
            "population": FIELD_SETS[name].population,
            "density_factor": FIELD_SETS[name].density_factor,
            "seeds": seeds,
            "blended": bootstrap(rows, seeds, lambda r: r["blendedness"] >= BLENDED),
            "all": bootstrap(rows, seeds, lambda r: True),
            "by_blendedness": {},
            "timing": {},
            "rows": rows,
        }
        for lo, hi in itertools.pairwise(BLEND_BINS):
            entry["by_blendedness"][f"{lo}-{hi}"] = bootstrap(
                rows,
                seeds,
                lambda r, lo=lo, hi=hi: (
                    lo <= r["blendedness"] < hi or (hi == 1.0 and r["blendedness"] >= 1.0)
                ),
                n_boot=300,
            )
        for m in methods:
            if m == "blend":
                continue
            entry["timing"][m] = timing({s: records[m][s] for s in seeds})
        if "madness" in entry["timing"] and "scarlet2" in entry["timing"]:
            entry["time_ratio"] = time_ratio(
                {s: records["madness"][s] for s in seeds},
                {s: records["scarlet2"][s] for s in seeds},
            )
        used = [records[m][s] for m in methods for s in seeds]
        entry["cores_used"] = sorted({r["cores_used"] for r in used if "cores_used" in r})
        entry["cpus"] = sorted({r["cpu"] for r in used if "cpu" in r})
        if "madness" in records:
            versions = {records["madness"][s].get("prior_version") for s in seeds}
            entry["prior_version"] = sorted(v for v in versions if v)
        payload["sets"][name] = entry
    return payload


QUALITY_HEADER = (
    "| set | measured on | method | galaxies | r flux bias [95 %] | r flux 68 % width [95 %] "
    "| >3σ outliers [95 %] | g-r 68 % width [95 %] | SSIM median [95 %] | median abs Δg [95 %] |"
)


def _quality_rows(name: str, stats: dict) -> list[str]:
    lines = []
    kinds = (
        ("model", ("madness", "scarlet2", "blend")),
        ("re-distributed", ("madness+redist", "scarlet2+redist")),
    )
    for kind, methods in kinds:
        for m in methods:
            if m not in stats:
                continue
            s = stats[m]
            label = LABELS[m.split("+")[0]]
            on = "the blend (reference)" if m == "blend" else kind
            lines.append(
                f"| {name} | {on} | {label} | {s['n']} | {_fmt(s, 'flux_bias', sign=True)} | "
                f"{_fmt(s, 'flux_width68')} | {_fmt(s, 'outlier_3sigma', 2)} | "
                f"{_fmt(s, 'colour_width68')} | {_fmt(s, 'ssim_median')} | {_fmt(s, 'dg_median')} |"
            )
    return lines


def _ratio_rows(name: str, stats: dict) -> list[str]:
    lines = []
    for pair, ratios in stats["ratios"].items():
        kind = "re-distributed" if "redist" in pair else "model"
        cells = [
            f"{ratios[k]['value']:.2f} [{ratios[k]['ci95'][0]:.2f}, {ratios[k]['ci95'][1]:.2f}]"
            if np.isfinite(ratios[k]["value"])
            else "- (scarlet2: 0)"
            for k in RATIO_STATS
        ]
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return lines


def tables(payload: dict) -> str:
    sets = payload["sets"]
    out = [
        f'Fields of {payload["field_size"]} px ({0.2 * payload["field_size"]:.0f}" at 0.2" per '
        f"pixel), {payload['fields_requested']} requested per set; true positions and variance for every method; madness_ppl prior "
        + ", ".join(f"`{v}`" for v in payload["prior_versions"])
        + f" at `deblend()` defaults{_options(payload)}; scarlet2 "
        "`fit(max_iter=1000, e_rel=1e-4)` as documented. 95 % intervals: bootstrap over fields "
        f"({N_BOOT} resamples); madness_ppl / scarlet2 ratios on the same resampled fields.",
        "",
        "| set | population | density (galaxies / arcmin²) | fields | galaxies | blended (β >= 0.1) |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in sets.items():
        n_all = e["all"]["madness"]["n"] if "madness" in e["all"] else e["all"]["blend"]["n"]
        n_bl = e["blended"]["blend"]["n"]
        out.append(
            f"| {name} | {e['population']} | {e['density']:.1f} ({e['density_factor']:g} x "
            f"expected_density()) | {len(e['seeds'])} | {n_all} | {n_bl} ({n_bl / n_all:.0%}) |"
        )
    for title, key in (
        ("**Blended galaxies (blendedness >= 0.1)** — the headline", "blended"),
        ("All galaxies", "all"),
    ):
        out += ["", f"{title}:", "", QUALITY_HEADER, "|---" * 10 + "|"]
        for name, e in sets.items():
            out += _quality_rows(name, e[key])
        out += [
            "",
            f"{title.split(' —')[0]}, madness_ppl / scarlet2 (like for like; < 1: madness_ppl "
            "better) [95 %]:",
            "",
            "| set | measured on | r flux 68 % width | >3σ outliers | g-r 68 % width "
            "| median abs Δg |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in sets.items():
            out += _ratio_rows(name, e[key])
    out += [
        "",
        "r-band flux 68 % width by blendedness [95 %, 300 resamples] (galaxies):",
        "",
        "| set | method | " + " | ".join(f"β {k}" for k in _bins()) + " |",
        "|---|---|" + "---|" * len(_bins()),
    ]
    for name, e in sets.items():
        for m in ("madness", "scarlet2", "blend", "madness+redist", "scarlet2+redist"):
            cells = []
            for k in _bins():
                s = e["by_blendedness"][k].get(m)
                cells.append(
                    f"{s['flux_width68']:.3f} [{s['flux_width68_ci95'][0]:.3f}, "
                    f"{s['flux_width68_ci95'][1]:.3f}] ({s['n']})"
                    if s and s["n"]
                    else "-"
                )
            kind = " (re-distributed)" if "redist" in m else ""
            if m in e["all"]:
                out.append(
                    f"| {name} | {LABELS[m.split('+')[0]]}{kind} | " + " | ".join(cells) + " |"
                )
    out += [
        "",
        "Speed and convergence, each method in its own process pinned to one core. madness_ppl "
        "compiles every source-count bucket on a warm-up fit first, so its times exclude "
        "compilation (the warm-up column is one such first fit); scarlet2 compiles every new "
        "scene, so its steady times are every field after the first of a process:",
        "",
        "| set | method | fields | converged fields | sources started compact (fallback) "
        "| s / field | s / galaxy steady [95 %] | madness_ppl / scarlet2 time [95 %] "
        "| warm-up fit, s (median) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in sets.items():
        for m, t in e["timing"].items():
            ratio = ""
            if m == "madness" and "time_ratio" in e:
                r = e["time_ratio"]
                ratio = f"{r['value']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
            conv = f"{t['converged_fields']} / {t['fields']}"
            if m == "scarlet2":
                its = [i for i in t["iterations"] if i is not None]
                conv += (
                    f" (all fits stopped at {max(its)} iterations)"
                    if (t["converged_fields"] == 0 and its and min(its) == max(its))
                    else f" (iterations {min(its)}-{max(its)})"
                )
            lo, hi = t["seconds_per_galaxy_steady_ci95"]
            warm = t["warmup_seconds_per_bucket"]
            warm = f"{warm:.1f}" if np.isfinite(warm) else "-"
            fallback = "-"
            if m == "scarlet2" and "galaxies" in t:
                fallback = f"{t['fallback_init']} / {t['galaxies']}"
            out.append(
                f"| {name} | {LABELS[m]} | {t['fields']} | {conv} | {fallback} | "
                f"{t['seconds_per_field']:.2f} | "
                f"{t['seconds_per_galaxy_steady']:.3f} [{lo:.3f}, {hi:.3f}] | {ratio} | {warm} | "
                f"{t['peak_rss_mb']:.0f} |"
            )
    out += [
        "",
        "scarlet2's converged column is its own stopping test (the largest relative parameter "
        "change of an Adam step below e_rel = 1e-4), which relative step sizes keep near the "
        "step factor; a fit at the 1,000-iteration cap is the cost of its documented settings. "
        "How its flux error changes with the iteration count and its initial boxes: "
        "scarlet2_settings.md. A source 'started compact' is one whose from_gaussian_moments "
        "initialisation failed (it is 'stable only for isolated sources') and began as a point "
        "source in an 11x11 box, as the scarlet2 notebook falls back. The `ood` sets are out of distribution for "
        "madness_ppl only (scarlet2 has no learned prior; it gets the wider PSFs); `lsst` and "
        "`dense` come from the simulator, PSFs and noise the prior was trained on.",
    ]
    return "\n".join(out)


def _machine(payload: dict) -> dict:
    return machine_of_records(payload["sets"].values(), "each method's fits")


def _options(payload: dict) -> str:
    opts = payload.get("madness_options") or {}
    return f" with {json.dumps(opts)}" if opts else ""


def _bins() -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in itertools.pairwise(BLEND_BINS)]


def _figure(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madness_ppl.plot import save_figure

    sets = payload["sets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"lsst": "o-", "dense": "s-", "ood": "o--", "ood-dense": "s--"}
    for name, e in sets.items():
        for m in ("madness", "scarlet2", "blend", "madness+redist"):
            rows = e["rows"].get(m)
            if not rows:
                continue
            beta = np.array([r["blendedness"] for r in rows])
            rel = np.array([(r["flux_r"] - r["true_flux_r"]) / r["true_flux_r"] for r in rows])
            ssim = np.array([r["ssim_r"] for r in rows])
            order = np.argsort(beta)
            label = f"{LABELS[m.split('+')[0]]}{' redist' if 'redist' in m else ''} ({name})"
            for ax, values in ((axes[0], np.abs(rel)), (axes[1], ssim)):
                bins = np.array_split(order, max(len(order) // 40, 1))
                xs = [np.median(beta[b]) for b in bins]
                ys = [np.nanmedian(values[b]) for b in bins]
                colour = {"madness": "C0", "scarlet2": "C1", "blend": "C2"}.get(m, "C3")
                ax.plot(xs, ys, styles.get(name, "o-"), color=colour, label=label, ms=3)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks([0.0, 0.01, 0.1, 1.0], ["0", "0.01", "0.1", "1"])
        ax.set_xlabel("blendedness (medians of bins of 40 galaxies)")
        ax.set_title(
            "colour: method; marker and line: field set (dashed: out of distribution)", fontsize=8
        )
    axes[0].set(ylabel="median |r-band flux residual|", yscale="log")
    axes[1].set(ylabel="median SSIM (r band)")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, str(RESULTS / "deblend_vs_scarlet2.png"))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--field-size", "64", "--methods", "madness", "blend", "--sets", "lsst"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=12, help="fields per set")
    parser.add_argument("--field-size", type=int, default=205)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sets", nargs="+", default=["lsst", "dense", "ood"], choices=SETS)
    parser.add_argument("--madness-options", default="{}", help="JSON options for deblend()")
    parser.add_argument(
        "--rebuild",
        "--tables-only",
        dest="tables_only",
        action="store_true",
        help="rebuild the results from the stored fields",
    )
    parser.add_argument("--worker", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = json.loads(args.madness_options)
    if args.worker and len(args.worker) == 3:  # METHOD low|high OUT (map_speed.py)
        method, density, out = args.worker
        legacy_worker(method, density, args.fields, args.field_size, Path(out), options)
        return
    if args.worker:
        method, name = args.worker
        done = set(load_records(method, name, field_seeds(name, args.fields), args.field_size))
        todo = [s for s in field_seeds(name, args.fields) if s not in done]
        worker(method, name, todo, args.field_size, options)
        return

    if not args.tables_only:
        for name in args.sets:
            for method in args.methods:
                done = load_records(method, name, field_seeds(name, args.fields), args.field_size)
                if len(done) == args.fields:
                    continue
                cmd = ["--fields", str(args.fields), "--field-size", str(args.field_size)]
                cmd += ["--madness-options", args.madness_options, "--worker", method, name]
                run_study("deblend_vs_scarlet2", *cmd)

    payload = summarise(args.sets, args.fields, args.methods, args.field_size)
    for name, e in payload["sets"].items():
        e["density"] = FIELD_SETS[name].config(args.field_size).density
    payload = {
        "protocol": __doc__,
        "fields_requested": args.fields,
        "field_size": args.field_size,
        "madness_options": options,
        "prior_versions": sorted(
            {v for e in payload["sets"].values() for v in (e.get("prior_version") or [])}
        ),
        **payload,
    }
    table = tables(payload)
    _figure(payload)
    for e in payload["sets"].values():
        e.pop("rows")  # per-galaxy rows live in the .jsonl files
    write_results("deblend_vs_scarlet2", payload, table, machine=_machine(payload))
    print(table)


if __name__ == "__main__":
    main()
