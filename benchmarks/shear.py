"""Weak-lensing shear bias through the deblender: m and c vs blendedness, madness_ppl vs scarlet2.

Run: ``taskset -c 0 python -m benchmarks shear [--fields 40] [--scarlet2-fields 20]``
(scarlet2 from the ``bench`` extra). Writes ``results/shear.{json,md,png}``. Resumable: every
finished field of every method is appended to ``results/shear/<method>_<field size>.jsonl``; a
rerun fits only the missing fields and ``--tables-only`` rebuilds the outputs from those files.

Protocol
--------
* **Layouts**: 41" (205-pixel) LSST 10-year fields of the in-distribution population at
  ``expected_density()`` (~26 galaxies, i < 25.3, centres >= 5 pixels from the edges), the
  ``lsst`` set of ``deblend_vs_scarlet2.py`` with seeds from 17000. Each layout (catalog and
  positions) is drawn four times: intrinsic shapes as drawn or rotated by 90 degrees
  (:func:`madness_ppl.simulate.rotate_shapes`, the ring test: shape noise cancels in c) x
  applied shear :math:`g = (+0.02, +0.02)` or :math:`(-0.02, -0.02)` on every galaxy
  (``make_blend(shear=...)``: the profile is sheared about its own centre, positions are not).
* **Noise**: the four variants of a layout share one seed for the noise, hence the same
  standard-normal draws (scaled by each image's own variance): pixel noise largely cancels in
  :math:`g^+ - g^-`, so m needs far fewer galaxies than with independent noise.
* **Methods** (the same true positions and variance for both deblenders):

  - ``reference``: KSB of the noiseless isolated galaxy (the estimator alone, no noise);
  - ``madness:<prior>``: ``deblend(field, variance, positions, prior=..., errors=False)``
    (defaults otherwise; the Laplace flux errors, computed after the fit, do not change the
    models and cost ~30 % of the time), for the shipped prior and v0.1.0;
  - ``madness-isolated:<prior>``: the same galaxies, shears and noise seed drawn on a grid
    64 pixels apart (no neighbours) and fitted the same way: decoder + noise + estimator bias
    without blending;
  - ``scarlet2``: ``madness_ppl/peers/scarlet2.py`` (``fit(max_iter=1000, e_rel=1e-4)``).

* **Shapes**: :func:`madness_ppl.measure.hsm_shear` (galsim.hsm KSB, PSF corrected, r band,
  the estimator of the catalog's ``g1``, ``g2``) on every model stamp and on the truth.
* **m, c** per component from :func:`madness_ppl.measure.shear_bias`:
  :math:`m_k = \\langle (g^+_k - g^-_k) / 2g \\rangle - 1`, :math:`c_k = \\langle (g^+_k +
  g^-_k)/2 \\rangle` over galaxies x rotations. A galaxy counts for a method only if all four of
  its measurements succeeded (a KSB value with |g| >= 1 counts as failed). Because both
  components are sheared at once, :math:`m_k` absorbs
  the off-diagonal response :math:`\\partial g_k / \\partial g_{j \\ne k}`, zero in expectation
  here (round PSFs and a population symmetric under reflections). Δm: the same on the paired
  per-galaxy differences with the reference (or with the isolated fit of the same prior: the
  part due to blending alone). Errors: bootstrap over layouts (all galaxies of a layout and
  its rotated partners are resampled together), 1000 resamples, the same resamples for every
  method. Blendedness of a galaxy: the mean of its four variants.
* LSST requirements: the LSST DESC Science Requirements Document (Mandelbaum et al. 2018,
  arXiv:1809.01669) caps the systematic uncertainty of the (redshift-dependent)
  multiplicative shear calibration at 0.003 for Y10 (0.013 for Y1), a budget on the
  *knowledge* of m for the whole pipeline, not on m itself; the Rubin Project's own
  shape-measurement requirement asks |m| < 0.001, |c| < 1e-4 on isolated galaxies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import (
    RESULTS,
    machine_of_records,
    records_by_seed,
    run_study,
    write_results,
)
from benchmarks.deblend_vs_scarlet2 import BLEND_BINS, _psf_images
from benchmarks.fields import SETS as FIELD_SETS
from benchmarks.fields import catalog_config_for
from madness_ppl.machine import describe_machine

SHEAR = 0.02
VARIANTS = ((0.0, 1), (0.0, -1), (90.0, 1), (90.0, -1))  # (rotation degrees, shear sign)
FIRST_SEED = 17000
GRID_SPACING = 64
N_BOOT = 1000
GOAL = 0.01  # the target sigma(m)
REQUIREMENT = {
    "m_Y10": 0.003,
    "m_Y1": 0.013,
    "source": "LSST DESC Science Requirements Document v1 (Mandelbaum et al. 2018, "
    "arXiv:1809.01669), systematic uncertainty of the redshift-dependent shear calibration",
    "project_m": 0.001,
    "project_c": 0.0001,
    "project_source": "Rubin Observatory LSST Project shape-measurement requirement, constant "
    "shears 0.01-0.05 recovered from isolated galaxies (CCB change announced at "
    "community.lsst.org/t/updated-requirements-for-shape-measurement/3417)",
}
SHEAR_DIR = RESULTS / "shear"
PRIORS = ("lsst", "lsst-v0.1.0")
#: i-magnitude bins of the m table by brightness (the catalogue's cut is i < 25.3).
MAG_BINS = (0.0, 22.0, 23.0, 24.0, 25.3)


def methods_for(priors: list[str]) -> dict[str, list[str]]:
    """Worker -> the methods it writes (``madness`` also writes the reference)."""
    madness = ["reference"]
    for p in priors:
        madness += [f"madness:{p}", f"madness-isolated:{p}"]
    return {"madness": madness, "scarlet2": ["scarlet2"]}


def label(method: str, versions: dict[str, str] | None = None) -> str:
    versions = versions or {}
    if method == "reference":
        return "reference (noiseless isolated)"
    if method == "scarlet2":
        return "scarlet2"
    kind, prior = method.split(":")
    version = versions.get(prior, prior)
    where = ", isolated" if kind == "madness-isolated" else ""
    return f"madness_ppl (prior {version}{where})"


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------
def layout(seed: int, field_size: int):
    """Catalog and true positions of layout ``seed`` (the ``lsst`` set of deblend_vs_scarlet2)."""
    from madness_ppl.simulate import make_catalog, sample_positions

    fields_of = FIELD_SETS["lsst"]
    survey, config = fields_of.survey(), fields_of.config(field_size)
    catalog_config = catalog_config_for(fields_of.population)
    rng = np.random.default_rng(seed)
    area = (field_size * survey.pixel_scale / 60.0) ** 2
    n = int(rng.poisson(config.density * area))
    catalog = make_catalog(n, survey, rng=rng, config=catalog_config)
    positions = sample_positions(n, config, survey.pixel_scale, rng)
    return survey, config, catalog, positions


def variant_fields(seed: int, field_size: int, *, isolated: bool):
    """The four variants of layout ``seed`` (see :data:`VARIANTS`), blended or on a grid."""
    import dataclasses

    from madness_ppl.simulate import make_blend, rotate_shapes

    survey, config, catalog, positions = layout(seed, field_size)
    if isolated:
        n = len(positions)
        cols = max(math.ceil(math.sqrt(n)), 1)
        ij = np.array([(k // cols, k % cols) for k in range(n)], float).reshape(-1, 2)
        frac = positions - np.rint(positions)
        positions = GRID_SPACING * (ij[:, ::-1] + 0.5) + frac
        size = GRID_SPACING * max(cols, math.ceil(n / cols), 1)
        config = dataclasses.replace(config, field_size=size)
    out = []
    for rotation, sign in VARIANTS:
        out.append(
            make_blend(
                survey,
                rng=np.random.default_rng([seed, 2 if isolated else 1]),
                config=config,
                catalog=rotate_shapes(catalog, rotation),
                positions=positions,
                shear=(sign * SHEAR, sign * SHEAR),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
def _fields_file(method: str, field_size: int) -> Path:
    return SHEAR_DIR / f"{method.replace(':', '_')}_{field_size}.jsonl"


def load_records(method: str, field_size: int) -> dict[int, dict]:
    """Finished fields of ``method`` (the last record of a seed wins; torn lines skipped)."""
    return records_by_seed(_fields_file(method, field_size))


def _append(method: str, field_size: int, record: dict) -> None:
    SHEAR_DIR.mkdir(parents=True, exist_ok=True)
    with _fields_file(method, field_size).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _g(stamps: np.ndarray, r: int, psf_r: np.ndarray) -> list:
    from madness_ppl import measure

    return measure.hsm_shear(np.asarray(stamps, np.float64)[:, r], psf_r).tolist()


def worker(
    group: str,
    seeds: list[int],
    field_size: int,
    priors: list[str],
    limits: dict[str, int] | None = None,
) -> None:
    """Fit every method of worker ``group`` on layouts ``seeds``; one JSON line per field.

    ``limits``: prior name (its two methods) or ``"isolated"`` (every isolated fit) -> the
    number of layouts, the first ones, it runs on.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from madness_ppl import measure

    survey = FIELD_SETS["lsst"].survey()
    bands = survey.band_names
    r = bands.index("r")
    psf_r = _psf_images(45, survey)[r]
    psfs = _psf_images(41, survey)
    methods = methods_for(priors)[group]
    done = {m: set(load_records(m, field_size)) for m in methods}
    limits = limits or {}
    for m in methods:  # methods limited to fewer layouts count the others as done
        prior = m.partition(":")[2]
        if prior in limits:
            done[m] |= set(seeds[limits[prior] :])
        if m.startswith("madness-isolated") and "isolated" in limits:
            done[m] |= set(seeds[limits["isolated"] :])
    models = {}
    versions = {}
    if group == "madness":
        from madness_ppl.prior import GalaxyPrior

        for p in priors:
            models[p] = GalaxyPrior.load(p)
            versions[p] = models[p].config.version
    compiled: set = set()

    def fit(method: str, blend) -> tuple[np.ndarray, dict]:
        if method == "scarlet2":
            from madness_ppl.peers.scarlet2 import run_scarlet2

            out = run_scarlet2(blend.field, blend.variance, blend.positions, psfs, list(bands))
            return out["models"], {"converged": out["converged"], "n_iter": out["n_iter"]}
        from madness_ppl.deblend import deblend
        from madness_ppl.scene import bucket_size

        prior = method.split(":")[1]
        key = (prior, bucket_size(len(blend.positions)), blend.field.shape)
        info = {"new_shape": key not in compiled}
        compiled.add(key)
        res = deblend(
            blend.field, blend.variance, blend.positions, prior=models[prior], errors=False
        )
        return res.sources, {**info, "converged": bool(res.fit.converged)}

    todo = [s for s in seeds if any(s not in done[m] for m in methods)]
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"))
    with Progress(*columns, TextColumn("{task.total}"), TimeRemainingColumn()) as bar:
        task = bar.add_task(f"shear {group}", total=len(todo))
        for seed in todo:
            blends = variant_fields(seed, field_size, isolated=False)
            grids = None
            for method in methods:
                if seed in done[method]:
                    continue
                t0 = time.perf_counter()
                record = {"seed": seed, "n_galaxies": len(blends[0].positions)}
                if method == "reference":
                    record["g"] = [_g(b.isolated, r, psf_r) for b in blends]
                    record["blendedness"] = [
                        measure.blendedness(b.isolated, b.positions, b.field.shape[-2:]).tolist()
                        for b in blends
                    ]
                    record["i_mag"] = np.asarray(blends[0].catalog["i_mag"], float).tolist()
                else:
                    if method.startswith("madness-isolated"):
                        grids = grids or variant_fields(seed, field_size, isolated=True)
                        fields = grids
                    else:
                        fields = blends
                    gs, infos = [], []
                    for blend in fields:
                        stamps, info = fit(method, blend)
                        gs.append(_g(stamps, r, psf_r))
                        infos.append(info)
                    record["g"], record["info"] = gs, infos
                    if method.startswith("madness-isolated"):
                        record["max_blendedness"] = float(
                            max(
                                measure.blendedness(
                                    b.isolated, b.positions, b.field.shape[-2:]
                                ).max(initial=0.0)
                                for b in grids
                            )
                        )
                    if method.startswith("madness"):
                        record["prior_version"] = versions[method.split(":")[1]]
                record["seconds"] = time.perf_counter() - t0
                record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                record["cpu"] = describe_machine()["cpu"]
                record["cores_used"] = len(os.sched_getaffinity(0))
                _append(method, field_size, record)
            bar.advance(task)
            if not sys.stdout.isatty():
                print(f"shear {group} seed {seed}: {len(blends[0].positions)} galaxies", flush=True)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def _pairs(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(2N, 2)`` g+ and g- (rotation 0 then 90) of one field; NaN rows where any variant failed.

    A KSB value with :math:`|g| \\ge 1` (not a reduced shear) counts as a failure.
    """
    g = np.array(record["g"], float).reshape(4, -1, 2)  # variants x galaxies x 2
    with np.errstate(invalid="ignore"):
        unphysical = np.hypot(g[..., 0], g[..., 1]) >= 1.0
    bad = ~np.isfinite(g).all(axis=(0, 2)) | unphysical.any(axis=0)
    g[:, bad] = np.nan
    return np.concatenate([g[0], g[2]]), np.concatenate([g[1], g[3]])


def _stats(res, n_galaxies: int) -> dict:
    worst = float(np.max(res.m_err)) if res.n else float("nan")
    return {
        # sigma(m) scales as 1 / sqrt(galaxies): what the worse component needs for GOAL
        "galaxies_for_goal": n_galaxies * (worst / GOAL) ** 2 if res.n_groups > 1 else float("nan"),
        "n_pairs": res.n,
        "n_galaxies": n_galaxies,
        "n_fields": res.n_groups,
        "m": res.m.tolist(),
        "m_err": res.m_err.tolist(),
        "m_ci95": res.m_ci95.tolist(),
        "c": res.c.tolist(),
        "c_err": res.c_err.tolist(),
        "c_ci95": res.c_ci95.tolist(),
    }


def _bias(gp, gm, groups, valid, select, reference=None) -> dict:
    """:func:`~madness_ppl.measure.shear_bias` statistics of the valid selected pairs."""
    from madness_ppl.measure import shear_bias

    sel = select & valid
    kw = {}
    if reference is not None:
        kw["reference"] = (reference[0][sel], reference[1][sel])
    res = shear_bias(gp[sel], gm[sel], SHEAR, groups=groups[sel], n_boot=N_BOOT, **kw)
    return _stats(res, res.n // 2)  # rows are galaxy x rotation pairs


def summarise(field_size: int, priors: list[str], n_fields: int) -> dict:
    seeds_wanted = [FIRST_SEED + k for k in range(n_fields)]
    all_methods = [m for ms in methods_for(priors).values() for m in ms]
    records = {m: load_records(m, field_size) for m in all_methods}
    ref = records["reference"]
    seeds_ref = [s for s in seeds_wanted if s in ref]
    payload: dict = {"methods": {}, "prior_versions": {}, "timing": {}}
    for m in all_methods:
        seeds = [s for s in seeds_ref if s in records[m]]
        if not seeds:
            continue
        gp, gm, rp, rm, beta, groups, mag = [], [], [], [], [], [], []
        for s in seeds:
            a, b = _pairs(records[m][s])
            ra, rb = _pairs(ref[s])
            bl = np.array(ref[s]["blendedness"], float).mean(0)
            gp.append(a), gm.append(b), rp.append(ra), rm.append(rb)
            beta.append(np.concatenate([bl, bl]))
            mag.append(np.concatenate([ref[s]["i_mag"]] * 2))
            groups.append(np.full(len(a), s))
        gp, gm, rp, rm = map(np.concatenate, (gp, gm, rp, rm))
        beta, groups, mag = map(np.concatenate, (beta, groups, mag))
        valid = np.isfinite(gp).all(1) & np.isfinite(gm).all(1)
        entry: dict = {
            "fields": len(seeds),
            "galaxies": int(sum(records[m][s]["n_galaxies"] for s in seeds)),
            "failed_fraction": float(1 - valid.mean()) if valid.size else float("nan"),
        }

        def bias(select, reference=None, _d=(gp, gm, groups, valid)):
            return _bias(*_d, select, reference)

        everything = np.ones(len(gp), bool)
        entry["all"] = bias(everything)
        if m != "reference":
            entry["delta_reference"] = bias(everything, reference=(rp, rm))
        kind, _, prior = m.partition(":")
        iso = f"madness-isolated:{prior}"
        if kind == "madness" and iso in records:
            common = [s for s in seeds if s in records[iso]]
            ip, im = [], []
            for s in seeds:
                if s in records[iso]:
                    a, b = _pairs(records[iso][s])
                else:
                    a = b = np.full((2 * records[m][s]["n_galaxies"], 2), np.nan)
                ip.append(a), im.append(b)
            entry["delta_isolated"] = bias(
                everything, reference=tuple(map(np.concatenate, (ip, im)))
            )
            entry["delta_isolated"]["fields_in_common"] = len(common)
        entry["by_blendedness"] = {}
        for lo, hi in itertools.pairwise(BLEND_BINS):
            sel = (beta >= lo) & ((beta < hi) | (hi == 1.0))
            key = f"{lo}-{hi}"
            entry["by_blendedness"][key] = bias(sel)
            if m != "reference":
                entry["by_blendedness"][key]["delta_reference"] = bias(sel, reference=(rp, rm))
        entry["by_i_mag"] = {}
        for lo, hi in itertools.pairwise(MAG_BINS):
            sel = (mag >= lo) & (mag < hi)
            key = f"{lo}-{hi}"
            entry["by_i_mag"][key] = bias(sel)
            if m != "reference":
                entry["by_i_mag"][key]["delta_reference"] = bias(sel, reference=(rp, rm))
        entry["mag_range"] = [float(np.min(mag)), float(np.max(mag))] if mag.size else []
        recs = [records[m][s] for s in seeds]
        secs = np.array([r["seconds"] for r in recs])
        gals = np.array([r["n_galaxies"] for r in recs])
        steady = [
            i
            for i, r in enumerate(recs)
            if not any(x.get("new_shape") for x in r.get("info", []) if isinstance(x, dict))
        ]
        fits = 1 if m == "reference" else 4
        entry["timing"] = {
            "seconds_total": float(secs.sum()),
            "seconds_per_galaxy_fit": float(secs.sum() / max(fits * gals.sum(), 1)),
            "seconds_per_galaxy_fit_steady": float(
                secs[steady].sum() / max(fits * gals[steady].sum(), 1)
            )
            if steady
            else float("nan"),
            "peak_rss_mb": float(max(r["peak_rss_mb"] for r in recs)),
        }
        infos = [x for r in recs for x in r.get("info", [])]
        if infos:
            entry["converged_fraction"] = float(np.mean([bool(x.get("converged")) for x in infos]))
        if m.startswith("madness-isolated"):
            entry["max_blendedness_on_grid"] = float(max(r["max_blendedness"] for r in recs))
        versions = {r.get("prior_version") for r in recs if r.get("prior_version")}
        if versions:
            payload["prior_versions"][prior] = sorted(versions)[0]
        entry["cores_used"] = sorted({r["cores_used"] for r in recs})
        entry["cpus"] = sorted({r["cpu"] for r in recs})
        payload["methods"][m] = entry
    return payload


def _pm(stats: dict, key: str, k: int, digits: int = 4) -> str:
    v, e = stats[key][k], stats[f"{key}_err"][k]
    return f"{v:+.{digits}f} ± {e:.{digits}f}" if np.isfinite(v) else "-"


def _binned_table(payload: dict, key: str, edges, name: str, symbol: str) -> list[str]:
    """Markdown lines: m = (m1 + m2) / 2 per bin of ``key`` (galaxies) and Δm vs the reference."""
    versions = payload["prior_versions"]
    bins = [f"{lo}-{hi}" for lo, hi in itertools.pairwise(edges)]
    out = [
        "",
        f"m = (m1 + m2) / 2 by {name} (galaxies in the bin) and Δm vs the reference:",
        "",
        "| method | " + " | ".join(f"{symbol} {b}" for b in bins) + " |",
        "|---|" + "---|" * len(bins),
    ]
    for m, e in payload["methods"].items():
        if key not in e:  # records summarised before this table existed
            continue
        cells = []
        for b in bins:
            s = e[key][b]
            if not s["n_galaxies"]:
                cells.append("-")
                continue
            mm, err = _mean_m(s)
            cell = f"{mm:+.3f} ± {err:.3f} ({s['n_galaxies']})"
            if "delta_reference" in s:
                dm, derr = _mean_m(s["delta_reference"])
                cell += f"; Δm {dm:+.3f} ± {derr:.3f}"
            cells.append(cell)
        out.append(f"| {label(m, versions)} | " + " | ".join(cells) + " |")
    return out


def tables(payload: dict) -> str:
    versions = payload["prior_versions"]
    out = [
        f"Ring test on {payload['field_size']}-pixel LSST fields at `expected_density()`: every "
        f"galaxy sheared by g = ±{SHEAR} on both components, intrinsic shapes as drawn and "
        "rotated by 90°, one noise realisation shared by the four variants of a layout; true "
        "positions and variance for every deblender; shapes: galsim.hsm KSB (r band, PSF "
        "corrected). ± : bootstrap standard deviation over layouts "
        f"({N_BOOT} resamples). Δm: paired with the noiseless isolated reference on the same "
        "galaxies.",
        "",
        f"LSST requirements: uncertainty on m <= {REQUIREMENT['m_Y1']} (Y1) and "
        f"{REQUIREMENT['m_Y10']} (Y10), {REQUIREMENT['source']}; |m| < "
        f"{REQUIREMENT['project_m']} and |c| < {REQUIREMENT['project_c']}, "
        f"{REQUIREMENT['project_source']}.",
        "",
        "| method | fields | galaxies (used) | m1 | m2 | c1 | c2 | Δm1 vs reference "
        f"| Δm2 vs reference | galaxies for σ(m) = {GOAL} | s / galaxy fit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in payload["methods"].items():
        a = e["all"]
        d = e.get("delta_reference")
        t = e["timing"]["seconds_per_galaxy_fit_steady"]
        out.append(
            f"| {label(m, versions)} | {e['fields']} | {e['galaxies']} ({a['n_galaxies']}) | "
            f"{_pm(a, 'm', 0)} | {_pm(a, 'm', 1)} | {_pm(a, 'c', 0, 5)} | {_pm(a, 'c', 1, 5)} | "
            + (f"{_pm(d, 'm', 0)} | {_pm(d, 'm', 1)} | " if d else "- | - | ")
            + (
                f"{a['galaxies_for_goal']:.0f} | "
                if np.isfinite(a["galaxies_for_goal"])
                else "- | "
            )
            + (f"{t:.3f} |" if m != "reference" and np.isfinite(t) else "- |")
        )
    blending = [(m, e) for m, e in payload["methods"].items() if "delta_isolated" in e]
    if blending:
        out += [
            "",
            "The part due to blending alone: madness_ppl on the blended fields minus the same "
            "prior's fit of the same galaxies, shears and noise seed without neighbours (paired "
            "per galaxy):",
            "",
            "| method | galaxies | Δm1 | Δm2 | Δc1 | Δc2 |",
            "|---|---|---|---|---|---|",
        ]
        for m, e in blending:
            d = e["delta_isolated"]
            out.append(
                f"| {label(m, versions)} | {d['n_galaxies']} | {_pm(d, 'm', 0)} | "
                f"{_pm(d, 'm', 1)} | {_pm(d, 'c', 0, 5)} | {_pm(d, 'c', 1, 5)} |"
            )
    out += _binned_table(payload, "by_blendedness", BLEND_BINS, "blendedness β", "β")
    out += _binned_table(payload, "by_i_mag", MAG_BINS, "i magnitude", "i")
    out += [
        "",
        "Time: seconds per galaxy and fit, steady (fits that compiled a new shape excluded), "
        "each worker in a process pinned to one core; the `madness` worker also simulates the "
        "fields. Failed: fraction of galaxy x rotation pairs where KSB failed (or returned |g| >= 1) "
        "on one of the four variants (dropped):",
        "",
        "| method | failed | converged fits | s / galaxy fit (all) | total s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for m, e in payload["methods"].items():
        t = e["timing"]
        conv = f"{e['converged_fraction']:.2f}" if "converged_fraction" in e else "-"
        out.append(
            f"| {label(m, versions)} | {e['failed_fraction']:.3f} | {conv} | "
            f"{t['seconds_per_galaxy_fit']:.3f} | {t['seconds_total']:.0f} | "
            f"{t['peak_rss_mb']:.0f} |"
        )
    groups = {
        g: sum(
            payload["methods"][m]["timing"]["seconds_total"] for m in ms if m in payload["methods"]
        )
        for g, ms in methods_for(list(versions)).items()
    }
    payload["worker_seconds"] = groups
    out += [
        "",
        "Time recorded in the per-field records (fits, shapes and the isolated grids' "
        "simulation; the blended fields' simulation, process start-up and prior loading "
        "excluded): " + ", ".join(f"{g} worker {t / 60:.1f} min" for g, t in groups.items()) + ".",
    ]
    return "\n".join(out)


def _mean_m(s: dict) -> tuple[float, float]:
    """(m1 + m2) / 2 and its error (components treated as independent: an approximation)."""
    m = 0.5 * (s["m"][0] + s["m"][1])
    err = 0.5 * math.hypot(*s["m_err"])
    return m, err


def _figure(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madness_ppl.plot import save_figure

    versions = payload["prior_versions"]
    bins = [(lo, hi) for lo, hi in itertools.pairwise(BLEND_BINS)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    n_methods = len(payload["methods"])
    for j, (m, e) in enumerate(payload["methods"].items()):
        for ax, key in zip(axes, (None, "delta_reference"), strict=True):
            if key and m == "reference":
                continue
            xs, ys, es = [], [], []
            for b, (lo, hi) in enumerate(bins):
                s = e["by_blendedness"][f"{lo}-{hi}"]
                if s["n_galaxies"] < 5:
                    continue
                mm, err = _mean_m(s[key] if key else s)
                xs.append(b + 0.08 * (j - (n_methods - 1) / 2))
                ys.append(mm)
                es.append(err)
            style = "--" if "isolated" in m else "-"
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                fmt="o" + style,
                ms=4,
                capsize=2,
                color=f"C{j}",
                label=label(m, versions),
            )
    for ax in axes:
        ax.axhspan(-REQUIREMENT["m_Y10"], REQUIREMENT["m_Y10"], color="0.8", label="±0.003")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(bins)), [f"{lo}-{hi}" for lo, hi in bins])
        ax.set_xlabel("blendedness β of the galaxy in the blended field")
    axes[0].set_ylabel("m = (m1 + m2) / 2  (bootstrap 1σ)")
    axes[1].set_ylabel("Δm = m - m(noiseless isolated, same galaxies)")
    axes[0].set_title("multiplicative shear bias (KSB, r band)", fontsize=9)
    axes[1].set_title("beyond the estimator's own bias (paired per galaxy)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, str(RESULTS / "shear.png"))


def _machine(payload: dict) -> dict:
    return machine_of_records(payload["methods"].values(), "each worker")


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    "--fields",
    "1",
    "--scarlet2-fields",
    "0",
    "--field-size",
    "64",
    "--priors",
    "lsst",
    "--workers",
    "madness",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=40, help="layouts for madness_ppl")
    parser.add_argument(
        "--scarlet2-fields", type=int, default=None, help="layouts for scarlet2 (default --fields)"
    )
    parser.add_argument("--field-size", type=int, default=205)
    parser.add_argument("--priors", nargs="+", default=list(PRIORS))
    parser.add_argument(
        "--prior-fields",
        nargs="*",
        default=[],
        metavar="PRIOR=N",
        help="run PRIOR's methods on the first N layouts only (e.g. lsst-v0.1.0=8; "
        "isolated=N: every isolated fit)",
    )
    parser.add_argument("--workers", nargs="+", default=["madness", "scarlet2"])
    parser.add_argument(
        "--rebuild", "--tables-only", dest="tables_only", action="store_true", help="tables only"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n_scarlet2 = args.fields if args.scarlet2_fields is None else args.scarlet2_fields
    limits = {k: int(v) for k, v in (item.split("=") for item in args.prior_fields)}
    if args.worker:
        n = n_scarlet2 if args.worker == "scarlet2" else args.fields
        seeds = [FIRST_SEED + k for k in range(n)]
        worker(args.worker, seeds, args.field_size, args.priors, limits)
        return
    t0 = time.perf_counter()
    if not args.tables_only:
        for group in args.workers:
            cmd = ["--worker", group, "--fields", str(args.fields)]
            cmd += ["--scarlet2-fields", str(n_scarlet2), "--field-size", str(args.field_size)]
            cmd += ["--priors", *args.priors, "--prior-fields", *args.prior_fields]
            run_study("shear", *cmd)
        SHEAR_DIR.mkdir(parents=True, exist_ok=True)
        with (SHEAR_DIR / "runs.jsonl").open("a") as f:  # wall time of every fitting run
            run = {"argv": sys.argv[1:], "wall_seconds": time.perf_counter() - t0}
            f.write(json.dumps({**run, "cpu": describe_machine()["cpu"]}) + "\n")
    runs_file = SHEAR_DIR / "runs.jsonl"
    runs = [json.loads(x) for x in runs_file.read_text().splitlines()] if runs_file.exists() else []
    payload = summarise(args.field_size, args.priors, max(args.fields, n_scarlet2))
    payload = {
        "protocol": __doc__,
        "shear": SHEAR,
        "variants": [list(v) for v in VARIANTS],
        "field_size": args.field_size,
        "fields_requested": {"madness": args.fields, "scarlet2": n_scarlet2, **limits},
        "requirement": REQUIREMENT,
        "wall_seconds_this_call": time.perf_counter() - t0,
        "runs": runs,
        **payload,
    }
    table = tables(payload)
    _figure(payload)
    write_results("shear", payload, table, machine=_machine(payload))
    print(table)


if __name__ == "__main__":
    main()
