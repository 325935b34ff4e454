"""Flux errors on galsim blends: NUTS against the Laplace errors, with and without model error.

The companion of ``calibration.py`` (NUTS on data simulated from the model, where it must be
calibrated): here four error methods on the same sources with the shipped LSST prior, on
fields simulated with galsim (``madness_ppl.simulate.make_blend``, 91x91 pixels, 2-4
galaxies, LSST 10-year depth), where the prior is only approximately right (it was trained on
this simulator's isolated galaxies: in distribution for the galaxies, not for the blending).
All start from the MAP of ``deblend`` (true positions and variance); the truth is the r-band
flux of each galaxy's noiseless isolated stamp. Methods: ``Laplace``
(:func:`madness_ppl.uncertainty.laplace_flux_errors`), ``Laplace + model error`` (the prior's
calibrated pixel fraction in the precision, its flux fraction in quadrature: the ``deblend``
catalog's ``flux_<band>_err``), ``NUTS`` (several chains, the Laplace covariance as a fixed
dense inverse mass matrix: sampling in an approximately whitened space; step size adapted)
and ``NUTS + model error`` (the pixel term in the likelihood, the flux floor added to the draws
as Gaussian noise). Reported: coverage with binomial errors, a PIT histogram test, the
standardised error :math:`(\\bar f - f_\\mathrm{true}) / \\mathrm{sd}(f)`, and for NUTS R-hat,
bulk/tail ESS of every r-band flux (and of every band's flux where the cache stores them),
divergences, cost per source and ESS per second.

Each NUTS method samples into its own resumable cache,
``results/.calibration_<method>_<chains>x<warmup>+<samples>[_ext<k>][_from<k>].npz``
(``--nuts METHOD``, ``--first-field K`` for a second process); ``--cached`` makes the rows from
the caches, and ``--method-settings "NUTS=80,300,2"`` takes a method from a cache of other
settings (each row states its own). ``--laplace-fields M`` adds the Laplace rows over the first
``M`` fields (the NUTS fields and those after them: the Laplace coverage on many more sources
of the same population, every band), and ``--keep-row NUTS`` keeps a NUTS method's row of the
previous ``calibration_galsim.json`` when this run has no cache for it (labelled as kept).
``--rebuild`` rewrites the markdown and figure from ``results/calibration_galsim.json``.

Run: ``python -m benchmarks calibration_galsim --fields 48 --warmup 100 --samples 400 --chains 4
--extensions 4`` (hours on one core: split the NUTS sampling over processes with ``--nuts``).
Writes ``results/calibration_galsim.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import arviz as az
import jax.numpy as jnp
import matplotlib
import numpy as np
from scipy import stats

from benchmarks._common import RESULTS, write_results
from benchmarks.calibration import LEVELS, N_RANK, coverage_cells, interval_coverage
from madness_ppl.atomic import atomic_savez
from madness_ppl.infer import sample_posterior, summarize_diagnostics
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model
from madness_ppl.uncertainty import calibrated_fractions

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: The results' file name.
NAME = "calibration_galsim"

#: the issue's mixing targets for every reported flux (all bands): R-hat and bulk ESS
RHAT_TARGET, ESS_TARGET = 1.01, 200


class NutsRun(NamedTuple):
    """Settings of a galsim NUTS method: chains x (warm-up + draws), and up to
    ``extensions`` further blocks of ``samples`` draws while some flux has R-hat above
    :data:`RHAT_TARGET` or a bulk or tail ESS below :data:`ESS_TARGET`."""

    warmup: int
    samples: int
    chains: int
    extensions: int = 0

    def label(self) -> str:
        """``4 x (100 + 400)``, with ``, <= 3 more blocks of 400`` when extended."""
        text = f"{self.chains} x ({self.warmup} + {self.samples})"
        more = f", <= {self.extensions} more blocks of {self.samples}"
        return text + (more if self.extensions else "")


GALSIM_METHODS = ("NUTS", "NUTS + model error", "Laplace", "Laplace + model error")
LAPLACE_METHODS = GALSIM_METHODS[2:]
#: label suffix of the Laplace rows over every field of ``--galsim-laplace-fields``
MORE_FIELDS = " (more fields)"


def _hits_and_pit(draws: np.ndarray, truth: np.ndarray) -> tuple[dict, np.ndarray]:
    """Equal-tailed interval hits per level and the PIT ``P(F < truth)`` from flux draws."""
    hits = {}
    for level in LEVELS:
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
        hits[level] = (lo <= truth) & (truth <= hi)
    return hits, (draws < truth).mean(axis=0)


def _gaussian_hits_and_pit(mean, sd, truth) -> tuple[dict, np.ndarray]:
    hits = {level: np.abs(truth - mean) <= stats.norm.ppf((1 + level) / 2) * sd for level in LEVELS}
    return hits, stats.norm.cdf((truth - mean) / sd)


NUTS_METHODS = {"NUTS": False, "NUTS + model error": True}  # method -> pixel model error on


def run_galsim_nuts(prior, seed: int, method: str, run: NutsRun) -> dict:
    """One NUTS method on one galsim blend: raw r-band flux draws and their diagnostics.

    The field, MAP and truth are those of :func:`galsim_blend` (deterministic in ``seed``);
    ``NUTS + model error`` has the prior's calibrated pixel fraction in the likelihood and its
    own Laplace covariance as the fixed dense inverse mass matrix; with ``run.extensions``
    the chains continue in blocks until every flux meets the mixing targets. Post-hoc error terms (the
    flux floor, the blending term) are applied when the rows are made, not here, so that they
    can change without sampling again.
    """
    from madness_ppl.scene import prepare_blend
    from madness_ppl.uncertainty import laplace_flux_errors

    field = galsim_blend(prior, seed)
    blend, z_map, n, r = field["blend"], field["z_map"], field["n"], field["r"]
    eps = calibrated_fractions(prior)["pixel_fraction"] if NUTS_METHODS[method] else 0.0
    pixel_mask = np.isfinite(blend.field)
    lap = laplace_flux_errors(
        prior, z_map, blend.positions, blend.variance, pixel_mask=pixel_mask, model_error=eps
    )
    inputs = prepare_blend(
        blend.field, blend.positions, blend.variance, prior, pixel_mask=pixel_mask
    )
    t0 = time.process_time()
    w0 = time.perf_counter()
    idata = sample_posterior(
        blend_model,
        *inputs.args,
        **inputs.kwargs,
        model_error=eps,
        init={"z": z_map},
        inverse_mass_matrix=lap.covariance,
        adapt_mass_matrix=False,
        num_warmup=run.warmup,
        num_samples=run.samples,
        num_chains=run.chains,
        max_extensions=run.extensions,
        converge_on=("flux",),
        max_rhat=RHAT_TARGET,
        min_ess_per_chain=ESS_TARGET / run.chains,
        seed=seed,
        diagnose=False,
    )
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    every = np.asarray(idata.posterior["flux"])[..., :n, :]  # (chain, draw, n, band)
    flux = every[..., r]
    diag = summarize_diagnostics(idata, warn=False)
    every_band = az.convert_to_dataset(every)
    return {
        "seed": seed,
        "n": n,
        "truth": field["truth"],
        "z_map": z_map,
        "draws": flux.astype(np.float32),
        "rhat": np.asarray(az.rhat(az.convert_to_dataset(flux))["x"]),
        "ess_bulk": np.asarray(az.ess(az.convert_to_dataset(flux), method="bulk")["x"]),
        "ess_tail": np.asarray(az.ess(az.convert_to_dataset(flux), method="tail")["x"]),
        # every band's flux (n, band): the target is R-hat and ESS for every reported flux
        "rhat_all": np.asarray(az.rhat(every_band)["x"]),
        "ess_bulk_all": np.asarray(az.ess(every_band, method="bulk")["x"]),
        "ess_tail_all": np.asarray(az.ess(every_band, method="tail")["x"]),
        "cpu_seconds": cpu,
        "seconds": wall,
        "divergences": diag.divergences,
        "min_ess_z": diag.min_ess_bulk,
        "max_rhat_z": diag.max_rhat,
        "leapfrog_mean": float(idata.sample_stats["n_steps"].mean()),
        "step_size": float(idata.sample_stats["step_size"].mean()),
        "gradient": idata.posterior.attrs["gradient"],
        "blocks": int(idata.posterior.attrs["blocks"]),
    }


def _meets_targets(run: dict) -> bool:
    """Whether every band's flux of a cached field has R-hat <= RHAT_TARGET and bulk and tail
    ESS >= ESS_TARGET (the test ``sample_posterior`` extends on)."""
    ess = np.minimum(run["ess_bulk_all"], run["ess_tail_all"])
    return bool(run["rhat_all"].max() <= RHAT_TARGET and ess.min() >= ESS_TARGET)


def galsim_blend(prior, seed: int, *, timed: bool = False) -> dict:
    """The galsim field of ``seed`` (91 x 91 pixels, 2-4 LSST galaxies), its MAP and truth;
    ``timed``: fit twice, timing the second (compiled) fit (``map_cpu_seconds``)."""
    from madness_ppl.deblend import deblend
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    config = BlendConfig(field_size=91, n_galaxies=(2, 4), margin=10)
    blend = make_blend(Survey.lsst(), config=config, rng=np.random.default_rng(seed))
    if timed:  # compile first, time the second fit
        deblend(blend.field, blend.variance, blend.positions, prior=prior, errors=False)
    t0 = time.process_time()
    result = deblend(blend.field, blend.variance, blend.positions, prior=prior, errors=False)
    n = len(blend.positions)
    r = list(prior.bands).index("r")
    return {
        "blend": blend,
        "result": result,
        "n": n,
        "r": r,
        "z_map": np.asarray(result.fit.params["z"])[:n],
        "truth": blend.isolated[:, r].sum(axis=(-1, -2)),
        "map_cpu_seconds": time.process_time() - t0,
    }


def galsim_nuts_runs(
    prior_name: str, method: str, fields: int, run: NutsRun, *, first: int = 0
) -> list[dict]:
    """Run (or continue) one NUTS method's fields ``first..fields-1`` into its cache,
    ``results/.calibration_<method>_<chains>x<warmup>+<samples>[_ext<k>].npz`` (``_from<first>``
    for a second process sampling later fields in parallel); return every cached field of
    the method (see :func:`_cached_nuts_runs`).

    With extensions, a field of the unextended cache of the same settings whose fluxes meet
    the targets is taken from it as it is: its first block is what the extended sampler
    draws (same seed and compiled programs: identical draws, checked on field 7009), and it
    stops there.
    """
    prior = GalaxyPrior.load(prior_name)
    suffix = f"_from{first}" if first else ""
    partial = RESULTS / f".calibration_{_cache_stem(method, run)}{suffix}.npz"
    key = _nuts_key(prior_name, method, run)
    own = _load_runs(partial, key)
    plain = {}
    if run.extensions:
        plain = {
            r["seed"]: r for r in _cached_nuts_runs(prior_name, method, run._replace(extensions=0))
        }
    for k in range(first + len(own), fields):
        seed = 7000 + k
        if seed in plain and _meets_targets(plain[seed]):
            own.append({**plain[seed], "blocks": 1, "from_unextended_cache": True})
        else:
            own.append(run_galsim_nuts(prior, seed, method, run))
        last = own[-1]
        print(
            f"{method} field {k}: {last['n']} sources, {last['cpu_seconds']:.0f} CPU s, "
            f"{last.get('blocks', 1)} block(s), max R-hat {last['rhat_all'].max():.4f}, "
            f"min bulk ESS {last['ess_bulk_all'].min():.0f}",
            flush=True,
        )
        RESULTS.mkdir(exist_ok=True)
        atomic_savez(partial, runs=np.array(own, dtype=object), settings=key)
    return _cached_nuts_runs(prior_name, method, run)[:fields]


def _galsim_rows(all_runs: list[dict], settings: dict[str, dict], prior_version: str) -> list[dict]:
    """One result row per method over the fields that have it (every field has the Laplace
    methods; a NUTS method may stop short when its sampling ran out of time, or have none);
    ``settings``: each NUTS method's; ``prior_version``: the prior's (every row records it)."""
    rows = []
    for method in GALSIM_METHODS + tuple(m + MORE_FIELDS for m in LAPLACE_METHODS):
        runs = [r for r in all_runs if method in r]
        if not runs:
            continue
        truth = np.concatenate([r["truth"] for r in runs])
        n = truth.size
        per = [r[method] for r in runs]
        pit = np.concatenate([p["pit"] for p in per])
        coverage = interval_coverage(per, n)
        ranks = np.minimum((pit * (N_RANK + 1)).astype(int), N_RANK)
        counts = np.histogram(ranks, bins=10, range=(0, N_RANK + 1))[0]
        mean = np.concatenate([p["mean"] for p in per])
        sd = np.concatenate([p["sd"] for p in per])
        zscore = (mean - truth) / sd
        z16, z50, z84 = np.percentile(zscore, [16, 50, 84])
        row = {
            "prior": f"galsim blends, {method}",
            "method": method,
            "sources": n,
            "fields": len(runs),
            "coverage": coverage,
            "rank_counts": counts.tolist(),
            "rank_chi2_pvalue": float(stats.chisquare(counts).pvalue),
            "pit": pit.tolist(),
            "seconds": float(sum(p["seconds"] for p in per)),
            "seconds_per_source": float(sum(p["seconds"] for p in per) / n),
            "map_seconds_per_source": float(sum(r["map_seconds"] for r in runs) / n),
            # fields after the first, which pays the compilation of MAP and Laplace programs
            "warm_seconds_per_source": _warm_rate([p["seconds"] for p in per], runs),
            "warm_map_seconds_per_source": _warm_rate([r["map_seconds"] for r in runs], runs),
            "median_relative_flux_sd": float(np.median(sd / np.abs(truth))),
            "zscore_median": float(z50),
            "zscore_width68": float(0.5 * (z84 - z16)),
            "settings": settings.get(
                method, {"method": "Laplace at MAP", "prior_version": prior_version}
            ),
        }
        if all("band_hits" in p for p in per):  # Laplace: every band's flux
            row["bands"] = runs[0]["bands"]
            row["band_coverage"] = {
                str(level): np.concatenate([p["band_hits"][level] for p in per]).mean(0).tolist()
                for level in LEVELS
            }
        if method.startswith("NUTS"):
            rhat = np.concatenate([p["rhat"] for p in per])
            bulk = np.concatenate([p["ess_bulk"] for p in per])
            tail = np.concatenate([p["ess_tail"] for p in per])
            row.update(
                divergences=int(sum(p["divergences"] for p in per)),
                max_rhat_flux_r=float(rhat.max()),
                min_ess_flux_r=float(bulk.min()),
                min_ess_tail_flux_r=float(tail.min()),
                fraction_rhat_ok=float(np.mean(rhat < 1.01)),
                fraction_ess_ok=float(np.mean(bulk >= 200)),
                min_ess_z=float(min(p["min_ess_z"] for p in per)),
                max_rhat_z=float(max(p["max_rhat_z"] for p in per)),
                leapfrog_mean=float(np.mean([p["leapfrog_mean"] for p in per])),
                blocks=[int(p.get("blocks", 1)) for p in per],
                ess_per_second=float(np.median(bulk) * n / sum(p["seconds"] for p in per)),
                gradient=per[0]["gradient"],
            )
            if all("rhat_all" in p for p in per):  # every band's flux
                rhat_all = np.concatenate([p["rhat_all"].ravel() for p in per])
                bulk_all = np.concatenate([p["ess_bulk_all"].ravel() for p in per])
                row.update(
                    max_rhat_flux_all=float(rhat_all.max()),
                    min_ess_flux_all=float(bulk_all.min()),
                    fraction_rhat_ok_all=float(np.mean(rhat_all < 1.01)),
                    fraction_ess_ok_all=float(np.mean(bulk_all >= 200)),
                    fluxes_all=int(rhat_all.size),
                )
        rows.append(row)
    return rows


def galsim_field_methods(prior, seed: int, nuts: dict, *, labels: tuple[str, ...] = ("",)) -> dict:
    """All four error methods on the galsim field of ``seed`` (same MAP, sources and truth).

    ``nuts`` holds the cached runs of the NUTS methods that sampled this field (possibly
    none: then only the Laplace methods, at this run's MAP). The Laplace methods are stored
    under their names plus each suffix of ``labels``: ``""`` for the rows on the NUTS
    fields, :data:`MORE_FIELDS` for the rows over every field of ``--galsim-laplace-fields``.

    ``Laplace``: :func:`~madness_ppl.uncertainty.laplace_flux_errors` at the MAP, no model
    error. ``Laplace + model error``: the ``deblend`` catalog's ``flux_<band>_err``: the pixel
    term in the precision, the flux and blending terms in quadrature
    (:func:`~madness_ppl.uncertainty.flux_error_budget`). ``NUTS``: the raw draws of
    :func:`run_galsim_nuts`; ``NUTS + model error``: its pixel-term draws plus Gaussian noise of
    the same two systematic terms (evaluated at the MAP), so both "+ model error" rows carry
    the same error model.
    """
    from madness_ppl.uncertainty import laplace_flux_errors, systematic_flux_errors

    field = galsim_blend(prior, seed, timed=True)  # the field, the truth and the MAP's time
    blend, n, r, truth = (field[k] for k in ("blend", "n", "r", "truth"))
    # where the chains started (the MAP of the run that sampled them), else this run's MAP
    z_map = np.asarray(next(iter(nuts.values()))["z_map"] if nuts else field["z_map"])
    for method, run in nuts.items():
        if run["seed"] != seed or run["n"] != n:
            raise RuntimeError(f"{method}: the cached field {run['seed']} is not seed {seed}")
        if not np.allclose(run["z_map"], field["z_map"], atol=1e-3):
            print(
                f"seed {seed}: {method}'s cached MAP differs from this run's (max |dz| "
                f"{np.abs(run['z_map'] - field['z_map']).max():.2g}); using the cached one"
            )
    sources = np.asarray(prior.decode(jnp.asarray(z_map)), np.float64)
    flux = sources.sum(axis=(-2, -1))
    systematic_all = systematic_flux_errors(prior, sources, blend.positions, blend.field.shape)
    systematic = systematic_all[:, r]
    truth_all = blend.isolated.sum(axis=(-1, -2)).astype(np.float64)  # (n, band)
    out: dict = {
        "n": n,
        "truth": truth,
        "map_seconds": field["map_cpu_seconds"],
        "bands": list(prior.bands),
    }
    laplace_flux_errors(prior, z_map, blend.positions, blend.variance)  # compiles, untimed
    for label, eps in (
        ("Laplace", 0.0),
        ("Laplace + model error", calibrated_fractions(prior)["pixel_fraction"]),
    ):
        t0 = time.process_time()
        lap = laplace_flux_errors(prior, z_map, blend.positions, blend.variance, model_error=eps)
        sd_all = lap.flux_err if label == "Laplace" else np.hypot(lap.flux_err, systematic_all)
        seconds = time.process_time() - t0
        sd = sd_all[:, r]
        hits, pit = _gaussian_hits_and_pit(flux[:, r], sd, truth)
        band_hits, _ = _gaussian_hits_and_pit(flux, sd_all, truth_all)  # every band: (n, band)
        entry = {
            "hits": hits,
            "pit": pit,
            "sd": sd,
            "mean": flux[:, r],
            "seconds": seconds,
            "band_hits": band_hits,
        }
        out |= {label + suffix: entry for suffix in labels}
    rng = np.random.default_rng(seed)
    for method, run in nuts.items():
        draws = run["draws"].reshape(-1, n).astype(np.float64)
        if method != "NUTS":
            draws = draws + systematic * rng.normal(size=draws.shape)
        hits, pit = _hits_and_pit(draws, truth)
        keep = ("rhat", "ess_bulk", "ess_tail", "divergences", "min_ess_z", "max_rhat_z")
        keep += tuple(k for k in ("rhat_all", "ess_bulk_all", "ess_tail_all") if k in run)
        out[method] = {
            "hits": hits,
            "pit": pit,
            "sd": draws.std(axis=0),
            "mean": draws.mean(axis=0),
            "seconds": run["cpu_seconds"],
            "leapfrog_mean": run["leapfrog_mean"],
            "gradient": run["gradient"],
            "blocks": int(run.get("blocks", 1)),
            **{k: run[k] for k in keep},
        }
    return out


def _warm_rate(seconds: list[float], runs: list[dict]) -> float | None:
    """Seconds per source over the fields after the first (``None`` with one field)."""
    sources = sum(r["n"] for r in runs[1:])
    return float(sum(seconds[1:]) / sources) if sources else None


def calibrate_galsim(
    prior_name: str,
    fields: int,
    default: NutsRun,
    *,
    sample: bool = True,
    method_settings: dict[str, NutsRun] | None = None,
    laplace_fields: int = 0,
) -> list[dict]:
    """The galsim rows: NUTS fields sampled (or continued from their caches; with
    ``sample=False`` only the fields the caches hold), the Laplace methods recomputed.

    ``default``: the NUTS settings of both methods; ``method_settings``: the
    :class:`NutsRun` of a NUTS method whose cache was sampled with
    other settings than the rest (each row states its own). ``laplace_fields``: also the
    Laplace rows over the first ``laplace_fields`` fields (the NUTS fields and those after
    them: the same population, many more sources, for the Laplace coverage target).
    """
    prior = GalaxyPrior.load(prior_name)
    own = {m: default for m in NUTS_METHODS} | (method_settings or {})
    if sample:
        runs = {m: galsim_nuts_runs(prior_name, m, fields, own[m]) for m in NUTS_METHODS}
    else:
        runs = {m: _cached_nuts_runs(prior_name, m, own[m]) for m in NUTS_METHODS}
    sampled = min(fields, max(len(v) for v in runs.values()))
    more = (MORE_FIELDS,) if laplace_fields else ()
    per_field = [
        galsim_field_methods(
            prior,
            7000 + k,
            {m: v[k] for m, v in runs.items() if k < min(len(v), sampled)},
            labels=("", *more) if k < sampled else more,
        )
        for k in range(max(sampled, laplace_fields))
    ]
    settings = {
        m: {
            "chains": r.chains,
            "warmup": r.warmup,
            "samples": r.samples,
            "extensions": r.extensions,
            "start": "MAP of deblend(), Laplace covariance as fixed dense mass matrix",
            "prior_version": prior.config.version,
            "source": "this run",
        }
        for m, r in own.items()
    }
    return _galsim_rows(per_field, settings, prior.config.version)


def _keep_rows(results: list[dict], methods: list[str]) -> list[dict]:
    """``results`` with the galsim rows of ``methods`` that this run did not make taken from
    ``results/calibration_galsim.json`` (labelled as kept), in :data:`GALSIM_METHODS` order."""
    made = {r.get("method") for r in results}
    wanted = [m for m in methods if m not in made]
    if not wanted:
        return results
    previous = json.loads((RESULTS / f"{NAME}.json").read_text())["results"]
    kept = []
    for method in wanted:
        row = next((r for r in previous if r.get("method") == method), None)
        if row is None:
            raise SystemExit(
                f"--galsim-keep-row {method!r}: results/calibration_galsim.json has no such row"
            )
        settings = dict(row["settings"])
        if settings.get("source", "this run") == "this run":
            settings["source"] = "row kept from an earlier run (results/calibration_galsim.json)"
        kept.append({**row, "settings": settings})
    order = {m: k for k, m in enumerate(GALSIM_METHODS)}
    galsim = sorted(
        [r for r in results if "method" in r] + kept,
        key=lambda r: order.get(r["method"], len(order)),
    )
    return [r for r in results if "method" not in r] + galsim


def _run_fields(settings: dict) -> dict:
    """The :class:`NutsRun` fields a row's ``settings`` record (no extensions before they
    were recorded)."""
    return {k: int(settings.get(k, 0)) for k in NutsRun._fields}


def _load_runs(path, key: str) -> list[dict]:
    """The runs a cache file holds for settings ``key`` (none if missing or other settings)."""
    if not path.exists():
        return []
    saved = np.load(path, allow_pickle=True)
    return list(saved["runs"]) if saved["settings"].item() == key else []


def _cached_nuts_runs(prior_name: str, method: str, run: NutsRun):
    """The fields all of a NUTS method's caches hold for these settings, merged by seed:
    the unbroken sequence from the first field (seed 7000)."""
    key = _nuts_key(prior_name, method, run)
    paths = RESULTS.glob(f".calibration_{_cache_stem(method, run)}*.npz")
    by_seed = {run["seed"]: run for path in paths for run in _load_runs(path, key)}
    runs = []
    while 7000 + len(runs) in by_seed:
        runs.append(by_seed[7000 + len(runs)])
    return runs


def _cache_stem(method: str, run: NutsRun) -> str:
    """``<method>_<chains>x<warmup>+<samples>[_ext<k>]``, e.g. ``nuts_model_error_4x100+400``."""
    slug = method.lower().replace(" + ", "_").replace(" ", "_")
    ext = f"_ext{run.extensions}" if run.extensions else ""
    return f"{slug}_{run.chains}x{run.warmup}+{run.samples}{ext}"


def _nuts_key(prior_name: str, method: str, run: NutsRun) -> str:
    """Cache key of NUTS runs: the prior's name *and version* (a name such as "lsst" moves on)."""
    version = GalaxyPrior.load(prior_name).config.version
    base = [prior_name, version, method, run.warmup, run.samples, run.chains, "v3"]
    return json.dumps(base + ([run.extensions] if run.extensions else []))


def figure(rows: list[dict]) -> None:
    """Empirical against nominal coverage of every method's equal-tailed intervals (from the
    PIT values), with the 95 % binomial band."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    nominal = np.linspace(0.05, 0.99, 40)
    n = rows[0]["sources"]
    band = 1.96 * np.sqrt(nominal * (1 - nominal) / n)
    ax.fill_between(nominal, nominal - band, nominal + band, color="0.85", label="95 % binomial")
    ax.plot([0, 1], [0, 1], color="0.4", lw=1)
    for k, res in enumerate(rows):
        pit = np.asarray(res["pit"])
        cover = [np.mean(np.abs(pit - 0.5) <= c / 2) for c in nominal]
        ax.plot(nominal, cover, color=f"C{k}", label=f"{res['method']} ({res['sources']})")
    ax.set_xlabel("nominal coverage of the equal-tailed interval")
    ax.set_ylabel("empirical coverage")
    ax.set_title(f"shipped prior on galsim blends: {n} sources", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / f"{NAME}.png", dpi=100)
    plt.close(fig)


def galsim_table(rows: list[dict]) -> str:
    """The galsim-blend rows: one per error method, same sources."""
    if not rows:
        return ""
    versions = sorted({r["settings"].get("prior_version") or "?" for r in rows})
    laplace_row = next(r for r in rows if r["method"] == "Laplace + model error")
    out = (
        f"**Shipped prior (v{', v'.join(versions)}) on galsim blends** (up to "
        f"{max(r['sources'] for r in rows)} sources in {max(r['fields'] for r in rows)} fields "
        "(the first fields of one seeded sequence: each row says how many it holds) of 91 x 91 "
        "pixels, 2-4 galaxies, LSST 10-year "
        "depth; the prior was trained on this simulator's isolated galaxies). Truth: r-band flux "
        "of the noiseless isolated galaxy. NUTS: "
        "chains x (warm-up + draws) as each row says, from the MAP, "
        "the Laplace covariance as fixed dense inverse mass matrix (a whitened space), step size "
        'adapted. "+ model error": the prior\'s calibrated pixel fraction in the likelihood '
        "(NUTS) or the precision (Laplace), and its flux and blending terms "
        "(kappa F, lambda C at the MAP) in quadrature (Laplace: the `deblend` catalog's "
        "`flux_r_err`) or as Gaussian noise added to the draws (NUTS). Times are CPU seconds of "
        "one process (NUTS with the inline gradient: pinned to one core; with the callback "
        "gradient: two threads, CPU time of both); MAP and Laplace timed on a second call "
        "(compiled), NUTS including its compilation where the run compiled. Rows "
        '"(more fields)": the Laplace methods over more fields of the same seeded sequence (the '
        "NUTS fields and those after them: the same population, more sources).\n\n"
        "| method | NUTS: chains x (warm-up + draws), gradient | sources (fields) | 68 % coverage "
        "| 90 % coverage | PIT chi2 p | (mean - truth) / sd: median, "
        "68 % width | max R-hat (r flux) | min bulk / tail ESS (r flux) | r fluxes with R-hat < "
        "1.01 / ESS >= 200 | every band's flux: max R-hat; R-hat < 1.01 / ESS >= 200 (fluxes) "
        "| divergences | leapfrog steps per draw | s per source | ESS per s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        nuts = r["method"].startswith("NUTS")
        st = r["settings"]
        every = (
            f"{r['max_rhat_flux_all']:.3f}; {r['fraction_rhat_ok_all']:.2f} / "
            f"{r['fraction_ess_ok_all']:.2f} ({r['fluxes_all']})"
            if "max_rhat_flux_all" in r
            else "not stored"
        )
        how = "-"
        if nuts:
            how = NutsRun(**_run_fields(st)).label()
            blocks = np.asarray(r.get("blocks", [1]))
            if st.get("extensions"):
                how += f" ({int((blocks > 1).sum())} fields extended, max {blocks.max()} blocks)"
            how += f", {r['gradient']}"
            if st.get("source", "this run") != "this run":
                how += f"; {st['source']}"
        out += (
            f"| {r['method']} | {how} | {r['sources']} ({r['fields']}) | {coverage_cells(r)} | {r['rank_chi2_pvalue']:.2f} | "
            f"{r['zscore_median']:+.2f}, "
            f"{r['zscore_width68']:.2f} | "
            + (
                f"{r['max_rhat_flux_r']:.3f} | {r['min_ess_flux_r']:.0f} / "
                f"{r['min_ess_tail_flux_r']:.0f} | {r['fraction_rhat_ok']:.2f} / "
                f"{r['fraction_ess_ok']:.2f} | {every} | {r['divergences']} | "
                f"{r['leapfrog_mean']:.1f} | "
                f"{r['seconds_per_source']:.1f} | {r['ess_per_second']:.1f} |\n"
                if nuts
                else f"- | - | - | - | - | - | {r['seconds_per_source']:.3f} | - |\n"
            )
        )
    out += (
        f"\nMAP (`deblend`, errors off) for comparison: "
        f"{laplace_row['map_seconds_per_source']:.3f} s per source in these fields. "
    )
    lap = laplace_row["seconds_per_source"] / laplace_row["map_seconds_per_source"]
    out += f"Laplace + model error: {100 * lap:.0f} % of the MAP's time. "
    nuts_warm = {r["method"]: r.get("warm_seconds_per_source") for r in rows}
    if all(nuts_warm.get(m) for m in NUTS_METHODS):
        out += (
            "NUTS on the fields after the first (compiled): "
            + ", ".join(f"{m} {nuts_warm[m]:.1f} s per source" for m in NUTS_METHODS)
            + ". "
        )
    out += "Coverage vs nominal for every level: `calibration_galsim.png`."
    return out + _band_table(rows)


def _band_table(rows: list[dict]) -> str:
    """Every band's coverage of the Laplace rows that store it (binomial errors)."""
    rows = [r for r in rows if "band_coverage" in r]
    if not rows:
        return ""
    bands = rows[0]["bands"]
    out = (
        "\n\nEvery band's flux, Laplace rows (Gaussian intervals, binomial standard error; the "
        '"more fields" rows: the NUTS fields and the fields after them in the same seeded '
        "sequence, the same population):\n\n"
        f"| method | sources (fields) | level | {' | '.join(bands)} |\n"
        f"|---|---|---|{'---|' * len(bands)}\n"
    )
    for r in rows:
        n = r["sources"]
        for level in LEVELS:
            cells = " | ".join(
                f"{c:.3f} +- {np.sqrt(c * (1 - c) / n):.3f}" for c in r["band_coverage"][str(level)]
            )
            out += f"| {r['method']} | {n} ({r['fields']}) | {level:.0%} | {cells} |\n"
    return out


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it): NUTS with a
#: handful of draws into the scratch results directory, then the rows.
SMOKE = ["--fields", "1", "--warmup", "10", "--samples", "10", "--chains", "1"]


def _method_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, NutsRun]:
    """``METHOD=WARMUP,SAMPLES,CHAINS[,EXTENSIONS]`` items as :class:`NutsRun` per method."""
    out = {}
    for item in items:
        method, _, values = item.partition("=")
        numbers = values.split(",")
        if (
            method not in NUTS_METHODS
            or len(numbers) not in (3, 4)
            or not all(v.isdigit() for v in numbers)
        ):
            parser.error(
                f"--method-settings {item!r}: want METHOD=WARMUP,SAMPLES,CHAINS[,EXTENSIONS]"
            )
        out[method] = NutsRun(*(int(v) for v in numbers))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=8, help="galsim blend fields with NUTS")
    parser.add_argument("--prior", default="lsst", help="the prior")
    parser.add_argument("--chains", type=int, default=2, help="NUTS chains per field")
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument(
        "--extensions",
        type=int,
        default=0,
        help="up to this many more blocks of --samples draws while a flux misses "
        f"R-hat <= {RHAT_TARGET} or ESS >= {ESS_TARGET}",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="sample nothing: rewrite the markdown and figure from the stored JSON",
    )
    parser.add_argument(
        "--nuts",
        choices=tuple(NUTS_METHODS),
        help="only sample this NUTS method's fields into its cache (for a background run)",
    )
    parser.add_argument(
        "--first-field",
        type=int,
        default=0,
        help="with --nuts: start at this field (a second process, its own cache file)",
    )
    parser.add_argument(
        "--cached",
        action="store_true",
        help="sample nothing: NUTS rows from the fields both caches already hold",
    )
    parser.add_argument(
        "--laplace-fields",
        type=int,
        default=0,
        help="also the Laplace rows over this many fields (the NUTS fields and later ones)",
    )
    parser.add_argument(
        "--keep-row",
        action="append",
        default=[],
        choices=tuple(NUTS_METHODS),
        help="a NUTS method whose caches hold no field: keep its row of the stored JSON",
    )
    parser.add_argument(
        "--method-settings",
        action="append",
        default=[],
        metavar="METHOD=WARMUP,SAMPLES,CHAINS[,EXTENSIONS]",
        help="tabulate a NUTS method from its cache of other settings, e.g. 'NUTS=80,300,2'",
    )
    opts = parser.parse_args(argv)
    method_settings = _method_settings(parser, opts.method_settings)
    run = NutsRun(opts.warmup, opts.samples, opts.chains, opts.extensions)
    if opts.nuts:
        galsim_nuts_runs(opts.prior, opts.nuts, opts.fields, run, first=opts.first_field)
        return
    if opts.rebuild:
        payload = json.loads((RESULTS / f"{NAME}.json").read_text())
        machine = payload.pop("machine")
        payload.pop("provenance", None)
        rows = payload["results"]
    else:
        rows = calibrate_galsim(
            opts.prior,
            opts.fields,
            run,
            sample=not opts.cached,
            method_settings=method_settings,
            laplace_fields=opts.laplace_fields,
        )
        rows = _keep_rows(rows, opts.keep_row)
        machine = None
        payload = {"benchmark": "NUTS and Laplace r-flux errors on galsim blends", "results": rows}
    figure(rows)
    table = galsim_table(rows)
    if payload.get("rows_made_by"):  # rows of an earlier run, rebuilt
        table = f"Rows made by {payload['rows_made_by']}.\n\n{table}"
    write_results(NAME, payload, table, machine=machine)
    print(table)


if __name__ == "__main__":
    main()
