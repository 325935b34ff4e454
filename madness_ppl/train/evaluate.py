"""Held-out validation of a trained prior: the numbers and figures of its model card.

* VAE reconstruction of held-out stamps: r-band aperture-flux relative error (median and half the
  16-84 % range, "68 % width") of the decoded encoder mean against the noiseless truth, and the
  chi² per pixel of the noisy stamp against the reconstruction (1 for a perfect reconstruction;
  the truth itself scores ~1 too).
* Generative check: galaxies decoded from flow samples against simulated noiseless galaxies:
  two-sample Kolmogorov-Smirnov statistics of r-band flux, HSM adaptive-moment size and
  ellipticity modulus.
* Deblending encoder: latent RMS error and r-band flux error of its decoded central galaxy against
  the plain VAE encoder on the same blended cutouts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from scipy import stats

from madness_ppl.prior import GalaxyPrior

__all__ = [
    "aperture_flux",
    "deblender_metrics",
    "hsm_moments",
    "reconstruction_metrics",
    "sample_metrics",
    "summarise_relative_error",
]


def aperture_flux(images: np.ndarray, radius: float = 5.0) -> np.ndarray:
    """Flux in a circular aperture of ``radius`` pixels about the stamp centre, per image.

    ``images`` is ``(n, S, S)``; the sum uses sep's exact pixel-circle overlap.
    """
    import sep

    images = np.ascontiguousarray(images, dtype=np.float64)
    c = (images.shape[-1] - 1) / 2.0
    out = np.empty(len(images))
    for i, image in enumerate(images):
        out[i] = sep.sum_circle(image, [c], [c], radius)[0][0]
    return out


def summarise_relative_error(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Median and 68 % width (half the 16-84 percentile range) of ``(estimate - truth) / truth``."""
    rel = (np.asarray(estimate) - truth) / truth
    rel = rel[np.isfinite(rel)]
    p16, p50, p84 = np.percentile(rel, [16, 50, 84])
    return {"median": float(p50), "width68": float(0.5 * (p84 - p16)), "n": int(rel.size)}


def hsm_moments(images: np.ndarray, pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """HSM adaptive-moment size sigma (arcsec) and ellipticity modulus of each ``(S, S)`` image;
    NaN where HSM fails."""
    import galsim

    sizes, ellipticities = np.full(len(images), np.nan), np.full(len(images), np.nan)
    for i, image in enumerate(images):
        try:
            m = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(image, np.float64), scale=1.0))
        except galsim.errors.GalSimHSMError:
            continue
        if m.moments_status == 0:
            sizes[i] = m.moments_sigma * pixel_scale
            ellipticities[i] = np.hypot(m.observed_shape.e1, m.observed_shape.e2)
    return sizes, ellipticities


def _decode_batches(prior: GalaxyPrior, z: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate(
        [np.asarray(prior.decode(z[s : s + batch])) for s in range(0, len(z), batch)]
    )


def _encode_batches(
    prior: GalaxyPrior, images: np.ndarray, *, deblender: bool = False
) -> np.ndarray:
    fn = prior.deblend_encode if deblender else prior.encode
    return np.concatenate([np.asarray(fn(images[s : s + 256])) for s in range(0, len(images), 256)])


def reconstruction_metrics(
    prior: GalaxyPrior,
    noisy: np.ndarray,
    noiseless: np.ndarray,
    sky_variance: np.ndarray,
    *,
    band: str = "r",
) -> tuple[dict[str, Any], np.ndarray]:
    """Reconstruction quality on held-out isolated stamps (electrons); returns metrics and the
    reconstructions."""
    recon = _decode_batches(prior, _encode_batches(prior, noisy))
    b = prior.bands.index(band)
    flux = summarise_relative_error(aperture_flux(recon[:, b]), aperture_flux(noiseless[:, b]))
    variance = np.asarray(sky_variance)[:, None, None] + np.maximum(noiseless, 0)
    chi2_recon = float(np.mean((noisy - recon) ** 2 / variance))
    chi2_truth = float(np.mean((noisy - noiseless) ** 2 / variance))
    return {
        f"{band}_aperture_flux_rel_error": flux,
        "chi2_per_pixel": chi2_recon,
        "chi2_per_pixel_truth": chi2_truth,
    }, recon


def sample_metrics(
    prior: GalaxyPrior,
    noiseless: np.ndarray,
    pixel_scale: float,
    *,
    n: int = 1000,
    seed: int = 0,
    band: str = "r",
) -> tuple[dict[str, Any], np.ndarray]:
    """KS statistics between galaxies decoded from flow samples and simulated galaxies."""
    z = np.asarray(prior.latent_distribution().sample(jax.random.key(seed), (n,)))
    samples = _decode_batches(prior, z)
    b = prior.bands.index(band)
    truth = noiseless[:n, b]
    size_s, e_s = hsm_moments(samples[:, b], pixel_scale)
    size_t, e_t = hsm_moments(truth, pixel_scale)
    out = {}
    for name, a, t in (
        ("flux", samples[:, b].sum((-1, -2)), truth.sum((-1, -2))),
        ("size", size_s, size_t),
        ("ellipticity", e_s, e_t),
    ):
        a, t = a[np.isfinite(a)], t[np.isfinite(t)]
        res = stats.ks_2samp(a, t)
        out[name] = {
            "ks": float(res.statistic),
            "p_value": float(res.pvalue),
            "median_samples": float(np.median(a)),
            "median_simulated": float(np.median(t)),
        }
    return out, samples


def deblender_metrics(
    prior: GalaxyPrior, cutouts: np.ndarray, central: np.ndarray, *, band: str = "r"
) -> dict[str, Any]:
    """Deblending encoder vs plain VAE encoder on blended cutouts whose central galaxy is known."""
    target = _encode_batches(prior, central)
    b = prior.bands.index(band)
    true_flux = aperture_flux(central[:, b])
    out = {}
    for name, deblender in (("deblender", True), ("vae_encoder", False)):
        z = _encode_batches(prior, cutouts, deblender=deblender)
        decoded = _decode_batches(prior, z)
        out[name] = {
            "latent_rms": float(np.sqrt(np.mean((z - target) ** 2))),
            f"{band}_aperture_flux_rel_error": summarise_relative_error(
                aperture_flux(decoded[:, b]), true_flux
            ),
        }
    return out
