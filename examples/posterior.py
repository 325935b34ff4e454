"""
# Posterior uncertainties with HMC

[`deblend`][madness_ppl.deblend.deblend] returns one answer, the maximum a posteriori (MAP)
fit, with flux errors from a Laplace approximation around it. This tutorial draws the whole
posterior of the same blend with NUTS (Hamiltonian Monte Carlo), started at the MAP, and reads
from it what the MAP cannot give: credible intervals of fluxes and colours, and how uncertain
each pixel of each deblended galaxy is. It uses the shipped LSST prior on a galsim blend, so the
truth is known. Run it with `python examples/posterior.py` (about two minutes on a laptop CPU; the
sampler costs about 20 ms per gradient with the shipped decoder on 2 CPU cores).

(The exact check of the sampler against a closed-form posterior, with a linear decoder and a
Gaussian prior, is in [Using NumPyro's tools](numpyro_tools.md).)
"""

# %%
# ## A tight blend and its MAP
#
# Three LSST galaxies in a 10" x 10" field at 10-year depth, close enough to overlap. The
# blendedness (0 isolated, towards 1 when neighbours outshine a galaxy on its own footprint)
# says how much. We pass the true positions, so that the comparison below is about fluxes,
# not detection.

import time

import arviz as az
import matplotlib.pyplot as plt
import numpy as np

from madness_ppl import measure
from madness_ppl.deblend import deblend, fitted_scene
from madness_ppl.infer import flux_table, pixel_std_maps, sample_posterior, summarize_diagnostics
from madness_ppl.plot import plot_panels
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey
from madness_ppl.uncertainty import laplace_flux_errors, systematic_flux_errors

start = time.perf_counter()
survey = Survey.lsst()
prior = GalaxyPrior.load("lsst")
config = BlendConfig(field_size=51, n_galaxies=(3, 3), margin=14, max_shift=None)
blend = make_blend(survey, rng=np.random.default_rng(7), config=config)
n = len(blend.positions)
bands = prior.bands
r = bands.index("r")
blendedness = measure.blendedness(blend.isolated, blend.positions, blend.field.shape[-2:])
true_flux = blend.isolated.sum(axis=(-1, -2))  # (n, bands), electrons
for i in range(n):
    x, y = blend.positions[i]
    print(
        f"galaxy {i}: (x, y) = ({x:5.1f}, {y:5.1f}) px, r flux {true_flux[i, r]:8.0f} e-, "
        f"blendedness {blendedness[i]:.2f}"
    )

result = deblend(blend.field, blend.variance, blend.positions, prior=prior)
print(
    f"MAP: {int(result.fit.n_steps)} steps, converged={bool(result.fit.converged)}, "
    f"reduced chi2 = {float(result.fit.reduced_chi2):.3f}"
)
fig = plot_panels(
    {"data": blend.field, "MAP model": result.model_image, "residual": result.residual},
    bands,
    noise=survey.sky_sigma,
    positions=blend.positions,
)

# %%
# ## NUTS from the MAP
#
# [`blend_model`][madness_ppl.scene.blend_model] is the NumPyro model that `deblend` fitted.
# [`fitted_scene`][madness_ppl.results.fitted_scene] returns its arguments as `deblend` used
# them, with the MAP as the starting point: the data, the PSF kernels (the prior draws galaxies
# at its own model-frame PSF; the fit observed them through the kernels to this field's PSF,
# here the LSST default) and the prior's calibrated model-error fraction \(\epsilon\), which
# adds \((\epsilon m)^2\) to each pixel's variance, as the catalog's errors do.
#
# NUTS mixes fastest when its mass matrix matches the posterior covariance, and the Laplace
# approximation at the MAP is exactly such an estimate: we pass its covariance as the inverse
# mass matrix and keep it (`adapt_mass_matrix=False`), so that a short warm-up, which then only
# tunes the step size, suffices. Two chains let R-hat compare them.

scene = fitted_scene(result, prior)
laplace = laplace_flux_errors(
    prior,
    scene.init["z"],
    blend.positions,
    blend.variance,
    psf=scene.kwargs["psf"],
    model_error=scene.kwargs["model_error"],
)
idata = sample_posterior(
    blend_model,
    *scene.args,
    **scene.kwargs,
    init=scene.init,
    inverse_mass_matrix=laplace.covariance,
    adapt_mass_matrix=False,
    num_warmup=50,
    num_samples=150,
    num_chains=2,
    coords={"band": list(bands)},
    diagnose=False,
)
diag = summarize_diagnostics(idata, var_names=["flux"])
steps = np.asarray(idata.sample_stats["n_steps"])
print(
    f"NUTS: {diag.num_chains} chains x {diag.num_draws} draws, fluxes: max R-hat "
    f"{diag.max_rhat:.3f}, min bulk ESS {diag.min_ess_bulk:.0f}; {diag.divergences} "
    f"divergences, {steps.mean():.1f} leapfrog steps per draw, "
    f"{idata.posterior.attrs['sampling_time']:.0f} s"
)

# %%
# The diagnostics hold the run to the usual thresholds (R-hat below 1.01, at least 100
# effective draws per chain, Vehtari et al. 2021) and say which flux falls short: this short
# run, sized for the docs, is close but not there. For numbers you publish, draw more
# (`num_samples=`), or let the sampler extend itself until the fluxes have mixed
# (`max_extensions=2, converge_on=("flux",)`).
#
# `idata` is an `arviz.InferenceData`: every arviz tool works on it. The trace of the r-band
# fluxes shows the two chains exploring the same region:

axes = az.plot_trace(idata, var_names=["flux"], coords={"band": ["r"]}, compact=True)
plt.gcf().tight_layout()

# %%
# ## Fluxes and colours with credible intervals
#
# The likelihood knows the pixel noise but not how far a trained decoder can be from a real
# galaxy; the prior ships calibrated systematic terms for that
# ([`systematic_flux_errors`][madness_ppl.error_budget.systematic_flux_errors], the same terms
# the catalog's `flux_<band>_err` contains). `flux_table` adds them in quadrature to the spread
# of the draws. Below, per galaxy: the truth, the NUTS posterior mean with its 68 % interval,
# and the catalog's MAP flux with its Laplace-based error.

stamps = result.sources  # the MAP models, as decoded and placed by deblend
systematic = systematic_flux_errors(
    prior,
    stamps,
    blend.positions,
    blend.field.shape,
    residual=result.residual,
    variance=result.variance,
)
table = flux_table(idata, bands, intervals=(0.68, 0.9), systematic=systematic)
catalog = result.catalog
print(
    " id  band      true    NUTS mean [68 % interval]        MAP +- catalog error   (truth - MAP)/err"
)
for i in range(n):
    for band in ("g", "r", "i"):
        b = bands.index(band)
        lo, hi = table[f"flux_{band}_lo68"][i], table[f"flux_{band}_hi68"][i]
        err = catalog[f"flux_{band}_err"][i]
        pull = (true_flux[i, b] - catalog[f"flux_{band}"][i]) / err
        print(
            f"{i:3d}  {band:4s} {true_flux[i, b]:9.0f}  {table[f'flux_{band}'][i]:9.0f} "
            f"[{lo:8.0f}, {hi:8.0f}]   {catalog[f'flux_{band}'][i]:9.0f} +- {err:6.0f}   {pull:+6.2f}"
        )

# %%
# How often do the intervals contain the truth? Over all bands of the three galaxies (a small
# sample: the benchmarks below measure it on thousands):

inside = []
for i in range(n):
    for b, band in enumerate(bands):
        inside.append(
            table[f"flux_{band}_lo68"][i] <= true_flux[i, b] <= table[f"flux_{band}_hi68"][i]
        )
print(f"{sum(inside)} of {len(inside)} true fluxes inside their 68 % posterior interval")

# %%
# Colours are ratios of fluxes of one galaxy, so their posterior is read directly from the
# draws (correlations between bands included). With the survey's zero points they are AB
# colours:

zeropoints = [b.zeropoint + 2.5 * np.log10(b.exposure_time) for b in survey.bands]
colours = flux_table(idata, bands, intervals=(0.9,), zeropoints=zeropoints, systematic=systematic)
g = bands.index("g")
true_gr = zeropoints[g] - zeropoints[r] - 2.5 * np.log10(true_flux[:, g] / true_flux[:, r])
for i in range(n):
    print(
        f"galaxy {i}: g-r = {colours['g-r'][i]:.3f} +- {colours['g-r_sd'][i]:.3f} mag "
        f"(90 %: [{colours['g-r_lo90'][i]:.3f}, {colours['g-r_hi90'][i]:.3f}]), "
        f"true {true_gr[i]:.3f}"
    )

# %%
# How do the two error estimates compare? The ratio of the NUTS posterior standard deviation
# of each flux (noise only, before the systematic terms) to the Laplace one says whether the
# Gaussian approximation at the MAP holds for this blend; ratios near 1 mean the cheap
# catalog errors can be trusted here.

draws = np.asarray(idata.posterior["flux"]).reshape(-1, n, len(bands))
ratio = draws.std(axis=0) / laplace.flux_err
with np.printoptions(precision=2, suppress=True):
    print("NUTS sd / Laplace sd, per galaxy (rows) and band", bands)
    print(ratio)

# %%
# ## Pixel by pixel: how well is each galaxy known?
#
# [`pixel_std_maps`][madness_ppl.infer.pixel_std_maps] decodes the draws in batches and keeps
# each pixel's running mean and standard deviation: the posterior mean image of every galaxy,
# and where its shape is uncertain (shown here on the central 25 x 25 pixels of the 45-pixel
# stamps, in the prior's model frame). The uncertainty sits in the cores, where a small change
# of size or shape moves the most light; compare the relative widths of the flux intervals
# above with each galaxy's blendedness in the first table.

maps = pixel_std_maps(idata, prior, batch_size=50)
centre = slice(prior.stamp_size // 2 - 12, prior.stamp_size // 2 + 13)
fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.2))
for i in range(n):
    image = axes[0, i].imshow(maps.mean[i, r, centre, centre], origin="lower", cmap="gray_r")
    axes[0, i].set_title(f"galaxy {i}: posterior mean (r)")
    fig.colorbar(image, ax=axes[0, i], shrink=0.8, label="e- / pixel")
    image = axes[1, i].imshow(maps.std[i, r, centre, centre], origin="lower", cmap="magma")
    axes[1, i].set_title(f"galaxy {i}: pixel sd (r)")
    fig.colorbar(image, ax=axes[1, i], shrink=0.8, label="e- / pixel")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
print(f"total time {time.perf_counter() - start:.0f} s")

# %%
# For many fields, NUTS on each is costly (tens of seconds per blend on a CPU); the catalog's
# Laplace errors with the calibrated systematic terms are what `deblend` reports by default,
# and [the benchmarks](../../benchmarks.md) measure how often their intervals contain the
# truth on blends in and out of the prior's training distribution.
