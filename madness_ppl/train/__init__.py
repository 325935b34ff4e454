"""Training of galaxy priors: VAE -> flow on its latents -> deblending encoder.

See :func:`madness_ppl.train.pipeline.train_prior` and ``madness-ppl train``.
"""

from madness_ppl.train.pipeline import TrainConfig, load_blend_cutouts, train_prior
from madness_ppl.train.stages import StageConfig, train_deblender, train_flow, train_vae, vae_loss

__all__ = [
    "StageConfig",
    "TrainConfig",
    "load_blend_cutouts",
    "train_deblender",
    "train_flow",
    "train_prior",
    "train_vae",
    "vae_loss",
]
