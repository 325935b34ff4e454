r"""The three training stages of a galaxy prior, as losses and stage runners.

Stage 1, VAE (encoder :math:`q_\phi(z|x)`, decoder :math:`f_\theta`), on noisy -> noiseless
isolated stamps (with ``augment``, every minibatch draws a random symmetry of the square and fresh
noise for each noiseless stamp, :mod:`madness_ppl.train.augment`), with the noise-weighted loss
of MADNESS (normalised units, :math:`\nu` the normalisation constant, :math:`\sigma_b^2` the
sky variance of band *b*):

.. math::
    \mathcal{L}_1 = \frac{1}{N_\mathrm{pix}} \mathbb{E}_{x}\Big[
      \tfrac12 \sum_\mathrm{pix} \frac{(y - f_\theta(z))^2}{\sigma_b^2/\nu^2 + \max(y, 0)/\nu}
      + \beta\, \mathrm{KL}\big(q_\phi(z|x) \,\|\, N(0, I)\big)\Big],
    \quad z \sim q_\phi(z|x).

With a PSF kernel bank (:mod:`madness_ppl.train.psfs`; PSF-aware priors) the stamps are
model-frame stamps :math:`y^\mathrm{ref}` and every minibatch observes each through a random
kernel :math:`K` of the bank: :math:`y = \mathrm{crop}(K \ast y^\mathrm{ref})`, fresh noise on
:math:`y`, the encoder reads :math:`(x, d_K)` (:math:`d_K` the PSF descriptor) and the decoded
model-frame stamp is observed through the same kernel before the loss,
:math:`f_\theta(z) \to \mathrm{crop}(K \ast f_\theta(z))`. The latents stay PSF-free.

Stage 2, flow :math:`p_\psi` on the frozen encoder's aggregate posterior (a fresh draw
:math:`z \sim q_\phi(z|x)` per stamp and step): :math:`\mathcal{L}_2 = -\mathbb{E}[\log p_\psi(z)]`.

Stage 3, deblending encoder :math:`g_\chi` (initialised from the VAE encoder) on blended cutouts
:math:`b` whose central galaxy has noiseless image :math:`y_0`; it regresses that galaxy's latent
:math:`z_0 = \mu_\phi(y_0)`: :math:`\mathcal{L}_3 = \mathbb{E}\,\|\mu_\chi(b) - z_0\|^2`.

Why one module of ~670 lines: one loss and one runner per stage, over the shared stage runner
``_fit`` (checkpoints, fingerprints, validation); the card and figures live in
:mod:`madness_ppl.train.report`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from madness_ppl.chunks import map_chunks
from madness_ppl.likelihood import pixel_variance
from madness_ppl.nn import (
    decode,
    encode,
    flow_log_prob,
    init_flow,
    kl_to_standard_normal,
    sample_latent,
    standard_normal_log_prob,
)
from madness_ppl.nn.vae import set_amplitude_offset
from madness_ppl.prior import GalaxyPrior
from madness_ppl.train.augment import add_noise, random_dihedral
from madness_ppl.train.checkpoint import pytree_digest
from madness_ppl.train.loop import EpochLog, run_epochs
from madness_ppl.train.psfs import KernelBank, observe, observe_in_batches

__all__ = [
    "StageConfig",
    "encode_in_batches",
    "train_deblender",
    "train_flow",
    "train_vae",
    "vae_loss",
    "with_data_amplitude",
]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    r"""Optimisation settings of one stage.

    Parameters
    ----------
    epochs, batch_size
        Passes over the data and minibatch size.
    learning_rate
        Peak Adam learning rate, decayed by a cosine schedule to 1 % over the run.
    beta
        KL weight of the VAE stage (ignored by the others).
    clip
        Global gradient-norm clipping.
    snr_cap
        VAE stage: per-galaxy loss weights :math:`1 / (1 + \mathrm{SNR}^2/\mathrm{SNR}_{\rm cap}^2)`
        (see :func:`vae_loss`); ``None`` for unweighted.
    augment
        VAE stage: random :math:`D_4` symmetry and fresh noise per minibatch (needs only the
        noiseless stamps; exact for circular PSFs).
    flux_weight_power, max_weight_ratio
        VAE stage: draw training stamps with probability
        :math:`\propto \min((F_n / F_{\rm med})^{\gamma}, r_{\max})`, :math:`F_n` the stamp's
        total normalised flux, :math:`\gamma` = ``flux_weight_power`` (0: uniform).  Deep number
        counts give :math:`dN/d\ln F \propto F^{-0.78}`: most stamps are faint and carry little
        shape information, so :math:`\gamma > 0` shows the decoder bright, resolved galaxies
        more often.  Only the VAE sees this distribution; the flow is fitted to the unweighted
        population.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    beta: float = 0.1
    clip: float = 10.0
    snr_cap: float | None = None
    augment: bool = False
    flux_weight_power: float = 0.0
    max_weight_ratio: float = 30.0


def _optimizer(config: StageConfig, steps: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(steps, 1), alpha=0.01)
    return optax.chain(optax.clip_by_global_norm(config.clip), optax.adam(schedule))


def with_data_amplitude(prior: GalaxyPrior, noiseless: np.ndarray) -> GalaxyPrior:
    r"""Start the decoder's amplitude head at the training set's median flux per band.

    :math:`a_b \leftarrow \log \operatorname{median}_n (\sum_\mathrm{pix} y_{n,b} / \nu_b)`
    (:func:`madness_ppl.nn.vae.set_amplitude_offset`); a no-op for networks without the head.

    Parameters
    ----------
    prior
        A freshly initialised prior.
    noiseless
        Noiseless training stamps in electrons, ``(n, bands, S, S)``.
    """
    network = prior.config.network
    if not network.amplitude:
        return prior
    flux = np.median(np.sum(noiseless, axis=(-2, -1)), axis=0) / np.asarray(
        prior.config.normalisation
    )
    if not np.all(np.isfinite(flux) & (flux > 0)):
        raise ValueError(f"median training flux per band must be positive, got {flux}")
    params = set_amplitude_offset(prior.decoder_params, network, np.log(flux))
    return prior.replace(decoder_params=params)


def encode_in_batches(
    params, network, images: np.ndarray, batch: int = 256, psf: np.ndarray | None = None
):
    """Encoder means and Cholesky factors of ``images`` (normalised units), in batches;
    ``psf``: the images' PSF descriptors ``(n, bands, k)`` for a PSF-aware encoder."""
    if psf is None:

        def moments(chunk):
            out = encode(params, network, jnp.asarray(chunk))
            return out.mean, out.scale_tril

        return map_chunks(moments, images, batch)

    def moments_psf(chunk):
        out = encode(params, network, jnp.asarray(chunk[0]), jnp.asarray(chunk[1]))
        return out.mean, out.scale_tril

    return map_chunks(moments_psf, (images, np.asarray(psf, np.float32)), batch)


def vae_loss(
    params: dict,
    prior: GalaxyPrior,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    sky_variance: jax.Array,
    beta: float,
    snr_cap: float | None = None,
) -> jax.Array:
    r"""Stage-1 loss per pixel (see the module docstring); ``batch`` holds electrons.

    With ``snr_cap`` each galaxy's term (:math:`\tfrac12\chi^2_n + \beta\,\mathrm{KL}_n`) is
    weighted by :math:`w_n = 1 / (1 + \mathrm{SNR}_n^2 / \mathrm{SNR}_{\rm cap}^2)`, where
    :math:`\mathrm{SNR}_n^2 = \sum_\mathrm{pix} y^2 / \sigma^2` is the galaxy's optimal
    signal-to-noise ratio squared.  A relative model error :math:`\varepsilon` costs
    :math:`\chi^2 \approx \varepsilon^2 \mathrm{SNR}^2`, which spans five decades across a
    survey population, so without weights the brightest galaxy of a minibatch sets the whole
    gradient; with them every galaxy brighter than the cap pulls with the same strength on its
    *relative* error (the trade-off between its :math:`\chi^2` and KL is unchanged).

    PSF-aware training (:func:`train_vae` with a kernel bank) adds to ``batch`` the observed
    stamps' PSF descriptors ``"psf"`` ``(n, bands, k)``, read by the encoder, and their
    difference kernels ``"kernel"`` ``(n, bands, G, G // 2 + 1)``: the decoded model-frame
    stamp is then observed through the kernel (:func:`madness_ppl.train.psfs.observe`) before
    it is compared with ``batch["noiseless"]``. Without these keys the loss is unchanged.
    """
    cfg, nu = prior.config.network, prior.normalisation
    x = batch["noisy"] / nu
    y = batch["noiseless"] / nu
    q = encode(params["encoder"], cfg, x, batch.get("psf"))
    z = sample_latent(key, q.mean, q.scale_tril)
    y_hat = decode(params["decoder"], cfg, z)
    if "kernel" in batch:
        y_hat = observe(y_hat, batch["kernel"])
    variance = pixel_variance(y, sky_variance, unit=nu, xp=jnp)
    chi2 = jnp.sum((y - y_hat) ** 2 / variance, axis=(-3, -2, -1))
    kl = kl_to_standard_normal(q.mean, q.scale_tril)
    per_galaxy = 0.5 * chi2 + beta * kl
    if snr_cap is not None:
        snr2 = jnp.sum(y**2 / variance, axis=(-3, -2, -1))
        per_galaxy = per_galaxy / (1.0 + jax.lax.stop_gradient(snr2) / snr_cap**2)
    return jnp.mean(per_galaxy) / y[0].size


def observe_with_bank(
    key: jax.Array, stamps: jax.Array, bank: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Observe each model-frame stamp ``(n, bands, S, S)`` through a uniformly drawn kernel of
    ``bank = (fourier, descriptor)`` (device arrays of a :class:`KernelBank`); returns the
    observed noiseless stamps, their kernels and their PSF descriptors."""
    fourier, descriptor = bank
    index = jax.random.randint(key, (stamps.shape[0],), 0, fourier.shape[0])
    kernel = fourier[index]
    return observe(stamps, kernel), kernel, descriptor[index]


def bank_fingerprint(bank: KernelBank | None) -> dict | None:
    """What identifies a kernel bank in checkpoint fingerprints (size, grid, a checksum)."""
    if bank is None:
        return None
    return {
        "n": len(bank),
        "grid": bank.grid,
        "descriptor_sum": round(float(np.sum(np.abs(bank.descriptor), dtype=np.float64)), 4),
    }


def _observed_validation(
    val: dict[str, np.ndarray], bank: KernelBank, sky_variance: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """Held-out model-frame stamps observed through a fixed, seeded kernel each, with fixed
    noise: ``noisy``, ``noiseless``, ``index`` (into the bank) and ``psf`` (descriptors)."""
    from madness_ppl.simulate.stamps import add_noise as add_noise_np

    rng = np.random.default_rng([seed, 28, 1])
    index = rng.integers(len(bank), size=len(val["noiseless"]))
    noiseless = observe_in_batches(val["noiseless"], bank, index)
    noisy, _ = add_noise_np(noiseless, np.asarray(sky_variance), rng)
    return {"noisy": noisy, "noiseless": noiseless, "index": index, "psf": bank.descriptor[index]}


def flux_weights(
    prior: GalaxyPrior, noiseless: np.ndarray, config: StageConfig
) -> np.ndarray | None:
    """Sampling weights of :class:`StageConfig` ``flux_weight_power`` (``None`` when it is 0)."""
    if config.flux_weight_power == 0:
        return None
    flux = np.sum(noiseless.sum(axis=(-2, -1)) / np.asarray(prior.config.normalisation), axis=-1)
    flux = np.maximum(flux, 1e-6 * np.median(flux))
    ratio = (flux / np.median(flux)) ** config.flux_weight_power
    return np.minimum(ratio, config.max_weight_ratio)


def _fingerprint(
    name: str, prior: GalaxyPrior, config: StageConfig, seed: int, extra: dict | None = None
) -> str:
    """What makes a stage's run: its name, settings, seed and the prior's architecture.

    The number of epochs is left out, so a run can be resumed with more (or fewer) epochs to
    train it further; the cosine schedule is then recomputed for the new length.
    """
    settings = dataclasses.asdict(config)
    del settings["epochs"]
    record = {
        "stage": name,
        "config": settings,
        "seed": seed,
        "network": prior.config.network.to_dict(),
        "flow": prior.config.flow.to_dict(),
        "normalisation": list(prior.config.normalisation),
    }
    if extra is not None:  # e.g. the PSF kernel bank; absent keeps older fingerprints valid
        record["extra"] = extra
    return json.dumps(record, sort_keys=True)


def _fit(
    name: str,
    prior: GalaxyPrior,
    loss_fn,
    params,
    data,
    validate,
    config: StageConfig,
    *,
    seed: int,
    checkpoint: Path | None,
    resume: bool,
    progress: bool,
    weights: np.ndarray | None = None,
    consts=None,
    fingerprint_extra: dict | None = None,
    upstream: Any = None,
):
    """Adam + cosine decay on ``loss_fn(params, batch, key)`` with the resumable loop; checkpoints
    carry the stage's fingerprint (:func:`_fingerprint`).

    ``consts`` (a pytree of device arrays, e.g. a PSF kernel bank) is passed to the jitted step
    as an argument, not baked into the program as a constant: ``loss_fn(params, batch, key,
    consts)`` is then called. ``upstream`` (a pytree: the frozen parameters the stage learns
    on) is digested into the checkpoints, so a resumed stage whose upstream changed restarts.
    """
    steps = config.epochs * (len(next(iter(data.values()))) // config.batch_size)
    opt = _optimizer(config, steps)
    objective = loss_fn if consts is not None else (lambda p, b, k, c: loss_fn(p, b, k))

    @jax.jit
    def jitted_step(state, batch, key, consts):
        params, opt_state = state
        loss, grads = jax.value_and_grad(objective)(params, batch, key, consts)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def step(state, batch, key):
        return jitted_step(state, batch, key, consts)

    state = (params, opt.init(params))
    state, history = run_epochs(
        name,
        step=step,
        state=state,
        data=data,
        validate=lambda s: validate(s[0]),
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=seed,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        weights=weights,
        fingerprint=_fingerprint(name, prior, config, seed, fingerprint_extra),
        upstream=None if upstream is None else pytree_digest(upstream),
    )
    return state[0], history


def train_vae(
    prior: GalaxyPrior,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    *,
    sky_variance: np.ndarray,
    pixel_scale: float = 0.2,
    config: StageConfig = StageConfig(),
    seed: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    psf_bank: KernelBank | None = None,
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 1: train encoder + decoder on ``train["noisy"] -> train["noiseless"]`` (electrons).

    With ``config.augment`` only ``train["noiseless"]`` is used: each minibatch is a random
    symmetry of the square of the stamps plus fresh noise.  Validation metrics (fixed noisy
    held-out stamps ``val``): the loss (``val_loss``), the r-band aperture-flux 68 % width of the
    reconstructions (``val_flux_width68``) and the RMS ellipticity error of the brighter half
    (``val_e_rms_bright``, :func:`~madness_ppl.train.evaluate.shape_error`).

    With ``psf_bank`` (a PSF-aware prior, :mod:`madness_ppl.train.psfs`) ``train["noiseless"]``
    and ``val["noiseless"]`` are model-frame stamps (at the reference PSF) and only they are
    used: each minibatch takes a random symmetry of each stamp (with ``config.augment``),
    observes it through a random kernel of the bank and adds fresh noise; the encoder reads
    the kernel's PSF descriptor and the decoded stamp is observed through the same kernel
    (:func:`vae_loss`).  Validation observes each held-out stamp through a fixed seeded kernel
    with fixed noise, and its metrics compare observed reconstructions with observed truth.
    """

    sky = jnp.asarray(sky_variance, jnp.float32)

    def plain_loss(params, batch, key):
        return vae_loss(
            params, prior, batch, key, sky_variance=sky, beta=config.beta, snr_cap=config.snr_cap
        )

    def augmented_loss(params, batch, key):
        k_sym, k_noise, k_z = jax.random.split(key, 3)
        noiseless = random_dihedral(k_sym, batch["noiseless"])
        noisy = add_noise(k_noise, noiseless, sky)
        return plain_loss(params, {"noisy": noisy, "noiseless": noiseless}, k_z)

    def bank_loss(params, batch, key, bank):
        k_sym, k_psf, k_noise, k_z = jax.random.split(key, 4)
        reference = batch["noiseless"]
        if config.augment:
            reference = random_dihedral(k_sym, reference)
        noiseless, kernel, descriptor = observe_with_bank(k_psf, reference, bank)
        noisy = add_noise(k_noise, noiseless, sky)
        observed = {"noisy": noisy, "noiseless": noiseless, "psf": descriptor, "kernel": kernel}
        return plain_loss(params, observed, k_z)

    validate = _vae_validation(prior, plain_loss, val, sky_variance, pixel_scale, psf_bank, seed)

    params = {"encoder": prior.encoder_params, "decoder": prior.decoder_params}
    consts = None
    if psf_bank is not None:
        if not prior.psf_aware:
            raise ValueError("a PSF kernel bank needs a PSF-aware network (psf_features > 0)")
        data, loss_fn = {"noiseless": train["noiseless"]}, bank_loss
        consts = (jnp.asarray(psf_bank.fourier), jnp.asarray(psf_bank.descriptor))
    elif config.augment:
        data, loss_fn = {"noiseless": train["noiseless"]}, augmented_loss
    else:
        data, loss_fn = {"noisy": train["noisy"], "noiseless": train["noiseless"]}, plain_loss
    weights = flux_weights(prior, train["noiseless"], config)
    run = {"seed": seed, "checkpoint": checkpoint, "resume": resume, "progress": progress}
    params, history = _fit(
        "vae",
        prior,
        loss_fn,
        params,
        data,
        validate,
        config,
        weights=weights,
        consts=consts,
        fingerprint_extra=bank_fingerprint(psf_bank),
        **run,
    )
    return prior.replace(
        encoder_params=params["encoder"], decoder_params=params["decoder"]
    ), history


def _vae_validation(
    prior: GalaxyPrior,
    loss: Callable,
    val: dict[str, np.ndarray],
    sky_variance: ArrayLike,
    pixel_scale: float,
    psf_bank: KernelBank | None,
    seed: int,
) -> Callable[[dict], dict[str, float]]:
    """The VAE stage's epoch validation: held-out ``loss``, r-band aperture flux width and
    ellipticity RMS of the brighter half, of reconstructions (observed through the bank's PSFs
    for a PSF-aware network)."""
    from madness_ppl.train import evaluate

    val_loss = jax.jit(loss)
    band = prior.bands.index("r") if "r" in prior.bands else 0
    if psf_bank is not None:
        val = _observed_validation(val, psf_bank, sky_variance, seed)
    bright = evaluate.brighter_half(val["noiseless"], band)

    def val_chunk(s: int) -> dict:
        chunk = {k: val[k][s : s + 256] for k in ("noisy", "noiseless")}
        if psf_bank is not None:
            chunk["psf"] = val["psf"][s : s + 256]
            chunk["kernel"] = psf_bank.fourier[val["index"][s : s + 256]]
        return chunk

    def reconstruct(trained: GalaxyPrior) -> np.ndarray:
        if psf_bank is None:
            return evaluate.reconstruct(trained, val["noisy"])
        z = map_chunks(lambda c: trained.encode(c[0], psf=c[1]), (val["noisy"], val["psf"]), 256)
        model = map_chunks(trained.decode, z, 256)
        return observe_in_batches(model, psf_bank, val["index"])

    def validate(params):
        losses = [
            val_loss(params, val_chunk(s), jax.random.key(0))
            for s in range(0, len(val["noisy"]), 256)
        ]
        trained = prior.replace(encoder_params=params["encoder"], decoder_params=params["decoder"])
        recon = reconstruct(trained)
        flux = evaluate.summarise_relative_error(
            evaluate.central_aperture_flux(recon[:, band]),
            evaluate.central_aperture_flux(val["noiseless"][:, band]),
        )
        shapes = evaluate.shape_error(
            recon[bright, band], val["noiseless"][bright, band], pixel_scale
        )
        return {
            "val_loss": float(np.mean(jax.device_get(losses))),
            "val_flux_width68": flux["width68"],
            "val_e_rms_bright": shapes["e_rms"],
        }

    return validate


def train_flow(
    prior: GalaxyPrior,
    train_noisy: np.ndarray,
    val_noisy: np.ndarray,
    *,
    config: StageConfig = StageConfig(epochs=30, batch_size=256, learning_rate=1e-3),
    seed: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    train_psf: np.ndarray | None = None,
    val_psf: np.ndarray | None = None,
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 2: fit the flow to the frozen encoder's aggregate posterior.

    Validation metrics: held-out negative log-likelihood per latent vector under the flow
    (``val_nll``) and under a standard normal (``val_nll_normal``), on encoder means of ``val_noisy``.

    PSF-aware priors: ``train_noisy`` and ``val_noisy`` are *observed* stamps (each through its
    own PSF, :func:`madness_ppl.train.psfs.observe_in_batches`) and ``train_psf``/``val_psf``
    their PSF descriptors ``(n, bands, k)``; the latents, hence the flow, are PSF-free.
    """
    nu, network, flow_cfg = prior.normalisation, prior.config.network, prior.config.flow
    if prior.psf_aware and (train_psf is None or val_psf is None):
        raise ValueError("a PSF-aware prior's flow needs the stamps' PSF descriptors")
    mean, tril = encode_in_batches(prior.encoder_params, network, train_noisy / nu, psf=train_psf)
    val_mean, _ = encode_in_batches(prior.encoder_params, network, val_noisy / nu, psf=val_psf)
    init_key, sample_key = jax.random.split(jax.random.key(seed))
    init_z = sample_latent(sample_key, jnp.asarray(mean), jnp.asarray(tril))
    params = init_flow(init_key, flow_cfg, data=init_z)

    def loss_fn(params, batch, key):
        z = sample_latent(key, batch["mean"], batch["tril"])
        return -jnp.mean(flow_log_prob(params, flow_cfg, z))

    val_z = jnp.asarray(val_mean)
    nll_normal = float(-jnp.mean(standard_normal_log_prob(val_z)))

    def validate(params):
        return {
            "val_nll": float(-jnp.mean(flow_log_prob(params, flow_cfg, val_z))),
            "val_nll_normal": nll_normal,
        }

    data = {"mean": mean, "tril": tril}
    run = {"seed": seed, "checkpoint": checkpoint, "resume": resume, "progress": progress}
    params, history = _fit(
        "flow", prior, loss_fn, params, data, validate, config, upstream=prior.encoder_params, **run
    )
    return prior.replace(flow_params=params), history


def train_deblender(
    prior: GalaxyPrior,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    *,
    config: StageConfig = StageConfig(epochs=5, learning_rate=3e-4),
    seed: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    psf_bank: KernelBank | None = None,
    sky_variance: np.ndarray | None = None,
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 3: train the deblending encoder on ``train["cutout"]`` (blends, electrons) to predict
    the VAE-encoder latent of ``train["central"]`` (the central galaxy alone, noiseless).

    Validation metrics: RMS latent error per dimension of the deblender (``val_latent_rms``) and of
    the plain VAE encoder on the same blends (``val_latent_rms_vae``).

    With ``psf_bank`` (PSF-aware priors) ``train``/``val`` hold model-frame stamps: ``"blend"``
    (the noiseless blended cutout) and ``"central"``. Each minibatch observes each blend and its
    central galaxy through the same random kernel of the bank, adds fresh noise (``sky_variance``)
    to the blend, and regresses the VAE-encoder mean of the observed noiseless central galaxy
    (with the kernel's PSF descriptor, computed in the step) from the noisy observed blend and
    the same descriptor. Validation uses a fixed seeded kernel and fixed noise per blend.
    """
    nu, network = prior.normalisation, prior.config.network
    if psf_bank is not None:
        return _train_deblender_bank(
            prior,
            train,
            val,
            config=config,
            psf_bank=psf_bank,
            sky_variance=sky_variance,
            run={"seed": seed, "checkpoint": checkpoint, "resume": resume, "progress": progress},
        )
    target, _ = encode_in_batches(prior.encoder_params, network, train["central"] / nu)
    val_target, _ = encode_in_batches(prior.encoder_params, network, val["central"] / nu)
    val_vae, _ = encode_in_batches(prior.encoder_params, network, val["cutout"] / nu)
    rms_vae = float(np.sqrt(np.mean((val_vae - val_target) ** 2)))

    def loss_fn(params, batch, key):
        del key
        q = encode(params, network, batch["cutout"] / nu)
        return jnp.mean(jnp.sum((q.mean - batch["target"]) ** 2, axis=-1))

    def validate(params):
        pred, _ = encode_in_batches(params, network, val["cutout"] / nu)
        return {
            "val_latent_rms": float(np.sqrt(np.mean((pred - val_target) ** 2))),
            "val_latent_rms_vae": rms_vae,
        }

    start = prior.deblender_params if prior.deblender_params is not None else prior.encoder_params
    data = {"cutout": train["cutout"], "target": target}
    run = {"seed": seed, "checkpoint": checkpoint, "resume": resume, "progress": progress}
    params, history = _fit(
        "deblender",
        prior,
        loss_fn,
        start,
        data,
        validate,
        config,
        upstream=prior.encoder_params,
        **run,
    )
    return prior.replace(deblender_params=params), history


def _train_deblender_bank(
    prior: GalaxyPrior,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    *,
    config: StageConfig,
    psf_bank: KernelBank,
    sky_variance: np.ndarray | None,
    run: dict,
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """:func:`train_deblender` with a PSF kernel bank (see there)."""
    from madness_ppl.simulate.stamps import add_noise as add_noise_np

    if sky_variance is None:
        raise ValueError("training the deblender through a PSF bank needs sky_variance")
    if not prior.psf_aware:
        raise ValueError("a PSF kernel bank needs a PSF-aware network (psf_features > 0)")
    nu, network = prior.normalisation, prior.config.network
    sky = jnp.asarray(sky_variance, jnp.float32)

    rng = np.random.default_rng([run["seed"], 28, 3])
    index = rng.integers(len(psf_bank), size=len(val["blend"]))
    val_psf = psf_bank.descriptor[index]
    val_cutout, _ = add_noise_np(
        observe_in_batches(val["blend"], psf_bank, index), np.asarray(sky_variance), rng
    )
    val_central = observe_in_batches(val["central"], psf_bank, index)
    encoder = prior.encoder_params
    val_target, _ = encode_in_batches(encoder, network, val_central / nu, psf=val_psf)
    val_vae, _ = encode_in_batches(encoder, network, val_cutout / nu, psf=val_psf)
    rms_vae = float(np.sqrt(np.mean((val_vae - val_target) ** 2)))

    def loss_fn(params, batch, key, consts):
        fourier, descriptor, encoder_params = consts
        k_psf, k_noise = jax.random.split(key)
        blend, kernel, psf = observe_with_bank(k_psf, batch["blend"], (fourier, descriptor))
        central = observe(batch["central"], kernel)
        target = encode(encoder_params, network, central / nu, psf).mean
        noisy = add_noise(k_noise, blend, sky)
        q = encode(params, network, noisy / nu, psf)
        return jnp.mean(jnp.sum((q.mean - jax.lax.stop_gradient(target)) ** 2, axis=-1))

    def validate(params):
        pred, _ = encode_in_batches(params, network, val_cutout / nu, psf=val_psf)
        return {
            "val_latent_rms": float(np.sqrt(np.mean((pred - val_target) ** 2))),
            "val_latent_rms_vae": rms_vae,
        }

    start = prior.deblender_params if prior.deblender_params is not None else encoder
    data = {"blend": train["blend"], "central": train["central"]}
    consts = (jnp.asarray(psf_bank.fourier), jnp.asarray(psf_bank.descriptor), encoder)
    params, history = _fit(
        "deblender",
        prior,
        loss_fn,
        start,
        data,
        validate,
        config,
        consts=consts,
        fingerprint_extra=bank_fingerprint(psf_bank),
        upstream=encoder,
        **run,
    )
    return prior.replace(deblender_params=params), history
