r"""The two NUTS backends behind :func:`~madness_ppl.infer.sample_posterior`.

Both draw from :math:`p(u) \propto \exp(-U(u))` for a potential :math:`U(\text{data}, u)`
over a pytree of unconstrained arrays (the data are traced arguments of programs compiled
once per potential, settings and shapes), with Stan's windowed adaptation of the step size
and of a diagonal or dense mass matrix, and return the same :class:`Draws`: positions ``(chain, draw, ...)``,
statistics ``(chain, draw)``, the wall time and the chains' last states, from which
:class:`Backend`'s ``extend`` draws further blocks (no new warm-up: the adapted step size and
mass matrix are kept). Neither knows the model behind :math:`U`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from madness_ppl.progress import progress_counter

__all__ = [
    "BACKENDS",
    "Backend",
    "Draws",
    "NUTSSettings",
    "Runner",
    "extend_blackjax",
    "extend_numpyro",
    "run_blackjax",
    "run_numpyro",
]

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
    seconds of warm-up and sampling, compilation included when the call compiled;
    ``resume``: the chains' last states (backend-specific), where ``extend`` continues.
    """

    positions: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    elapsed: float
    resume: Any = None

    def then(self, more: Draws) -> Draws:
        """These draws followed by ``more`` (the same chains continued) along the draw axis."""

        def join(a, b):
            return np.concatenate([a, b], axis=1)

        return Draws(
            jax.tree.map(join, self.positions, more.positions),
            {k: join(v, more.stats[k]) for k, v in self.stats.items()},
            self.elapsed + more.elapsed,
            more.resume,
        )


class _Program(NamedTuple):
    """Static (hashable) part of a compiled sampler: the potential and the scalar settings."""

    potential: Callable
    num_warmup: int
    num_samples: int
    dense_mass: bool
    target_accept: float
    max_tree_depth: int
    adapt_mass_matrix: bool
    progress: bool

    @classmethod
    def of(cls, potential: Callable, s: NUTSSettings) -> _Program:
        return cls(
            potential,
            int(s.num_warmup),
            int(s.num_samples),
            bool(s.dense_mass),
            float(s.target_accept),
            int(s.max_tree_depth),
            bool(s.adapt_mass_matrix),
            bool(s.progress),
        )


#: the bar that the compiled samplers' iterations advance (one sampling run at a time)
_ticks: list[Callable[[int], Any]] = []


def _tick() -> None:
    if _ticks:
        _ticks[-1](1)


def run_numpyro(
    potential: Callable, data: Any, u0: dict, key: jax.Array, settings: NUTSSettings
) -> Draws:
    r"""NUTS with NumPyro's kernel (``numpyro.infer.hmc.hmc``, ``algo="NUTS"``) from ``u0``.

    ``potential(data, u)`` is :math:`U(u)`; it must be hashable (it is a static argument of
    the compiled chain, e.g. a :class:`~madness_ppl.infer.target.Target`) so that one
    program of warm-up and draws (``lax.scan`` over NumPyro's ``sample_kernel``) serves
    every call with data of the same shapes. Chains start at ``u0`` with their own keys and
    adaptation; ``"sequential"`` runs them one after the other through that program,
    ``"vectorized"`` in one ``vmap``-ed program.
    """
    s = settings
    program = _Program.of(potential, s)
    inverse_mass = None if s.inverse_mass_matrix is None else jnp.asarray(s.inverse_mass_matrix)
    keys = jax.random.split(key, s.num_chains)
    if s.chain_method == "vectorized":
        return _numpyro_runs(s, lambda: _numpyro_chains(program, data, u0, inverse_mass, keys))
    return _numpyro_runs(
        s, lambda: [_numpyro_chain(program, data, u0, inverse_mass, k) for k in keys]
    )


def extend_numpyro(potential: Callable, data: Any, resume: Any, settings: NUTSSettings) -> Draws:
    """``settings.num_samples`` further draws of every chain of a :func:`run_numpyro` run,
    continued from its last states ``resume`` (one compiled program per potential, settings
    and shapes, as for the first block)."""
    s = settings
    program = _Program.of(potential, s)
    inverse_mass = None if s.inverse_mass_matrix is None else jnp.asarray(s.inverse_mass_matrix)
    if s.chain_method == "vectorized":
        return _numpyro_runs(
            s, lambda: _numpyro_more_chains(program, data, resume, inverse_mass), warmup=False
        )
    states = [jax.tree.map(lambda x, c=c: x[c], resume) for c in range(s.num_chains)]
    return _numpyro_runs(
        s, lambda: [_numpyro_more(program, data, st, inverse_mass) for st in states], warmup=False
    )


def _numpyro_runs(s: NUTSSettings, sample: Callable[[], Any], *, warmup: bool = True) -> Draws:
    """Run ``sample()`` (all chains: one stacked ``(state, (z, extra))`` or a list of them,
    one per chain) under the progress bar and make its :class:`Draws`."""
    start = time.perf_counter()
    total = s.num_chains * ((s.num_warmup if warmup else 0) + s.num_samples)
    with progress_counter(
        s.progress,
        "NUTS (numpyro)",
        total,
        transient=True,
        until_first="NUTS (numpyro): compiling the sampler",
    ) as advance:
        vectorized = s.chain_method == "vectorized"
        # one tick per iteration; vectorized chains share an iteration (an argument-free
        # callback is not batched by vmap)
        _ticks.append((lambda n: advance(n * s.num_chains)) if vectorized else advance)
        try:
            runs = sample()
            if not vectorized:
                runs = jax.tree.map(lambda *xs: jnp.stack(xs), *runs)
            states, (positions, extra) = runs
            positions, extra = jax.device_get((positions, extra))
        finally:
            _ticks.pop()
    elapsed = time.perf_counter() - start
    n_steps = np.asarray(extra["num_steps"], np.int64)
    stats = {
        "diverging": np.asarray(extra["diverging"], bool),
        "tree_depth": np.ceil(np.log2(n_steps + 1)).astype(np.int64),
        "n_steps": n_steps,
        "energy": np.asarray(extra["energy"]),
        "step_size": np.asarray(extra["step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }
    return Draws(positions, stats, elapsed, states)


def _numpyro_kernels(p: _Program, data: Any, u0: dict, inverse_mass: Any, key: jax.Array):
    """NumPyro's NUTS ``(initial state, sample_kernel)`` for ``p`` at ``u0``.

    ``init_kernel`` also configures ``sample_kernel`` (warm-up length, tree depth, adaptation
    schedule), so a continued chain calls it too and discards its state (dead code).
    """
    from numpyro.infer.hmc import hmc

    init_kernel, sample_kernel = hmc(
        potential_fn_gen=lambda d: functools.partial(p.potential, d), algo="NUTS"
    )
    state = init_kernel(
        u0,
        p.num_warmup,
        inverse_mass_matrix=inverse_mass,
        adapt_mass_matrix=p.adapt_mass_matrix,
        dense_mass=p.dense_mass,
        target_accept_prob=p.target_accept,
        max_tree_depth=p.max_tree_depth,
        model_args=(data,),
        rng_key=key,
    )
    return state, sample_kernel


def _numpyro_scan(p: _Program, sample_kernel: Callable, data: Any, state: Any, warmup: bool):
    """``num_warmup`` (``warmup``) then ``num_samples`` kernel steps from ``state``:
    ``(last state, (positions, statistics))`` of the kept draws."""

    def step(state, _):
        state = sample_kernel(state, model_args=(data,))
        if p.progress:
            jax.debug.callback(_tick)
        return state, None

    def draw(state, _):
        state, _ = step(state, None)
        return state, (
            state.z,
            {
                "diverging": state.diverging,
                "num_steps": state.num_steps,
                "energy": state.energy,
                "accept_prob": state.accept_prob,
                "step_size": state.adapt_state.step_size,
                "potential_energy": state.potential_energy,
            },
        )

    if warmup:
        state, _ = jax.lax.scan(step, state, None, length=p.num_warmup)
    return jax.lax.scan(draw, state, None, length=p.num_samples)


def _numpyro_chain_body(
    program: _Program, data: Any, u0: dict, inverse_mass: Any, key: jax.Array
) -> tuple[Any, tuple[dict, dict]]:
    """One chain: NumPyro's NUTS initialised at ``u0``, warm-up, then the kept draws."""
    state, sample_kernel = _numpyro_kernels(program, data, u0, inverse_mass, key)
    return _numpyro_scan(program, sample_kernel, data, state, warmup=True)


def _numpyro_more_body(
    program: _Program, data: Any, state: Any, inverse_mass: Any
) -> tuple[Any, tuple[dict, dict]]:
    """One chain continued from its last ``state``: ``num_samples`` more draws."""
    _, sample_kernel = _numpyro_kernels(program, data, state.z, inverse_mass, state.rng_key)
    return _numpyro_scan(program, sample_kernel, data, state, warmup=False)


_numpyro_chain = jax.jit(_numpyro_chain_body, static_argnums=0)
_numpyro_more = jax.jit(_numpyro_more_body, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _numpyro_chains(program: _Program, data: Any, u0: dict, inverse_mass: Any, keys: jax.Array):
    """All chains in lock-step (``vmap`` over their keys)."""
    return jax.vmap(lambda k: _numpyro_chain_body(program, data, u0, inverse_mass, k))(keys)


@functools.partial(jax.jit, static_argnums=0)
def _numpyro_more_chains(program: _Program, data: Any, states: Any, inverse_mass: Any):
    """All chains continued in lock-step (``vmap`` over their stacked states)."""
    return jax.vmap(lambda st: _numpyro_more_body(program, data, st, inverse_mass))(states)


def run_blackjax(
    potential: Callable, data: Any, u0: dict, key: jax.Array, settings: NUTSSettings
) -> Draws:
    """NUTS with ``blackjax.nuts`` after ``blackjax.window_adaptation``, chains one by one.

    ``potential(data, u)`` as for :func:`run_numpyro` (hashable; the compiled warm-up and
    sampling programs serve every call with data of the same shapes; ``chain_method`` is
    ignored); with ``progress`` the draws are taken in about 20 chunks to advance the bar.
    """
    s = settings
    program = _Program.of(potential, s)._replace(progress=False)

    def warm(c: int) -> _BlackjaxChain:
        k_warm, k_sample = jax.random.split(jax.random.fold_in(key, c))
        state, step_size, inv_mass = _blackjax_warmup(program, data, k_warm, u0)
        return _BlackjaxChain(state, step_size, inv_mass, k_sample, 0)

    return _blackjax_runs(program, data, s, [warm(c) for c in range(s.num_chains)])


def extend_blackjax(potential: Callable, data: Any, resume: Any, settings: NUTSSettings) -> Draws:
    """``settings.num_samples`` further draws of every chain of a :func:`run_blackjax` run,
    continued from its last states ``resume`` with the adapted step size and mass matrix."""
    program = _Program.of(potential, settings)._replace(progress=False)
    return _blackjax_runs(program, data, settings, list(resume))


class _BlackjaxChain(NamedTuple):
    """Where a BlackJAX chain stands: state, adapted parameters, its sampling key, and the
    number of blocks of draws taken so far."""

    state: Any
    step_size: Any
    inverse_mass_matrix: Any
    key: jax.Array
    blocks: int


def _blackjax_runs(
    program: _Program, data: Any, s: NUTSSettings, chains: list[_BlackjaxChain]
) -> Draws:
    """One block of ``num_samples`` draws of every chain: :class:`Draws`, resumable."""
    chunk = max(1, s.num_samples // 20) if s.progress else s.num_samples
    start = time.perf_counter()
    with progress_counter(
        s.progress,
        "NUTS (blackjax)",
        len(chains) * s.num_samples,
        transient=True,
        until_first="NUTS (blackjax): warm-up and compiling",
    ) as advance:
        runs = [_blackjax_block(program, data, chain, chunk, advance) for chain in chains]
    elapsed = time.perf_counter() - start
    positions = jax.tree.map(lambda *xs: np.stack(xs), *(pos for pos, _, _ in runs))
    div, depth, n_steps, energy, accept, lp, eps = (
        np.stack(x) for x in zip(*(st for _, st, _ in runs), strict=True)
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
    return Draws(positions, stats, elapsed, [chain for _, _, chain in runs])


def _logdensity(program: _Program, data: Any) -> Callable:
    return lambda u: -program.potential(data, u)


@functools.partial(jax.jit, static_argnums=0)
def _blackjax_warmup(program: _Program, data: Any, key: jax.Array, position: dict):
    """``(state, step_size, inverse_mass)`` after ``window_adaptation`` from ``position``."""
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    adaptation = blackjax.window_adaptation(
        blackjax.nuts,
        _logdensity(program, data),
        is_mass_matrix_diagonal=not program.dense_mass,
        target_acceptance_rate=program.target_accept,
        adaptation_info_fn=get_filter_adapt_info_fn(),
        max_num_doublings=program.max_tree_depth,
    )
    (state, params), _ = adaptation.run(key, position, num_steps=program.num_warmup)
    return state, params["step_size"], params["inverse_mass_matrix"]


@functools.partial(jax.jit, static_argnums=(0, 6))
def _blackjax_sample(program, data, key, state, step_size, inverse_mass_matrix, length):
    """``length`` NUTS draws from ``state``: ``(state, (positions, stats))``."""
    import blackjax

    nuts = blackjax.nuts(
        _logdensity(program, data),
        step_size=step_size,
        inverse_mass_matrix=inverse_mass_matrix,
        max_num_doublings=program.max_tree_depth,
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


def _blackjax_block(
    program: _Program,
    data: Any,
    chain: _BlackjaxChain,
    chunk: int,
    advance: Callable[[int], Any],
) -> tuple[Any, tuple, _BlackjaxChain]:
    """``num_samples`` draws of one chain from where it stands, in chunks of ``chunk``."""
    # block 0 keeps the key the chain has always used; later blocks fold in their index
    base = chain.key if chain.blocks == 0 else jax.random.fold_in(chain.key, 2**31 + chain.blocks)
    state, pieces = chain.state, []
    for i, first in enumerate(range(0, program.num_samples, chunk)):
        length = min(chunk, program.num_samples - first)
        key_i = jax.random.fold_in(base, i)
        state, out = _blackjax_sample(
            program, data, key_i, state, chain.step_size, chain.inverse_mass_matrix, length
        )
        pieces.append(jax.device_get(out))
        advance(length)
    pos, st = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
    step_sizes = np.full(program.num_samples, np.asarray(chain.step_size))
    return pos, (*st, step_sizes), chain._replace(state=state, blocks=chain.blocks + 1)


class Runner(NamedTuple):
    """A backend: ``run(potential, data, u0, key, settings)`` warms up and draws a first
    block; ``extend(potential, data, draws.resume, settings)`` draws another block."""

    run: Callable[[Callable, Any, dict, jax.Array, NUTSSettings], Draws]
    extend: Callable[[Callable, Any, Any, NUTSSettings], Draws]


#: Backend name -> its :class:`Runner`.
BACKENDS: dict[str, Runner] = {
    "numpyro": Runner(run_numpyro, extend_numpyro),
    "blackjax": Runner(run_blackjax, extend_blackjax),
}
