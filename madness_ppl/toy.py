r"""A linear-Gaussian toy galaxy prior with a closed-form blend posterior.

:class:`LinearGaussianPrior` follows the duck-typed interface of
:class:`madness_ppl.prior.GalaxyPrior` (``decode``, ``latent_distribution``, ``bands``,
``stamp_size``, ``latent_dim``, ``deblend_encode``, ``log_prob``) with a *linear* decoder

.. math::

    f(z) = W z + b, \qquad z \sim \mathcal{N}(0, I_d),

reshaped to ``(bands, S, S)`` stamps in electrons. Because the scene model is then linear in
all latents and the likelihood is Gaussian, the posterior of the blend is Gaussian and known
exactly (:func:`linear_gaussian_posterior`): a known answer for MAP and HMC tests.

Examples
--------
>>> import jax
>>> prior = LinearGaussianPrior.random(
...     jax.random.key(0), n_bands=2, stamp_size=15, latent_dim=4
... )
>>> prior.decode(jax.numpy.zeros((3, 4))).shape
(3, 2, 15, 15)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.typing import ArrayLike

from madness_ppl.scene import place_stamps

__all__ = [
    "LinearGaussianPosterior",
    "LinearGaussianPrior",
    "linear_gaussian_posterior",
]


@jax.tree_util.register_pytree_node_class
class LinearGaussianPrior:
    r"""Linear decoder with a standard-normal latent prior.

    Parameters
    ----------
    weight
        Decoder matrix :math:`W`, shape ``(B * S * S, d)``, electrons per unit latent.
    bias
        Mean stamp :math:`b`, shape ``(B * S * S,)``, electrons.
    bands
        Band names (their number is ``B``).
    stamp_size
        Stamp side ``S`` (odd, centre at index ``S // 2``).

    Notes
    -----
    A JAX pytree: ``weight`` and ``bias`` are leaves (so the prior can be passed as a jit
    argument), ``bands`` and ``stamp_size`` are static auxiliary data.
    """

    def __init__(
        self, weight: jax.Array, bias: jax.Array, *, bands: Sequence[str], stamp_size: int
    ):
        self.weight = weight
        self.bias = bias
        self.bands = tuple(bands)
        self.stamp_size = int(stamp_size)

    # -- pytree protocol -------------------------------------------------------------------
    def tree_flatten(self):
        return (self.weight, self.bias), (self.bands, self.stamp_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        weight, bias = children
        bands, stamp_size = aux
        return cls(weight, bias, bands=bands, stamp_size=stamp_size)

    def __repr__(self) -> str:
        return (
            f"LinearGaussianPrior(bands={self.bands}, stamp_size={self.stamp_size}, "
            f"latent_dim={self.latent_dim})"
        )

    # -- interface ---------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        """Dimension ``d`` of one galaxy's latent vector."""
        return int(self.weight.shape[-1])

    @property
    def n_bands(self) -> int:
        """Number of bands ``B``."""
        return len(self.bands)

    def decode(self, z: ArrayLike) -> jax.Array:
        r"""Stamps :math:`W z + b` in electrons.

        Parameters
        ----------
        z
            Latents, shape ``(..., d)``.

        Returns
        -------
        jax.Array
            Stamps, shape ``(..., B, S, S)``.
        """
        z = jnp.asarray(z)
        flat = z @ self.weight.T + self.bias
        return flat.reshape((*z.shape[:-1], self.n_bands, self.stamp_size, self.stamp_size))

    def latent_distribution(self) -> dist.Distribution:
        r""":math:`\mathcal{N}(0, I_d)` with ``event_shape == (d,)``."""
        zeros = jnp.zeros(self.latent_dim, dtype=self.weight.dtype)
        return dist.Normal(zeros, 1.0).to_event(1)

    def log_prob(self, z: ArrayLike) -> jax.Array:
        """Log density of the latent prior, shape ``z.shape[:-1]``."""
        return self.latent_distribution().log_prob(jnp.asarray(z))

    def deblend_encode(
        self, cutouts: ArrayLike, *, noise_variance: float | None = None
    ) -> jax.Array:
        r"""Latents of the central galaxy of each cutout by a regularised projection.

        .. math::

            \hat z = (W^\top W + \lambda I)^{-1} W^\top (c - b)

        With ``noise_variance`` :math:`\sigma^2` given, :math:`\lambda = \sigma^2` and
        :math:`\hat z` is the exact posterior mean of an *isolated* galaxy under white noise;
        otherwise :math:`\lambda = 10^{-6}\,\mathrm{tr}(W^\top W) / d` (a least-squares
        projection). Neighbours in a blended cutout bias it, as a real encoder's would be.

        Parameters
        ----------
        cutouts
            Shape ``(n, B, S, S)``, electrons, centred on each galaxy.
        noise_variance
            Optional white-noise variance per pixel (electrons²).

        Returns
        -------
        jax.Array
            Shape ``(n, d)``.
        """
        c = jnp.asarray(cutouts).reshape(-1, self.weight.shape[0]) - self.bias
        gram = self.weight.T @ self.weight
        if noise_variance is None:
            lam = 1e-6 * jnp.trace(gram) / self.latent_dim
        else:
            lam = jnp.asarray(noise_variance, gram.dtype)
        rhs = c @ self.weight
        return jnp.linalg.solve(gram + lam * jnp.eye(self.latent_dim, dtype=gram.dtype), rhs.T).T

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        key: jax.Array,
        *,
        n_bands: int,
        stamp_size: int,
        latent_dim: int,
        flux: float = 1.0e3,
        size: float | None = None,
        variation: float = 0.3,
        bands: Sequence[str] | None = None,
        dtype: jnp.dtype | None = None,
    ) -> LinearGaussianPrior:
        r"""A random prior with smooth, galaxy-like basis images.

        The mean stamp is a circular Gaussian profile of width ``size`` (default ``S / 8``)
        with total flux ``flux`` times a random positive colour per band. Column :math:`k`
        of :math:`W` is a Gauss-Hermite (shapelet) mode :math:`H_m(x/s_k) H_n(y/s_k)
        e^{-r^2/2s_k^2}` of increasing order :math:`m + n`, a random width
        :math:`s_k` near ``size``, a random colour and an amplitude
        ``variation / (1 + m + n)`` relative to the mean profile's peak, so that
        :math:`z \sim \mathcal{N}(0, I)` gives galaxies whose shapes, sizes, fluxes and colours
        vary by tens of per cent.

        Parameters
        ----------
        key
            JAX random key.
        n_bands, stamp_size, latent_dim
            ``B``, ``S`` and ``d``.
        flux
            Mean total flux per band (electrons).
        size
            Gaussian width of the mean profile in pixels (default ``stamp_size / 8``).
        variation
            Relative amplitude of the modes.
        bands
            Band names (default ``("b0", "b1", ...)``).
        dtype
            Floating dtype (default: JAX's default float).
        """
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        size = stamp_size / 8.0 if size is None else float(size)
        bands = tuple(bands) if bands is not None else tuple(f"b{i}" for i in range(n_bands))
        if len(bands) != n_bands:
            raise ValueError(f"got {len(bands)} band names for n_bands={n_bands}")
        # One draw of all random numbers, then plain numpy (no per-op compilation).
        counts = (n_bands, latent_dim, latent_dim * n_bands, latent_dim)
        draws = np.asarray(jax.random.normal(key, (sum(counts),)), dtype=np.float64)
        g_colour, g_width, g_mode_colour, g_sign = np.split(draws, np.cumsum(counts)[:-1])

        coords = np.arange(stamp_size) - stamp_size // 2
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        colour = np.exp(0.3 * g_colour)
        colour = colour / colour.mean()
        profile = np.exp(-(xx**2 + yy**2) / (2 * size**2))
        profile = profile / profile.sum()
        bias = flux * colour[:, None, None] * profile
        peak = profile.max() * flux

        widths = size * np.exp(0.2 * g_width)
        mode_colour = colour * np.exp(0.3 * g_mode_colour.reshape(latent_dim, n_bands))
        signs = np.sign(g_sign + 1e-300)
        columns = []
        for k, (m, n) in enumerate(_shapelet_orders(latent_dim)):
            u, v = xx / widths[k], yy / widths[k]
            mode = _hermite(m, u) * _hermite(n, v) * np.exp(-(u**2 + v**2) / 2)
            mode = mode / np.abs(mode).max()
            amp = signs[k] * variation * peak / (1 + m + n)
            columns.append((amp * mode_colour[k][:, None, None] * mode).reshape(-1))
        weight = np.stack(columns, axis=1)
        return cls(
            jnp.asarray(weight, dtype),
            jnp.asarray(bias.reshape(-1), dtype),
            bands=bands,
            stamp_size=stamp_size,
        )


def _shapelet_orders(count: int) -> list[tuple[int, int]]:
    """The first ``count`` (m, n) shapelet orders, by increasing m + n."""
    orders: list[tuple[int, int]] = []
    total = 0
    while len(orders) < count:
        orders.extend((m, total - m) for m in range(total + 1))
        total += 1
    return orders[:count]


def _hermite(order: int, x: np.ndarray) -> np.ndarray:
    """Physicists' Hermite polynomial by recurrence."""
    h_prev, h = np.ones_like(x), 2 * x
    if order == 0:
        return h_prev
    for k in range(1, order):
        h_prev, h = h, 2 * x * h - 2 * k * h_prev
    return h


class LinearGaussianPosterior(NamedTuple):
    """Exact Gaussian posterior of all latents of a blend with a linear prior.

    Attributes
    ----------
    mean
        Posterior mean (= MAP), shape ``(n, d)``.
    covariance
        Posterior covariance of ``mean.reshape(-1)``, shape ``(n * d, n * d)``.
    """

    mean: jax.Array
    covariance: jax.Array


def linear_gaussian_posterior(
    field: ArrayLike,
    positions: ArrayLike,
    variance: ArrayLike,
    prior: LinearGaussianPrior,
    *,
    source_mask: ArrayLike | None = None,
    pixel_mask: ArrayLike | None = None,
    subpixel: bool = False,
) -> LinearGaussianPosterior:
    r"""Closed-form posterior of the latents of :func:`madness_ppl.scene.blend_model`.

    The model image is affine in the stacked latents :math:`z = (z_1, \dots, z_n)`,
    :math:`m(z) = A z + m_0` (``A`` is the Jacobian of the placed, summed decoder outputs and
    :math:`m_0` the image of :math:`z = 0`), so with :math:`\Sigma = \mathrm{diag}(\sigma^2)`
    over unmasked pixels:

    .. math::

        \Lambda = I + A^\top \Sigma^{-1} A, \qquad
        \mu = \Lambda^{-1} A^\top \Sigma^{-1} (y - m_0), \qquad
        \mathrm{Cov} = \Lambda^{-1}.

    Sources with ``source_mask == False`` contribute nothing to the image, so their block of
    the posterior is the prior :math:`\mathcal{N}(0, I)`. (:func:`~madness_ppl.infer.fit_map`
    leaves such latents at their initial value, since the masked model has no density for
    them.)

    Parameters
    ----------
    field, positions, variance, prior, source_mask, pixel_mask, subpixel
        As in :func:`madness_ppl.scene.blend_model`. Masked pixels may hold NaN.

    Returns
    -------
    LinearGaussianPosterior
        ``(mean (n, d), covariance (n d, n d))``.
    """
    return _linear_gaussian_posterior(
        jnp.asarray(field),
        jnp.asarray(positions),
        jnp.asarray(variance),
        prior,
        None if source_mask is None else jnp.asarray(source_mask),
        None if pixel_mask is None else jnp.asarray(pixel_mask),
        bool(subpixel),
    )


@functools.partial(jax.jit, static_argnums=6)
def _linear_gaussian_posterior(
    field, positions, variance, prior, source_mask, pixel_mask, subpixel
) -> LinearGaussianPosterior:
    n, d = positions.shape[0], prior.latent_dim
    dtype = jnp.result_type(field.dtype, prior.weight.dtype)
    smask = jnp.ones(n, dtype) if source_mask is None else jnp.asarray(source_mask, dtype)
    pmask = jnp.ones(field.shape, bool)
    if pixel_mask is not None:
        pmask = jnp.broadcast_to(jnp.asarray(pixel_mask, bool), field.shape)

    def image(zflat: jax.Array) -> jax.Array:
        stamps = prior.decode(zflat.reshape(n, d)) * smask[:, None, None, None]
        return place_stamps(stamps, positions, field.shape[-2:], subpixel=subpixel).reshape(-1)

    zero = jnp.zeros(n * d, dtype)
    m0 = image(zero)
    a = jax.jacfwd(image)(zero)
    inv_var = jnp.where(pmask, 1.0 / jnp.where(pmask, jnp.asarray(variance, dtype), 1.0), 0.0)
    inv_var = inv_var.reshape(-1)
    y = jnp.where(pmask, field, 0.0).reshape(-1)
    precision = jnp.eye(n * d, dtype=dtype) + a.T @ (inv_var[:, None] * a)
    chol = jnp.linalg.cholesky(precision)
    mean = jax.scipy.linalg.cho_solve((chol, True), a.T @ (inv_var * (y - m0)))
    cov = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n * d, dtype=dtype))
    return LinearGaussianPosterior(mean.reshape(n, d), 0.5 * (cov + cov.T))
