r"""A RealNVP normalizing flow over :math:`\mathbb{R}^d` with exact density and sampling.

The flow maps a base vector :math:`u \sim N(0, I_d)` to a data vector :math:`z = T(u)` through
``n_layers`` affine coupling layers (Dinh et al. 2017) followed by an optional element-wise affine
layer.  A coupling layer with binary mask :math:`m` (1 = passed through, 0 = transformed) reads

.. math::
    y = m \odot x + (1 - m) \odot \left( x \odot e^{s(m \odot x)} + t(m \odot x) \right),
    \qquad \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i (1 - m_i)\, s_i,

where :math:`(s, t)` come from a small tanh MLP and :math:`s` is soft-clamped to
:math:`[-c, c]` by :math:`s = c \tanh(\tilde s / c)` for numerical stability.  The density follows
from the change of variables

.. math::
    \log p(z) = \log N\!\left(T^{-1}(z); 0, I\right)
    + \log\left|\det \frac{\partial T^{-1}(z)}{\partial z}\right| .

Masks alternate within pairs of layers and change from pair to pair (halves, then bit patterns of
the coordinate index), so every coordinate is both transformed and conditioned on.  They are
derived from the configuration alone, so a saved parameter tree fully defines the flow.

The parameters are a plain nested dict of arrays; all functions are pure, jit-compiled once per
(config, shape) and vectorised over arbitrary leading batch dimensions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "FlowConfig",
    "flow_forward",
    "flow_inverse",
    "flow_log_prob",
    "flow_sample",
    "init_flow",
    "standard_normal_log_prob",
]

Params = Any  # {"coupling_<i>": {"w_<j>", "b_<j>", "w_out", "b_out"}, "affine": {...}}

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Hyper-parameters of the coupling flow (frozen and hashable).

    Parameters
    ----------
    latent_dim
        Dimension ``d`` of the space the flow lives in (>= 2).
    n_layers
        Number of affine coupling layers.
    hidden
        Widths of the hidden layers of each coupling MLP (tanh activations).
    max_log_scale
        Soft bound ``c`` on the log-scale of each coupling, :math:`s = c \\tanh(\\tilde s / c)`.
    affine
        Append a learned element-wise affine layer on the data side (actnorm-like); it can be
        initialised to the data mean and standard deviation with ``init_flow(..., data=z)``.
    """

    latent_dim: int = 16
    n_layers: int = 6
    hidden: tuple[int, ...] = (64, 64)
    max_log_scale: float = 3.0
    affine: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "max_log_scale", float(self.max_log_scale))
        if self.latent_dim < 2:
            raise ValueError(f"a coupling flow needs latent_dim >= 2, got {self.latent_dim}")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if self.max_log_scale <= 0:
            raise ValueError("max_log_scale must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**data)


def _masks(cfg: FlowConfig) -> np.ndarray:
    """Binary masks, shape ``(n_layers, d)``: 1 = conditioning (identity), 0 = transformed.

    Pair ``p`` of layers splits the coordinates by one bit of their index (the top bit first,
    i.e. contiguous halves, then bits 0, 1, ...); the two layers of a pair swap the roles.
    """
    d = cfg.latent_dim
    n_bits = (d - 1).bit_length()
    bit_order = [n_bits - 1, *range(n_bits - 1)]
    index = np.arange(d)
    masks = []
    for layer in range(cfg.n_layers):
        bit = bit_order[(layer // 2) % n_bits]
        cond = ((index >> bit) & 1) == 0
        masks.append(cond if layer % 2 == 0 else ~cond)
    return np.asarray(masks, dtype=np.float32).reshape(cfg.n_layers, d)


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_flow(key: jax.Array, cfg: FlowConfig, *, data: ArrayLike | None = None) -> Params:
    """Initialise flow parameters.

    Hidden layers use LeCun-normal weights; the output layer of every coupling MLP is zero, so the
    couplings start as the identity.  The affine layer starts as the identity, or, when ``data``
    (shape ``(n, d)``) is given, as the map standardising it: shift = mean, log-scale = log std.

    Parameters
    ----------
    key
        A ``jax.random`` key.
    cfg
        The flow configuration.
    data
        Optional samples used to initialise the affine layer.

    Returns
    -------
    params
        A nested dict of float32 arrays.
    """
    d = cfg.latent_dim
    params: dict[str, Any] = {}
    # RngBitGenerator keys compile several times faster than threefry ones (see nn.vae)
    key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="unsafe_rbg")
    keys = jax.random.split(key, max(cfg.n_layers, 1))
    for layer in range(cfg.n_layers):
        layer_keys = jax.random.split(keys[layer], len(cfg.hidden))
        p: dict[str, jax.Array] = {}
        fan_in = d
        for j, width in enumerate(cfg.hidden):
            std = 1.0 / math.sqrt(fan_in)
            p[f"w_{j}"] = std * jax.random.normal(layer_keys[j], (fan_in, width), jnp.float32)
            p[f"b_{j}"] = jnp.zeros((width,), jnp.float32)
            fan_in = width
        p["w_out"] = jnp.zeros((fan_in, 2 * d), jnp.float32)
        p["b_out"] = jnp.zeros((2 * d,), jnp.float32)
        params[f"coupling_{layer}"] = p
    if cfg.affine:
        shift = jnp.zeros((d,), jnp.float32)
        log_scale = jnp.zeros((d,), jnp.float32)
        if data is not None:
            data = jnp.asarray(data, jnp.float32).reshape(-1, d)
            shift = jnp.mean(data, axis=0)
            log_scale = jnp.log(jnp.std(data, axis=0) + 1e-6)
        params["affine"] = {"shift": shift, "log_scale": log_scale}
    return params


def _conditioner(p: dict[str, jax.Array], cfg: FlowConfig, x: jax.Array, mask: jax.Array):
    """Masked MLP returning the clamped log-scale and the shift of the transformed coordinates."""
    h = x * mask
    for j in range(len(cfg.hidden)):
        h = jnp.tanh(h @ p[f"w_{j}"] + p[f"b_{j}"])
    out = h @ p["w_out"] + p["b_out"]
    d = cfg.latent_dim
    c = cfg.max_log_scale
    log_scale = c * jnp.tanh(out[..., :d] / c) * (1.0 - mask)
    shift = out[..., d:] * (1.0 - mask)
    return log_scale, shift


@functools.partial(jax.jit, static_argnames=("cfg",))
def flow_forward(params: Params, cfg: FlowConfig, u: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""Push base vectors to data space, :math:`z = T(u)`.

    Parameters
    ----------
    params
        Flow parameters.
    cfg
        The flow configuration (static under ``jit``).
    u
        Base-space vectors, shape ``(..., d)``.

    Returns
    -------
    z, log_det
        Data-space vectors ``(..., d)`` and :math:`\log|\det \partial T(u)/\partial u|`, ``(...)``.
    """
    x = jnp.asarray(u)
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for layer, mask in enumerate(_masks(cfg)):
        mask = jnp.asarray(mask, x.dtype)
        log_scale, shift = _conditioner(params[f"coupling_{layer}"], cfg, x, mask)
        x = x * jnp.exp(log_scale) + shift
        log_det = log_det + jnp.sum(log_scale, axis=-1)
    if cfg.affine:
        aff = params["affine"]
        x = x * jnp.exp(aff["log_scale"]) + aff["shift"]
        log_det = log_det + jnp.sum(aff["log_scale"])
    return x, log_det


@functools.partial(jax.jit, static_argnames=("cfg",))
def flow_inverse(params: Params, cfg: FlowConfig, z: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""Pull data vectors back to the base space, :math:`u = T^{-1}(z)`.

    Returns
    -------
    u, log_det
        Base-space vectors ``(..., d)`` and :math:`\log|\det \partial T^{-1}(z)/\partial z|`,
        shape ``(...)``; it equals minus the ``log_det`` of :func:`flow_forward` at ``u``.
    """
    x = jnp.asarray(z)
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    if cfg.affine:
        aff = params["affine"]
        x = (x - aff["shift"]) * jnp.exp(-aff["log_scale"])
        log_det = log_det - jnp.sum(aff["log_scale"])
    masks = _masks(cfg)
    for layer in reversed(range(cfg.n_layers)):
        mask = jnp.asarray(masks[layer], x.dtype)
        # the conditioning coordinates are unchanged by the layer, so s and t are recomputable
        log_scale, shift = _conditioner(params[f"coupling_{layer}"], cfg, x, mask)
        x = (x - shift) * jnp.exp(-log_scale)
        log_det = log_det - jnp.sum(log_scale, axis=-1)
    return x, log_det


@jax.jit
def standard_normal_log_prob(u: ArrayLike) -> jax.Array:
    r"""Log density of :math:`N(0, I_d)` summed over the last axis,
    :math:`-\tfrac12 \lVert u \rVert^2 - \tfrac d2 \log 2\pi`.

    >>> float(standard_normal_log_prob(jnp.zeros(2)))  # doctest: +ELLIPSIS
    -1.837877...
    """
    u = jnp.asarray(u)
    return -0.5 * jnp.sum(u**2, axis=-1) - u.shape[-1] * _HALF_LOG_2PI


@functools.partial(jax.jit, static_argnames=("cfg",))
def flow_log_prob(params: Params, cfg: FlowConfig, z: ArrayLike) -> jax.Array:
    r"""Exact log density of the flow,
    :math:`\log p(z) = \log N(T^{-1}(z); 0, I) + \log|\det \partial T^{-1}(z)/\partial z|`.

    Parameters
    ----------
    params
        Flow parameters.
    cfg
        The flow configuration (static under ``jit``).
    z
        Points, shape ``(..., d)``.

    Returns
    -------
    jax.Array
        Log densities, shape ``(...)``.
    """
    u, log_det = flow_inverse(params, cfg, z)
    return standard_normal_log_prob(u) + log_det


@functools.partial(jax.jit, static_argnames=("cfg", "shape"))
def _flow_sample(params: Params, cfg: FlowConfig, key: jax.Array, shape: tuple[int, ...]):
    u = jax.random.normal(key, (*shape, cfg.latent_dim), jnp.float32)
    return flow_forward(params, cfg, u)[0]


def flow_sample(
    params: Params, cfg: FlowConfig, key: jax.Array, shape: int | tuple[int, ...] = ()
) -> jax.Array:
    """Draw samples :math:`z = T(u)`, :math:`u \\sim N(0, I)`.

    Parameters
    ----------
    params
        Flow parameters.
    cfg
        The flow configuration.
    key
        A ``jax.random`` key.
    shape
        Sample shape; the result has shape ``(*shape, d)``.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return _flow_sample(params, cfg, key, shape)
