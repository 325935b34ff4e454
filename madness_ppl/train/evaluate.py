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

from madness_ppl.chunks import map_chunks
from madness_ppl.likelihood import pixel_variance
from madness_ppl.prior import GalaxyPrior

__all__ = [
    "brighter_half",
    "central_aperture_flux",
    "deblender_metrics",
    "hsm_moments",
    "hsm_shapes",
    "reconstruct",
    "reconstruction_metrics",
    "sample_metrics",
    "shape_error",
    "summarise_relative_error",
]


def central_aperture_flux(images: np.ndarray, radius: float = 5.0) -> np.ndarray:
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


def hsm_shapes(images: np.ndarray, pixel_scale: float) -> np.ndarray:
    """HSM adaptive moments of each ``(S, S)`` image: ``(n, 3)`` columns size sigma (arcsec),
    distortion ``e1``, ``e2`` of the observed (PSF-convolved) light; NaN rows where HSM fails."""
    import galsim

    out = np.full((len(images), 3), np.nan)
    for i, image in enumerate(images):
        try:
            m = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(image, np.float64), scale=1.0))
        except galsim.errors.GalSimHSMError:
            continue
        if m.moments_status == 0:
            out[i] = m.moments_sigma * pixel_scale, m.observed_shape.e1, m.observed_shape.e2
    return out


def hsm_moments(images: np.ndarray, pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """HSM adaptive-moment size sigma (arcsec) and ellipticity modulus of each ``(S, S)`` image;
    NaN where HSM fails."""
    shapes = hsm_shapes(images, pixel_scale)
    return shapes[:, 0], np.hypot(shapes[:, 1], shapes[:, 2])


def shape_error(recon: np.ndarray, truth: np.ndarray, pixel_scale: float) -> dict[str, float]:
    r"""How well reconstructions keep the shapes of the truth (one band, ``(n, S, S)`` each).

    Returns the RMS of the ellipticity difference
    :math:`\sqrt{\langle |e_{\rm rec} - e_{\rm true}|^2 \rangle}` (distortions
    :math:`e = e_1 + i e_2` of the observed light), the median :math:`|e|` of each, and the
    68 % width of the relative size error, over the galaxies HSM measures in both.
    """
    a, t = hsm_shapes(recon, pixel_scale), hsm_shapes(truth, pixel_scale)
    ok = np.all(np.isfinite(a) & np.isfinite(t), axis=1)
    a, t = a[ok], t[ok]
    de = np.hypot(a[:, 1] - t[:, 1], a[:, 2] - t[:, 2])
    return {
        "e_rms": float(np.sqrt(np.mean(de**2))),
        "e_median_recon": float(np.median(np.hypot(a[:, 1], a[:, 2]))),
        "e_median_truth": float(np.median(np.hypot(t[:, 1], t[:, 2]))),
        "size_width68": summarise_relative_error(a[:, 0], t[:, 0])["width68"],
        "n": int(ok.sum()),
    }


def brighter_half(noiseless: np.ndarray, band: int) -> np.ndarray:
    """Boolean mask of the stamps whose total flux in ``band`` is above the median."""
    flux = noiseless[:, band].sum(axis=(-2, -1))
    return flux > np.median(flux)


def reconstruct(prior: GalaxyPrior, noisy: np.ndarray) -> np.ndarray:
    """Decoded VAE-encoder means of noisy stamps (electrons in, electrons out), in batches."""
    return _decode_batches(prior, _encode_batches(prior, noisy))


def _decode_batches(prior: GalaxyPrior, z: np.ndarray, batch: int = 256) -> np.ndarray:
    return map_chunks(prior.decode, z, batch)


def _encode_batches(
    prior: GalaxyPrior, images: np.ndarray, *, deblender: bool = False
) -> np.ndarray:
    fn = prior.deblend_encode if deblender else prior.encode
    return map_chunks(fn, images, 256)


def _colour(flux_a: np.ndarray, flux_b: np.ndarray) -> np.ndarray:
    r"""AB colour :math:`-2.5 \log_{10}(f_a / f_b)`; NaN where either flux is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((flux_a > 0) & (flux_b > 0), -2.5 * np.log10(flux_a / flux_b), np.nan)


def _width68(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    p16, p84 = np.percentile(values, [16, 84])
    return float(0.5 * (p84 - p16))


def reconstruction_metrics(
    prior: GalaxyPrior,
    noisy: np.ndarray,
    noiseless: np.ndarray,
    sky_variance: np.ndarray,
    *,
    band: str = "r",
    i_mag: np.ndarray | None = None,
    bright_mag: float = 23.0,
    pixel_scale: float = 0.2,
) -> tuple[dict[str, Any], np.ndarray]:
    r"""Reconstruction quality on held-out isolated stamps (electrons).

    The reconstruction of a stamp is the decoded VAE-encoder mean of its noisy version.

    * ``<band>_aperture_flux_rel_error``: relative error of the aperture flux (1" radius) of the
      reconstruction against the noiseless truth (median, 68 % width), all stamps and, with
      ``i_mag``, those brighter than ``bright_mag`` (``..._bright``);
    * ``noise_only_*``: the same aperture measured on the *noisy input* against the truth, i.e.
      the width noise alone causes (a reconstruction cannot beat it by much);
    * ``chi2_per_pixel``: :math:`\langle (y_{\rm noisy} - \hat y)^2 / \sigma^2 \rangle`
      (the truth scores ``chi2_per_pixel_truth`` ~ 1);
    * ``band_flux_ratio_median``: per band, median of total decoded flux / true flux (bright);
    * ``colour_width68``: 68 % width of the error of aperture colours g-r and r-i (bright, mag);
    * ``shape_bright_half``: :func:`shape_error` on the brighter half (r-band flux).

    Returns the metrics and the reconstructions.
    """
    recon = reconstruct(prior, noisy)
    b = prior.bands.index(band)
    bright = np.ones(len(noisy), bool) if i_mag is None else np.asarray(i_mag) < bright_mag
    ap_true = {k: central_aperture_flux(noiseless[:, k]) for k in range(len(prior.bands))}
    ap_recon = central_aperture_flux(recon[:, b])
    ap_noisy = central_aperture_flux(noisy[:, b])
    variance = pixel_variance(noiseless, sky_variance)
    out: dict[str, Any] = {
        f"{band}_aperture_flux_rel_error": summarise_relative_error(ap_recon, ap_true[b]),
        f"{band}_aperture_flux_rel_error_bright": summarise_relative_error(
            ap_recon[bright], ap_true[b][bright]
        ),
        "noise_only_flux_rel_error": summarise_relative_error(ap_noisy, ap_true[b]),
        "noise_only_flux_rel_error_bright": summarise_relative_error(
            ap_noisy[bright], ap_true[b][bright]
        ),
        "chi2_per_pixel": float(np.mean((noisy - recon) ** 2 / variance)),
        "chi2_per_pixel_truth": float(np.mean((noisy - noiseless) ** 2 / variance)),
        "bright_mag": bright_mag if i_mag is not None else None,
        "n_bright": int(bright.sum()),
    }
    total_recon, total_true = recon.sum(axis=(-2, -1)), noiseless.sum(axis=(-2, -1))
    out["band_flux_ratio_median"] = {
        name: float(np.median(total_recon[bright, k] / total_true[bright, k]))
        for k, name in enumerate(prior.bands)
    }
    colours = {}
    for blue, red in (("g", "r"), ("r", "i")):
        if blue in prior.bands and red in prior.bands:
            kb, kr = prior.bands.index(blue), prior.bands.index(red)
            c_recon = _colour(
                central_aperture_flux(recon[bright, kb]), central_aperture_flux(recon[bright, kr])
            )
            c_true = _colour(ap_true[kb][bright], ap_true[kr][bright])
            colours[f"{blue}-{red}"] = _width68(c_recon - c_true)
    out["colour_width68"] = colours
    half = brighter_half(noiseless, b)
    out["shape_bright_half"] = shape_error(recon[half, b], noiseless[half, b], pixel_scale)
    return out, recon


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
    true_flux = central_aperture_flux(central[:, b])
    out = {}
    for name, deblender in (("deblender", True), ("vae_encoder", False)):
        z = _encode_batches(prior, cutouts, deblender=deblender)
        decoded = _decode_batches(prior, z)
        out[name] = {
            "latent_rms": float(np.sqrt(np.mean((z - target) ** 2))),
            f"{band}_aperture_flux_rel_error": summarise_relative_error(
                central_aperture_flux(decoded[:, b]), true_flux
            ),
        }
    return out
