r"""The two NUTS backends behind :func:`~madness_ppl.infer.sample_posterior`.

Both draw from :math:`p(u) \propto \exp(-U(u))` for a potential :math:`U` over a pytree of
unconstrained arrays, with Stan's windowed adaptation of the step size and of a diagonal or
dense mass matrix, and return the same :class:`Draws`: positions ``(chain, draw, ...)``,
statistics ``(chain, draw)`` and the wall time. Neither knows the model behind :math:`U`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS

from madness_ppl.progress import progress_counter

__all__ = ["BACKENDS", "Backend", "Draws", "NUTSSettings", "run_blackjax", "run_numpyro"]

Backend = Literal["numpyro", "blackjax"]


class NUTSSettings(NamedTuple):
    """Settings shared by both backends (see :func:`~madness_ppl.infer.sample_posterior`)."""

    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 1
    dense_mass: bool = False
    target_accept: float = 0.8
    max_tree_depth: int = 10
    progress: bool = False
    chain_method: Literal["sequential", "vectorized"] = "sequential"
    #: initial inverse mass matrix over the flattened unconstrained latents, ``(k,)`` or
    #: ``(k, k)`` (``None``: the identity); numpyro backend only
    inverse_mass_matrix: np.ndarray | None = None
    #: adapt the mass matrix during warm-up (``False``: step size only)
    adapt_mass_matrix: bool = True

    def check(self, backend: str) -> NUTSSettings:
        """Raise :class:`ValueError` for settings that ``backend`` cannot run; return them."""
        if self.num_samples < 1 or self.num_chains < 1 or self.num_warmup < 0:
            raise ValueError(
                f"need num_samples >= 1, num_chains >= 1, num_warmup >= 0; got "
                f"{self.num_samples}, {self.num_chains}, {self.num_warmup}"
            )
        if self.chain_method not in ("sequential", "vectorized"):
            raise ValueError(
                f"chain_method must be 'sequential' or 'vectorized', got {self.chain_method!r}"
            )
        if backend == "blackjax" and self.num_warmup < 1:
            raise ValueError("the blackjax backend needs num_warmup >= 1 to tune the step size")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept}")
        if backend == "blackjax" and (
            self.inverse_mass_matrix is not None or not self.adapt_mass_matrix
        ):
            raise ValueError(
                "inverse_mass_matrix= and adapt_mass_matrix=False need backend='numpyro' "
                "(blackjax's window adaptation starts from the identity and always adapts it)"
            )
        return self


class Draws(NamedTuple):
    """Output of a backend.

    ``positions``: unconstrained draws by site, ``(chain, draw, ...)``; ``stats``:
    ``diverging``, ``tree_depth``, ``n_steps``, ``energy``, ``step_size``,
    ``acceptance_rate`` and ``lp`` :math:`= -U(u)`, each ``(chain, draw)``; ``elapsed``:
    seconds of warm-up and sampling, compilation included.
    """

    positions: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    elapsed: float


def run_numpyro(potential: Callable, u0: dict, key: jax.Array, settings: NUTSSettings) -> Draws:
    """NUTS with ``numpyro.infer.NUTS`` and ``MCMC`` from ``u0`` (every chain)."""
    s = settings
    kernel = NUTS(
        potential_fn=potential,
        dense_mass=s.dense_mass,
        target_accept_prob=s.target_accept,
        max_tree_depth=s.max_tree_depth,
        inverse_mass_matrix=None
        if s.inverse_mass_matrix is None
        else jnp.asarray(s.inverse_mass_matrix),
        adapt_mass_matrix=s.adapt_mass_matrix,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=s.num_chains,
        chain_method=s.chain_method,
        progress_bar=s.progress,
    )
    init = u0 if s.num_chains == 1 else jax.tree.map(lambda x: jnp.stack([x] * s.num_chains), u0)
    fields = (
        "diverging",
        "num_steps",
        "energy",
        "accept_prob",
        "adapt_state.step_size",
        "potential_energy",
    )
    start = time.perf_counter()
    mcmc.run(key, init_params=init, extra_fields=fields)
    positions = jax.device_get(mcmc.get_samples(group_by_chain=True))
    extra = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
    elapsed = time.perf_counter() - start
    n_steps = np.asarray(extra["num_steps"], np.int64)
    stats = {
        "diverging": np.asarray(extra["diverging"], bool),
        "tree_depth": np.ceil(np.log2(n_steps + 1)).astype(np.int64),
        "n_steps": n_steps,
        "energy": np.asarray(extra["energy"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }
    return Draws(positions, stats, elapsed)


def run_blackjax(potential: Callable, u0: dict, key: jax.Array, settings: NUTSSettings) -> Draws:
    """NUTS with ``blackjax.nuts`` after ``blackjax.window_adaptation``, chains one by one.

    The chains share the compiled warm-up and sampling programs (``chain_method`` is
    ignored); with ``progress`` the draws are taken in about 20 chunks to advance the bar.
    """
    s = settings
    warmup, sample = _blackjax_programs(potential, s)
    chunk = max(1, s.num_samples // 20) if s.progress else s.num_samples
    start = time.perf_counter()
    total = s.num_chains * s.num_samples
    with progress_counter(s.progress, "NUTS (blackjax)", total, transient=True) as advance:
        runs = [
            _blackjax_chain(warmup, sample, u0, jax.random.fold_in(key, c), s, chunk, advance)
            for c in range(s.num_chains)
        ]
    elapsed = time.perf_counter() - start
    positions = jax.tree.map(lambda *xs: np.stack(xs), *(pos for pos, _ in runs))
    div, depth, n_steps, energy, accept, lp, eps = (
        np.stack(x) for x in zip(*(st for _, st in runs), strict=True)
    )
    stats = {
        "diverging": div.astype(bool),
        "tree_depth": depth.astype(np.int64),
        "n_steps": n_steps.astype(np.int64),
        "energy": energy,
        "step_size": eps,
        "acceptance_rate": accept,
        "lp": lp,
    }
    return Draws(positions, stats, elapsed)


def _blackjax_programs(potential: Callable, s: NUTSSettings) -> tuple[Callable, Callable]:
    """Jitted ``warmup(key, u0) -> (state, step_size, inverse_mass)`` and
    ``sample(key, state, step_size, inverse_mass, length) -> (state, (positions, stats))``."""
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    def logdensity(u):
        return -potential(u)

    adaptation = blackjax.window_adaptation(
        blackjax.nuts,
        logdensity,
        is_mass_matrix_diagonal=not s.dense_mass,
        target_acceptance_rate=s.target_accept,
        adaptation_info_fn=get_filter_adapt_info_fn(),
        max_num_doublings=s.max_tree_depth,
    )

    @jax.jit
    def warmup(key, position):
        (state, params), _ = adaptation.run(key, position, num_steps=s.num_warmup)
        return state, params["step_size"], params["inverse_mass_matrix"]

    @functools.partial(jax.jit, static_argnums=4)
    def sample(key, state, step_size, inverse_mass_matrix, length):
        nuts = blackjax.nuts(
            logdensity,
            step_size=step_size,
            inverse_mass_matrix=inverse_mass_matrix,
            max_num_doublings=s.max_tree_depth,
        )

        def one(state, k):
            state, info = nuts.step(k, state)
            stats = (
                info.is_divergent,
                info.num_trajectory_expansions,
                info.num_integration_steps,
                info.energy,
                info.acceptance_rate,
                state.logdensity,
            )
            return state, (state.position, stats)

        return jax.lax.scan(one, state, jax.random.split(key, length))

    return warmup, sample


def _blackjax_chain(
    warmup: Callable,
    sample: Callable,
    u0: dict,
    key: jax.Array,
    s: NUTSSettings,
    chunk: int,
    advance: Callable[[int], Any],
) -> tuple[Any, tuple]:
    """One chain: warm-up from ``u0``, then ``num_samples`` draws in chunks of ``chunk``."""
    k_warm, k_sample = jax.random.split(key)
    state, step_size, inv_mass = warmup(k_warm, u0)
    pieces = []
    for i, first in enumerate(range(0, s.num_samples, chunk)):
        length = min(chunk, s.num_samples - first)
        state, out = sample(jax.random.fold_in(k_sample, i), state, step_size, inv_mass, length)
        pieces.append(jax.device_get(out))
        advance(length)
    pos, st = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
    return pos, (*st, np.full(s.num_samples, np.asarray(step_size)))


#: Backend name -> runner ``(potential, u0, key, settings) -> Draws``.
BACKENDS: dict[str, Callable[[Callable, dict, jax.Array, NUTSSettings], Draws]] = {
    "numpyro": run_numpyro,
    "blackjax": run_blackjax,
}
