"""
# Deblend your first blend

Simulate a small LSST field in which galaxies overlap, deblend it with the shipped prior, look at
the residuals and read the catalog. Run it with `python examples/deblend_first_blend.py`; it takes
well under a minute on a laptop CPU, most of it the one-off JAX compilation of the fit.
"""

# %%
# ## A blended field
#
# [`make_blend`][madness_ppl.simulate.blends.make_blend] draws galaxies from a CatSim-like population
# (bulge + disk, colours from redshifted SED templates through the LSST throughputs) at random
# positions and renders them with galsim at LSST 10-year depth: the field is in electrons, sky
# subtracted, with sky and source Poisson noise. Alongside the noisy `field` it returns the truth:
# the noiseless image of every galaxy (`isolated`), their `positions` and their `catalog`.
# The blendedness of a galaxy (0 when isolated, towards 1 when a neighbour outshines it on its
# own footprint) says how much its neighbours overlap it.

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from madness_ppl import measure
from madness_ppl.deblend import deblend
from madness_ppl.io import write_products
from madness_ppl.plot import asinh_rgb, plot_panels
from madness_ppl.prior import GalaxyPrior
from madness_ppl.simulate import BlendConfig, make_blend
from madness_ppl.survey import Survey

survey = Survey.lsst()
config = BlendConfig(field_size=81, n_galaxies=(6, 6), margin=6)  # 16" x 16", 6 galaxies
blend = make_blend(survey, rng=np.random.default_rng(15), config=config)

print("bands:", survey.band_names, f'pixel scale {survey.pixel_scale}"')
print("field:", blend.field.shape, blend.field.dtype, "(bands, height, width), electrons")
print("truth stamps:", blend.isolated.shape, "(galaxies, bands, 45, 45)")
truth = blend.catalog["id", "x", "y", "redshift", "i_mag", "flux_r"]
truth["blendedness"] = measure.blendedness(blend.isolated, blend.positions, (81, 81))
formats = {"x": ".1f", "y": ".1f", "redshift": ".2f", "i_mag": ".2f", "flux_r": ".0f"}
for name, fmt in {**formats, "blendedness": ".2f"}.items():
    truth[name].info.format = fmt
print(truth)

# %%
# The colour composites below map the i, r and g bands to red, green and blue with an asinh
# stretch in units of the sky noise; the noiseless panel is the same galaxies without noise.

fig = plot_panels(
    {"field": blend.field, "noiseless truth": blend.noiseless},
    survey.band_names,
    noise=survey.sky_sigma,
    positions=blend.positions,
)

# %%
# ## Deblend it
#
# [`deblend`][madness_ppl.deblend.deblend] is the whole pipeline in one call:
#
# 1. estimate the sky level and noise of each band on this field, and the per-pixel variance
#    \(\sigma^2 = \sigma^2_\mathrm{sky} + \max(y, 0)\);
# 2. detect sources on the noise-weighted coadd;
# 3. start each galaxy's latent vector at the deblending encoder's prediction on a cutout
#    around it;
# 4. fit the MAP of [`blend_model`][madness_ppl.scene.blend_model] with
#    [`fit_map`][madness_ppl.infer.map.fit_map];
# 5. measure each galaxy's model into a catalog.
#
# The prior is the trained LSST prior that ships with the package (it is also the default when
# no `prior=` is given).

prior = GalaxyPrior.load("lsst")
print(prior)

detected = deblend(blend.field, prior=prior)
fit = detected.fit
print(
    f"{len(detected.positions)} sources detected; MAP: {int(fit.n_steps)} steps, "
    f"converged={bool(fit.converged)}, reduced chi2 = {float(fit.reduced_chi2):.3f}"
)

# %%
# ## Look at the residuals
#
# Data, model and residual on one common stretch: where the model explains the data the
# residual is noise. The circles are the detections used by the fit.

fig = plot_panels(
    {"data": blend.field, "model": detected.model_image, "residual": detected.residual},
    detected.bands,
    noise=survey.sky_sigma,
    positions=detected.positions,
)

# %%
# ## When detection merges galaxies
#
# Detection (sep, on the noise-weighted coadd of all bands) splits overlapping galaxies only
# when their peaks are distinct; a galaxy that sits on the wing of a brighter neighbour is
# often merged into it, and the fit then explains two galaxies with one model. Matching the
# detections to the truth (Hungarian matching within 5 pixels) shows which were missed:

truth_idx, det_idx = measure.match_positions(blend.positions, detected.positions)
missed = sorted(set(range(len(blend.positions))) - set(truth_idx.tolist()))
print(f"{len(detected.positions)} detections for {len(blend.positions)} galaxies; missed: {missed}")

# %%
# The model fixes positions and fits shapes and fluxes, so when you know where the galaxies are
# (a deeper image, another band, a catalog) pass them with `positions=`. Here we pass the true
# positions; everything below uses this fit.

result = deblend(blend.field, positions=blend.positions, prior=prior)
fit = result.fit
print(
    f"{len(result.positions)} sources; MAP: {int(fit.n_steps)} steps, "
    f"converged={bool(fit.converged)}, reduced chi2 = {float(fit.reduced_chi2):.3f}"
)
fig = plot_panels(
    {"data": blend.field, "model": result.model_image, "residual": result.residual},
    result.bands,
    noise=survey.sky_sigma,
    positions=result.positions,
)

# %%
# The residual in units of the noise, \((y - m) / \sigma\), shows where the fit falls short;
# for a perfect model its histogram is a standard normal.

r = result.bands.index("r")
pull = result.residual / np.sqrt(result.variance)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
image = ax0.imshow(pull[r], origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
fig.colorbar(image, ax=ax0, label="r-band residual / sigma")
ax0.set_title("normalised residual, r band")
grid = np.linspace(-5, 5, 201)
ax1.hist(pull.ravel(), bins=grid[::5], density=True, histtype="step", label="all bands")
ax1.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
ax1.set_yscale("log")
ax1.set_ylim(1e-5, 1)
ax1.set_xlabel("residual / sigma")
ax1.legend()
fig.tight_layout()
print(f"mean squared pull per band: {np.round(np.nanmean(pull**2, axis=(1, 2)), 3)}")

# %%
# ## Read the catalog
#
# `result.catalog` is an astropy `Table` with one row per source: position, flux (electrons)
# and AB magnitude per band, the KSB shear of the model in the r band (PSF corrected), the
# reduced \(\chi^2\) over the source's footprint and the fit's convergence flag.

catalog = result.catalog
print(catalog.colnames)
view = catalog["id", "x", "y", "mag_g", "mag_r", "mag_i", "g1", "g2", "chi2", "converged"]
for name in ("x", "y", "mag_g", "mag_r", "mag_i", "chi2"):
    view[name].info.format = ".2f"
for name in ("g1", "g2"):
    view[name].info.format = "+.3f"
print(view)

# %%
# Compare with the truth: the r-band flux of each model against the flux of the isolated
# noiseless galaxy, and what a 1" aperture on the blended image gives against the same aperture
# on the isolated galaxy (photometry without deblending).

truth_idx, det_idx = measure.match_positions(blend.positions, result.positions)
true_flux = blend.isolated[truth_idx, r].sum(axis=(-1, -2))
model_flux = np.asarray(catalog["flux_r"])[det_idx]
aperture, _ = measure.aperture_flux(blend.field[r : r + 1], result.positions[det_idx], 5.0)
centres = prior.stamp_size // 2 + blend.positions[truth_idx] - np.rint(blend.positions[truth_idx])
true_aperture = np.array(
    [
        measure.aperture_flux(blend.isolated[t, r : r + 1], centres[k : k + 1], 5.0)[0][0, 0]
        for k, t in enumerate(truth_idx)
    ]
)
print(f"{len(truth_idx)} of {len(blend.positions)} galaxies matched")
print(" id   true r flux   model    error   aperture error")
for k, t in enumerate(truth_idx):
    print(
        f"{t:3d} {true_flux[k]:13.0f} {model_flux[k]:8.0f} {model_flux[k] / true_flux[k] - 1:+8.1%}"
        f" {aperture[k, 0] / true_aperture[k] - 1:+10.1%}"
    )

# %%
# The aperture on the blend collects the light of the neighbours too: compare its errors with
# those of the models for the galaxies with a high blendedness in the first table.

# %%
# ## Each galaxy on its own
#
# `result.sources` holds the model of every source, `(N, bands, 45, 45)` stamps centred on the
# (rounded) positions: the deblended galaxies. Top row: the simulated truth, bottom row: the
# madness_ppl model, on the same stretch.

n_show = min(5, len(truth_idx))
fig, axes = plt.subplots(2, n_show, figsize=(2.3 * n_show, 4.8), squeeze=False)
for k in range(n_show):
    for row, stamp in enumerate((blend.isolated[truth_idx[k]], result.sources[det_idx[k]])):
        ax = axes[row, k]
        ax.imshow(asinh_rgb(stamp, result.bands, noise=survey.sky_sigma, top=50), origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, k].set_title(f"galaxy {truth_idx[k]}")
axes[0, 0].set_ylabel("truth")
axes[1, 0].set_ylabel("model")
fig.tight_layout()

# %%
# ## Save the products
#
# [`write_products`][madness_ppl.products.write_products] writes what `madness-ppl deblend` writes:
# the catalog (FITS and ECSV), the per-source models, the model and residual images and the
# figure. For your own images, [`read_field`][madness_ppl.fields.read_field] reads a FITS cube
# (or one HDU per band) with its band names, and `madness-ppl deblend field.fits --out dir`
# does all of the above from the command line.

with tempfile.TemporaryDirectory() as tmp:
    out = write_products(Path(tmp) / "my-blend", result)
    print(sorted(p.name for p in out.iterdir()))

# %%
# ## Your PSF
#
# The fits above passed no PSF, so `deblend` warned that it used the LSST default PSF of each
# band (the median seeing). Real images come with their own PSF, and the prior handles it in a
# *model frame*: it draws each galaxy at its own reference PSF, and the scene convolves every
# band with the difference kernel from that PSF to the image's
# ([`madness_ppl.psf`][madness_ppl.psf]). Here are the same galaxies observed in worse seeing,
# 1.5 times the median FWHM in every band:

import galsim  # noqa: E402

from madness_ppl.psf import psf_images  # noqa: E402

fwhm = 1.5 * np.array([survey.band(b).psf_fwhm for b in survey.band_names])
seeing = dict(zip(survey.band_names, fwhm, strict=True))
wide = make_blend(
    survey,
    rng=np.random.default_rng(15),
    config=config,
    catalog=blend.catalog,
    positions=blend.positions,
    psf=lambda band: galsim.Kolmogorov(fwhm=seeing[band]),
)

# %%
# Give the PSF as a FWHM per band (drawn as a Kolmogorov profile, or `psf_profile="moffat"`),
# or as images `(bands, P, P)` of any size, centred and in the prior's band order (or in the
# order of `bands=`); in a FITS file, a `PSF` cube named by a `BANDS` header, read by
# `madness-ppl deblend` from the field file or from `--psf psf.fits`. Without it, the fit
# explains the wider galaxies with wider models and the colours and fluxes drift:

by_fwhm = deblend(wide.field, positions=wide.positions, prior=prior, psf=fwhm)
images = psf_images(fwhm, pixel_scale=survey.pixel_scale, size=61)
by_image = deblend(wide.field, positions=wide.positions, prior=prior, psf=images)
no_psf = deblend(wide.field, positions=wide.positions, prior=prior)  # warns
true_wide = wide.isolated[:, r].sum(axis=(-1, -2))
print(" id   true r flux   psf (FWHM)   psf (images)   no psf")
for k in range(len(true_wide)):
    errors = [
        float(res.catalog["flux_r"][k]) / true_wide[k] - 1 for res in (by_fwhm, by_image, no_psf)
    ]
    print(f"{k:3d} {true_wide[k]:13.0f} " + "".join(f"{e:+13.1%}" for e in errors))

# %%
# Better seeing works the same way: the shipped prior (v0.3, trained with
# `madness-ppl train --psf-aware`) draws galaxies at a 0.3" Gaussian model-frame PSF, so it
# takes any PSF from about 0.35". A PSF narrower than the model frame cannot be reached by a
# convolution and is refused with a [`PSFError`][madness_ppl.psf.PSFError] naming the band
# (as the previous prior, `"lsst-v0.2"`, whose frame is the LSST median PSF itself, refuses
# any seeing better than the median):

sharp = fwhm / 1.5
sharp[survey.band_names.index("i")] = 0.25  # arcsec, below the 0.3" model frame
try:
    deblend(wide.field, positions=wide.positions, prior=prior, psf=sharp)
except ValueError as error:
    print(type(error).__name__, ":", error)
