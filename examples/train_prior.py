"""
# Train a prior for another survey

The shipped prior knows LSST: its bands, pixel scale, PSFs and depth. For another survey you
train your own, from simulations of that survey. This tutorial trains a prior for the HSC-SSP
wide survey (grizy, 0.168"/pixel) end to end, *tiny on purpose* (a few hundred stamps, one
epoch per stage, so it runs in a couple of minutes on a laptop CPU), then loads it and
deblends an HSC field with it. The settings for a real prior are at the end.

The command-line equivalent is `madness-ppl simulate ...` for the four datasets and
`madness-ppl train ...` (see [Command line](../../cli.md)).
"""

# %%
# ## The survey
#
# [`Survey`][madness_ppl.survey.Survey] holds what the simulator needs: bands, zeropoints, sky
# brightness, exposure, PSFs. `Survey.named("hsc")` builds HSC from the surveycodex numbers;
# any survey known to surveycodex works the same way.

import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from madness_ppl.deblend import deblend
from madness_ppl.plot import plot_panels
from madness_ppl.prior import GalaxyPrior
from madness_ppl.simulate import BlendConfig, make_blend, simulate_dataset
from madness_ppl.survey import Survey
from madness_ppl.train import StageConfig, TrainConfig, train_prior

survey = Survey.named("hsc")
print("bands", survey.band_names, f'pixel scale {survey.pixel_scale}"')
print("sky noise per pixel (electrons):", np.round(survey.sky_sigma, 1))

# %%
# ## Training data
#
# Training needs four datasets, each written as shards by
# [`simulate_dataset`][madness_ppl.simulate.dataset.simulate_dataset]:
#
# * isolated galaxies, noisy and noiseless, for stages 1 and 2 (training and held-out sets);
# * small blends of 1-3 galaxies with one galaxy at the centre of a stamp-sized field, for
#   stage 3 (training and held-out sets).

work = Path(tempfile.mkdtemp(prefix="hsc-prior-"))
start = time.perf_counter()
common = {"survey": "hsc", "progress": False}
simulate_dataset(work / "iso_train", kind="isolated", n=384, seed=1, **common)
simulate_dataset(work / "iso_val", kind="isolated", n=96, seed=2, **common)
central = BlendConfig(field_size=45, n_galaxies=(1, 3), max_shift=2.0, central_galaxy=True)
simulate_dataset(
    work / "blends_train", kind="blends", n=192, blend_config=central, seed=3, **common
)
simulate_dataset(work / "blends_val", kind="blends", n=64, blend_config=central, seed=4, **common)
print(f"simulated 736 stamps in {time.perf_counter() - start:.1f} s")

# %%
# ## The three stages
#
# [`train_prior`][madness_ppl.train.pipeline.train_prior] runs, in order:
#
# 1. **VAE.** An encoder \(q_\phi(z \mid x)\) and a decoder \(f_\theta(z)\) are trained on noisy
#    isolated stamps to reproduce the galaxy, with the MADNESS noise-weighted loss
#    \(\tfrac12 \sum (y - f_\theta(z))^2 / (\sigma^2_b + \max(y, 0)) + \beta\,
#    \mathrm{KL}(q_\phi \,\|\, \mathcal{N}(0, I))\).
# 2. **Flow.** With the VAE frozen, a RealNVP flow \(p_\psi(z)\) is fitted by maximum likelihood
#    to the latents of the training galaxies: this is the prior density used by the fit.
# 3. **Deblending encoder.** A copy of the encoder learns to map a *blended* cutout to the
#    latent of its central galaxy alone; it initialises every fit.
#
# Then it evaluates the prior on the held-out sets and writes the weights, a model card and
# validation figures. Every stage checkpoints each epoch, so `resume=True` continues an
# interrupted run. [`TrainConfig`][madness_ppl.train.pipeline.TrainConfig] sets the sizes and
# [`StageConfig`][madness_ppl.train.stages.StageConfig] each stage's optimisation; here one
# epoch each and a small flow.

config = TrainConfig(
    preset="lean",
    latent_dim=16,
    flow_layers=4,
    flow_hidden=(32, 32),
    vae=StageConfig(epochs=1, batch_size=32, learning_rate=1e-3, beta=0.1),
    flow=StageConfig(epochs=3, batch_size=128, learning_rate=1e-3),
    deblender=StageConfig(epochs=1, batch_size=32, learning_rate=3e-4),
)
start = time.perf_counter()
prior, report = train_prior(
    work / "iso_train",
    work / "iso_val",
    work / "blends_train",
    work / "blends_val",
    work / "hsc-prior",
    config=config,
    progress=False,
)
print(f"trained in {time.perf_counter() - start:.1f} s")
print(prior)

# %%
# ## The model card
#
# The prior directory holds `weights.safetensors`, `config.json` (architecture, bands, survey,
# normalisation and the validation metrics) and `README.md`, a model card: the data it saw,
# the settings, the time and machine, and held-out metrics (flux error of the VAE
# reconstructions, \(\chi^2\) per pixel, the flow's held-out negative log-likelihood, how
# decoded flow samples compare with the simulation, how well the deblending encoder predicts
# the central galaxy). After one epoch these numbers are poor, as they should be.

print(sorted(p.name for p in (work / "hsc-prior").iterdir()))
print((work / "hsc-prior" / "README.md").read_text())

# %%
# The validation figures: held-out stamps with their VAE reconstructions and residuals, and
# galaxies decoded from samples of the flow prior. A well-trained prior gives residuals close to
# noise and samples that look like the simulated galaxies; this one is blurry.

for name in ("reconstructions.png", "samples.png"):
    fig, ax = plt.subplots(figsize=(12, 6.3))
    ax.imshow(plt.imread(work / "hsc-prior.work" / name))
    ax.set_axis_off()
    fig.tight_layout()

# %%
# ## Use it
#
# A saved prior loads from its directory with
# [`GalaxyPrior.load`][madness_ppl.prior.GalaxyPrior.load] and plugs into everything that takes
# a prior: `deblend`, `blend_model`, your own scene models. Here it deblends a simulated HSC
# field (with this under-trained prior, the fit is rough).

hsc_prior = GalaxyPrior.load(work / "hsc-prior")
blend = make_blend(
    survey,
    rng=np.random.default_rng(2),
    config=BlendConfig(field_size=81, n_galaxies=(4, 4), margin=8),
)
result = deblend(blend.field, prior=hsc_prior)
print(f"{len(result.positions)} sources, reduced chi2 {float(result.fit.reduced_chi2):.2f}")
fig = plot_panels(
    {"data": blend.field, "model": result.model_image, "residual": result.residual},
    result.bands,
    noise=survey.sky_sigma,
    positions=result.positions,
)

# %%
# ## A real prior: one command
#
# The shipped priors were trained the same way on tens of thousands of simulated stamps, by one
# command that simulates the four datasets (isolated stamps and central-galaxy blends at the
# model-frame PSF) and trains a PSF-aware prior on them; rerun it after an interruption and it
# resumes. The shipped HSC prior ([Shipped HSC prior](../../hsc-prior.md)) is
#
# ```bash
# madness-ppl train-survey hsc --out hsc-prior --data-seed 200 --vae-epochs 10 --workers 2
# ```
#
# (and `madness-ppl train-survey lsst --data-seed 100 ...` the LSST one's datasets). Its model
# card records the equivalent `madness-ppl simulate` / `madness-ppl train` commands, settings,
# training time and held-out metrics. On a 2-core CPU the lean networks train at about 170
# stamps per second (an hour for 10 VAE epochs over 56 000 stamps); a GPU makes the reference
# sizes (`--preset reference`) practical.

shutil.rmtree(work)
