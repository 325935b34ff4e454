"""Flux errors that stay honest off the training distribution (issue #32): records and coverage.

Run: ``python -m benchmarks error_model --sets lsst ood tight tight-ood psf-wide --fields 30``
(``--block calibration`` for the held-out fields the constants are fitted on, ``test``,
the default, for the fields they are checked on); ``--tables`` rebuilds
``results/error_model.{json,md,png}`` from the stored records. Records (one JSON line per field)
are kept in ``results/error_model/<set>_<block>.jsonl`` as they finish, so a run resumes.

Sets (fits from the true positions and variance, ``deblend`` defaults, the shipped ``lsst``
prior, given the field's own PSF images); in brackets the field set of ``benchmarks/fields.py``
each draws:

* ``lsst`` (``high``): 205 x 205-pixel fields, 12-20 galaxies, the simulator the prior was
  trained on (other seeds);
* ``ood`` (``high-ood``): the same layout, the out-of-distribution population (larger,
  more elliptical, bulgier galaxies, PSFs 15 % wider), which no prior saw;
* ``tight``, ``tight-ood`` (the same): 80 x 80-pixel fields with 2-6 galaxies in the central 40 x 40
  pixels (nearest neighbours often < 1"), each population;
* ``psf-wide`` (the same): 128 x 128 pixels at the population's expected density, in-distribution
  galaxies seen through a field PSF 1.4-1.8x the LSST median FWHM, Kolmogorov or Moffat
  (as in ``benchmarks/psf.py``);
* ``dense`` (``crowded``): 128 x 128 pixels at three times the population's expected density, in
  distribution (crowded fields: most sources overlap a neighbour).

``psf-wide`` and ``dense`` are never used for calibration.

Calibration fields use seeds ``[700_000 + set, k]``, test fields ``[5_000 + set, k]``; the
training simulations used seeds below 500; no field is in both blocks.

Per source and band a record holds the MAP flux ``F``, the truth (the noiseless isolated
the galaxy's flux as
drawn into the field, on a stamp holding ~99 % of its light; the 45-pixel truth stamp's flux,
which misses the wings of large galaxies, as ``truth_45``), the Laplace width (pixel term included, no systematic terms), the neighbours'
light ``C`` (:func:`madness_ppl.uncertainty.neighbour_light`), the misfit evidence of
:func:`madness_ppl.misfit.source_misfit` and the true blendedness; per source the S/N, the stamp
edge fraction, convergence; per field the fit and error seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, records_by
from madness_ppl.atomic import atomic_write_text

RECORDS = RESULTS / "error_model"
#: this study's set names -> the field sets of ``benchmarks/fields.py`` they draw
FIELD_SET = {
    "lsst": "high",
    "ood": "high-ood",
    "tight": "tight",
    "tight-ood": "tight-ood",
    "psf-wide": "psf-wide",
    "dense": "crowded",
}
SETS = tuple(FIELD_SET)
BLOCK_SEED = {"calibration": 700_000, "test": 5_000}


def make_field(name: str, seed: list[int], prior):
    """One field of set ``name``: ``(blend, psf_images)`` (the images the field was drawn with:
    61 px in survey band order for ``psf-wide``, the prior's stamp size and bands otherwise)."""
    from benchmarks.fields import SETS as FIELD_SETS

    field = FIELD_SETS[FIELD_SET[name]].draw(seed)
    if field.psf_objects is not None:
        return field.blend, field.psf_images()
    return field.blend, field.psf_images(prior.stamp_size, prior.bands)


@contextlib.contextmanager
def drawn_fluxes():
    """Collect the flux of every galaxy as drawn into the field (the whole galaxy: the
    simulator draws each on a stamp holding ~99 % of its light, and crops only the 45-pixel
    ``Blend.isolated`` truth stamps, which miss the wings of large galaxies)."""
    from madness_ppl.simulate import blends

    fluxes, draw = [], blends.draw_galaxy

    def recording(*args, **kwargs):
        image = draw(*args, **kwargs)
        fluxes.append(np.asarray(image, np.float64).sum(axis=(-2, -1)))
        return image

    blends.draw_galaxy = recording
    try:
        yield fluxes
    finally:
        blends.draw_galaxy = draw


def field_record(prior, blend, psf, drawn) -> dict:
    """Deblend one field and keep what the error model needs (module docstring)."""
    from madness_ppl import measure
    from madness_ppl.deblend import deblend
    from madness_ppl.misfit import source_misfit
    from madness_ppl.uncertainty import neighbour_light

    tick = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = deblend(
            blend.field,
            blend.variance,
            blend.positions,
            prior=prior,
            psf=psf,
            flux_error_floor=0.0,
            blend_error=0.0,
            adaptive_errors=False,
        )
    cpu = time.process_time() - tick
    cat = result.catalog
    shape = blend.field.shape
    misfit = source_misfit(result.sources, blend.positions, result.residual, result.variance)
    bands = prior.bands

    def rows(a) -> list:
        return np.round(np.asarray(a, np.float64), 6).tolist()

    return {
        "n": len(blend.positions),
        "flux": rows(result.sources.sum(axis=(-2, -1))),
        "truth": rows(drawn),
        "truth_45": rows(blend.isolated.sum(axis=(-2, -1))),
        "laplace": rows(np.stack([cat[f"flux_{b}_err"] for b in bands], axis=1)),
        "neighbour": rows(neighbour_light(result.sources, blend.positions, shape)),
        "chi2": rows(misfit.chi2),
        "model_error": rows(misfit.model_error),
        "excess": rows(misfit.excess),
        "excess_sd": rows(misfit.excess_sd),
        "model_power": rows(misfit.model_power),
        "chi2_bands": rows(misfit.chi2_bands),
        "residual_flux": rows(misfit.residual_flux),
        "residual_flux_sd": rows(misfit.residual_flux_sd),
        "blendedness": rows(measure.blendedness(blend.isolated, blend.positions, shape[-2:])),
        "snr": rows(cat["snr"]),
        "edge": rows(cat["edge_flux_frac"]),
        "chi2_all": rows(cat["chi2"]),
        "converged": [bool(c) for c in cat["converged"]],
        "timings": {k: float(v) for k, v in result.timings.items()},
        "cpu_seconds": cpu,
    }


def record_path(name: str, block: str) -> Path:
    return RECORDS / f"{name}_{block}.jsonl"


def load_records(name: str, block: str) -> dict[int, dict]:
    """Stored records of a set and block keyed by field index (torn lines skipped)."""
    return records_by(record_path(name, block), "k")


def run(names: list[str], block: str, n_fields: int) -> None:
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.progress import progress_bar

    prior = GalaxyPrior.load("lsst")
    RECORDS.mkdir(parents=True, exist_ok=True)
    for name in names:
        done = load_records(name, block)
        todo = [k for k in range(n_fields) if k not in done]
        path = record_path(name, block)
        with progress_bar(True) as bar:
            task = bar.add_task(f"{name} ({block})", total=len(todo))
            for k in todo:
                seed = [BLOCK_SEED[block] + SETS.index(name), k]
                with drawn_fluxes() as drawn:
                    blend, psf = make_field(name, seed, prior)
                record = {
                    "set": name,
                    "block": block,
                    "k": k,
                    "seed": seed,
                    "version": prior.config.version,
                }
                if len(blend.positions):
                    record.update(field_record(prior, blend, psf, np.stack(drawn)))
                else:
                    record["n"] = 0
                lines = path.read_text() if path.exists() else ""
                atomic_write_text(path, lines + json.dumps(record) + "\n")
                bar.advance(task)


KEYS = (
    "flux",
    "truth",
    "laplace",
    "neighbour",
    "model_error",
    "blendedness",
    "snr",
    "edge",
)
LEVELS = {"68": 0.6827, "90": 0.90}
CALIBRATION_SETS = ("lsst", "ood", "tight", "tight-ood")
VARIANTS = (
    "Laplace",
    "before: κ, λ = 0.175, Gaussian",
    "population terms only (λ, ν refitted)",
    "adaptive (this model)",
)
#: The constants shipped before this model (``benchmarks/laplace_coverage.py``, v0.3.1).
PREVIOUS = {
    "blend_fraction": 0.175,
    "misfit_fraction": 0.0,
    "edge_fraction": 0.0,
    "tail_dof": np.inf,
}
#: Search grid of the constants (misfit fraction γ, edge fraction η, blend fraction λ).
GRID = {
    "misfit_fraction": np.round(np.arange(0.0, 1.51, 0.1), 2),
    "edge_fraction": np.concatenate([[0.0], np.round(np.geomspace(10.0, 500.0, 18), 1)]),
    "blend_fraction": np.round(np.arange(0.0, 0.31, 0.025), 3),
    "tail_dof": np.array([2.0, 3.0, 5.0, 10.0, np.inf]),
}


def field_arrays(name: str, block: str) -> list[dict]:
    """Per field, the record's per-source arrays (fields with sources only)."""
    out = []
    for record in load_records(name, block).values():
        if record.get("n"):
            field = {key: np.asarray(record[key], np.float64) for key in KEYS}
            field["seconds"] = record["timings"]
            out.append(field)
    return out


def pooled(fields: list[dict]) -> dict:
    return {key: np.concatenate([f[key] for f in fields]) for key in KEYS}


def error_of(d: dict, constants: dict, stored: dict) -> np.ndarray:
    """``(n, B)`` flux errors (:func:`madness_ppl.uncertainty.flux_error_budget`) with the
    prior's flux fractions κ and ``constants`` (empty: the Laplace width alone)."""
    from madness_ppl.uncertainty import flux_error_budget

    if not constants:
        return d["laplace"]
    return flux_error_budget(
        d["laplace"],
        d["flux"],
        d["neighbour"],
        flux_fraction=stored["flux_fraction"],
        blend_fraction=constants["blend_fraction"],
        misfit=d["model_error"],
        misfit_fraction=constants["misfit_fraction"],
        edge=d["edge"],
        edge_fraction=constants["edge_fraction"],
    )


def coverage(d: dict, sd: np.ndarray, level: float, tail_dof: float = np.inf) -> np.ndarray:
    r"""Per band, the share of sources with :math:`|F - F_\mathrm{true}| < h_\gamma`, the
    half-width of :func:`madness_ppl.uncertainty.interval_halfwidth` (Gaussian for
    ``tail_dof = inf``)."""
    from madness_ppl.uncertainty import interval_halfwidth

    h = interval_halfwidth(level, tail_dof)
    return np.mean(np.abs(d["flux"] - d["truth"]) < h * sd, axis=0)


def _loss(sets: dict[str, dict], constants: dict, stored: dict) -> float:
    """Squared miss of the 68 % and 90 % coverage, summed over sets and bands."""
    loss = 0.0
    for d in sets.values():
        sd = error_of(d, constants, stored)
        for level in LEVELS.values():
            loss += np.sum((coverage(d, sd, level, constants["tail_dof"]) - level) ** 2)
    return float(loss)


def calibrate(sets: dict[str, dict], stored: dict) -> dict:
    """The constants minimising the squared miss of the 68 % and 90 % coverage, summed over
    the calibration sets and bands (grid search over :data:`GRID`)."""
    best, best_loss = None, np.inf
    for values in itertools.product(*GRID.values()):
        constants = dict(zip(GRID, values, strict=True))
        loss = _loss(sets, constants, stored)
        if loss < best_loss:
            best, best_loss = constants, loss
    return {**{k: float(v) for k, v in best.items()}, "loss": float(best_loss)}


def calibrate_population(sets: dict[str, dict], stored: dict) -> dict:
    """The population-only model (no per-source terms) calibrated on the same fields: the
    blend fraction λ and the tails ν alone (on a wider grid), for a like-with-like comparison."""
    best, best_loss = None, np.inf
    lams, dofs = np.round(np.arange(0.0, 1.01, 0.05), 2), [1.5, *GRID["tail_dof"]]
    for lam, dof in itertools.product(lams, dofs):
        constants = {
            "blend_fraction": float(lam),
            "misfit_fraction": 0.0,
            "edge_fraction": 0.0,
            "tail_dof": float(dof),
        }
        loss = _loss(sets, constants, stored)
        if loss < best_loss:
            best, best_loss = constants, loss
    return {**best, "loss": best_loss}


def _interval(fields, statistic) -> tuple[float, float, float]:
    from madness_ppl.stats import field_bootstrap

    return field_bootstrap(fields, lambda fs: statistic(pooled(fs)), n=1000, seed=0)


def _fmt(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def blended(d: dict) -> np.ndarray:
    """Sources with true blendedness >= 0.1."""
    return d["blendedness"] >= 0.1


def isolated(d: dict) -> np.ndarray:
    """Sources with true blendedness < 0.01."""
    return d["blendedness"] < 0.01


def set_rows(name: str, fields: list[dict], models: dict, stored: dict, bands) -> list[dict]:
    """Coverage rows of one test set, one per variant, with field-bootstrap intervals."""
    r = bands.index("r")
    rows = []
    for variant, constants in models.items():

        def cov(d, level, band=r, mask=None, variant=variant, constants=constants):
            sd = error_of(d, constants, stored)
            keep = np.ones(len(sd), bool) if mask is None else mask(d)
            if not keep.any():
                return np.nan
            sub = {k: v[keep] for k, v in d.items()}
            dof = constants.get("tail_dof", np.inf)
            return float(coverage(sub, sd[keep], level, dof)[band])

        d = pooled(fields)
        sd = error_of(d, constants, stored)
        dof = constants.get("tail_dof", np.inf)
        rows.append(
            {
                "set": name,
                "variant": variant,
                "fields": len(fields),
                "sources": len(d["flux"]),
                "r68": _interval(fields, lambda d, cov=cov: cov(d, LEVELS["68"])),
                "r90": _interval(fields, lambda d, cov=cov: cov(d, LEVELS["90"])),
                "bands68": coverage(d, sd, LEVELS["68"], dof).tolist(),
                "bands90": coverage(d, sd, LEVELS["90"], dof).tolist(),
                "blended_r68": _interval(
                    fields, lambda d, cov=cov: cov(d, LEVELS["68"], mask=blended)
                ),
                "blended_sources": int(blended(d).sum()),
                "ratio_r": float(np.median(sd[:, r] / d["laplace"][:, r])),
                "ratio_r_isolated": float(np.median((sd[:, r] / d["laplace"][:, r])[isolated(d)]))
                if isolated(d).any()
                else float("nan"),
            }
        )
    return rows


def bins_rows(test: dict[str, list[dict]], constants: dict, stored: dict, bands) -> list[dict]:
    """r-band coverage of the adaptive errors by S/N and by blendedness, all test sets pooled."""
    r = bands.index("r")
    fields = [f for fs in test.values() for f in fs]
    out = []
    for column, edges in (
        ("snr", (0, 10, 30, 100, np.inf)),
        ("blendedness", (0, 0.01, 0.1, 0.5, 1.01)),
    ):
        for lo, hi in itertools.pairwise(edges):

            def stat(d, level, lo=lo, hi=hi, column=column):
                keep = (d[column] >= lo) & (d[column] < hi)
                if not keep.any():
                    return np.nan
                sub = {k: v[keep] for k, v in d.items()}
                sd = error_of(sub, constants, stored)
                return float(coverage(sub, sd, level, constants["tail_dof"])[r])

            d = pooled(fields)
            n = int(((d[column] >= lo) & (d[column] < hi)).sum())
            out.append(
                {
                    "by": column,
                    "bin": [lo, hi if np.isfinite(hi) else None],
                    "sources": n,
                    "r68": _interval(fields, lambda d, stat=stat: stat(d, LEVELS["68"])),
                    "r90": _interval(fields, lambda d, stat=stat: stat(d, LEVELS["90"])),
                }
            )
    return out


def figure(test: dict[str, list[dict]], models: dict, stored: dict, bands, path: Path) -> None:
    """Coverage against nominal level (r band) per test set and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = bands.index("r")
    levels = np.linspace(0.05, 0.99, 40)
    fig, axes = plt.subplots(1, len(test), figsize=(3.2 * len(test), 3.3), sharey=True)
    for ax, (name, fields) in zip(np.atleast_1d(axes), test.items(), strict=True):
        d = pooled(fields)
        for variant, constants in models.items():
            sd = error_of(d, constants, stored)
            dof = constants.get("tail_dof", np.inf)
            ax.plot(levels, [coverage(d, sd, g, dof)[r] for g in levels], label=variant)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{name} ({len(d['flux'])} sources)", fontsize=9)
        ax.set_xlabel("nominal level")
    np.atleast_1d(axes)[0].set_ylabel("r-band coverage")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_prior(constants: dict, calibration_fields: dict[str, int]) -> Path:
    """Store the adaptive constants in the shipped ``lsst`` prior's ``config.json``."""
    path = Path(__file__).parent.parent / "madness_ppl" / "weights" / "lsst" / "config.json"
    document = json.loads(path.read_text())
    model_error = document["config"]["metadata"]["model_error"]
    # the blend fraction is refitted here, with the per-source terms: the isolated-galaxy
    # calibration (laplace_coverage.py) keeps the pixel and flux fractions only
    model_error["calibrated_by"] = model_error["calibrated_by"].split("; blend fraction")[0]
    if not model_error["calibrated_by"].endswith(")"):
        model_error["calibrated_by"] += ")"
    model_error["blend_fraction"] = constants["blend_fraction"]
    model_error["misfit_fraction"] = constants["misfit_fraction"]
    model_error["edge_fraction"] = constants["edge_fraction"]
    model_error["tail_dof"] = constants["tail_dof"]
    sets = ", ".join(f"{k} ({v} fields)" for k, v in calibration_fields.items())
    model_error["adaptive_calibrated_by"] = (
        "python -m benchmarks error_model --tables --write-prior (blend, misfit and edge "
        f"fractions jointly, on the calibration fields of {sets}, seeds [700000 + set, k])"
    )
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def misfit_cost(repeats: int = 5) -> float:
    """Milliseconds :func:`madness_ppl.misfit.source_misfit` and the edge fraction take on a
    205 x 205-pixel, 6-band field with 20 sources on 75-pixel stamps (median of ``repeats``)."""
    from madness_ppl.catalog import stamp_edge_fraction
    from madness_ppl.misfit import source_misfit

    rng = np.random.default_rng(0)
    stamps = rng.uniform(0.0, 1.0, (20, 6, 75, 75))
    positions = rng.uniform(20.0, 185.0, (20, 2))
    residual = rng.normal(size=(6, 205, 205))
    variance = np.ones((6, 205, 205))
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        source_misfit(stamps, positions, residual, variance)
        stamp_edge_fraction(stamps)
        seconds.append(time.perf_counter() - tick)
    return 1e3 * float(np.median(seconds))


def tables(write: bool) -> None:
    from benchmarks._common import machine_of_records, write_results
    from madness_ppl.prior import GalaxyPrior
    from madness_ppl.uncertainty import calibrated_fractions

    prior = GalaxyPrior.load("lsst")
    bands = list(prior.bands)
    stored = calibrated_fractions(prior)
    calibration = {n: field_arrays(n, "calibration") for n in CALIBRATION_SETS}
    calibration = {n: f for n, f in calibration.items() if f}
    test = {n: field_arrays(n, "test") for n in SETS}
    test = {n: f for n, f in test.items() if f}
    pooled_calibration = {n: pooled(f) for n, f in calibration.items()}
    adaptive = calibrate(pooled_calibration, stored)
    population = calibrate_population(pooled_calibration, stored)
    models = dict(zip(VARIANTS, ({}, PREVIOUS, population, adaptive), strict=True))
    rows = [r for n, f in test.items() for r in set_rows(n, f, models, stored, bands)]
    bins = bins_rows(test, adaptive, stored, bands)
    figure(test, models, stored, bands, RESULTS / "error_model.png")
    cost = [
        f["seconds"]["errors"] / (f["seconds"]["fit"] + f["seconds"].get("refine", 0.0))
        for fs in test.values()
        for f in fs[1:]
    ]
    misfit_ms = misfit_cost()
    if write:
        write_prior(adaptive, {n: len(f) for n, f in calibration.items()})
    lines = [
        "Flux errors on six sets of galsim blends (fits from true positions and variance, "
        "the field's own PSF, prior lsst "
        f"{prior.config.version}). Constants fitted on the calibration fields of "
        + ", ".join(f"{n} ({len(f)} fields)" for n, f in calibration.items())
        + f": misfit fraction γ = {adaptive['misfit_fraction']:g}, edge fraction η = "
        f"{adaptive['edge_fraction']:g}, blend fraction λ = {adaptive['blend_fraction']:g}, "
        f"tail degrees of freedom ν = {adaptive['tail_dof']:g} (population-only model refitted "
        f"on the same fields: λ = {population['blend_fraction']:g}, ν = "
        f"{population['tail_dof']:g}); flux fractions κ and pixel fractions ε as stored "
        "in the prior. Coverage on the test fields (other seeds; psf-wide and dense are never used "
        "for calibration): share of sources with |F - F_true| < h σ, h the half-width of the level's "
        "interval (Student-t with ν degrees of freedom scaled to h = 1 at 68.27 %: 1.645 at "
        "90 % for ν = inf), F_true the galaxy's flux as "
        "drawn into the field; 95 % intervals from 1000 bootstrap resamples of fields.",
        "",
        "| set | errors | fields / sources | r 68 % | r 90 % | 68 %, bands u..y | 90 %, bands u..y "
        "| blended r 68 % (n) | median σ / Laplace (r) | isolated: median σ / Laplace (r) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['variant']} | {row['fields']} / {row['sources']} | "
            f"{_fmt(row['r68'])} | {_fmt(row['r90'])} | "
            + " ".join(f"{x:.2f}" for x in row["bands68"])
            + " | "
            + " ".join(f"{x:.2f}" for x in row["bands90"])
            + f" | {_fmt(row['blended_r68'])} ({row['blended_sources']}) | "
            f"{row['ratio_r']:.2f} | {row['ratio_r_isolated']:.2f} |"
        )
    lines += [
        "",
        "Adaptive errors, r band, all test sets pooled, by matched-filter S/N and by true "
        "blendedness:",
        "",
        "| by | bin | sources | r 68 % | r 90 % |",
        "|---|---|---|---|---|",
    ]
    for b in bins:
        hi = "∞" if b["bin"][1] is None else f"{b['bin'][1]:g}"
        lines.append(
            f"| {b['by']} | [{b['bin'][0]:g}, {hi}) | {b['sources']} | {_fmt(b['r68'])} | "
            f"{_fmt(b['r90'])} |"
        )
    lines += [
        "",
        f"Cost of the errors (Laplace and all terms): median {100 * np.median(cost):.0f} % of "
        "the MAP fit and refinement time per field (fields after each process's first). The "
        f"per-source terms (misfit and extent) take {misfit_ms:.0f} ms for a 205 x 205-pixel "
        "field of 20 sources with 75-pixel stamps (timed here, numpy on the host).",
        "",
        "Command: `python -m benchmarks error_model --tables` (records: `python "
        "benchmarks/error_model.py --sets ... --block calibration|test --fields N`).",
    ]
    records = [
        json.loads(line) for p in RECORDS.glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    write_results(
        "error_model",
        {
            "protocol": __doc__,
            "constants": adaptive,
            "population_only": population,
            "rows": rows,
            "bins": bins,
            "error_cost_fraction": float(np.median(cost)),
        },
        "\n".join(lines),
        machine=machine_of_records(records, "fits"),
    )
    print("\n".join(lines))


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    ["--sets", "lsst", "--block", "calibration", "--fields", "1"],
    ["--sets", "lsst", "--block", "test", "--fields", "1"],
    ["--tables"],
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--block", default="test", choices=tuple(BLOCK_SEED))
    parser.add_argument("--fields", type=int, default=30)
    parser.add_argument(
        "--rebuild", "--tables", dest="tables", action="store_true", help="tables from records only"
    )
    parser.add_argument(
        "--write-prior", action="store_true", help="with --tables: store the constants"
    )
    args = parser.parse_args(argv)
    if args.tables:
        tables(args.write_prior)
    else:
        run(args.sets, args.block, args.fields)


if __name__ == "__main__":
    main()
