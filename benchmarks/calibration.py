"""Calibration of NUTS flux intervals on data simulated from the model: coverage and SBC ranks.

For each prior, fields of 60 overlapping pairs of galaxies (pairs 24 pixels apart, so that
their posteriors are independent: 120 independent blend experiments per field) are simulated
*from the model itself*: latents drawn from the prior, decoded, placed, Gaussian noise with
the model's variance (sky + Poisson term of the noiseless image). ``sample_posterior`` (NUTS,
started at the prior mean / a prior draw, not at the truth) gives per-source r-band flux draws;
we report

* the coverage of the equal-tailed 68 % and 90 % intervals, with its binomial standard
  error :math:`\\sqrt{\\gamma(1-\\gamma)/n}` and the z-score of the deviation;
* simulation-based-calibration ranks (Talts et al. 2018): the rank of the true flux among
  ``L = 99`` thinned posterior draws, uniform on ``0..L`` when the posterior is calibrated
  (chi-squared test over 10 bins, and a rank histogram figure).

Priors: the linear-Gaussian toy prior, and a small randomly initialised ``GalaxyPrior`` (conv
decoder, coupling flow; 3 bands, 15-pixel stamps, latent dimension 4): data drawn from it are
from the model by construction, whatever its weights.

The same question on galsim blends with the shipped prior, where the prior is only
approximately right (NUTS against the Laplace errors): ``calibration_galsim.py``.
``--rebuild`` rewrites the markdown and figure from ``results/calibration.json``.

Run: ``python -m benchmarks calibration [--fields 3 --gp-fields 1 --warmup 300 --samples 400]``.
Writes ``results/calibration.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from scipy import stats

from benchmarks._common import RESULTS, write_results
from madness_ppl.infer import flux_table, sample_posterior, summarize_diagnostics
from madness_ppl.prior import FlowConfig, GalaxyPrior, NetworkConfig, PriorConfig
from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.toy import LinearGaussianPrior

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BANDS = ("g", "r", "i")
N_PAIRS, CELL, GRID = 60, 24, 8
LEVELS = (0.68, 0.9)
N_RANK = 99


def pair_positions(rng: np.random.Generator) -> np.ndarray:
    """Two sources 4-7 pixels apart in each of ``N_PAIRS`` cells of a ``GRID x GRID`` grid."""
    cells = np.array([(i % GRID, i // GRID) for i in range(N_PAIRS)], float)
    centres = (cells + 0.5) * CELL
    offset = rng.uniform(2.0, 3.5, size=(N_PAIRS, 2)) * rng.choice([-1.0, 1.0], (N_PAIRS, 2))
    return np.concatenate([centres - offset, centres + offset]).round()


def small_galaxy_prior() -> GalaxyPrior:
    network = NetworkConfig.tiny(bands=3, latent_dim=4, width=8, dense=32)
    config = PriorConfig(
        survey="toy",
        bands=BANDS,
        stamp_size=15,
        network=network,
        flow=FlowConfig(latent_dim=4, n_layers=2, hidden=(16,)),
    )
    return GalaxyPrior.init(jax.random.key(0), config)


def run_field(prior, sky: float, seed: int, warmup: int, samples: int) -> dict:
    rng = np.random.default_rng(seed)
    positions = jnp.asarray(pair_positions(rng), jnp.float32)
    n = positions.shape[0]
    z_true = prior.latent_distribution().sample(jax.random.key(seed), (n,))
    stamps = prior.decode(z_true)
    image = place_stamps(stamps, positions, (GRID * CELL, GRID * CELL))
    variance = default_variance(image, sky)
    field = image + jnp.sqrt(variance) * rng.normal(size=image.shape).astype(np.float32)
    # Start from a fresh prior draw: the sampler must find the posterior itself.
    init = prior.latent_distribution().sample(jax.random.key(seed + 10_000), (n,))
    start = time.perf_counter()
    idata = sample_posterior(
        blend_model,
        field,
        positions,
        variance,
        prior,
        init={"z": init},
        num_warmup=warmup,
        num_samples=samples,
        seed=seed,
        diagnose=False,
    )
    seconds = time.perf_counter() - start
    r = BANDS.index("r")
    truth = np.asarray(stamps.sum(axis=(-1, -2)))[:, r]
    table = flux_table(idata, BANDS, intervals=LEVELS)
    hits = {
        level: (table[f"flux_r_lo{round(100 * level)}"].value <= truth)
        & (truth <= table[f"flux_r_hi{round(100 * level)}"].value)
        for level in LEVELS
    }
    draws = np.asarray(idata.posterior["flux"])[..., r].reshape(-1, n)
    thin = draws[np.linspace(0, draws.shape[0] - 1, N_RANK).round().astype(int)]
    ranks = (thin < truth).sum(axis=0)
    diag = summarize_diagnostics(idata, warn=False)
    ess_flux = np.asarray(az.ess(idata, var_names=["flux"])["flux"])[..., r]
    return {
        "hits": hits,
        "ranks": ranks,
        "seconds": seconds,
        "divergences": diag.divergences,
        "min_ess_flux_r": float(ess_flux.min()),
        "min_ess_z": diag.min_ess_bulk,
        "gradient": idata.posterior.attrs["gradient"],
        "rel_sd": float(np.median(table["flux_r_sd"].value / np.abs(truth))),
    }


def calibrate(name: str, prior, sky: float, fields: int, warmup: int, samples: int) -> dict:
    runs = []
    for k in range(fields):
        runs.append(run_field(prior, sky, seed=100 * k + 1, warmup=warmup, samples=samples))
        print(
            name,
            "field",
            k,
            {key: v for key, v in runs[-1].items() if key not in ("hits", "ranks")},
        )
    out = _aggregate(name, runs, fields)
    out["min_ess_flux_r"] = float(min(r["min_ess_flux_r"] for r in runs))
    out["settings"] = _settings(warmup, samples, "a prior draw", prior)
    return out


def _settings(warmup: int, samples: int, start: str, prior) -> dict:
    version = getattr(getattr(prior, "config", None), "version", None)
    return {
        "chains": 1,
        "warmup": warmup,
        "samples": samples,
        "start": start,
        "prior_version": version,
        "source": "this run",
    }


def interval_coverage(runs: list[dict], n: int) -> dict:
    """Coverage per level over the ``hits`` of ``runs``, its binomial error and z-score."""
    coverage = {}
    for level in LEVELS:
        k = int(sum(r["hits"][level].sum() for r in runs))
        se = np.sqrt(level * (1 - level) / n)
        coverage[str(level)] = {
            "hits": k,
            "n": n,
            "coverage": k / n,
            "binomial_se": se,
            "z": (k / n - level) / se,
        }
    return coverage


def _aggregate(name: str, runs: list[dict], fields: int) -> dict:
    ranks = np.concatenate([r["ranks"] for r in runs])
    n = ranks.size
    coverage = interval_coverage(runs, n)
    counts = np.histogram(ranks, bins=10, range=(0, N_RANK + 1))[0]
    chi2 = stats.chisquare(counts)
    return {
        "prior": name,
        "sources": n,
        "fields": fields,
        "coverage": coverage,
        "rank_counts": counts.tolist(),
        "rank_chi2_pvalue": float(chi2.pvalue),
        "ranks": ranks.tolist(),
        "seconds": float(sum(r["seconds"] for r in runs)),
        "divergences": int(sum(r["divergences"] for r in runs)),
        "min_ess_z": float(min(r["min_ess_z"] for r in runs)),
        "gradient": runs[0]["gradient"],
        "median_relative_flux_sd": float(np.median([r["rel_sd"] for r in runs])),
    }


def figure(results: list[dict]) -> None:
    """SBC rank histograms of every row, with the 99 % band of uniform ranks."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        n = res["sources"]
        counts = np.asarray(res["rank_counts"])
        expected = n / counts.size
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / counts.size)
        ax.axhspan(lo, hi, color="0.85", label="99 % band (uniform ranks)")
        ax.axhline(expected, color="0.4", lw=1)
        ax.bar(np.arange(counts.size) * 10 + 5, counts, width=9, color="C0", label="SBC ranks")
        ax.set_xlabel(f"rank of the true r-band flux among {N_RANK} draws")
        ax.set_ylabel("sources")
        cov = res["coverage"]
        ax.set_title(
            f"{res['prior']}: {n} sources\n68 %: {cov['0.68']['coverage']:.2f}, "
            f"90 %: {cov['0.9']['coverage']:.2f} coverage",
            fontsize=10,
        )
        ax.set_ylim(0, 1.35 * max(hi, counts.max()))
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "calibration.png", dpi=100)
    plt.close(fig)


def coverage_cells(row: dict) -> str:
    """The 68 % and 90 % coverage cells of a table row: coverage +- binomial error (z)."""
    return " | ".join(
        f"{c['coverage']:.3f} +- {c['binomial_se']:.3f} (z={c['z']:+.1f})"
        for c in (row["coverage"]["0.68"], row["coverage"]["0.9"])
    )


def make_table(results: list[dict]) -> str:
    """The markdown of ``results``, every row labelled with the settings it ran with."""
    table = (
        "| prior | sources | 68 % coverage | 90 % coverage | SBC chi2 p | divergences | "
        "min ESS of z (bulk) | min r-flux ESS | median flux sd / flux | NUTS: warm-up + draws, "
        "start | gradient | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in results:
        st = r["settings"]
        table += (
            f"| {r['prior']} | {r['sources']} | {coverage_cells(r)} | "
            f"{r['rank_chi2_pvalue']:.2f} | {r['divergences']} | "
            f"{r['min_ess_z']:.1f} | {r['min_ess_flux_r']:.0f} | "
            f"{r['median_relative_flux_sd']:.3f} | "
            f"{st['chains']} chain, {st['warmup']} + {st['samples']}, from {st['start']}"
            + (f" ({st['source']})" if st.get("source", "this run") != "this run" else "")
            + " | "
            f"{r['gradient']} | {r['seconds']:.0f} |\n"
        )
    return table + (
        "\nOne chain per field. Coverage of equal-tailed intervals of the r-band flux; binomial "
        "standard error; SBC rank histogram (10 bins) in `calibration.png`. Seconds: wall time "
        "of the sampling, compilation included. The same question on galsim blends with the "
        "shipped prior: `calibration_galsim`."
    )


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--fields", "1", "--gp-fields", "0", "--warmup", "20", "--samples", "20"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fields", type=int, default=3, help="toy-prior fields (120 sources)")
    parser.add_argument("--gp-fields", type=int, default=1, help="GalaxyPrior fields")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument(
        "--rebuild",
        "--from-json",
        dest="rebuild",
        action="store_true",
        help="sample nothing: rewrite the markdown and figure from results/calibration.json",
    )
    opts = parser.parse_args(argv)
    if opts.rebuild:
        payload = json.loads((RESULTS / "calibration.json").read_text())
        machine = payload.pop("machine")
        payload.pop("provenance", None)
        results = payload["results"]
    else:
        toy = LinearGaussianPrior.random(
            jax.random.key(1), n_bands=3, stamp_size=15, latent_dim=4, bands=BANDS
        )
        results = [
            calibrate("toy linear prior", toy, 100.0, opts.fields, opts.warmup, opts.samples)
        ]
        if opts.gp_fields:
            results.append(
                calibrate(
                    "small random GalaxyPrior",
                    small_galaxy_prior(),
                    1.0e4,
                    opts.gp_fields,
                    opts.warmup,
                    opts.samples,
                )
            )
        machine = None
        payload = {
            "benchmark": "coverage of NUTS r-band flux intervals on data simulated from the model",
            "results": results,
        }
    figure(results)
    table = make_table(results)
    write_results("calibration", payload, table, machine=machine)
    print(table)


if __name__ == "__main__":
    main()
