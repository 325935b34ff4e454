"""What a training run leaves for people: the generated model card and the figures.

Everything here is made from the run's ``report.json`` (and, for the validation figures, the
held-out images the run evaluated): :func:`model_card` prints only numbers the report holds,
:func:`write_model_card` regenerates a shipped prior's card, :func:`validation_figures` and
:func:`training_curves` draw the reconstructions, samples and loss curves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from madness_ppl.atomic import atomic_write_text
from madness_ppl.psf import REFERENCE_FWHM_PIXELS
from madness_ppl.survey import Survey

__all__ = ["model_card", "training_curves", "validation_figures", "write_model_card"]


def _wall_time_line(timings: dict[str, float], history: dict[str, list[dict]]) -> str:
    """Minutes per stage: the sum of the epoch times in the history (which a resumed run
    carries over, so runs interrupted and resumed are all counted) where recorded, and the last
    run's own wall time, which alone would undercount a resumed training."""
    stages = [("VAE", "vae"), ("flow", "flow"), ("deblender", "deblender")]
    epochs = {key: sum(e["seconds"] for e in history.get(key, [])) for _, key in stages}
    if not all(epochs.values()):
        return (
            f"- wall time: VAE {timings['vae_s'] / 60:.1f} min, flow {timings['flow_s'] / 60:.1f} "
            f"min, deblender {timings['deblender_s'] / 60:.1f} min (total "
            f"{timings['train_total_s'] / 60:.1f} min)"
        )
    parts = ", ".join(f"{label} {epochs[key] / 60:.1f} min" for label, key in stages)
    return (
        f"- training time, summed over the epochs of every run (resumed ones included; "
        f"stage set-up and evaluation not counted): {parts} (total "
        f"{sum(epochs.values()) / 60:.1f} min); wall time of the last run alone "
        f"{timings['train_total_s'] / 60:.1f} min"
    )


def model_card(report: dict[str, Any], *, figures: list[str] | None = None) -> str:
    """The markdown model card of a prior, generated from its training report only.

    Every number printed comes from ``report`` (``report.json``); nothing is typed by hand and no
    path of the training machine is written (data directories by their last component). Metrics
    an older report did not record (v0.1.0: band fluxes, colours, sizes, shapes, noise-only
    widths) are listed as not measured rather than left out. ``figures``: the figure files
    next to the report (default: the three that :func:`~madness_ppl.train.pipeline.train_prior` writes).
    """
    lines = [*_card_head(report), *_validation_table(report["reconstruction"], report)]
    if report.get("notes"):
        lines += ["", "## Notes", *(f"- {note}" for note in report["notes"])]
    figures = figures or ["reconstructions.png", "samples.png", "training_curves.png"]
    lines += [
        "",
        "Figures (written next to the report): " + ", ".join(f"`{f}`" for f in figures) + ".",
        "",
    ]
    return "\n".join(lines)


def _by_psf_lines(rec: dict[str, Any]) -> list[str]:
    """Model-card table of the reconstruction through the fixed PSF conditions (PSF-aware)."""
    by_psf = rec.get("by_psf")
    if not by_psf:
        return []
    lines = [
        "",
        "Reconstruction through fixed observed PSFs (round Kolmogorov; FWHM = factor x the "
        "survey's median per band):",
        "",
        '| PSF | FWHM (") | r flux 68 % width, all / bright | noise-only width '
        "| ratio | chi2 / pixel (truth) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in by_psf.items():
        fwhm = ", ".join(f"{b} {f:.2f}" for b, f in row["fwhm"].items())
        lines.append(
            f"| {name} | {fwhm} | {row['r_flux_width68']:.4f} / "
            f"{row['r_flux_width68_bright']:.4f} | {row['noise_only_width68']:.4f} "
            f"| {row['width_ratio']:.2f} | {row['chi2_per_pixel']:.3f} "
            f"({row['chi2_per_pixel_truth']:.3f}) |"
        )
    return lines


def _psf_lines(report: dict[str, Any]) -> list[str]:
    """Model-card lines on the PSFs a PSF-aware prior was trained on (none for older priors)."""
    psf = report["train_config"].get("psf")
    if not psf:
        return []
    lo, hi = psf["fwhm_range"]
    return [
        f"- model frame: galaxies decoded at a circular Gaussian PSF of FWHM "
        f"{REFERENCE_FWHM_PIXELS:g} px; training observed every stamp through a random PSF of a "
        f"bank of {report['train_config']['psf_bank_size']}: Kolmogorov or Moffat "
        f"(fraction {psf['moffat_fraction']:g}, beta {psf['moffat_beta'][0]:g}-"
        f'{psf["moffat_beta"][1]:g}), FWHM {lo:g}"-{hi:g}" (seeing factor on the survey\'s '
        f"median FWHM: log-normal of sigma {psf['typical_sigma']:g} with probability "
        f"{psf['typical_fraction']:g}, otherwise log-uniform over the range), ellipticity "
        f"|e| <= {psf['max_ellipticity']:g}",
    ]


def write_model_card(directory: str | os.PathLike) -> Path:
    """Regenerate ``README.md`` of a saved prior from its ``report.json`` (version from its
    ``config.json`` when the report has none), listing the figures present; return its path."""
    directory = Path(directory)
    report = json.loads((directory / "report.json").read_text())
    if "version" not in report and (directory / "config.json").exists():
        version = json.loads((directory / "config.json").read_text()).get("version")
        report = {**report, **({"version": version} if version else {})}
    figures = sorted(p.name for p in directory.glob("*.png"))
    path = directory / "README.md"
    atomic_write_text(path, model_card(report, figures=figures))
    return path


def validation_figures(
    work: Path, val: dict, recon: np.ndarray, samples: np.ndarray, survey: Survey
) -> None:
    """Validation figures: data / reconstruction / residual, and decoded flow samples."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from madness_ppl.plot import asinh_rgb, intensity_top, save_figure

    bands, noise = survey.band_names, survey.sky_sigma
    n = 8
    # stamps spread over the flux range (brightest, then down the brighter half), not the first n
    r = survey.band_names.index("r") if "r" in survey.band_names else 0
    order = np.argsort(-val["noiseless"][:, r].sum(axis=(-2, -1)))
    shown = order[np.linspace(0, len(order) // 2, n).astype(int)]
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.3))
    for col, i in enumerate(shown):
        top = None
        for row, (title, image) in enumerate(
            (
                ("data", val["noisy"][i]),
                ("reconstruction", recon[i]),
                ("residual", val["noisy"][i] - recon[i]),
            )
        ):
            rgb = asinh_rgb(image, bands, noise=noise, top=top)
            ax = axes[row, col]
            ax.imshow(rgb, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title)
            if row == 0:
                top = intensity_top(image, bands, noise)
    fig.suptitle(
        "held-out stamps from the brighter half: data / VAE reconstruction / residual "
        "(asinh g-r-i, same stretch)"
    )
    fig.tight_layout()
    save_figure(fig, str(work / "reconstructions.png"))
    plt.close(fig)

    fig, axes = plt.subplots(4, 8, figsize=(12, 6.3))
    for ax, image in zip(axes.ravel(), samples, strict=False):
        ax.imshow(asinh_rgb(image, bands, noise=noise), origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("galaxies decoded from flow-prior samples (noiseless, asinh g-r-i)")
    fig.tight_layout()
    save_figure(fig, str(work / "samples.png"))
    plt.close(fig)


def training_curves(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Figure of the validation curves of the three stages against training samples seen."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from madness_ppl.plot import save_figure

    panels = [
        ("vae", "val_loss", "VAE held-out loss"),
        ("vae", "val_flux_width68", "r-band flux error, 68 % width"),
        ("vae", "val_e_rms_bright", "ellipticity RMS error, brighter half"),
        ("flow", "val_nll", "flow held-out NLL / galaxy"),
        ("deblender", "val_latent_rms", "deblender latent RMS"),
    ]
    panels = [p for p in panels if any(p[1] in h["metrics"] for h in report["history"][p[0]])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, (stage, key, title) in zip(axes[0], panels, strict=True):
        history = [h for h in report["history"][stage] if key in h["metrics"]]
        seen, total = [], 0.0
        for h in history:
            total += h["samples_per_s"] * h["seconds"]
            seen.append(total)
        ax.plot(seen, [h["metrics"][key] for h in history], "o-", ms=3)
        ax.set_xlabel("training samples seen")
        ax.set_title(title, fontsize=9)
        if key != "val_loss" and key != "val_nll":
            ax.set_ylim(bottom=0)
    fig.tight_layout()
    save_figure(fig, str(path))
    plt.close(fig)


def _card_head(report: dict[str, Any]) -> list[str]:
    """The model card's title, data and training sections."""
    d, t, m = report["data"], report["timings"], report["machine"]
    cfg = d["dataset_config"]

    def name(path: str) -> str:
        return Path(path).name

    return [
        f"# Galaxy prior: {cfg['survey']} ({', '.join(cfg['bands'])}; {cfg['stamp_size']} px stamps)",
        "",
        "Trained by `madness_ppl.train.train_prior` (`madness-ppl train`) on simulated data only; "
        "this card is generated from `report.json` by `madness_ppl.train.pipeline.model_card`.",
        "",
        "## Data",
        f"- isolated stamps: {d['n_train']} training (`{name(d['isolated_train'])}`, seed "
        f"{cfg['seed']}), {d['n_val']} held out (`{name(d['isolated_val'])}`, seed "
        f"{d.get('isolated_val_seed', 'not recorded')})",
        f"- central-galaxy blends: {d['n_blends_train']} training, {d['n_blends_val']} held out",
        f"- simulator configuration: `{json.dumps(cfg['catalog_config'])}`",
        "- the held-out sets come from the same simulator as the training set (other seeds): "
        "these are in-distribution numbers",
        "",
        "## Training",
        f"- version: {report.get('version', 'not recorded')}",
        f"- command: `{report['command']}`" if report.get("command") else "- command: not recorded",
        f"- settings: `{json.dumps(report['train_config'])}`",
        *_psf_lines(report),
        _wall_time_line(t, report.get("history", {})),
        f"- machine: {m['cpu']}, {m['cores']} cores, devices {m['devices']}",
        f"- throughput (samples/s): {json.dumps(report['throughput_samples_per_s'])}",
        "",
    ]


def _validation_table(rec: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """The model card's held-out validation section: its preamble and the metrics table."""
    flux = rec["r_aperture_flux_rel_error"]
    flux_b = rec.get("r_aperture_flux_rel_error_bright")
    noise, noise_b = (
        rec.get("noise_only_flux_rel_error"),
        rec.get("noise_only_flux_rel_error_bright"),
    )
    bright = f"i < {rec['bright_mag']:g}" if rec.get("bright_mag") is not None else "all"
    shape = rec.get("shape_bright_half")
    missing = "not measured by this report"
    lines = [
        "## Held-out validation",
        "",
        "Reconstruction = decoded VAE-encoder mean of the noisy stamp; "
        + (
            "the held-out model-frame stamps (and blends) are observed through fixed round "
            "Kolmogorov PSFs with seeded noise, the encoders read the PSF descriptor and the "
            "decoded stamp is observed through the same PSF; the rows below are at the "
            "survey's median FWHM per band (shapes: model-frame reconstruction vs model-frame "
            "truth); "
            if rec.get("by_psf")
            else ""
        )
        + (
            f"bright = {bright} ({rec['n_bright']} stamps)"
            if "n_bright" in rec
            else f"{flux['n']} held-out stamps"
        )
        + '; flux = aperture of 1" radius.',
        "",
        "| metric | value |",
        "|---|---|",
        f"| r-band flux rel. error of reconstructions, median / 68 % width, all "
        f"| {flux['median']:+.4f} / {flux['width68']:.4f} |",
        f"| same, bright | {flux_b['median']:+.4f} / {flux_b['width68']:.4f} |"
        if flux_b
        else f"| same, bright | {missing} |",
    ]
    if noise and noise_b:
        lines += [
            f"| noise only (same aperture on the noisy input), 68 % width, all / bright "
            f"| {noise['width68']:.4f} / {noise_b['width68']:.4f} |",
            f"| reconstruction width / noise-only width, all | "
            f"{flux['width68'] / noise['width68']:.2f} |",
        ]
    else:
        lines.append(f"| noise only (same aperture on the noisy input), 68 % width | {missing} |")
    lines.append(
        f"| chi2 / pixel of data vs reconstruction (truth scores {rec['chi2_per_pixel_truth']:.3f}) "
        f"| {rec['chi2_per_pixel']:.3f} |"
    )
    ratio, colour = rec.get("band_flux_ratio_median"), rec.get("colour_width68")
    lines += [
        "| median decoded / true total flux per band, bright | "
        + (", ".join(f"{b} {v:.3f}" for b, v in ratio.items()) if ratio else missing)
        + " |",
        "| colour error 68 % width (mag), bright | "
        + (", ".join(f"{c} {v:.3f}" for c, v in colour.items()) if colour else missing)
        + " |",
    ]
    if shape:
        lines += [
            f"| r-band ellipticity RMS error, brighter half (median \\|e\\| recon "
            f"{shape['e_median_recon']:.3f} vs truth {shape['e_median_truth']:.3f}) "
            f"| {shape['e_rms']:.3f} |",
            f"| r-band size (HSM sigma) rel. error 68 % width, brighter half | "
            f"{shape['size_width68']:.3f} |",
        ]
    else:
        lines.append(f"| r-band ellipticity and size errors of reconstructions | {missing} |")
    lines += _flow_and_deblender_rows(report)
    lines += _by_psf_lines(rec)
    return lines


def _flow_and_deblender_rows(report: dict[str, Any]) -> list[str]:
    """The validation table's rows of the flow (held-out NLL, sample statistics) and of the
    deblending encoder."""
    lines: list[str] = []
    lines.append(
        f"| flow held-out NLL / galaxy (standard normal: {report['flow']['val_nll_normal']:.2f}) "
        f"| {report['flow']['val_nll']:.2f} |"
    )
    for key, v in report["samples"].items():
        lines.append(
            f"| decoded flow samples vs simulation, {key}: KS statistic (medians "
            f"{v['median_samples']:.4g} vs {v['median_simulated']:.4g}) | {v['ks']:.3f} |"
        )
    for key, v in report["deblender"].items():
        f = v["r_aperture_flux_rel_error"]
        lines.append(
            f"| {key} on blends: latent RMS / r-band flux error median, 68 % width "
            f"| {v['latent_rms']:.3f} / {f['median']:+.3f}, {f['width68']:.3f} |"
        )
    return lines
