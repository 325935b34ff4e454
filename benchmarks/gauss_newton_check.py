"""How well the refinement's Gauss-Newton model predicts the loss (issue #31 diagnosis).

Run: ``python -m benchmarks gauss_newton_check [--seeds 3 4 5 6 7 8]``. Writes
``results/gauss_newton_check.{json,md}``.

On tight 6-source LSST fields (80 x 80 pixels, ``benchmarks/tight.py``'s set, shipped prior, true
positions), ``deblend`` is run and the latents that enter the Newton refinement (the L-BFGS end
point) are captured. There, the refinement's first step
:math:`\\delta = -\\tilde H^{-1} g` (Gauss-Newton matrix :math:`J^\\top W J` plus the flow's
Hessian, eigenvalues raised to 1) is taken at fractions 1, 0.5 and 0.1, and each term of the loss
is compared with its quadratic prediction:

* data term :math:`\\tfrac12 \\sum w r^2`: predicted :math:`g_d^\\top s + \\tfrac12 s^\\top J^\\top W J s`;
* prior term :math:`-\\sum_i \\log p(z_i)`: predicted :math:`g_p^\\top s + \\tfrac12 s^\\top \\nabla^2 s`.

A control: random unit directions of length 1e-4 and 1e-3 against the linear prediction of the
data term (the evaluation noise floor, float32 decoder).
"""

from __future__ import annotations

import argparse
import warnings

import jax.numpy as jnp
import numpy as np

import madness_ppl.deblend as deblend_module
import madness_ppl.results as results_module
from benchmarks._common import write_results
from madness_ppl.cutouts import extract_cutouts, nearest_pixel, paste_stamps
from madness_ppl.likelihood import inverse_variance
from madness_ppl.prior import GalaxyPrior
from madness_ppl.refine import _evaluate
from madness_ppl.scene import bucket_size
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey
from madness_ppl.uncertainty import gauss_newton_precision, linearise

FRACTIONS = (1.0, 0.5, 0.1)


def refinement_input(prior: GalaxyPrior, seed: int) -> dict:
    """``deblend`` on the field of ``seed``; the arguments its Newton refinement received."""
    captured: dict = {}
    original = results_module.newton_refine

    def capture(prior, z, positions, field, variance, **options):
        captured.update(z=np.asarray(z), positions=positions, field=field, variance=variance)
        captured.update(options)
        return original(prior, z, positions, field, variance, **options)

    config = BlendConfig(field_size=80, n_galaxies=(6, 6), margin=20)
    blend = make_blend(Survey.lsst(), config=config, rng=np.random.default_rng(seed))
    results_module.newton_refine = capture
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deblend_module.deblend(blend.field, blend.variance, blend.positions, prior=prior)
    finally:
        results_module.newton_refine = original
    return captured


def check_field(prior: GalaxyPrior, seed: int) -> dict:
    c = refinement_input(prior, seed)
    z = c["z"].astype(np.float64)
    n, d = z.shape
    psf = c["psf"]
    field = np.asarray(c["field"], np.float64)
    mask = np.isfinite(field) & np.broadcast_to(c["pixel_mask"], field.shape)
    weight = inverse_variance(np.asarray(c["variance"], np.float64), mask)
    data = np.where(mask, field, 0.0)
    centres = nearest_pixel(c["positions"])
    plate = bucket_size(n)

    def padded(latents: np.ndarray) -> jnp.ndarray:
        return jnp.asarray(np.concatenate([latents, np.zeros((plate - n, d))]), jnp.float32)

    def terms(latents: np.ndarray) -> tuple[float, float, np.ndarray]:
        outputs = _evaluate(prior, padded(latents), psf, None)
        _, observed, neg_logp = (np.asarray(a[:n], np.float64) for a in outputs)
        residual = paste_stamps(observed, centres, field.shape) - data
        return 0.5 * float(np.sum(weight * residual**2)), float(neg_logp.sum()), residual

    data0, prior0, residual = terms(z)
    outputs = linearise(prior, padded(z), psf)
    _, _, jac, hess, grad_prior = (np.asarray(a[:n], np.float64) for a in outputs)
    size = jac.shape[-1]
    weights = extract_cutouts(weight, centres, size, dtype=np.float64)
    weighted = extract_cutouts(weight * residual, centres, size, dtype=np.float64)
    grad_data = np.einsum("ndbyx,nbyx->nd", jac, weighted).ravel()
    precision = gauss_newton_precision(jac, hess, weights, centres)
    prior_block = np.zeros_like(precision)
    for i in range(n):
        prior_block[i * d : (i + 1) * d, i * d : (i + 1) * d] = hess[i]
    values, vectors = np.linalg.eigh(precision)
    gradient = grad_data + grad_prior.ravel()
    step = -(vectors @ ((vectors.T @ gradient) / np.maximum(values, 1.0)))
    rows = []
    for fraction in FRACTIONS:
        s = fraction * step
        data1, prior1, _ = terms(z + s.reshape(n, d))
        rows.append(
            {
                "fraction": fraction,
                "max_abs_step": float(np.abs(s).max()),
                "data_actual": data1 - data0,
                "data_predicted": float(grad_data @ s + 0.5 * s @ (precision - prior_block) @ s),
                "prior_actual": prior1 - prior0,
                "prior_predicted": float(grad_prior.ravel() @ s + 0.5 * s @ prior_block @ s),
            }
        )
    rng = np.random.default_rng(seed)
    floor = {}
    for length in (1e-4, 1e-3):
        errors = []
        for _ in range(6):
            u = rng.normal(size=n * d)
            u *= length / np.linalg.norm(u)
            data1, _, _ = terms(z + u.reshape(n, d))
            errors.append(abs((data1 - data0) - float(grad_data @ u)))
        floor[str(length)] = float(np.max(errors))
    return {
        "seed": seed,
        "sources": n,
        "eigenvalues": [float(values.min()), float(values.max())],
        "steps": rows,
        "linear_error_max": floor,
    }


def table(fields: list[dict]) -> str:
    lines = [
        "The refinement's first Gauss-Newton step at the L-BFGS end point of tight 6-source LSST "
        "fields (shipped prior, true positions): actual vs quadratic-model change of each loss "
        "term, nats.",
        "",
        "| seed | GN eigenvalues (min, max) | step fraction | max abs(step) (latent units) "
        "| data term actual | data term predicted | prior term actual | prior term predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fields:
        for r in f["steps"]:
            lines.append(
                f"| {f['seed']} | {f['eigenvalues'][0]:.3g}, {f['eigenvalues'][1]:.3g} "
                f"| {r['fraction']} | {r['max_abs_step']:.3f} | {r['data_actual']:+.3f} "
                f"| {r['data_predicted']:+.3f} | {r['prior_actual']:+.3f} "
                f"| {r['prior_predicted']:+.3f} |"
            )
    worst = {k: max(f["linear_error_max"][k] for f in fields) for k in ("0.0001", "0.001")}
    lines += [
        "",
        "Control: the data term's change along random directions of length 1e-4 / 1e-3 departs "
        f"from its linear prediction by at most {worst['0.0001']:.1e} / {worst['0.001']:.1e} nats "
        "(the evaluation is not noise-limited at these scales).",
    ]
    return "\n".join(lines)


#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--seeds", "3"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    args = parser.parse_args(argv)
    prior = GalaxyPrior.load("lsst")
    fields = [check_field(prior, seed) for seed in args.seeds]
    write_results("gauss_newton_check", {"fields": fields}, table(fields))
    print(table(fields))


if __name__ == "__main__":
    main()
