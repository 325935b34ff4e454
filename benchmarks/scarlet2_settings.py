"""scarlet2 at its best (issue #33): initial boxes x iterations, on the tight-blend fields.

Run: ``python -m benchmarks scarlet2_settings [--fields 20] [--max-iter 3000]``. Writes
``results/scarlet2_settings.{json,md}``; per-field records are kept in
``results/scarlet2_settings/<population>__<variant>.jsonl`` and resumed.

Fields: ``tight.py``'s set (80 x 80 pixels, 2-6 LSST galaxies within the central 40 pixels,
seeds ``[3100 + population index, k]``; in distribution and out of it), true positions, the
survey's PSF images (as ``tight.py`` gives scarlet2); scarlet2 run by
``madness_ppl/peers/scarlet2.py`` (the 0.5.1 notebook recipe: ``from_gaussian_moments``, falling
back to ``pixel_spectrum`` + ``compact_morphology`` where it fails; Adam with scarlet2's
relative steps). Variants of the initial boxes ``from_gaussian_moments`` chooses from:

* ``documented``: scarlet2's own list (multiples of ``measure.fwhm``, which returns ~0.56x the
  PSF width: first boxes of 11 pixels on LSST);
* ``correct_fwhm``: the same list from the PSF's true FWHM (first boxes ~20 pixels);
* ``true_size``: one box per source from its true extent, the side of the smallest centred
  square that holds 99 % of its noiseless r-band light (odd, at least 11 pixels): an oracle no
  user has, the most boxes can give.

Each variant runs ``--max-iter`` steps with ``e_rel = 0`` and records every source's flux at the
``--checkpoints``: exactly what ``max_iter = checkpoint`` returns (Adam's path does not depend
on ``max_iter``; ``tests/test_peer_scarlet2.py`` checks it), so one run gives the sweep. The
step where the documented ``e_rel = 1e-4`` would have stopped is read from the run's
largest-relative-change trace. Reported per population, variant and checkpoint: the r-flux
error ``abs68(F / F_true - 1)`` (``F_true``: the galaxy's noiseless flux as drawn, as in
``tight.py``) with a 95 % field-bootstrap interval, the share of sources that fell back to the
compact initialisation, the share of fields ``e_rel = 1e-4`` would have stopped by then, and
CPU seconds per galaxy to get there (process time from the call's start: observation, initial
boxes, scarlet2's compilation, which it repeats for every scene, and the steps; the per-step
callback adds a little). madness_ppl's row is read from ``tight.py``'s records of the same fields
when they exist (its default ``deblend``, CPU after a warm-up compile per source count).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks._common import RESULTS, records_by, write_results
from benchmarks.fields import POPULATIONS
from benchmarks.tight import make_fields
from madness_ppl.stats import abs68, field_bootstrap

VARIANTS = ("documented", "correct_fwhm", "true_size")
RECORDS = RESULTS / "scarlet2_settings"
E_REL = 1e-4


def true_box(isolated_r: np.ndarray, fraction: float = 0.99, smallest: int = 11) -> int:
    """Side of the smallest centred odd square holding ``fraction`` of a stamp's light."""
    size = isolated_r.shape[-1]
    centre = size // 2
    total = isolated_r.sum()
    for half in range(smallest // 2, centre + 1):
        box = isolated_r[centre - half : centre + half + 1, centre - half : centre + half + 1]
        if box.sum() >= fraction * total:
            return 2 * half + 1
    return size


def fit_field(blend, variant: str, max_iter: int, checkpoints: list[int], psfs, bands) -> dict:
    """One field's record: flux errors at each checkpoint, fallbacks, stop step, CPU."""
    from madness_ppl.peers.scarlet2 import run_scarlet2

    r = bands.index("r")
    boxes = None
    if variant == "true_size":
        boxes = [[true_box(stamp[r])] for stamp in blend.isolated]
    start = time.process_time()
    out = run_scarlet2(
        blend.field,
        blend.variance,
        blend.positions,
        psfs,
        bands,
        max_iter=max_iter,
        e_rel=0.0,
        correct_fwhm=variant == "correct_fwhm",
        box_sizes=boxes,
        checkpoints=checkpoints,
    )
    truth = blend.isolated[:, r].sum(axis=(-1, -2))
    below = np.flatnonzero(np.asarray(out["max_change_trace"]) < E_REL)
    return {
        "n": len(blend.positions),
        "n_fallback_init": int(out["n_fallback_init"]),
        "stop_step_e_rel": int(below[0]) + 1 if below.size else None,
        "cpu_at": {str(k): v - start for k, v in out["cpu_at"].items()},
        "error_at": {
            str(k): (np.asarray(f)[:, r] / truth - 1).tolist() for k, f in out["fluxes_at"].items()
        },
        "loss_every_10": out["loss_trace"][::10],
        "boxes": [b[0] for b in boxes] if boxes else None,
    }


def run(population: str, variant: str, args, bands, psfs) -> list[dict]:
    """Records of ``variant`` on ``population``'s fields, resumed from the records file."""
    seed = args.seed + POPULATIONS.index(population)
    path = RECORDS / f"{population}__{variant}.jsonl"
    settings = {"seed": seed, "max_iter": args.max_iter, "checkpoints": args.checkpoints}
    done = {
        k: rec
        for k, rec in records_by(path, "field").items()
        if rec["settings"] == settings and k < args.fields
    }
    fields = None
    for k in range(args.fields):
        if k in done:
            continue
        fields = fields or make_fields(population, args.fields, seed)
        if k >= len(fields):
            break
        record = fit_field(fields[k], variant, args.max_iter, args.checkpoints, psfs, bands)
        record = {"field": k, "settings": settings, **record}
        RECORDS.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one line per field; a torn last line is skipped on load
            f.write(json.dumps(record) + "\n")
        done[k] = record
        print(f"{population} {variant} field {k}: {record['n']} galaxies", flush=True)
    return [done[k] for k in sorted(done)]


def madness_records(population: str, n_fields: int, seed: int) -> list[dict] | None:
    """``tight.py``'s default-``deblend`` records of the same fields, if it has them."""
    from benchmarks.tight import DEFAULT_REFINE, DEFAULT_TOL_FACTOR, record_name

    path = (
        RESULTS / "tight" / f"{population}__{record_name(DEFAULT_REFINE, DEFAULT_TOL_FACTOR)}.json"
    )
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored["settings"]["seed"] != seed or len(stored["records"]) < n_fields:
        return None
    return stored["records"][:n_fields]


def summarise(records: list[dict], step: int) -> dict:
    """The table cells of one variant at one checkpoint."""
    reached = [r for r in records if str(step) in r["error_at"]]

    def width(recs):
        return abs68(np.concatenate([r["error_at"][str(step)] for r in recs]))

    value, low, high = field_bootstrap(reached, width)
    galaxies = sum(r["n"] for r in reached)
    stopped = [r["stop_step_e_rel"] is not None and r["stop_step_e_rel"] <= step for r in reached]
    return {
        "fields": len(reached),
        "galaxies": galaxies,
        "r_abs68": [value, low, high],
        "fallback_share": sum(r["n_fallback_init"] for r in reached) / max(galaxies, 1),
        "stopped_by_e_rel_share": float(np.mean(stopped)) if stopped else float("nan"),
        "cpu_per_galaxy": sum(r["cpu_at"][str(step)] for r in reached) / max(galaxies, 1),
        "warm_cpu_per_galaxy": sum(_warm_seconds(r, step) for r in reached) / max(galaxies, 1),
    }


def _warm_seconds(record: dict, step: int) -> float:
    """CPU seconds of ``step`` Adam steps alone (no initialisation, no compilation): the rate
    between the first and last checkpoints, times ``step``."""
    marks = sorted(int(k) for k in record["cpu_at"])
    if len(marks) < 2:
        return float("nan")
    first, last = marks[0], marks[-1]
    rate = (record["cpu_at"][str(last)] - record["cpu_at"][str(first)]) / (last - first)
    return rate * step


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = [
    "--fields",
    "1",
    "--populations",
    "in-distribution",
    "--variants",
    "correct_fwhm",
    "--max-iter",
    "20",
    "--checkpoints",
    "10",
    "20",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=20)
    parser.add_argument("--populations", nargs="+", default=list(POPULATIONS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=3100, help="tight.py's seed")
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[100, 300, 1000, 3000])
    args = parser.parse_args(argv)
    args.checkpoints = sorted(c for c in set(args.checkpoints) if c <= args.max_iter)

    try:
        import scarlet2
    except ImportError as error:
        raise SystemExit(
            "scarlet2_settings runs scarlet2: install it with pip install -e '.[bench]'"
        ) from error

    from madness_ppl.survey import Survey

    survey = Survey.lsst()
    bands = list(survey.band_names)
    psfs = survey.psf_images(41)
    results: dict = {}
    lines = [
        "| population | method | checkpoint (steps) | fields / galaxies | r-flux 68 % error "
        "[95 %] | fell back to compact init | fields e_rel=1e-4 stopped by then | CPU s / "
        "galaxy, cold | CPU s / galaxy, warm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for population in args.populations:
        results[population] = {}
        for variant in args.variants:
            records = run(population, variant, args, bands, psfs)
            results[population][variant] = {
                str(step): summarise(records, step) for step in args.checkpoints
            }
            for step, s in results[population][variant].items():
                v, lo, hi = s["r_abs68"]
                lines.append(
                    f"| {population} | scarlet2 {scarlet2.__version__}, {variant} | {step} | "
                    f"{s['fields']} / {s['galaxies']} | {v:.3f} [{lo:.3f}, {hi:.3f}] | "
                    f"{s['fallback_share']:.2f} | {s['stopped_by_e_rel_share']:.2f} | "
                    f"{s['cpu_per_galaxy']:.2f} | {s['warm_cpu_per_galaxy']:.2f} |"
                )
        seed = args.seed + POPULATIONS.index(population)
        madness = madness_records(population, args.fields, seed)
        if madness:
            errors = [{"e": r["error"]} for r in madness]
            v, lo, hi = field_bootstrap(
                errors, lambda rs: abs68(np.concatenate([r["e"] for r in rs]))
            )
            galaxies = sum(r["n"] for r in madness)
            cpu = sum(r["cpu_s"] for r in madness) / galaxies
            steps = int(np.median([r["steps"] for r in madness]))
            results[population]["madness_ppl"] = {"r_abs68": [v, lo, hi], "cpu_per_galaxy": cpu}
            lines.append(
                f"| {population} | madness_ppl `deblend` defaults (tight.py records) | "
                f"{steps} (median L-BFGS) | {len(madness)} / {galaxies} | "
                f"{v:.3f} [{lo:.3f}, {hi:.3f}] | - | - | see compile_time.md | {cpu:.2f} |"
            )
    note = (
        f"\nCommand: `python -m benchmarks scarlet2_settings --fields {args.fields} --max-iter "
        f"{args.max_iter}`; scarlet2 {scarlet2.__version__}, recipe of "
        "`madness_ppl/peers/scarlet2.py` (spectrum step 0.05, morphology step 1e-3, relative "
        "steps, positivity / unit-interval constraints, centres fixed at the truth). "
        "Checkpoints are one run's fluxes after that many Adam steps (= `max_iter` of that "
        "value). CPU 'cold': from the call's start (observation, initial boxes, compilation, "
        "which scarlet2 pays for every scene, and the steps); 'warm': the steps alone, at the "
        "rate between the first and last checkpoints. madness_ppl's warm CPU is tight.md's "
        "(after one warm-up fit per source count); its cold start is in compile_time.md. Fields, truth and error statistic as in tight.md."
    )
    write_results(
        "scarlet2_settings",
        {"args": vars(args), "scarlet2": scarlet2.__version__, "results": results},
        "\n".join(lines) + "\n" + note,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
