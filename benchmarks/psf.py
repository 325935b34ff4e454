"""Priors across seeing: fields observed with their own PSF, narrow, median or wide (issue #28).

Run: ``python benchmarks/psf.py --priors lsst path/to/lsst-v0.3 [--fields 12] [--field-size 80]``.
Writes ``results/psf.{json,md}``.

Each field gets its own PSF: per band, the LSST median FWHM times a factor drawn once per field
from ``U(0.5, 0.7)`` (``psf-narrow``), ``1`` (``psf-median``) or ``U(1.4, 1.8)`` (``psf-wide``),
a Kolmogorov or a Moffat (beta ~ U(2.5, 4.5)) profile at random. Galaxies at
``expected_density()`` of each population (``_populations``: the training simulator's, and one
the priors never saw), drawn by galsim directly with the field's PSF (not through the model
frame's convolution the PSF-aware training uses), fitted from the *true* positions and
variance with ``deblend`` defaults.

Each prior is given the field's true PSF images when it can use them (a PSF-aware prior
always; the v0.2 prior, whose model frame is the LSST median PSF, only when the PSF is wider in
every band); otherwise it fits as it would without one (its only option). Metric: the 68 %
quantile of ``|F_r / F_r,true - 1|`` over all galaxies and over blended ones (blendedness
> 0.1), with 95 % bootstrap intervals over *fields* (1000 resamples) and the ratio of two
priors' widths bootstrapped on the same resampled fields.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import write_results
from _populations import POPULATIONS, catalog_config_for

SETS = {"psf-narrow": (0.5, 0.7), "psf-median": (1.0, 1.0), "psf-wide": (1.4, 1.8)}


def field_psf(rng: np.random.Generator, factor_range: tuple[float, float], survey):
    """One field's PSF: a galsim object per band and the images (61 px) of it."""
    import galsim

    factor = rng.uniform(*factor_range)
    moffat = rng.random() < 0.5
    beta = rng.uniform(2.5, 4.5)
    objects, images = {}, []
    for band in survey.band_names:
        fwhm = factor * survey.band(band).psf_fwhm
        obj = galsim.Moffat(beta=beta, fwhm=fwhm) if moffat else galsim.Kolmogorov(fwhm=fwhm)
        objects[band] = obj
        image = obj.drawImage(nx=61, ny=61, scale=survey.pixel_scale).array
        images.append(image / image.sum())
    info = {"factor": float(factor), "profile": "moffat" if moffat else "kolmogorov"}
    if moffat:
        info["beta"] = float(beta)
    return objects, np.stack(images), info


def make_fields(name: str, population: str, n_fields: int, field_size: int, seed: int):
    from madness_ppl import measure
    from madness_ppl.simulate import BlendConfig, expected_density, make_blend
    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    catalog_config = catalog_config_for(population)
    config = BlendConfig(field_size=field_size, density=expected_density(catalog_config), margin=5)
    fields = []
    for k in range(n_fields):
        rng = np.random.default_rng([seed, k])
        objects, images, info = field_psf(rng, SETS[name], survey)
        blend = make_blend(
            survey,
            rng=rng,
            config=config,
            catalog_config=catalog_config,
            psf=lambda band, o=objects: o[band],
        )
        shape = blend.field.shape[-2:]
        fields.append(
            {
                "blend": blend,
                "psf": images,
                "info": info,
                "blendedness": measure.blendedness(blend.isolated, blend.positions, shape),
            }
        )
    return fields


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


def width68(errors) -> float:
    errors = np.abs(np.asarray(errors, float))
    errors = errors[np.isfinite(errors)]
    return float(np.quantile(errors, 0.68)) if len(errors) else float("nan")


def bootstrap(records_a, records_b=None, *, blended=False, n=1000, seed=0):
    """Width (or ratio of widths b/a) and 95 % interval, resampling fields."""
    rng = np.random.default_rng(seed)

    def pick(records, idx):
        out = []
        for i in idx:
            e, b = np.asarray(records[i]["error"]), np.asarray(records[i]["blendedness"])
            out.extend(e[b > 0.1] if blended else e)
        return out

    k = len(records_a)
    full = np.arange(k)
    value = width68(pick(records_a, full))
    if records_b is not None:
        value = width68(pick(records_b, full)) / value
    draws = []
    for _ in range(n):
        idx = rng.integers(0, k, k)
        w = width68(pick(records_a, idx))
        draws.append(w if records_b is None else width68(pick(records_b, idx)) / w)
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return value, float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", default=["lsst"])
    parser.add_argument("--fields", type=int, default=12)
    parser.add_argument("--field-size", type=int, default=80)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--populations", nargs="+", default=list(POPULATIONS))
    parser.add_argument("--seed", type=int, default=2800)
    args = parser.parse_args()

    from madness_ppl.prior import GalaxyPrior

    priors = {name: GalaxyPrior.load(name) for name in args.priors}
    labels = {name: f"{Path(name).name} (v{p.config.version})" for name, p in priors.items()}
    results = {}
    for s, name in enumerate(args.sets):
        for p, population in enumerate(args.populations):
            fields = make_fields(
                name, population, args.fields, args.field_size, args.seed + 10 * s + p
            )
            key = f"{name} / {population}"
            results[key] = {label: run_prior(priors[n], fields) for n, label in labels.items()}
            print(
                key,
                {
                    lab: width68([e for r in recs for e in r["error"]])
                    for lab, recs in results[key].items()
                },
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
            lines.append(
                f"| {key} | {label} | {given}/{len(recs)} fields | {n} | {w:.3f} [{lo:.3f}, "
                f"{hi:.3f}] | {wb:.3f} [{lob:.3f}, {hib:.3f}] | {ratio} | {cpu:.2f} |"
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines += [
        "",
        f"Command: `python benchmarks/psf.py --priors {' '.join(args.priors)} --fields "
        f"{args.fields} --field-size {args.field_size}`; code {commit}. The in-distribution "
        "population is the one the priors were trained on (other seeds); the PSFs are drawn "
        "by galsim directly. 'PSF given': fields where the prior could take the true PSF.",
    ]
    payload = {"args": vars(args), "commit": commit, "results": results}
    write_results("psf", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
