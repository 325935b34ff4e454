r"""The contract between a galaxy prior and the code that uses it: :class:`GalaxyModel`.

A galaxy model maps a latent vector :math:`z \in \mathbb{R}^d` of one galaxy to its stamp
:math:`f(z) \in \mathbb{R}^{B \times S \times S}` in electrons, gives the prior
:math:`p(z)` as a NumPyro distribution, and proposes latents for blended cutouts. The scene
(:func:`~madness_ppl.scene.blend_model`), the posterior summaries and the batch pipeline
need nothing else, so any object with these members works there:
:class:`~madness_ppl.prior.GalaxyPrior` (VAE decoder + flow) and the linear-Gaussian
:class:`~madness_ppl.toy.LinearGaussianPrior` both satisfy it.

>>> import jax
>>> from madness_ppl.toy import LinearGaussianPrior
>>> isinstance(LinearGaussianPrior.random(
...     jax.random.key(0), n_bands=2, stamp_size=9, latent_dim=3
... ), GalaxyModel)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax
    import numpyro.distributions as dist
    from jax.typing import ArrayLike

__all__ = ["GalaxyModel", "ScoredGalaxyModel", "zero_bands"]


@runtime_checkable
class GalaxyModel(Protocol):
    """What the scene, the summaries and the batch pipeline ask of a galaxy prior.

    Attributes
    ----------
    bands
        Band names, in the order of the stamps' first axis (``B = len(bands)``).
    stamp_size
        Stamp side ``S`` in pixels (odd; the galaxy is centred at ``S // 2``).
    latent_dim
        Dimension ``d`` of one galaxy's latent vector.
    """

    @property
    def bands(self) -> Sequence[str]: ...

    @property
    def stamp_size(self) -> int: ...

    @property
    def latent_dim(self) -> int: ...

    def latent_distribution(self) -> dist.Distribution:
        r"""The prior :math:`p(z)` of one galaxy: ``batch_shape == ()``, ``event_shape == (d,)``."""
        ...

    def decode(self, z: ArrayLike) -> jax.Array:
        r"""Stamps :math:`f(z)` in electrons, ``(..., d) -> (..., B, S, S)``."""
        ...

    def deblend_encode(self, cutouts: ArrayLike) -> jax.Array:
        """Latents ``(..., d)`` of the central galaxy of blended cutouts ``(..., B, S, S)``."""
        ...


@runtime_checkable
class ScoredGalaxyModel(GalaxyModel, Protocol):
    """A :class:`GalaxyModel` that also evaluates its prior density: what the Laplace errors,
    the Newton refinement and the shear response differentiate twice.

    :class:`~madness_ppl.prior.GalaxyPrior` and :class:`~madness_ppl.toy.LinearGaussianPrior`
    both satisfy it.
    """

    def log_prob(self, z: ArrayLike) -> jax.Array:
        r""":math:`\log p(z)` of one galaxy's latents, ``(..., d) -> (...)``."""
        ...


def zero_bands(model: GalaxyModel, n_samples: int = 64, seed: int = 0) -> tuple[str, ...]:
    """Bands in which ``model`` decodes exactly zero for ``n_samples`` latents drawn from its
    latent distribution: bands it cannot model (every source gets flux 0 there)."""
    import jax
    import numpy as np

    z = model.latent_distribution().sample(jax.random.key(seed), (n_samples,))
    peak = np.abs(np.asarray(model.decode(z))).max(axis=(0, 2, 3))
    return tuple(b for b, p in zip(model.bands, peak, strict=True) if p == 0)
