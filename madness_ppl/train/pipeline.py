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
from madness_ppl.psf import REFERENCE_FWHM_PIXELS
from madness_ppl.simulate import iter_shards, load_dataset, read_config
from madness_ppl.simulate.stamps import add_noise
from madness_ppl.survey import Survey
from madness_ppl.train import evaluate
from madness_ppl.train.loop import EpochLog
from madness_ppl.train.psfs import (
    KernelBank,
    PSFDistribution,
    kernel_bank,
    observe_in_batches,
    training_kernel_grid,
)
from madness_ppl.train.report import (
    model_card,
    training_curves,
    validation_figures,
    write_model_card,
)
from madness_ppl.train.stages import (
    StageConfig,
    train_deblender,
    train_flow,
    train_vae,
    with_data_amplitude,
)

__all__ = ["TrainConfig", "load_blend_cutouts", "model_card", "train_prior", "write_model_card"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""What to train and how long.

    Parameters
    ----------
    preset
        Networks: ``"lean"`` (CPU-friendly default), ``"reference"`` (MADNESS sizes) or
        ``"v0.1.0"`` (the lean sizes with the v0.1.0 layers, for comparisons).
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
    psf
        ``None`` (default): the decoder draws galaxies at the survey's PSF (priors up to v0.2).
        A :class:`~madness_ppl.train.psfs.PSFDistribution`: a PSF-aware prior (v0.3, issue
        #28) whose decoder draws the model frame (reference PSF,
        ``PriorConfig.reference_fwhm_pixels``) and whose encoders read the observed PSF's
        descriptor (``NetworkConfig.psf_features = 3``); every dataset must then be simulated
        with ``psf="reference"`` and each stage observes its stamps through random PSFs of a
        seeded kernel bank of ``psf_bank_size`` draws from this distribution.
    psf_bank_size
        Number of observed PSFs in the kernel bank.
    """

    preset: Literal["lean", "reference", "v0.1.0"] = "lean"
    latent_dim: int = 16
    flow_layers: int = 6
    flow_hidden: tuple[int, ...] = (64, 64)
    vae: StageConfig = StageConfig(  # noqa: RUF009
        epochs=10,
        batch_size=64,
        learning_rate=1e-3,
        beta=0.1,
        snr_cap=100.0,
        augment=True,
        flux_weight_power=0.5,
    )
    flow: StageConfig = StageConfig(epochs=30, batch_size=256, learning_rate=1e-3)  # noqa: RUF009
    deblender: StageConfig = StageConfig(epochs=4, batch_size=64, learning_rate=3e-4)  # noqa: RUF009
    seed: int = 0
    max_train: int | None = None
    normalisation: float | None = None
    psf: PSFDistribution | None = None
    psf_bank_size: int = 1024


def load_blend_cutouts(
    path: str | os.PathLike, limit: int | None = None, *, noiseless: bool = False
) -> dict[str, np.ndarray]:
    """Blended cutouts and their central galaxies from a blends dataset whose fields are stamps.

    Returns ``{"cutout": (n, B, S, S), "central": (n, B, S, S)}`` in electrons, and with
    ``noiseless`` also ``"blend"``, the noiseless blended cutouts.
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
    cutouts, central, blend = [], [], []
    for shard in iter_shards(path):
        cutouts.append(shard["field"])
        central.append(shard["isolated"][:, 0])
        if noiseless:
            blend.append(shard["noiseless"])
        if limit is not None and sum(len(c) for c in cutouts) >= limit:
            break
    out = {"cutout": np.concatenate(cutouts)[:limit], "central": np.concatenate(central)[:limit]}
    if noiseless:
        out["blend"] = np.concatenate(blend)[:limit]
    return out


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
    preset = {
        "lean": NetworkConfig.lean,
        "reference": NetworkConfig.reference,
        "v0.1.0": NetworkConfig.v010,
    }[config.preset]
    network = preset(bands=len(bands), stamp_size=size, latent_dim=config.latent_dim)
    if config.psf is not None:
        network = dataclasses.replace(network, psf_features=PSF_FEATURES)
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
        reference_fwhm_pixels=None if config.psf is None else REFERENCE_FWHM_PIXELS,
    )


#: PSF descriptor numbers per band read by PSF-aware encoders (:func:`madness_ppl.psf.psf_descriptor`).
PSF_FEATURES = 3


def psf_kernel_bank(config: TrainConfig, survey: Survey, stamp_size: int) -> KernelBank:
    """The seeded kernel bank of a PSF-aware run (``config.psf`` set)."""
    return kernel_bank(
        config.psf,
        survey,
        config.psf_bank_size,
        seed=config.seed,
        grid=training_kernel_grid(stamp_size),
    )


def _check_reference_datasets(paths, config: TrainConfig) -> None:
    """A PSF-aware run needs datasets drawn at the reference PSF, and a plain one the survey's."""
    want = "survey" if config.psf is None else "reference"
    for path in paths:
        got = read_config(path).get("psf", "survey")
        if got != want:
            hint = (
                "simulate them with --psf reference, or train without --psf-aware"
                if config.psf is not None
                else "train with --psf-aware, or simulate them with the survey PSF"
            )
            raise ValueError(
                f"{path} was simulated with psf={got!r}, this run needs {want!r}: {hint}"
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
    version: str = "0.0.0",
    notes: tuple[str, ...] = (),
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
    version
        Version string stored with the weights.
    notes
        Free-text lines for the model card (how the run was made); measured numbers belong in
        the report, not here.

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
    _check_reference_datasets((isolated_train, isolated_val, blends_train, blends_val), config)
    t_start = time.perf_counter()

    keys = ("noisy", "noiseless")
    train_keys = ("noiseless",) if config.vae.augment or config.psf is not None else keys
    train = {k: v[: config.max_train] for k, v in load_dataset(isolated_train, train_keys).items()}
    prior_config = _prior_config(dataset, config, train["noiseless"])
    val = load_dataset(isolated_val, (*keys, "cat_i_mag"))
    val_i_mag = val.pop("cat_i_mag")
    prior = GalaxyPrior.init(jax.random.key(config.seed), prior_config)
    prior = with_data_amplitude(prior, train["noiseless"])
    timings: dict[str, float] = {}
    common = {"seed": config.seed, "resume": resume, "progress": progress}

    blend_paths = (blends_train, blends_val)
    prior, logs, timings, (blends, blends_held_out) = _train_stages(
        prior, train, val, blend_paths, survey, config, work, common
    )
    timings["train_total_s"] = time.perf_counter() - t_start

    held_out, recon, samples = _held_out_metrics(
        prior, val, val_i_mag, blends_held_out, survey, config.seed
    )
    metrics = {  # the report's order: reconstruction, flow, samples, deblender
        "reconstruction": held_out["reconstruction"],
        "flow": logs["flow"][-1].metrics,
        "samples": held_out["samples"],
        "deblender": held_out["deblender"],
    }
    data = {  # dataset directory names only: no paths of the training machine
        "isolated_train": Path(isolated_train).name,
        "isolated_val": Path(isolated_val).name,
        "blends_train": Path(blends_train).name,
        "blends_val": Path(blends_val).name,
        "isolated_val_seed": read_config(isolated_val)["seed"],
        "n_train": len(train["noisy"]),
        "n_val": len(val["noisy"]),
        "n_blends_train": len(blends["cutout"]),
        "n_blends_val": len(blends_held_out["cutout"]),
        "dataset_config": dataset,
    }
    report = {
        "data": data,
        "train_config": json.loads(json.dumps(dataclasses.asdict(config))),
        "version": version,
        "command": _command(isolated_train, isolated_val, blends_train, blends_val, out, config),
        "notes": list(notes),
        "machine": describe_machine(),
        "timings": timings,
        "throughput_samples_per_s": {
            stage: float(np.median([h.samples_per_s for h in log])) for stage, log in logs.items()
        },
        **metrics,
        "history": {stage: [h._asdict() for h in log] for stage, log in logs.items()},
    }
    metadata = {k: report[k] for k in ("reconstruction", "flow", "samples", "deblender", "timings")}
    metadata["dead_bands"] = list(prior.dead_bands())  # read by deblend instead of decoding
    prior = prior.replace(
        config=dataclasses.replace(prior.config, metadata=metadata, version=version)
    )
    prior.save(out, overwrite=overwrite)
    atomic_write_text(work / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "README.md", model_card(report))
    validation_figures(work, val, recon, samples, survey)
    training_curves(report, work / "training_curves.png")
    return prior, report


def _held_out_metrics(
    prior: GalaxyPrior,
    val: dict[str, np.ndarray],
    val_i_mag: np.ndarray,
    blends_held_out: dict[str, np.ndarray],
    survey: Survey,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The trained prior scored on the held-out sets (:mod:`madness_ppl.train.evaluate`):
    reconstructions, flow samples and the deblending encoder, with the reconstructions and
    samples the figures show. A PSF-aware prior is measured through fixed observed PSFs (its
    ``val["noisy"]`` is replaced by those observations)."""
    recon_metrics, val["noisy"], recon = evaluate.held_out_reconstruction(
        prior, val["noisy"], val["noiseless"], survey, i_mag=val_i_mag, seed=seed
    )
    if prior.psf_aware:  # the deblending encoder through the median observed PSF
        median = evaluate.fixed_psf_conditions(
            survey,
            prior.bands,
            grid=training_kernel_grid(prior.config.stamp_size),
            reference_fwhm_pixels=prior.config.reference_fwhm_pixels or REFERENCE_FWHM_PIXELS,
            conditions={"median": 1.0},
        )["median"]
        deblender = evaluate.deblender_metrics(
            prior,
            blends_held_out["blend"],
            blends_held_out["central"],
            psf=median,
            sky_variance=survey.sky_variance,
            seed=seed,
        )
    else:
        deblender = evaluate.deblender_metrics(
            prior, blends_held_out["cutout"], blends_held_out["central"]
        )
    samples_metrics, samples = evaluate.sample_metrics(prior, val["noiseless"], survey.pixel_scale)
    metrics = {
        "reconstruction": recon_metrics,
        "samples": samples_metrics,
        "deblender": deblender,
    }
    return metrics, recon, samples


def _train_stages(
    prior: GalaxyPrior,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    blend_paths: tuple[str | os.PathLike, str | os.PathLike],
    survey: Survey,
    config: TrainConfig,
    work: Path,
    common: dict[str, Any],
) -> tuple[GalaxyPrior, dict[str, list[EpochLog]], dict[str, float], tuple[dict, dict]]:
    """The three stages in order (VAE, flow on its latents, deblending encoder), each
    checkpointed in ``work``; returns the prior, the epoch logs and seconds per stage, and
    the training and held-out blend cut-outs."""
    timings: dict[str, float] = {}
    bank = None
    if config.psf is not None:
        t0 = time.perf_counter()
        bank = psf_kernel_bank(config, survey, prior.config.stamp_size)
        timings["psf_bank_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior, vae_log = train_vae(
        prior,
        train,
        val,
        sky_variance=survey.sky_variance,
        pixel_scale=survey.pixel_scale,
        config=config.vae,
        checkpoint=work / "vae.ckpt.npz",
        psf_bank=bank,
        **common,
    )
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    flow_inputs: dict[str, Any] = {}
    if bank is not None:  # the flow sees latents of stamps observed each through its own PSF
        rng = np.random.default_rng([config.seed, 2])
        index = rng.integers(len(bank), size=len(train["noiseless"]))
        observed = observe_in_batches(train["noiseless"], bank, index)
        train["noisy"] = add_noise(observed, survey.sky_variance, rng)[0]
        val_index = rng.integers(len(bank), size=len(val["noiseless"]))
        observed = observe_in_batches(val["noiseless"], bank, val_index)
        flow_inputs = {
            "train_psf": bank.descriptor[index],
            "val_psf": bank.descriptor[val_index],
        }
        val_noisy = add_noise(observed, survey.sky_variance, rng)[0]
    else:
        val_noisy = val["noisy"]
        if "noisy" not in train:  # augmented VAE training kept only the noiseless pool
            rng = np.random.default_rng([config.seed, 2])
            train["noisy"] = add_noise(train["noiseless"], survey.sky_variance, rng)[0]
    prior, flow_log = train_flow(
        prior,
        train["noisy"],
        val_noisy,
        config=config.flow,
        checkpoint=work / "flow.ckpt.npz",
        **flow_inputs,
        **common,
    )
    timings["flow_s"] = time.perf_counter() - t0

    noiseless = bank is not None
    blends = load_blend_cutouts(blend_paths[0], config.max_train, noiseless=noiseless)
    blends_held_out = load_blend_cutouts(blend_paths[1], noiseless=noiseless)
    t0 = time.perf_counter()
    prior, deblender_log = train_deblender(
        prior,
        blends,
        blends_held_out,
        config=config.deblender,
        checkpoint=work / "deblender.ckpt.npz",
        psf_bank=bank,
        sky_variance=survey.sky_variance,
        **common,
    )
    timings["deblender_s"] = time.perf_counter() - t0
    logs = {"vae": vae_log, "flow": flow_log, "deblender": deblender_log}
    return prior, logs, timings, (blends, blends_held_out)


def _command(isolated_train, isolated_val, blends_train, blends_val, out, config) -> str:
    """The ``madness-ppl train`` command equivalent to this run (dataset directory names only)."""
    names = " ".join(Path(p).name for p in (isolated_train, isolated_val, blends_train, blends_val))
    vae = config.vae
    parts = [
        f"madness-ppl train {names} --out {Path(out).name} --preset {config.preset}",
        f"--latent-dim {config.latent_dim} --vae-epochs {vae.epochs} --vae-lr {vae.learning_rate:g}",
        f"--beta {vae.beta:g} --snr-cap {vae.snr_cap or 0:g}",
        f"--flux-weight-power {vae.flux_weight_power:g}",
        "--augment" if vae.augment else "--no-augment",
        f"--flow-epochs {config.flow.epochs} --deblender-epochs {config.deblender.epochs}",
        f"--batch-size {vae.batch_size} --seed {config.seed}",
    ]
    if config.max_train is not None:
        parts.append(f"--max-train {config.max_train}")
    if config.psf is not None:
        parts.append(f"--psf-aware --psf-bank-size {config.psf_bank_size}")
    return " ".join(parts)
