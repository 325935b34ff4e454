"""Inference on scene models: MAP by SVI + AutoDelta (:func:`fit_map`), posterior samples by
NUTS (:func:`sample_posterior`), the Laplace approximation of any model
(:func:`laplace_approximation`) and their summaries (diagnostics, flux tables, pixel maps)."""

from madness_ppl.infer.backends import NUTSSettings
from madness_ppl.infer.gradient import callback_potential
from madness_ppl.infer.hmc import DEFAULT_KEEP, sample_posterior
from madness_ppl.infer.laplace import LaplaceApproximation, laplace_approximation
from madness_ppl.infer.map import MAPResult, default_lbfgs, default_optimizer, fit_map
from madness_ppl.infer.summary import (
    Diagnostics,
    PixelMoments,
    flux_table,
    pixel_std_maps,
    summarize_diagnostics,
)

__all__ = [
    "DEFAULT_KEEP",
    "Diagnostics",
    "LaplaceApproximation",
    "MAPResult",
    "NUTSSettings",
    "PixelMoments",
    "callback_potential",
    "default_lbfgs",
    "default_optimizer",
    "fit_map",
    "flux_table",
    "laplace_approximation",
    "pixel_std_maps",
    "sample_posterior",
    "summarize_diagnostics",
]
