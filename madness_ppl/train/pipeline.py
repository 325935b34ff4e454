"""End-to-end training of a :class:`~madness_ppl.prior.GalaxyPrior` from simulated datasets.

``train_prior`` runs the three stages of :mod:`madness_ppl.train.stages` on datasets written by
``madness-ppl simulate`` (isolated stamps for stages 1-2, blends with a central galaxy for stage 3),
checkpointing every epoch under ``<out>.work/`` so that ``resume=True`` continues an interrupted
run, then evaluates the prior on the held-out sets (:mod:`madness_ppl.train.evaluate`) and writes

* ``<out>/`` the prior (``weights.safetensors`` + ``config.json`` with the metrics as metadata),
* ``<out>.work/report.json`` the metrics, training history and timings,
* ``<out>.work/reconstructions.png`` and ``samples.png``, the validation figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from madness_ppl.atomic import atomic_write_text
from madness_ppl.machine import describe_machine
from madness_ppl.nn import FlowConfig, NetworkConfig
from madness_ppl.prior import GalaxyPrior, PriorConfig
from madness_ppl.simulate import iter_shards, load_dataset, read_config
from madness_ppl.survey import Survey
from madness_ppl.train import evaluate
from madness_ppl.train.stages import StageConfig, train_deblender, train_flow, train_vae

__all__ = ["TrainConfig", "load_blend_cutouts", "train_prior"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""What to train and how long.

    Parameters
    ----------
    preset
        Network sizes: ``"lean"`` (CPU-friendly default) or ``"reference"`` (MADNESS sizes).
    latent_dim
        Latent dimension.
    flow_layers, flow_hidden
        Coupling layers of the flow and their hidden widths.
    vae, flow, deblender
        Optimisation settings of each stage.
    seed
        Master seed (initialisation, minibatch order, reparameterisation noise).
    max_train
        Use at most this many training samples per stage (``None``: all).
    normalisation
        Electrons per network unit: one number for every band, or ``None`` (default) for a
        per-band value learned from the data, the median over training stamps of the peak
        noiseless pixel, :math:`\nu_b = \operatorname{median}_n \max_{pix} y_{n,b}`, so a
        typical galaxy peaks at 1 in every band.
    """

    preset: Literal["lean", "reference"] = "lean"
    latent_dim: int = 16
    flow_layers: int = 6
    flow_hidden: tuple[int, ...] = (64, 64)
    vae: StageConfig = StageConfig(epochs=10, batch_size=64, learning_rate=1e-3, beta=0.1)  # noqa: RUF009
    flow: StageConfig = StageConfig(epochs=30, batch_size=256, learning_rate=1e-3)  # noqa: RUF009
    deblender: StageConfig = StageConfig(epochs=4, batch_size=64, learning_rate=3e-4)  # noqa: RUF009
    seed: int = 0
    max_train: int | None = None
    normalisation: float | None = None


def load_blend_cutouts(path: str | os.PathLike, limit: int | None = None) -> dict[str, np.ndarray]:
    """Blended cutouts and their central galaxies from a blends dataset whose fields are stamps.

    Returns ``{"cutout": (n, B, S, S), "central": (n, B, S, S)}`` in electrons.
    """
    config = read_config(path)
    if config["kind"] != "blends":
        raise ValueError(f"{path} is a {config['kind']} dataset; stage 3 needs blends")
    layout = config["blend_config"]
    if layout["field_size"] != layout["stamp_size"] or not layout["central_galaxy"]:
        raise ValueError(
            f"{path}: stage 3 needs fields of the stamp size with a central galaxy "
            "(simulate blends --field-size 45 --central-galaxy)"
        )
    cutouts, central = [], []
    for shard in iter_shards(path):
        cutouts.append(shard["field"])
        central.append(shard["isolated"][:, 0])
        if limit is not None and sum(len(c) for c in cutouts) >= limit:
            break
    return {"cutout": np.concatenate(cutouts)[:limit], "central": np.concatenate(central)[:limit]}


def per_band_peak(noiseless: np.ndarray) -> tuple[float, ...]:
    r"""Per-band normalisation :math:`\nu_b = \operatorname{median}_n \max_{pix} y_{n,b}`.

    Parameters
    ----------
    noiseless
        Noiseless training stamps in electrons, shape ``(n, bands, S, S)``.
    """
    peaks = np.median(np.max(noiseless, axis=(-2, -1)), axis=0)
    if not np.all(np.isfinite(peaks) & (peaks > 0)):
        raise ValueError(f"cannot normalise: median peak per band is {peaks}")
    return tuple(float(p) for p in peaks)


def _prior_config(
    dataset: dict[str, Any], config: TrainConfig, noiseless: np.ndarray
) -> PriorConfig:
    bands, size = tuple(dataset["bands"]), dataset["stamp_size"]
    preset = NetworkConfig.reference if config.preset == "reference" else NetworkConfig.lean
    network = preset(bands=len(bands), stamp_size=size, latent_dim=config.latent_dim)
    flow = FlowConfig(
        latent_dim=config.latent_dim, n_layers=config.flow_layers, hidden=config.flow_hidden
    )
    norm = per_band_peak(noiseless) if config.normalisation is None else config.normalisation
    return PriorConfig(
        survey=dataset["survey"],
        bands=bands,
        stamp_size=size,
        normalisation=norm,
        network=network,
        flow=flow,
    )


def train_prior(
    isolated_train: str | os.PathLike,
    isolated_val: str | os.PathLike,
    blends_train: str | os.PathLike,
    blends_val: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[GalaxyPrior, dict[str, Any]]:
    """Train, evaluate and save a galaxy prior (see the module docstring for the outputs).

    Parameters
    ----------
    isolated_train, isolated_val
        Isolated-stamp datasets (training and held-out).
    blends_train, blends_val
        Blend datasets with ``field_size == stamp_size`` and a central galaxy.
    out
        Directory of the saved prior.
    config
        Sizes, epochs, learning rates and seed.
    resume
        Continue from the checkpoints in ``<out>.work/``.
    overwrite
        Replace an existing prior at ``out``.
    progress
        Show progress bars.

    Returns
    -------
    prior, report
        The trained prior and the validation report.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    dataset = read_config(isolated_train)
    survey = Survey.named(dataset["survey"]).select_bands(dataset["bands"])
    t_start = time.perf_counter()

    keys = ("noisy", "noiseless")
    train = {k: v[: config.max_train] for k, v in load_dataset(isolated_train, keys).items()}
    prior_config = _prior_config(dataset, config, train["noiseless"])
    val = load_dataset(isolated_val, keys)
    prior = GalaxyPrior.init(jax.random.key(config.seed), prior_config)
    timings: dict[str, float] = {}
    common = {"seed": config.seed, "resume": resume, "progress": progress}

    t0 = time.perf_counter()
    prior, vae_log = train_vae(
        prior,
        train,
        val,
        sky_variance=survey.sky_variance,
        config=config.vae,
        checkpoint=work / "vae.ckpt.npz",
        **common,
    )
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prior, flow_log = train_flow(
        prior,
        train["noisy"],
        val["noisy"],
        config=config.flow,
        checkpoint=work / "flow.ckpt.npz",
        **common,
    )
    timings["flow_s"] = time.perf_counter() - t0

    blends = load_blend_cutouts(blends_train, config.max_train)
    blends_held_out = load_blend_cutouts(blends_val)
    t0 = time.perf_counter()
    prior, deblender_log = train_deblender(
        prior,
        blends,
        blends_held_out,
        config=config.deblender,
        checkpoint=work / "deblender.ckpt.npz",
        **common,
    )
    timings["deblender_s"] = time.perf_counter() - t0
    timings["train_total_s"] = time.perf_counter() - t_start

    recon_metrics, recon = evaluate.reconstruction_metrics(
        prior, val["noisy"], val["noiseless"], survey.sky_variance
    )
    samples_metrics, samples = evaluate.sample_metrics(prior, val["noiseless"], survey.pixel_scale)
    deblend_metrics = evaluate.deblender_metrics(
        prior, blends_held_out["cutout"], blends_held_out["central"]
    )
    report = {
        "data": {
            "isolated_train": str(isolated_train),
            "isolated_val": str(isolated_val),
            "blends_train": str(blends_train),
            "blends_val": str(blends_val),
            "n_train": len(train["noisy"]),
            "n_val": len(val["noisy"]),
            "n_blends_train": len(blends["cutout"]),
            "n_blends_val": len(blends_held_out["cutout"]),
            "dataset_config": dataset,
        },
        "train_config": json.loads(json.dumps(dataclasses.asdict(config))),
        "machine": describe_machine(),
        "timings": timings,
        "throughput_samples_per_s": {
            "vae": float(np.median([h.samples_per_s for h in vae_log])),
            "flow": float(np.median([h.samples_per_s for h in flow_log])),
            "deblender": float(np.median([h.samples_per_s for h in deblender_log])),
        },
        "reconstruction": recon_metrics,
        "flow": flow_log[-1].metrics,
        "samples": samples_metrics,
        "deblender": deblend_metrics,
        "history": {
            "vae": [h._asdict() for h in vae_log],
            "flow": [h._asdict() for h in flow_log],
            "deblender": [h._asdict() for h in deblender_log],
        },
    }
    metadata = {k: report[k] for k in ("reconstruction", "flow", "samples", "deblender", "timings")}
    prior = prior.replace(config=dataclasses.replace(prior.config, metadata=metadata))
    prior.save(out, overwrite=overwrite)
    atomic_write_text(work / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "README.md", model_card(report))
    _figures(work, val, recon, samples, survey)
    return prior, report


def model_card(report: dict[str, Any]) -> str:
    """A markdown model card from a training report: data, settings, time, machine, metrics."""
    d, t, m = report["data"], report["timings"], report["machine"]
    rec = report["reconstruction"]
    flux = rec["r_aperture_flux_rel_error"]
    lines = [
        f"# Galaxy prior: {d['dataset_config']['survey']} "
        f"({', '.join(d['dataset_config']['bands'])}; {d['dataset_config']['stamp_size']} px stamps)",
        "",
        "Trained by `madness_ppl.train.train_prior` (`madness-ppl train`) on simulated data only.",
        "",
        "## Data",
        f"- isolated stamps: {d['n_train']} training (`{d['isolated_train']}`), "
        f"{d['n_val']} held out (`{d['isolated_val']}`)",
        f"- central-galaxy blends: {d['n_blends_train']} training, {d['n_blends_val']} held out",
        f"- simulator configuration: `{json.dumps(d['dataset_config']['catalog_config'])}`",
        "",
        "## Training",
        f"- settings: `{json.dumps(report['train_config'])}`",
        f"- wall time: VAE {t['vae_s'] / 60:.1f} min, flow {t['flow_s'] / 60:.1f} min, "
        f"deblender {t['deblender_s'] / 60:.1f} min (total {t['train_total_s'] / 60:.1f} min)",
        f"- machine: {m['cpu']}, {m['cores']} cores, devices {m['devices']}",
        f"- throughput (samples/s): {json.dumps(report['throughput_samples_per_s'])}",
        "",
        "## Held-out validation",
        "| metric | value |",
        "|---|---|",
        f"| VAE r-band aperture flux rel. error, median | {flux['median']:+.4f} |",
        f"| VAE r-band aperture flux rel. error, 68 % width | {flux['width68']:.4f} |",
        f"| chi2 / pixel of data vs reconstruction (truth scores {rec['chi2_per_pixel_truth']:.3f}) "
        f"| {rec['chi2_per_pixel']:.3f} |",
        f"| flow held-out NLL / galaxy (standard normal: {report['flow']['val_nll_normal']:.2f}) "
        f"| {report['flow']['val_nll']:.2f} |",
    ]
    for name, v in report["samples"].items():
        lines.append(
            f"| decoded flow samples vs simulation, {name}: KS statistic (medians "
            f"{v['median_samples']:.4g} vs {v['median_simulated']:.4g}) | {v['ks']:.3f} |"
        )
    for name, v in report["deblender"].items():
        f = v["r_aperture_flux_rel_error"]
        lines.append(
            f"| {name} on blends: latent RMS / r-band flux error median, 68 % width "
            f"| {v['latent_rms']:.3f} / {f['median']:+.3f}, {f['width68']:.3f} |"
        )
    lines += ["", "Figures: `reconstructions.png`, `samples.png` (written next to the report).", ""]
    return "\n".join(lines)


def _figures(work: Path, val: dict, recon: np.ndarray, samples: np.ndarray, survey: Survey) -> None:
    """Validation figures: data / reconstruction / residual, and decoded flow samples."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from madness_ppl.plot import asinh_rgb, intensity_top, save_figure

    bands, noise = survey.band_names, survey.sky_sigma
    n = 6
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.3))
    for i in range(n):
        top = None
        for row, (title, image) in enumerate(
            (
                ("data", val["noisy"][i]),
                ("reconstruction", recon[i]),
                ("residual", val["noisy"][i] - recon[i]),
            )
        ):
            rgb = asinh_rgb(image, bands, noise=noise, top=top)
            ax = axes[row, i]
            ax.imshow(rgb, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title)
            if row == 0:
                top = intensity_top(image, bands, noise)
    fig.suptitle(
        "held-out stamps: data / VAE reconstruction / residual (asinh g-r-i, same stretch)"
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
