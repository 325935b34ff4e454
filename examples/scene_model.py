"""
# Write your own NumPyro scene model

[`blend_model`][madness_ppl.scene.blend_model] is a short NumPyro function: galaxies with
latent vectors drawn from the learned prior, decoded, placed at fixed positions, observed with
Gaussian noise. Real images hold more than that. Here we unpack it, then extend it in plain
NumPyro with three things the ready-made model lacks:

* a **sky background** left over by an imperfect sky subtraction (a free level per band);
* a **star**: the PSF times a free flux per band, at a free position;
* **latent galaxy positions**: detections are off by a fraction of a pixel, so each galaxy gets
  a position offset with a tight prior (sub-pixel placement makes the image differentiable with
  respect to it).

Any such model is fitted with [`fit_map`][madness_ppl.infer.map.fit_map]. Run it with
`python examples/scene_model.py` (under a minute on a laptop CPU, mostly compilation).
"""

# %%
# ## A field with galaxies, a star and a sky offset
#
# Three LSST galaxies from [`make_blend`][madness_ppl.simulate.blends.make_blend], plus a star
# drawn with the survey's PSF (galsim) next to them and a constant sky level per band of half
# the sky noise, then sky + Poisson noise.

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import log_density

from madness_ppl.deblend import extract_cutouts
from madness_ppl.infer import fit_map
from madness_ppl.plot import plot_panels
from madness_ppl.prior import GalaxyPrior
from madness_ppl.scene import blend_model, galaxy_latents, gaussian_likelihood, place_stamps
from madness_ppl.simulate import BlendConfig, add_noise, make_blend
from madness_ppl.survey import Survey

rng = np.random.default_rng(11)
survey = Survey.lsst()
bands = survey.band_names
SIZE = 71
blend = make_blend(
    survey, rng=rng, config=BlendConfig(field_size=SIZE, n_galaxies=(3, 3), max_shift=2.4)
)


def draw_star(survey, magnitude_r, colours, position, size):
    """Noiseless star image (bands, size, size): the survey PSF at a sub-pixel position."""
    centre = (size - 1) / 2
    image = np.zeros((survey.n_bands, size, size), np.float32)
    for b, band in enumerate(survey.band_names):
        flux = survey.mag_to_electrons(magnitude_r + colours[b], band)
        star = survey.psf(band).withFlux(float(flux))
        drawn = star.drawImage(
            nx=size, ny=size, scale=survey.pixel_scale, offset=tuple(np.asarray(position) - centre)
        )
        image[b] = drawn.array
    return image


true_star_position = np.array([50.3, 19.6])
star_colours = np.array([1.6, 0.5, 0.0, -0.1, -0.15, -0.2])  # a K-type star, relative to r
star = draw_star(survey, 21.0, star_colours, true_star_position, SIZE)
true_star_flux = star.sum(axis=(1, 2))
true_sky = 0.5 * survey.sky_sigma
field, _ = add_noise(blend.noiseless + star + true_sky[:, None, None], survey.sky_variance, rng)
variance = survey.sky_variance[:, None, None] + np.maximum(field, 0.0)

fig = plot_panels(
    {"field": field, "noiseless galaxies": blend.noiseless, "star": star},
    bands,
    noise=survey.sky_sigma,
    positions=blend.positions,
)

# %%
# ## `blend_model`, unpacked
#
# Here is the ready-made model written out with the same building blocks of
# [`madness_ppl.scene`][madness_ppl.scene]:
#
# * [`galaxy_latents`][madness_ppl.scene.galaxy_latents] samples one latent vector per source
#   in the plate `"sources"` from the prior's flow distribution;
# * `prior.decode` turns latents into `(n, bands, 45, 45)` stamps in electrons;
# * [`place_stamps`][madness_ppl.scene.place_stamps] sums the stamps into the field;
# * [`gaussian_likelihood`][madness_ppl.likelihood.gaussian_likelihood] observes the field with
#   per-pixel variance.


def my_blend_model(field, positions, variance, prior):
    z = galaxy_latents("z", prior.latent_distribution(), positions.shape[0])
    stamps = prior.decode(z)
    numpyro.deterministic("stamps", stamps)
    image = place_stamps(stamps, positions, field.shape[-2:], subpixel=False)
    numpyro.deterministic("model_image", image)
    gaussian_likelihood("obs", image, field, variance)


# %%
# It is the same model: at any latent values both give the same log joint density.

prior = GalaxyPrior.load("lsst")
rng_pos = np.random.default_rng(0)
detections = blend.positions + rng_pos.uniform(-0.5, 0.5, size=blend.positions.shape)
z0 = prior.deblend_encode(extract_cutouts(field, detections, prior.stamp_size))
args = (jnp.asarray(field), jnp.asarray(detections), jnp.asarray(variance), prior)
ours, _ = log_density(my_blend_model, args, {}, {"z": z0})
ready_made, _ = log_density(blend_model, args, {}, {"z": z0})
print(f"log p(y, z0): ours {float(ours):.2f}, blend_model {float(ready_made):.2f}")

# %%
# Fitting it to this field leaves the star and the sky offset in the residual (and the
# galaxies may absorb some of their light).

plain = fit_map(my_blend_model, *args, init={"z": z0}, method="lbfgs", max_steps=150)
print(f"plain model: reduced chi2 = {float(plain.reduced_chi2):.3f}, {int(plain.n_steps)} steps")

# %%
# ## The extended scene
#
# Three additions, each a few lines of NumPyro. Every `numpyro.sample` without `obs=` is a
# free parameter of the MAP; its distribution is its prior.


def scene(field, detections, variance, prior, star_guess, psf, sky_noise):
    n_bands, shape = field.shape[0], field.shape[-2:]
    n = detections.shape[0]

    # Galaxies at latent positions: detection + offset, offset ~ N(0, 0.5 px) per axis.
    z = galaxy_latents("z", prior.latent_distribution(), n)
    with numpyro.plate("sources", n):
        offset = numpyro.sample("offset", dist.Normal(0.0, 0.5).expand([2]).to_event(1))
    positions = numpyro.deterministic("positions", detections + offset)
    galaxies = place_stamps(prior.decode(z), positions, shape, subpixel=True)

    # A star: the PSF times a positive flux per band, at a position near its detection.
    star_position = numpyro.sample("star_position", dist.Normal(star_guess, 1.0).to_event(1))
    with numpyro.plate("bands", n_bands):
        star_flux = numpyro.sample("star_flux", dist.LogNormal(jnp.log(1e5), 5.0))
    star = place_stamps(
        (star_flux[:, None, None] * psf)[None], star_position[None], shape, subpixel=True
    )

    # A flat sky level per band, in units of the sky noise (well scaled for the optimiser).
    sky_in_sigma = numpyro.sample(
        "sky_in_sigma", dist.Normal(0.0, 10.0).expand([n_bands]).to_event(1)
    )
    sky = numpyro.deterministic("sky", sky_in_sigma * sky_noise)

    image = galaxies + star + sky[:, None, None]
    numpyro.deterministic("galaxies", galaxies)
    numpyro.deterministic("model_image", image)
    gaussian_likelihood("obs", image, field, variance)


# %%
# The star's model needs a PSF image per band (unit flux, odd size, centred), here drawn from
# the survey's PSF model. The fit starts from the deblending encoder for the latents, zero
# offsets, the detected star position, the field's median for the sky and the star's peak pixel
# over the PSF's peak for its flux.

PSF_SIZE = 25
psf = np.stack(
    [
        survey.psf(b).drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=survey.pixel_scale).array
        for b in bands
    ]
)
psf = jnp.asarray(psf / psf.sum(axis=(1, 2), keepdims=True), jnp.float32)

star_guess = np.rint(true_star_position) + rng_pos.uniform(-0.5, 0.5, 2)
sky_guess = np.median(field.reshape(len(bands), -1), axis=1)
ix, iy = np.rint(star_guess).astype(int)
peak = field[:, iy, ix] - sky_guess
init = {
    "z": prior.deblend_encode(
        extract_cutouts(field - sky_guess[:, None, None], detections, prior.stamp_size)
    ),
    "offset": jnp.zeros_like(jnp.asarray(detections)),
    "star_position": jnp.asarray(star_guess, jnp.float32),
    "star_flux": jnp.asarray(np.maximum(peak, 1.0) / psf.max(axis=(1, 2))),
    "sky_in_sigma": jnp.asarray(sky_guess / survey.sky_sigma, jnp.float32),
}
result = fit_map(
    scene,
    jnp.asarray(field),
    jnp.asarray(detections, jnp.float32),
    jnp.asarray(variance),
    prior,
    jnp.asarray(star_guess, jnp.float32),
    psf,
    jnp.asarray(survey.sky_sigma, jnp.float32),
    init=init,
    method="lbfgs",
    max_steps=300,
)
print(
    f"extended scene: reduced chi2 = {float(result.reduced_chi2):.3f}, "
    f"{int(result.n_steps)} steps, converged={bool(result.converged)}"
)

# %%
# ## What the fit recovered
#
# `result.params` holds the MAP value of every latent site, `result.deterministics` every
# `numpyro.deterministic` site at the MAP.

np.set_printoptions(precision=1, suppress=True, linewidth=100)
print("bands               ", bands)
print("sky level   true    ", true_sky)
print("            fit     ", np.asarray(result.deterministics["sky"]))
print("star flux   true    ", true_star_flux)
print("            fit     ", np.asarray(result.params["star_flux"]))
print("star position true", true_star_position, " fit", np.asarray(result.params["star_position"]))
fitted = np.asarray(result.deterministics["positions"])
for k in range(len(detections)):
    print(
        f"galaxy {k}: true {blend.positions[k].round(2)}, detected {detections[k].round(2)},"
        f" fit {fitted[k].round(2)}"
    )

# %%
# Residuals of the two models on the same stretch: the extended scene explains the star and
# the sky offset. The last panel is the galaxies alone, the star and sky removed.

fig = plot_panels(
    {
        "data": field,
        "residual, blend_model": np.asarray(plain.residual),
        "residual, extended scene": np.asarray(result.residual),
        "fitted galaxies": np.asarray(result.deterministics["galaxies"]),
    },
    bands,
    noise=survey.sky_sigma,
)

# %%
# ## Where to go from here
#
# * The same pattern adds anything that is a function of parameters: a sky gradient
#   (`sky + a x + b y`), a shear applied to all galaxies, a per-band PSF mismatch kernel.
# * Another noise model is another likelihood: replace `gaussian_likelihood` by
#   [`student_t_likelihood`][madness_ppl.likelihood.student_t_likelihood] (same arguments and
#   masking, plus `df=`) to bound the pull of outlier pixels the mask missed; `fit_map`'s
#   `chi2` still counts its standardised residuals.
# * Masks: `galaxy_latents(..., source_mask=...)` and
#   `gaussian_likelihood(..., pixel_mask=...)` keep fixed array shapes while ignoring padded
#   sources or bad pixels, so one compiled program serves many fields.
# * The model is an ordinary NumPyro model: `numpyro.infer.MCMC(NUTS(scene), ...)` samples its
#   posterior.
#
# `examples/custom_scene.py` builds the same scene on a toy linear prior (seconds to run, no
# trained networks); it is the next page.
