"""Write your own scene: a sky background, a star and free positions in plain NumPyro.

The ready-made `madness_ppl.scene.blend_model` fixes the galaxy positions and assumes
a sky-subtracted field. Here the same building blocks (``galaxy_latents``, ``place_stamps``,
``gaussian_likelihood``) make a richer scene in a dozen lines:

* the galaxy positions are latent variables with a tight prior around the detections
  (sub-pixel placement makes the image differentiable with respect to them);
* a point source: a PSF image times a free positive flux per band;
* a free, flat sky background per band.

``fit_map`` fits any such model. The toy linear prior stands in for a trained
``GalaxyPrior`` (same interface); swap in ``GalaxyPrior.load(...)`` for real data.

Run with ``python examples/custom_scene.py`` (a few seconds, most of it compilation).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from madness_ppl.infer import fit_map
from madness_ppl.scene import default_variance, galaxy_latents, gaussian_likelihood, place_stamps
from madness_ppl.toy import LinearGaussianPrior

BANDS, STAMP, FIELD, PSF_SIZE = 3, 21, 48, 11


def gaussian_psf(fwhm_pixels: np.ndarray, size: int = PSF_SIZE) -> jnp.ndarray:
    """Unit-flux circular Gaussian PSF per band, shape (bands, size, size)."""
    c = np.arange(size) - size // 2
    r2 = c[None, :, None] ** 2 + c[None, None, :] ** 2
    sigma = np.asarray(fwhm_pixels)[:, None, None] / 2.355
    psf = np.exp(-r2 / (2 * sigma**2))
    return jnp.asarray(psf / psf.sum(axis=(1, 2), keepdims=True), jnp.float32)


def scene(field, detections, variance, prior, star_position, psf):
    """Galaxies at free positions + a star + a flat sky per band, Gaussian noise."""
    n_bands = field.shape[0]
    shape = field.shape[-2:]

    # Galaxies: latents from the prior, positions = detections + a small latent offset.
    z = galaxy_latents("z", prior.latent_distribution(), detections.shape[0])
    with numpyro.plate("sources", detections.shape[0]):
        offset = numpyro.sample("offset", dist.Normal(0.0, 0.5).expand([2]).to_event(1))
    positions = numpyro.deterministic("positions", detections + offset)
    image = place_stamps(prior.decode(z), positions, shape, subpixel=True)

    # A star: the PSF times a positive flux in each band.
    with numpyro.plate("bands", n_bands):
        star_flux = numpyro.sample("star_flux", dist.LogNormal(jnp.log(1e3), 3.0))
    image = image + place_stamps((star_flux[:, None, None] * psf)[None], star_position[None], shape)

    # A flat sky background per band.
    sky = numpyro.sample("sky", dist.Normal(0.0, 1e3).expand([n_bands]).to_event(1))
    image = image + sky[:, None, None]

    numpyro.deterministic("model_image", image)
    gaussian_likelihood("obs", image, field, variance)


def cutouts(image: jnp.ndarray, positions: np.ndarray, size: int) -> jnp.ndarray:
    """(n, bands, size, size) cutouts centred on the nearest pixels (zero-padded)."""
    half = size // 2
    padded = np.pad(np.asarray(image), ((0, 0), (half, half), (half, half)))
    out = []
    for x, y in np.floor(np.asarray(positions) + 0.5).astype(int):
        out.append(padded[:, y : y + size, x : x + size])
    return jnp.asarray(np.stack(out))


def main() -> None:
    start = time.perf_counter()
    rng = np.random.default_rng(1)
    prior = LinearGaussianPrior.random(
        jax.random.key(0), n_bands=BANDS, stamp_size=STAMP, latent_dim=6, flux=5e3, size=2.5
    )
    psf = gaussian_psf(np.array([4.5, 4.2, 4.0]))

    # Truth: two blended galaxies, a star next to them, a sky level per band.
    true_positions = np.array([[20.3, 22.6], [25.8, 26.1]])
    true_z = rng.normal(size=(2, prior.latent_dim))
    true_star, star_position = np.array([3000.0, 5000.0, 8000.0]), jnp.array([33.0, 18.0])
    true_sky = np.array([40.0, 60.0, 90.0])
    truth = place_stamps(prior.decode(jnp.asarray(true_z)), true_positions, (FIELD, FIELD))
    truth += place_stamps(
        (true_star[:, None, None] * psf)[None], star_position[None], (FIELD, FIELD)
    )
    truth += true_sky[:, None, None]
    variance = default_variance(truth, 50.0)  # sky-noise variance 50 e- + Poisson
    field = truth + jnp.sqrt(variance) * rng.normal(size=truth.shape)

    # Detections are off by up to half a pixel; the positions are fitted with the rest. They
    # trade off against the galaxies' shape latents (the decoder can move light within its
    # stamp), so the fit improves them only partly: see the printed errors below.
    detections = jnp.asarray(true_positions + rng.uniform(-0.5, 0.5, size=(2, 2)), jnp.float32)
    sky_guess = jnp.median(field.reshape(BANDS, -1), axis=1)
    init = {
        "z": prior.deblend_encode(cutouts(field - sky_guess[:, None, None], detections, STAMP)),
        "offset": jnp.zeros((2, 2)),
        "sky": sky_guess,
        "star_flux": jnp.full((BANDS,), 1e3),
    }
    result = fit_map(scene, field, detections, variance, prior, star_position, psf, init=init)

    np.set_printoptions(precision=2, suppress=True)
    print(
        f"L-BFGS: {int(result.n_steps)} steps, converged={bool(result.converged)}, "
        f"reduced chi2 = {float(result.reduced_chi2):.3f}"
    )
    print("sky        true", true_sky, " fit", np.asarray(result.params["sky"]))
    print("star flux  true", true_star, " fit", np.asarray(result.params["star_flux"]))
    fitted = np.asarray(result.deterministics["positions"])
    print(
        "positions  true",
        true_positions.ravel(),
        "\n           detected",
        np.asarray(detections).ravel(),
        "\n           fit",
        fitted.ravel(),
    )
    for name, guess in (("detected", np.asarray(detections)), ("fit", fitted)):
        rms = np.sqrt(np.mean((guess - true_positions) ** 2))
        print(f"position error ({name}): rms {rms:.2f} px")
    true_flux = np.asarray(prior.decode(jnp.asarray(true_z)).sum(axis=(-1, -2)))
    fit_flux = np.asarray(prior.decode(result.params["z"]).sum(axis=(-1, -2)))
    print("galaxy flux (per band) true\n", true_flux, "\n fit\n", fit_flux)
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
