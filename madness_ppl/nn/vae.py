r"""Convolutional VAE encoder and decoder for multi-band galaxy stamps.

The networks follow the MADNESS architecture (Biswas et al. 2025): the encoder is a stack of
stride-2 convolutions followed by a dense layer and a Gaussian head over the latent vector
:math:`z \in \mathbb{R}^d`; the decoder mirrors it with a dense layer, a reshape to a small
spatial grid, stride-2 transposed convolutions and a positive output layer.

Two decoder upsampling layers are available.  ``"transpose"`` (v0.1.0) is a stride-2
``Conv2DTranspose``; its weight gradient runs at a few per cent of a CPU's matmul rate.
``"subpixel"`` (the default since v0.2) is a stride-1 3x3 convolution to ``4c`` channels followed by
a depth-to-space rearrangement (Shi et al. 2016, arXiv 1609.05158): the same function class as a
5x5 stride-2 transposed convolution (each output phase sees a 3x3 input window) computed as an
ordinary convolution, several times faster to train (``benchmarks/training.py``).

With ``amplitude=True`` the decoder factorises each band into a total flux and a unit-sum profile,

.. math::
    f_b(z) = e^{a_b(z)}\,\frac{\mathrm{relu}(h_b(z))}{\sum_\mathrm{pix} \mathrm{relu}(h_b(z)) + \epsilon},

where :math:`a_b` comes from the dense trunk and :math:`h_b` from the convolutions, so the
convolutions learn shapes on one scale whatever the galaxy's brightness (fluxes of a survey
population span several decades).  With ``input_transform="asinh"`` the encoder sees
:math:`\operatorname{asinh}(x)` (``x`` in normalised units: linear near the noise, logarithmic for
bright galaxies) for the same reason.

Everything haiku-specific stays in this module.  The public interface is a set of pure functions
over parameter pytrees:

* :func:`init_encoder`, :func:`encode`: ``(..., bands, S, S) -> (mean, scale_tril)``;
* :func:`init_decoder`, :func:`decode`: ``(..., d) -> (..., bands, S, S)``;

Images are channel-first and in *normalised* units (electrons divided by the prior's
normalisation constant); internally the networks run in NHWC.  All functions accept arbitrary
leading batch dimensions and are jit-compiled once per (config, shape).

Why one module of ~620 lines: the encoder, decoder and their configuration are one network
family whose layer shapes must match; the flow lives in :mod:`madness_ppl.nn.flow`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "LEGACY_DEFAULTS",
    "EncoderOutput",
    "NetworkConfig",
    "decode",
    "depth_to_space",
    "encode",
    "init_decoder",
    "init_encoder",
    "kl_to_standard_normal",
    "sample_latent",
    "set_amplitude_offset",
]

Params = Any  # a haiku parameter mapping: {module_name: {param_name: array}}

_ACTIVATIONS = ("prelu", "leaky_relu", "gelu")
_OUTPUT_ACTIVATIONS = ("relu", "softplus")
_UPSAMPLING = ("subpixel", "transpose")
_INPUT_TRANSFORMS = ("linear", "asinh")
_AMPLITUDE_EPS = 1e-6  # added to the profile sum of the amplitude decoder
_MAX_LOG_AMPLITUDE = 30.0  # clip of a_b (normalised units), far beyond any galaxy
# keys absent from configs written before v0.2, and the behaviour those configs had
LEGACY_DEFAULTS = {
    "upsampling": "transpose",
    "amplitude": False,
    "input_transform": "linear",
    "warp": False,
    "posterior_scale_init": None,
}
_SCALE_EPS = 1e-4  # floor on the diagonal of the encoder's Cholesky factor


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    r"""Hyper-parameters of the VAE encoder and decoder (frozen and hashable).

    Parameters
    ----------
    bands
        Number of bands (input/output channels).
    stamp_size
        Side ``S`` of the square stamps, odd.
    latent_dim
        Dimension ``d`` of the latent space.
    encoder_channels
        Output channels of the stride-2 convolutions of the encoder.
    encoder_dense
        Width of the dense layer between the convolutions and the Gaussian head.
    decoder_dense
        Width of the first dense layer of the decoder.
    decoder_channels
        Output channels of the decoder's upsampling (x2) layers, in the order they are applied;
        the dense layer feeds a grid of ``decoder_channels[0]`` channels and side
        ``ceil(S / 2**len(decoder_channels))``.
    kernel_size
        Kernel side of the encoder's strided convolutions and of ``"transpose"`` upsampling
        (``"subpixel"`` layers use 3x3 kernels, the same reach at half the input resolution).
    decoder_refine
        Add a full-resolution 3x3 convolution with ``decoder_channels[-1]`` channels before the
        output layer (as MADNESS does); it costs ~30 % (lean) to ~60 % (reference) of the decoder
        time on a CPU.
    full_covariance
        If true the encoder predicts a full Cholesky factor of the latent covariance, otherwise a
        diagonal one.
    activation
        Hidden activation: ``"prelu"`` (per-channel learned slope, as MADNESS),
        ``"leaky_relu"`` or ``"gelu"``.
    output_activation
        ``"relu"`` (MADNESS) or ``"softplus"``; both give non-negative flux.
    upsampling
        ``"subpixel"`` (conv to ``4c`` channels + depth-to-space, default) or ``"transpose"``
        (stride-2 transposed convolution, v0.1.0).
    amplitude
        Factorise each band into ``exp(a_b(z))`` times a unit-sum profile (see module docstring).
    input_transform
        ``"linear"`` or ``"asinh"``: what the encoder applies to normalised stamps first.
    warp
        Resample the decoded stamp under a shear-and-scale map :math:`A(z)` predicted by the dense
        trunk (:func:`warp_stamps`), so that ellipticity and size have a direct route from the
        latent vector to the image.
    psf_features
        Numbers per band describing the observed PSF that the encoder reads beside the image
        (:func:`madness_ppl.psf.psf_descriptor`: log size relative to the model frame's
        reference PSF, e1, e2), concatenated to its flattened convolutional features; 0 (v0.2
        and before) for an encoder that does not see the PSF.
    posterior_scale_init
        Scale :math:`s` of the encoder's posterior when its raw outputs are zero (``None``: the
        plain softplus, :math:`s = \log 2`).  A small :math:`s` lets the decoder see nearly
        noiseless latents early in training, so weak features (orientation) are learned before
        the KL term closes the unused latent directions.
    """

    bands: int = 6
    stamp_size: int = 45
    latent_dim: int = 16
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)
    encoder_dense: int = 128
    decoder_dense: int = 128
    decoder_channels: tuple[int, ...] = (64, 32, 16)
    kernel_size: int = 5
    decoder_refine: bool = False
    full_covariance: bool = True
    activation: str = "prelu"
    output_activation: str = "relu"
    upsampling: str = "subpixel"
    amplitude: bool = True
    input_transform: str = "asinh"
    warp: bool = True
    posterior_scale_init: float | None = 0.05
    psf_features: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if self.stamp_size < 3 or self.stamp_size % 2 != 1:
            raise ValueError(f"stamp_size must be odd and >= 3, got {self.stamp_size}")
        if self.bands < 1 or self.latent_dim < 1:
            raise ValueError("bands and latent_dim must be positive")
        if not self.encoder_channels or not self.decoder_channels:
            raise ValueError("encoder_channels and decoder_channels must be non-empty")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.output_activation not in _OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {_OUTPUT_ACTIVATIONS}, "
                f"got {self.output_activation!r}"
            )
        if self.posterior_scale_init is not None and not self.posterior_scale_init > 0:
            raise ValueError(
                f"posterior_scale_init must be positive or None, got {self.posterior_scale_init}"
            )
        if self.upsampling not in _UPSAMPLING:
            raise ValueError(f"upsampling must be one of {_UPSAMPLING}, got {self.upsampling!r}")
        if self.input_transform not in _INPUT_TRANSFORMS:
            raise ValueError(
                f"input_transform must be one of {_INPUT_TRANSFORMS}, got {self.input_transform!r}"
            )

    @classmethod
    def reference(cls, *, bands: int = 6, stamp_size: int = 45, latent_dim: int = 16):
        """The MADNESS reference sizes: encoder (32, 128, 256, 512) + dense 512, decoder
        dense 512 -> (128, 96, 64) + a 3x3 refining convolution.  Heavy on a CPU."""
        return cls(
            bands=bands,
            stamp_size=stamp_size,
            latent_dim=latent_dim,
            encoder_channels=(32, 128, 256, 512),
            encoder_dense=512,
            decoder_dense=512,
            decoder_channels=(128, 96, 64),
            decoder_refine=True,
        )

    @classmethod
    def lean(cls, *, bands: int = 6, stamp_size: int = 45, latent_dim: int = 16):
        """CPU-friendly sizes (the default): encoder (16, 32, 64, 128) + dense 128, decoder
        dense 128 -> (64, 32, 16), no refining convolution."""
        return cls(bands=bands, stamp_size=stamp_size, latent_dim=latent_dim)

    @classmethod
    def tiny(
        cls,
        *,
        bands: int = 2,
        stamp_size: int = 15,
        latent_dim: int = 3,
        width: int = 4,
        dense: int = 16,
        **changes: Any,
    ):
        """Test-sized network (milliseconds per step on a CPU): encoder ``(width, 2 width)``
        + dense ``dense``, decoder dense ``dense`` -> ``(2 width, width)``; ``changes``
        override any other field."""
        return cls(
            bands=bands,
            stamp_size=stamp_size,
            latent_dim=latent_dim,
            encoder_channels=(width, 2 * width),
            encoder_dense=dense,
            decoder_dense=dense,
            decoder_channels=(2 * width, width),
            **changes,
        )

    @classmethod
    def v010(cls, *, bands: int = 6, stamp_size: int = 45, latent_dim: int = 16):
        """The v0.1.0 lean network: lean sizes with transposed convolutions, no amplitude
        factorisation, linear encoder input (kept for comparisons)."""
        return cls(bands=bands, stamp_size=stamp_size, latent_dim=latent_dim, **LEGACY_DEFAULTS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``.

        Keys missing from configurations written before v0.2 take the behaviour those versions
        had (:data:`LEGACY_DEFAULTS`: transposed convolutions, no amplitude, linear input), so old
        weights load into the network they were trained with.
        """
        return cls(**{**LEGACY_DEFAULTS, **data})


class EncoderOutput(NamedTuple):
    r"""Gaussian posterior over the latent vector, :math:`q(z|x) = N(\mu, L L^T)`.

    Attributes
    ----------
    mean
        :math:`\mu`, shape ``(..., d)``.
    scale_tril
        Lower-triangular Cholesky factor :math:`L` with positive diagonal, shape ``(..., d, d)``
        (diagonal when the network was configured with ``full_covariance=False``).
    """

    mean: jax.Array
    scale_tril: jax.Array


# ----------------------------------------------------------------------------- haiku modules


class PReLU(hk.Module):
    r"""Parametric ReLU with one learned slope per channel (last axis):
    :math:`f(x) = x` for :math:`x \ge 0`, :math:`a_c x` otherwise."""

    def __init__(self, init_slope: float = 0.25, name: str | None = None):
        super().__init__(name=name)
        self.init_slope = init_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        slope = hk.get_parameter(
            "slope", (x.shape[-1],), x.dtype, init=hk.initializers.Constant(self.init_slope)
        )
        return jnp.where(x >= 0, x, slope * x)


def _activation(cfg: NetworkConfig, name: str) -> Callable[[jax.Array], jax.Array]:
    if cfg.activation == "prelu":
        return PReLU(name=name)
    if cfg.activation == "leaky_relu":
        return functools.partial(jax.nn.leaky_relu, negative_slope=0.1)
    return jax.nn.gelu


def _fill_scale_tril(raw: jax.Array, d: int, full: bool, scale: float | None = None) -> jax.Array:
    r"""Map unconstrained head outputs to a Cholesky factor with a softplus-positive diagonal.

    With ``scale`` the factor is :math:`\mathrm{diag}(\mathrm{softplus}(r_{ii} + b)) + s\,
    \mathrm{tril}(r)`, :math:`b = \log(e^{s} - 1)`: zero raw outputs give :math:`L = s I`.
    """
    shift = 0.0 if scale is None else float(np.log(np.expm1(scale)))
    if not full:
        diag = jax.nn.softplus(raw + shift) + _SCALE_EPS
        return diag[..., :, None] * jnp.eye(d, dtype=raw.dtype)
    rows, cols = np.tril_indices(d)
    mat = jnp.zeros((*raw.shape[:-1], d, d), raw.dtype).at[..., rows, cols].set(raw)
    eye = jnp.eye(d, dtype=bool)
    off = mat if scale is None else scale * mat
    return jnp.where(eye, jax.nn.softplus(mat + shift) + _SCALE_EPS, off)


class Encoder(hk.Module):
    """Stride-2 convolutions -> dense -> Gaussian head.  Input NHWC ``(n, S, S, bands)``."""

    def __init__(self, cfg: NetworkConfig, name: str = "encoder"):
        super().__init__(name=name)
        self.cfg = cfg

    def __call__(self, x: jax.Array, psf: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        d = cfg.latent_dim
        h = jnp.arcsinh(x) if cfg.input_transform == "asinh" else x
        for i, channels in enumerate(cfg.encoder_channels):
            h = hk.Conv2D(channels, cfg.kernel_size, stride=2, padding="SAME", name=f"conv_{i}")(h)
            h = _activation(cfg, f"act_conv_{i}")(h)
        h = hk.Flatten()(h)
        if cfg.psf_features:
            h = jnp.concatenate([h, psf.reshape(h.shape[0], -1).astype(h.dtype)], axis=-1)
        h = hk.Linear(cfg.encoder_dense, name="dense")(h)
        h = _activation(cfg, "act_dense")(h)
        n_scale = d * (d + 1) // 2 if cfg.full_covariance else d
        out = hk.Linear(d + n_scale, name="head")(h)
        scale = _fill_scale_tril(out[..., d:], d, cfg.full_covariance, cfg.posterior_scale_init)
        return out[..., :d], scale


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """Rearrange NHWC channels into ``block x block`` spatial blocks:
    ``(n, h, w, block**2 c) -> (n, block h, block w, c)``."""
    n, h, w, c = x.shape
    c_out = c // block**2
    x = x.reshape(n, h, w, block, block, c_out)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, c_out)


def shear_matrix(params: jax.Array) -> jax.Array:
    r"""The linear map :math:`A = e^{s} \exp\begin{pmatrix} a & b \\ b & -a \end{pmatrix}`
    of ``params = (s, a, b)`` (shape ``(..., 3)``), returned as ``(..., 2, 2)``.

    :math:`\exp(M) = \cosh g\, I + \frac{\sinh g}{g} M` with :math:`g = \sqrt{a^2 + b^2}`: an
    area-preserving shear (axis ratio :math:`e^{-2g}`, position angle :math:`\tfrac12
    \operatorname{atan2}(b, a)`) times an isotropic scale :math:`e^{s}`; zero is the identity.
    """
    s, a, b = params[..., 0], params[..., 1], params[..., 2]
    g = jnp.sqrt(a**2 + b**2 + 1e-12)
    ch, sh = jnp.cosh(g), jnp.sinh(g) / g
    scale = jnp.exp(s)
    row0 = jnp.stack([ch + sh * a, sh * b], axis=-1)
    row1 = jnp.stack([sh * b, ch - sh * a], axis=-1)
    return scale[..., None, None] * jnp.stack([row0, row1], axis=-2)


def warp_stamps(images: jax.Array, params: jax.Array) -> jax.Array:
    r"""Resample NHWC stamps under the map :math:`A` of :func:`shear_matrix` about their centre.

    Output pixel :math:`x` takes the (bilinearly interpolated) value of the input at
    :math:`c + A^{-1}(x - c)`, :math:`c` the central pixel, zero outside: the stamp's light is
    stretched by :math:`A`.  ``images`` is ``(n, S, S, C)``, ``params`` ``(n, 3)``.
    """
    n, size = images.shape[0], images.shape[1]
    c = (size - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(size) - c, jnp.arange(size) - c, indexing="ij")
    inverse = jnp.linalg.inv(shear_matrix(params))  # (n, 2, 2) acting on (x, y)
    src_x = inverse[:, 0, 0, None, None] * xx + inverse[:, 0, 1, None, None] * yy + c
    src_y = inverse[:, 1, 0, None, None] * xx + inverse[:, 1, 1, None, None] * yy + c

    def one(image, sy, sx):  # image (S, S, C)
        sample = functools.partial(
            jax.scipy.ndimage.map_coordinates, coordinates=[sy, sx], order=1, mode="constant"
        )
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)

    del n
    return jax.vmap(one)(images, src_y, src_x)


def _upsample(cfg: NetworkConfig, h: jax.Array, channels: int, i: int) -> jax.Array:
    """One x2 upsampling layer (a plain function, so haiku names it ``up_<i>`` in the decoder)."""
    if cfg.upsampling == "transpose":
        return hk.Conv2DTranspose(
            channels, cfg.kernel_size, stride=2, padding="SAME", name=f"up_{i}"
        )(h)
    return depth_to_space(hk.Conv2D(4 * channels, 3, padding="SAME", name=f"up_{i}")(h))


class Decoder(hk.Module):
    """Dense -> grid -> x2 upsampling layers -> crop to ``S`` -> positive output.

    Input ``(n, d)``, output NHWC ``(n, S, S, bands)``.
    """

    def __init__(self, cfg: NetworkConfig, name: str = "decoder"):
        super().__init__(name=name)
        self.cfg = cfg

    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        size = cfg.stamp_size
        channels = cfg.decoder_channels
        grid = math.ceil(size / 2 ** len(channels))
        trunk = hk.Linear(cfg.decoder_dense, name="dense")(z)
        trunk = _activation(cfg, "act_dense")(trunk)
        h = hk.Linear(grid * grid * channels[0], name="grid")(trunk)
        h = _activation(cfg, "act_grid")(h)
        h = h.reshape((*h.shape[:-1], grid, grid, channels[0]))
        for i, c in enumerate(channels):
            h = _upsample(cfg, h, c, i)
            h = _activation(cfg, f"act_up_{i}")(h)
        # crop the (grid * 2**n) canvas to S x S, the extra pixel (if odd) on the far side
        excess = h.shape[-2] - size
        lo = excess // 2
        h = h[..., lo : lo + size, lo : lo + size, :]
        if cfg.decoder_refine:
            h = hk.Conv2D(channels[-1], 3, padding="SAME", name="refine")(h)
            h = _activation(cfg, "act_refine")(h)
        h = hk.Conv2D(cfg.bands, 3, padding="SAME", name="out")(h)
        profile = jax.nn.relu(h) if cfg.output_activation == "relu" else jax.nn.softplus(h)
        if cfg.warp:
            params = hk.Linear(3, w_init=hk.initializers.Constant(0.0), name="warp")(trunk)
            profile = warp_stamps(profile, params)
        if not cfg.amplitude:
            return profile
        log_amplitude = hk.Linear(cfg.bands, name="amplitude")(trunk)
        log_amplitude = jnp.clip(log_amplitude, -_MAX_LOG_AMPLITUDE, _MAX_LOG_AMPLITUDE)
        total = jnp.sum(profile, axis=(-3, -2), keepdims=True) + _AMPLITUDE_EPS
        return jnp.exp(log_amplitude)[..., None, None, :] * profile / total


@functools.cache
def _encoder_transform(cfg: NetworkConfig) -> hk.Transformed:
    return hk.without_apply_rng(hk.transform(lambda x, psf=None: Encoder(cfg)(x, psf)))


@functools.cache
def _decoder_transform(cfg: NetworkConfig) -> hk.Transformed:
    return hk.without_apply_rng(hk.transform(lambda z: Decoder(cfg)(z)))


def _init_key(key: jax.Array) -> jax.Array:
    """An ``unsafe_rbg`` key derived from ``key``.

    Initialisation draws one array per layer; with threefry keys XLA takes seconds to compile
    them, with the RngBitGenerator-based ``unsafe_rbg`` keys about five times less.  Statistical
    quality is irrelevant for weight initialisation.
    """
    bits = jax.random.bits(key, (4,), jnp.uint32)
    return jax.random.wrap_key_data(bits, impl="unsafe_rbg")


@functools.cache
def _jitted_init(which: str, cfg: NetworkConfig) -> Callable[[jax.Array], Params]:
    # eager haiku initialisation dispatches (and compiles) op by op and takes seconds; the dummy
    # inputs are numpy arrays so that a first call under a trace (eval_shape) caches no tracer
    if which == "encoder":
        x = np.zeros((1, cfg.stamp_size, cfg.stamp_size, cfg.bands), np.float32)
        psf = np.zeros((1, cfg.bands, cfg.psf_features), np.float32) if cfg.psf_features else None
        return jax.jit(lambda key: _encoder_transform(cfg).init(_init_key(key), x, psf))
    z = np.zeros((1, cfg.latent_dim), np.float32)
    return jax.jit(lambda key: _decoder_transform(cfg).init(_init_key(key), z))


# ----------------------------------------------------------------------------- pure functions


def init_encoder(key: jax.Array, cfg: NetworkConfig) -> Params:
    """Randomly initialise encoder parameters.

    Parameters
    ----------
    key
        A ``jax.random`` key.
    cfg
        The network configuration.

    Returns
    -------
    params
        A haiku parameter mapping (a pytree of arrays).
    """
    return _jitted_init("encoder", cfg)(key)


def init_decoder(key: jax.Array, cfg: NetworkConfig) -> Params:
    """Randomly initialise decoder parameters (see :func:`init_encoder`)."""
    return _jitted_init("decoder", cfg)(key)


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode(
    params: Params, cfg: NetworkConfig, x: ArrayLike, psf: ArrayLike | None = None
) -> EncoderOutput:
    r"""Encode normalised stamps into a Gaussian over the latent space.

    Parameters
    ----------
    params
        Encoder parameters from :func:`init_encoder` (or training).
    cfg
        The network configuration (static under ``jit``).
    x
        Stamps in normalised units, shape ``(..., bands, S, S)``.
    psf
        ``(..., bands, cfg.psf_features)`` descriptors of each stamp's PSF (broadcast over the
        leading axes; :func:`madness_ppl.psf.psf_descriptor`); needed when
        ``cfg.psf_features > 0``, ignored otherwise.

    Returns
    -------
    EncoderOutput
        ``mean`` of shape ``(..., d)`` and ``scale_tril`` of shape ``(..., d, d)``:
        :math:`q(z|x) = N(\mu(x), L(x) L(x)^T)`.
    """
    x = jnp.asarray(x)
    expected = (cfg.bands, cfg.stamp_size, cfg.stamp_size)
    if x.shape[-3:] != expected:
        raise ValueError(f"encoder expects stamps of shape (..., {expected}), got {x.shape}")
    lead = x.shape[:-3]
    nhwc = jnp.moveaxis(x.reshape((-1, *expected)), 1, -1)
    features = None
    if cfg.psf_features:
        if psf is None:
            raise ValueError("this encoder reads the PSF: pass psf descriptors (psf_descriptor)")
        shape = (*lead, cfg.bands, cfg.psf_features)
        features = jnp.broadcast_to(jnp.asarray(psf, x.dtype), shape).reshape(-1, *shape[-2:])
    mean, scale_tril = _encoder_transform(cfg).apply(params, nhwc, features)
    d = cfg.latent_dim
    return EncoderOutput(mean.reshape((*lead, d)), scale_tril.reshape((*lead, d, d)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode(params: Params, cfg: NetworkConfig, z: ArrayLike) -> jax.Array:
    """Decode latent vectors into noiseless stamps in normalised units.

    Parameters
    ----------
    params
        Decoder parameters from :func:`init_decoder` (or training).
    cfg
        The network configuration (static under ``jit``).
    z
        Latent vectors, shape ``(..., d)``.

    Returns
    -------
    jax.Array
        Non-negative images of shape ``(..., bands, S, S)`` (channel first), normalised units.
    """
    z = jnp.asarray(z)
    if z.shape[-1:] != (cfg.latent_dim,):
        raise ValueError(f"decoder expects latents of shape (..., {cfg.latent_dim}), got {z.shape}")
    lead = z.shape[:-1]
    out = _decoder_transform(cfg).apply(params, z.reshape(-1, cfg.latent_dim))
    out = jnp.moveaxis(out, -1, 1)
    return out.reshape((*lead, cfg.bands, cfg.stamp_size, cfg.stamp_size))


def set_amplitude_offset(params: Params, cfg: NetworkConfig, log_flux: ArrayLike) -> Params:
    r"""Decoder parameters whose amplitude head starts at a typical flux (data-dependent init).

    Sets the bias of the amplitude head to ``log_flux`` (per band, normalised units), e.g. the
    log of the median total flux of the training stamps, so that training starts at the right
    brightness instead of walking :math:`a_b` over several units at the learning rate.

    Parameters
    ----------
    params
        Decoder parameters of a configuration with ``amplitude=True``.
    cfg
        The network configuration.
    log_flux
        ``(bands,)`` starting log total flux per band.
    """
    if not cfg.amplitude:
        raise ValueError("the network has no amplitude head (amplitude=False)")
    log_flux = jnp.broadcast_to(jnp.asarray(log_flux, jnp.float32), (cfg.bands,))
    head = dict(params["decoder/amplitude"])
    head["b"] = log_flux.astype(head["b"].dtype)
    return {**params, "decoder/amplitude": head}


def sample_latent(key: jax.Array, mean: ArrayLike, scale_tril: ArrayLike) -> jax.Array:
    r"""Reparameterised draw :math:`z = \mu + L \epsilon`, :math:`\epsilon \sim N(0, I)`."""
    mean = jnp.asarray(mean)
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.einsum("...ij,...j->...i", scale_tril, eps)


def kl_to_standard_normal(mean: ArrayLike, scale_tril: ArrayLike) -> jax.Array:
    r"""KL divergence :math:`\mathrm{KL}(N(\mu, LL^T) \,\|\, N(0, I))`, summed over the event.

    .. math::
        \mathrm{KL} = \tfrac12 \left( \mathrm{tr}(LL^T) + \mu^T\mu - d \right)
        - \sum_i \log L_{ii}

    Returns an array of shape ``mean.shape[:-1]``.
    """
    mean = jnp.asarray(mean)
    scale_tril = jnp.asarray(scale_tril)
    d = mean.shape[-1]
    trace = jnp.sum(scale_tril**2, axis=(-2, -1))
    log_det = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), axis=-1)
    return 0.5 * (trace + jnp.sum(mean**2, axis=-1) - d) - log_det
