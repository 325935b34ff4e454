"""
# Using NumPyro's tools with madness_ppl

[`blend_model`][madness_ppl.scene.blend_model] is a plain NumPyro model, so NumPyro's own
tools work on it unchanged. This page runs each on one small blend whose posterior is known in
closed form (the toy linear-Gaussian prior stands in for a trained
[`GalaxyPrior`][madness_ppl.prior.GalaxyPrior]; every call below takes it the same way):

* `Predictive` with `field=None`: prior- and posterior-predictive noisy images;
* `handlers.condition` / `handlers.substitute`: simulate a field from chosen latents, evaluate
  the model at a fit;
* autoguides with NumPyro's `SVI` for a variational posterior, compared with NUTS and the exact
  answer;
* NumPyro's own `MCMC(NUTS(...))` with the Laplace covariance
  ([`laplace_approximation`][madness_ppl.infer.laplace_approximation]) as its mass matrix.

Run it with `python examples/numpyro_tools.py` (about a minute on a laptop CPU, most of it
compilation).
"""

# %%
# ## A blend, and fields drawn from the model
#
# Three overlapping galaxies in three bands. With `field=None` the observed site `"obs"` is
# drawn rather than conditioned on (NumPyro's `obs=None` convention), so `Predictive` turns the
# model into a simulator: here, prior-predictive fields, each with its own galaxies and noise.

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

from madness_ppl.infer import fit_map, laplace_approximation
from madness_ppl.plot import asinh_rgb
from madness_ppl.scene import blend_model
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

start = time.perf_counter()
BANDS = ("i", "r", "g")
prior = LinearGaussianPrior.random(
    jax.random.key(0), n_bands=3, stamp_size=15, latent_dim=4, flux=4e3, size=2.0
)
positions = jnp.array([[14.0, 15.0], [19.0, 17.0], [16.0, 21.0]])
variance = jnp.full((3, 32, 32), 25.0)  # sky-dominated noise, sigma = 5 electrons

prior_draws = Predictive(blend_model, num_samples=4)(
    jax.random.key(1), None, positions, variance, prior
)
print("prior-predictive fields:", prior_draws["obs"].shape, "latents:", prior_draws["z"].shape)
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, image in zip(axes, np.asarray(prior_draws["obs"]), strict=True):
    ax.imshow(asinh_rgb(image, BANDS, noise=np.full(3, 5.0)), origin="lower")
    ax.set_axis_off()
fig.suptitle("Prior-predictive fields: Predictive(blend_model)(key, None, ...)")
plt.show()

# %%
# ## Simulate "the" field with chosen latents: `condition`
#
# `handlers.condition` fixes the latents; tracing the conditioned model with `field=None` draws
# the noise. Build such a wrapper once and reuse it: each new wrapper is a new function object,
# so `fit_map` and `sample_posterior` (which compile per model) would compile again for it.

z_true = jax.random.normal(jax.random.key(2), (3, 4))
truth_model = handlers.condition(blend_model, {"z": z_true})
trace = handlers.trace(handlers.seed(truth_model, jax.random.key(3))).get_trace(
    None, positions, variance, prior
)
field = trace["obs"]["value"]
noise = np.asarray(field - trace["model_image"]["value"])
print(f"simulated field: noise sd {noise.std():.2f} (stated 5.00)")

# %%
# ## The MAP, and the model evaluated at it: `substitute`
#
# [`fit_map`][madness_ppl.infer.fit_map] returns constrained values by site name, which is what
# `handlers.substitute` takes: the substituted model's trace holds every deterministic site at
# the fit.

args = (field, positions, variance, prior)
fit = fit_map(blend_model, *args)
at_fit = handlers.trace(handlers.substitute(blend_model, fit.params)).get_trace(*args)
residual = np.asarray(field - at_fit["model_image"]["value"])
print(
    f"MAP: {int(fit.n_steps)} L-BFGS steps, converged={bool(fit.converged)}, "
    f"reduced chi2 {float(fit.reduced_chi2):.3f}; residual sd {residual.std():.2f}"
)

# %%
# ## Four posteriors of the same latents
#
# The model is linear in the latents with Gaussian prior and noise, so the posterior is exactly
# Gaussian ([`linear_gaussian_posterior`][madness_ppl.toy.linear_gaussian_posterior]). Against
# it, the standard deviations of the 12 latents from:
#
# * the Laplace approximation at the MAP (exact here: the Hessian of a quadratic);
# * NumPyro's `AutoNormal` (a diagonal Gaussian: it cannot represent the correlation between
#   overlapping galaxies, and minimising KL(q || p) then *under*-states their spread) and
#   `AutoLowRankMultivariateNormal` with plain `numpyro.infer.SVI` (3000 Adam steps, one
#   particle: its sds carry that optimisation's noise too);
# * NumPyro's `MCMC(NUTS(...))` with the Laplace covariance as a fixed dense inverse mass
#   matrix: NUTS then samples an almost white space and needs only a short warm-up.

exact = linear_gaussian_posterior(*args)
exact_sd = np.sqrt(np.diag(np.asarray(exact.covariance)))
laplace = laplace_approximation(blend_model, *args, params=fit.params)


def svi_sd(guide_class, steps=3000, **options):
    guide = guide_class(blend_model, **options)
    svi = SVI(blend_model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.key(4), steps, *args, progress_bar=False)
    draws = guide.sample_posterior(jax.random.key(5), result.params, sample_shape=(4000,))
    return np.asarray(draws["z"]).reshape(4000, -1).std(axis=0)


kernel = NUTS(
    blend_model,
    inverse_mass_matrix=jnp.asarray(laplace.covariance),
    dense_mass=True,
    adapt_mass_matrix=False,
)
mcmc = MCMC(kernel, num_warmup=200, num_samples=1000, progress_bar=False)
mcmc.run(jax.random.key(6), *args, init_params={"z": fit.params["z"]})
nuts_sd = np.asarray(mcmc.get_samples()["z"]).reshape(1000, -1).std(axis=0)

rows = {
    "Laplace at the MAP": laplace.sd()["z"].ravel(),
    "AutoNormal (SVI)": svi_sd(AutoNormal),
    "AutoLowRankMVN, rank 6 (SVI)": svi_sd(AutoLowRankMultivariateNormal, rank=6),
    "NUTS, Laplace mass matrix": nuts_sd,
}
print(f"{'method':32s} sd / exact sd: median   min   max")
for name, sd in rows.items():
    ratio = sd / exact_sd
    print(f"{name:32s} {np.median(ratio):14.3f} {ratio.min():5.3f} {ratio.max():5.3f}")

# %%
# ## Posterior-predictive fields
#
# `Predictive` with `posterior_samples=` and `field=None` draws new noisy fields from the
# posterior draws: a check that the fitted model explains the data (the observed field should
# look like one of them; here the per-pixel sd of the draws is the noise plus the posterior
# spread of the model).

replicas = Predictive(blend_model, posterior_samples=mcmc.get_samples())(
    jax.random.key(7), None, positions, variance, prior
)["obs"]
spread = np.asarray(replicas).std(axis=0)
print(f"posterior-predictive pixel sd: median {np.median(spread):.2f} (noise alone 5.00)")
print(f"total time {time.perf_counter() - start:.0f} s")
