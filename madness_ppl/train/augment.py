r"""On-the-fly training data: exact symmetry augmentation and fresh noise for each minibatch.

The simulated PSFs of the shipped surveys are circular and the pixel grid is square, so the eight
symmetries of the square (the dihedral group :math:`D_4`: flips and 90-degree rotations about the
central pixel) map a simulated stamp onto another valid stamp of the same population exactly;
noise is drawn afresh on every visit (the MADNESS noise model
:math:`y = I + \epsilon,\ \epsilon \sim N(0, \sigma_{\rm sky}^2 + \max(I, 0))`). A pool of *N*
noiseless stamps thus gives :math:`8N` distinct galaxies, each with unlimited noise realisations,
for the memory of *N* stamps and no simulation while training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from madness_ppl.likelihood import pixel_variance

__all__ = ["add_noise", "random_dihedral"]


def random_dihedral(key: jax.Array, images: ArrayLike) -> jax.Array:
    """Apply an independent, uniformly drawn element of :math:`D_4` to each image.

    Parameters
    ----------
    key
        A ``jax.random`` key.
    images
        ``(n, ..., S, S)`` square images; the transform acts on the last two axes and is shared by
        the channels of one image.

    Returns
    -------
    jax.Array
        Same shape: each image flipped along x and/or y and/or transposed (8 combinations).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(18.0).reshape(2, 1, 3, 3)
    >>> y = random_dihedral(jax.random.key(0), x)
    >>> bool(jnp.allclose(jnp.sort(y.reshape(2, -1)), jnp.sort(x.reshape(2, -1))))
    True
    """
    images = jnp.asarray(images)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square images, got {images.shape}")
    flips = jax.random.bernoulli(key, 0.5, (3, images.shape[0]))
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    out = jnp.where(flips[0].reshape(shape), images[..., ::-1, :], images)
    out = jnp.where(flips[1].reshape(shape), out[..., :, ::-1], out)
    return jnp.where(flips[2].reshape(shape), jnp.swapaxes(out, -1, -2), out)


def add_noise(key: jax.Array, noiseless: ArrayLike, sky_variance: ArrayLike) -> jax.Array:
    r"""Noisy copy :math:`y + \sqrt{\sigma_b^2 + \max(y, 0)}\,\epsilon` of noiseless stamps.

    Parameters
    ----------
    key
        A ``jax.random`` key.
    noiseless
        ``(..., bands, S, S)`` stamps in electrons.
    sky_variance
        ``(bands,)`` sky variance per pixel in electrons².
    """
    noiseless = jnp.asarray(noiseless)
    variance = pixel_variance(noiseless, sky_variance, dtype=noiseless.dtype, xp=jnp)
    return noiseless + jnp.sqrt(variance) * jax.random.normal(key, noiseless.shape, noiseless.dtype)
