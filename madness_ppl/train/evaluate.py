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

A PSF-aware prior (``prior.psf_aware``; held-out stamps in the model frame) is measured through
observed PSFs (:func:`psf_reconstruction_metrics`): the held-out stamps are observed through
fixed Kolmogorov PSFs of the survey's median FWHM per band times 0.6 ("narrow"), 1 ("median")
and 1.6 ("wide") (:data:`PSF_CONDITIONS`), with seeded noise; the encoder reads each
condition's PSF descriptor and the decoded model-frame stamp is observed through the same
kernel before it is compared with the observed truth.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from scipy import stats

from madness_ppl import psf as _psf
from madness_ppl.chunks import map_chunks
from madness_ppl.likelihood import pixel_variance
from madness_ppl.prior import GalaxyPrior
from madness_ppl.stats import median as finite_median
from madness_ppl.stats import width68
from madness_ppl.survey import Survey
from madness_ppl.train.psfs import KernelBank, observe_in_batches, training_kernel_grid

__all__ = [
    "PSF_CONDITIONS",
    "brighter_half",
    "central_aperture_flux",
    "deblender_metrics",
    "fixed_psf_conditions",
    "held_out_reconstruction",
    "hsm_moments",
    "hsm_shapes",
    "psf_reconstruction_metrics",
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
    return {"median": finite_median(rel), "width68": width68(rel), "n": int(rel.size)}


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
    prior: GalaxyPrior,
    images: np.ndarray,
    *,
    deblender: bool = False,
    psf: np.ndarray | None = None,
) -> np.ndarray:
    """Encoder means in batches; ``psf``: one ``(bands, k)`` descriptor shared by the images."""
    encode = prior.deblend_encode if deblender else prior.encode
    if psf is None:
        return map_chunks(encode, images, 256)
    return map_chunks(lambda x: encode(x, psf=psf), images, 256)


def _observe_all(stamps: np.ndarray, condition: KernelBank) -> np.ndarray:
    """Model-frame stamps observed through the single kernel of ``condition``."""
    return observe_in_batches(stamps, condition, np.zeros(len(stamps), int))


#: Fixed PSF conditions of the held-out evaluation of a PSF-aware prior: factor on the
#: survey's median FWHM of every band (Kolmogorov profiles, round).
PSF_CONDITIONS: dict[str, float] = {"narrow": 0.6, "median": 1.0, "wide": 1.6}


def fixed_psf_conditions(
    survey: Survey,
    bands: tuple[str, ...] | list[str],
    *,
    grid: int,
    reference_fwhm_pixels: float = _psf.REFERENCE_FWHM_PIXELS,
    conditions: dict[str, float] | None = None,
) -> dict[str, KernelBank]:
    """One-PSF kernel banks (deterministic round Kolmogorov PSFs of FWHM ``factor x`` the
    survey's median FWHM per band) of :data:`PSF_CONDITIONS`, on a ``grid`` side."""
    median = np.array([survey.band(b).psf_fwhm for b in bands], float)
    reference = _psf.reference_psf(len(bands), grid, fwhm_pixels=reference_fwhm_pixels)
    out = {}
    for name, factor in (conditions or PSF_CONDITIONS).items():
        fwhm = factor * median
        images = _psf.psf_images(fwhm, pixel_scale=survey.pixel_scale, size=grid)
        kernel = _psf.difference_kernel(images, reference, grid=grid, bands=bands)
        out[name] = KernelBank(
            np.asarray(kernel.fourier, np.complex64)[None],
            _psf.psf_descriptor(images, reference_fwhm=reference_fwhm_pixels)[None],
            fwhm[None].astype(np.float32),
        )
    return out


def _colour(flux_a: np.ndarray, flux_b: np.ndarray) -> np.ndarray:
    r"""AB colour :math:`-2.5 \log_{10}(f_a / f_b)`; NaN where either flux is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((flux_a > 0) & (flux_b > 0), -2.5 * np.log10(flux_a / flux_b), np.nan)


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
    psf: KernelBank | None = None,
    model_frame: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    r"""Reconstruction quality on held-out isolated stamps (electrons).

    The reconstruction of a stamp is the decoded VAE-encoder mean of its noisy version. With
    ``psf`` (a one-PSF :class:`~madness_ppl.train.psfs.KernelBank`, PSF-aware prior),
    ``noisy`` and ``noiseless`` are stamps observed through it, the encoder reads its
    descriptor and the reconstruction is the decoded model-frame stamp observed through its
    kernel; the shape errors then compare the model-frame reconstruction with ``model_frame``,
    the model-frame truth.

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

    Returns the metrics and the (observed) reconstructions.
    """
    if psf is None:
        recon = reconstruct(prior, noisy)
        shape_recon, shape_truth = recon, noiseless
    else:
        if model_frame is None:
            raise ValueError("reconstruction metrics through a PSF need the model-frame truth")
        model = _decode_batches(prior, _encode_batches(prior, noisy, psf=psf.descriptor[0]))
        recon = _observe_all(model, psf)
        shape_recon, shape_truth = model, model_frame
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
            colours[f"{blue}-{red}"] = width68(c_recon - c_true)
    out["colour_width68"] = colours
    half = brighter_half(noiseless, b)
    out["shape_bright_half"] = shape_error(shape_recon[half, b], shape_truth[half, b], pixel_scale)
    return out, recon


def psf_reconstruction_metrics(
    prior: GalaxyPrior,
    noiseless: np.ndarray,
    sky_variance: np.ndarray,
    survey: Survey,
    *,
    grid: int,
    band: str = "r",
    i_mag: np.ndarray | None = None,
    bright_mag: float = 23.0,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """:func:`reconstruction_metrics` of a PSF-aware prior through the :data:`PSF_CONDITIONS`.

    ``noiseless``: held-out model-frame stamps; ``sky_variance`` per band of the prior;
    ``survey`` gives the median FWHM and the pixel scale. Each condition observes them through its kernel
    (``grid`` side) and adds seeded noise (the same draws for every condition). Returns the
    metrics of the "median" condition with ``"by_psf"`` (headline numbers of every condition:
    FWHM per band, ``<band>`` flux 68 % widths all / bright, chi² per pixel, noise-only width
    and the ratio of the two widths), and the median condition's noisy stamps and observed
    reconstructions.
    """
    from madness_ppl.simulate.stamps import add_noise

    sky = np.asarray(sky_variance)
    conditions = fixed_psf_conditions(
        survey,
        prior.bands,
        grid=grid,
        reference_fwhm_pixels=prior.config.reference_fwhm_pixels or _psf.REFERENCE_FWHM_PIXELS,
    )
    by_psf: dict[str, dict[str, Any]] = {}
    median: tuple[dict[str, Any], np.ndarray, np.ndarray] | None = None
    for name, condition in conditions.items():
        observed = _observe_all(noiseless, condition)
        noisy, _ = add_noise(observed, sky, np.random.default_rng([seed, 28, 4]))
        metrics, recon = reconstruction_metrics(
            prior,
            noisy,
            observed,
            sky,
            band=band,
            i_mag=i_mag,
            bright_mag=bright_mag,
            pixel_scale=survey.pixel_scale,
            psf=condition,
            model_frame=noiseless,
        )
        flux = metrics[f"{band}_aperture_flux_rel_error"]
        noise = metrics["noise_only_flux_rel_error"]
        by_psf[name] = {
            "fwhm": {b: float(f) for b, f in zip(prior.bands, condition.fwhm[0], strict=True)},
            f"{band}_flux_width68": flux["width68"],
            f"{band}_flux_width68_bright": metrics[f"{band}_aperture_flux_rel_error_bright"][
                "width68"
            ],
            "chi2_per_pixel": metrics["chi2_per_pixel"],
            "chi2_per_pixel_truth": metrics["chi2_per_pixel_truth"],
            "noise_only_width68": noise["width68"],
            "width_ratio": flux["width68"] / noise["width68"],
        }
        if name == "median":
            median = (metrics, noisy, recon)
    if median is None:
        raise ValueError("the PSF conditions need a 'median' one")
    metrics, noisy, recon = median
    return {**metrics, "by_psf": by_psf}, noisy, recon


def held_out_reconstruction(
    prior: GalaxyPrior,
    noisy: np.ndarray | None,
    noiseless: np.ndarray,
    survey: Survey,
    *,
    i_mag: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The reconstruction metrics of a prior's model card, in the prior's own frame.

    A plain prior: :func:`reconstruction_metrics` of ``noisy`` against ``noiseless``, stamps
    drawn with the survey's PSF. A PSF-aware prior (``prior.psf_aware``): ``noiseless`` are
    model-frame stamps (drawn at the reference PSF, ``dataset_psf("reference")``), measured
    through the fixed observed PSFs of :func:`psf_reconstruction_metrics` on the training
    kernel grid (:func:`~madness_ppl.train.psfs.training_kernel_grid`); ``noisy`` is not
    used.

    Returns
    -------
    metrics, noisy, recon
        The metrics, and the noisy stamps and reconstructions they compare (for a PSF-aware
        prior, those of the median PSF).
    """
    if prior.psf_aware:
        return psf_reconstruction_metrics(
            prior,
            noiseless,
            survey.sky_variance,
            survey,
            grid=training_kernel_grid(prior.config.stamp_size),
            i_mag=i_mag,
            seed=seed,
        )
    if noisy is None:
        raise ValueError("a prior without PSF input is measured on noisy survey-PSF stamps")
    metrics, recon = reconstruction_metrics(
        prior,
        noisy,
        noiseless,
        survey.sky_variance,
        i_mag=i_mag,
        pixel_scale=survey.pixel_scale,
    )
    return metrics, noisy, recon


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
    prior: GalaxyPrior,
    cutouts: np.ndarray,
    central: np.ndarray,
    *,
    band: str = "r",
    psf: KernelBank | None = None,
    sky_variance: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Deblending encoder vs plain VAE encoder on blended cutouts whose central galaxy is known.

    With ``psf`` (a one-PSF :class:`~madness_ppl.train.psfs.KernelBank`, PSF-aware prior),
    ``cutouts`` are the *noiseless* model-frame blends and ``central`` the model-frame central
    galaxies: both are observed through the kernel, the blends get seeded noise
    (``sky_variance``), the encoders read the PSF descriptor, the target is the VAE-encoder
    latent of the observed central galaxy and decoded galaxies are observed before their flux
    is measured.
    """
    descriptor = None
    if psf is not None:
        from madness_ppl.simulate.stamps import add_noise

        if sky_variance is None:
            raise ValueError("deblender metrics through a PSF need sky_variance")
        rng = np.random.default_rng([seed, 28, 5])
        cutouts, _ = add_noise(_observe_all(cutouts, psf), np.asarray(sky_variance), rng)
        central = _observe_all(central, psf)
        descriptor = psf.descriptor[0]
    target = _encode_batches(prior, central, psf=descriptor)
    b = prior.bands.index(band)
    true_flux = central_aperture_flux(central[:, b])
    out = {}
    for name, deblender in (("deblender", True), ("vae_encoder", False)):
        z = _encode_batches(prior, cutouts, deblender=deblender, psf=descriptor)
        decoded = _decode_batches(prior, z)
        if psf is not None:
            decoded = _observe_all(decoded, psf)
        out[name] = {
            "latent_rms": float(np.sqrt(np.mean((z - target) ** 2))),
            f"{band}_aperture_flux_rel_error": summarise_relative_error(
                central_aperture_flux(decoded[:, b]), true_flux
            ),
        }
    return out
