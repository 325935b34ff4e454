"""Inference on scene models: MAP by SVI + AutoDelta (:func:`fit_map`)."""

from madness_ppl.infer.map import MAPResult, default_lbfgs, default_optimizer, fit_map

__all__ = ["MAPResult", "default_lbfgs", "default_optimizer", "fit_map"]
