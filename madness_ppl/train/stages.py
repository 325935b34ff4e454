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

Stage 2, flow :math:`p_\psi` on the frozen encoder's aggregate posterior (a fresh draw
:math:`z \sim q_\phi(z|x)` per stamp and step): :math:`\mathcal{L}_2 = -\mathbb{E}[\log p_\psi(z)]`.

Stage 3, deblending encoder :math:`g_\chi` (initialised from the VAE encoder) on blended cutouts
:math:`b` whose central galaxy has noiseless image :math:`y_0`; it regresses that galaxy's latent
:math:`z_0 = \mu_\phi(y_0)`: :math:`\mathcal{L}_3 = \mathbb{E}\,\|\mu_\chi(b) - z_0\|^2`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
from madness_ppl.train.loop import EpochLog, run_epochs

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


def encode_in_batches(params, network, images: np.ndarray, batch: int = 256):
    """Encoder means and Cholesky factors of ``images`` (normalised units), in batches."""

    def moments(chunk):
        out = encode(params, network, jnp.asarray(chunk))
        return out.mean, out.scale_tril

    return map_chunks(moments, images, batch)


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
    """
    cfg, nu = prior.config.network, prior.normalisation
    x = batch["noisy"] / nu
    y = batch["noiseless"] / nu
    q = encode(params["encoder"], cfg, x)
    z = sample_latent(key, q.mean, q.scale_tril)
    y_hat = decode(params["decoder"], cfg, z)
    variance = pixel_variance(y, sky_variance, unit=nu, xp=jnp)
    chi2 = jnp.sum((y - y_hat) ** 2 / variance, axis=(-3, -2, -1))
    kl = kl_to_standard_normal(q.mean, q.scale_tril)
    per_galaxy = 0.5 * chi2 + beta * kl
    if snr_cap is not None:
        snr2 = jnp.sum(y**2 / variance, axis=(-3, -2, -1))
        per_galaxy = per_galaxy / (1.0 + jax.lax.stop_gradient(snr2) / snr_cap**2)
    return jnp.mean(per_galaxy) / y[0].size


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


def _fingerprint(name: str, prior: GalaxyPrior, config: StageConfig, seed: int) -> str:
    """What makes a stage's run: its name, settings, seed and the prior's architecture.

    The number of epochs is left out, so a run can be resumed with more (or fewer) epochs to
    train it further; the cosine schedule is then recomputed for the new length.
    """
    settings = dataclasses.asdict(config)
    del settings["epochs"]
    return json.dumps(
        {
            "stage": name,
            "config": settings,
            "seed": seed,
            "network": prior.config.network.to_dict(),
            "flow": prior.config.flow.to_dict(),
            "normalisation": list(prior.config.normalisation),
        },
        sort_keys=True,
    )


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
):
    """Adam + cosine decay on ``loss_fn(params, batch, key)`` with the resumable loop; checkpoints
    carry the stage's fingerprint (:func:`_fingerprint`)."""
    steps = config.epochs * (len(next(iter(data.values()))) // config.batch_size)
    opt = _optimizer(config, steps)

    @jax.jit
    def step(state, batch, key):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

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
        fingerprint=_fingerprint(name, prior, config, seed),
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
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 1: train encoder + decoder on ``train["noisy"] -> train["noiseless"]`` (electrons).

    With ``config.augment`` only ``train["noiseless"]`` is used: each minibatch is a random
    symmetry of the square of the stamps plus fresh noise.  Validation metrics (fixed noisy
    held-out stamps ``val``): the loss (``val_loss``), the r-band aperture-flux 68 % width of the
    reconstructions (``val_flux_width68``) and the RMS ellipticity error of the brighter half
    (``val_e_rms_bright``, :func:`~madness_ppl.train.evaluate.shape_error`).
    """
    from madness_ppl.train import evaluate

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

    val_loss = jax.jit(plain_loss)
    band = prior.bands.index("r") if "r" in prior.bands else 0
    bright = evaluate.brighter_half(val["noiseless"], band)

    def validate(params):
        losses = [
            val_loss(params, {k: v[s : s + 256] for k, v in val.items()}, jax.random.key(0))
            for s in range(0, len(val["noisy"]), 256)
        ]
        trained = prior.replace(encoder_params=params["encoder"], decoder_params=params["decoder"])
        recon = evaluate.reconstruct(trained, val["noisy"])
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

    params = {"encoder": prior.encoder_params, "decoder": prior.decoder_params}
    if config.augment:
        data, loss_fn = {"noiseless": train["noiseless"]}, augmented_loss
    else:
        data, loss_fn = {"noisy": train["noisy"], "noiseless": train["noiseless"]}, plain_loss
    weights = flux_weights(prior, train["noiseless"], config)
    run = {"seed": seed, "checkpoint": checkpoint, "resume": resume, "progress": progress}
    params, history = _fit(
        "vae", prior, loss_fn, params, data, validate, config, weights=weights, **run
    )
    return prior.replace(
        encoder_params=params["encoder"], decoder_params=params["decoder"]
    ), history


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
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 2: fit the flow to the frozen encoder's aggregate posterior.

    Validation metrics: held-out negative log-likelihood per latent vector under the flow
    (``val_nll``) and under a standard normal (``val_nll_normal``), on encoder means of ``val_noisy``.
    """
    nu, network, flow_cfg = prior.normalisation, prior.config.network, prior.config.flow
    mean, tril = encode_in_batches(prior.encoder_params, network, train_noisy / nu)
    val_mean, _ = encode_in_batches(prior.encoder_params, network, val_noisy / nu)
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
    params, history = _fit("flow", prior, loss_fn, params, data, validate, config, **run)
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
) -> tuple[GalaxyPrior, list[EpochLog]]:
    """Stage 3: train the deblending encoder on ``train["cutout"]`` (blends, electrons) to predict
    the VAE-encoder latent of ``train["central"]`` (the central galaxy alone, noiseless).

    Validation metrics: RMS latent error per dimension of the deblender (``val_latent_rms``) and of
    the plain VAE encoder on the same blends (``val_latent_rms_vae``).
    """
    nu, network = prior.normalisation, prior.config.network
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
    params, history = _fit("deblender", prior, loss_fn, start, data, validate, config, **run)
    return prior.replace(deblender_params=params), history
