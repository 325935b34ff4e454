r"""The jitted programs behind :func:`madness_ppl.infer.fit_map`.

A fit is a :class:`FitState` advanced by one compiled step program at a time: the step body of
its method (SVI with an optax optimiser, or L-BFGS with its line search spread over steps,
:mod:`madness_ppl.infer.optimizers`), the stopping rule, the curvature check that confirms an
L-BFGS convergence, and the final evaluation (loss, deterministic sites, the Gaussian
:math:`\chi^2`). With a batch axis each program is ``vmap``-ed over the fields. The host loop
dispatches one step at a time (XLA:CPU); the device loop runs chunks of steps in
``lax.while_loop`` (accelerators). Programs are cached on :class:`Static`.
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro import handlers
from numpyro.distributions import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    Normal,
    StudentT,
)
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.initialization import init_to_feasible, init_to_median
from numpyro.infer.util import log_density
from numpyro.optim import optax_to_numpyro

from madness_ppl.compile_options import ONCE
from madness_ppl.infer.arguments import ArgSpec, is_array
from madness_ppl.infer.optimizers import (
    MIN_ALPHA,
    diagonal_newton_decrement,
    hessian_diagonal,
    lbfgs_init,
    lbfgs_step,
)
from madness_ppl.likelihood import normal_chi2

__all__ = [
    "MAX_RESTARTS",
    "VERIFY_MAX_ELEMENTS",
    "FitState",
    "Static",
    "Stopping",
    "advance_program",
    "argument_batch_axes",
    "check_program",
    "device_loop",
    "final_program",
    "host_loop",
    "init_program",
    "step_program",
]


# --------------------------------------------------------------------------------------------
# Batch axes of the model arguments (their static / dynamic split: infer.arguments)
# --------------------------------------------------------------------------------------------
def argument_batch_axes(
    args: tuple, kwargs: dict, spec: ArgSpec, in_axes: Sequence[int | None] | None
) -> tuple[int | None, ...]:
    """Batch axis of each dynamic leaf (0 for top-level array arguments by default)."""
    if in_axes is None:
        arg_axes = [0 if is_array(a) else None for a in args]
    else:
        if len(in_axes) != len(args):
            raise ValueError(f"in_axes has {len(in_axes)} entries for {len(args)} positional args")
        arg_axes = list(in_axes)
    kw_axes = {k: (0 if is_array(v) else None) for k, v in kwargs.items()}
    tree = (
        tuple(jax.tree.map(lambda _, ax=ax: ax, a) for a, ax in zip(args, arg_axes, strict=True)),
        {k: jax.tree.map(lambda _, ax=kw_axes[k]: ax, v) for k, v in kwargs.items()},
    )
    axes = spec.treedef.flatten_up_to(tree)
    return tuple(ax for ax, d in zip(axes, spec.dynamic, strict=True) if d)


# --------------------------------------------------------------------------------------------
# The fit, one field at a time (vmapped for batches)
# --------------------------------------------------------------------------------------------
class Static(NamedTuple):
    """What a compiled program depends on besides array shapes (hashable: the jit cache key):
    the model, method, optimiser, argument structure, batch axes, step cap and start rule."""

    model: Callable
    method: str
    optimizer: Any
    spec: ArgSpec
    batch_axes: tuple[int | None, ...] | None
    max_steps: int
    init_fallback: Callable


class FitState(NamedTuple):
    """The state of one fit (or of each fit of a batch) between steps: the optimiser state,
    the step count, the losses and smoothed decrease of the stopping rule, and its flags."""

    opt: Any  # SVIState ("svi") or (unconstrained params, direction state) ("lbfgs")
    step: jax.Array
    prev_loss: jax.Array
    avg: jax.Array
    avg_ref: jax.Array
    done: jax.Array
    converged: jax.Array
    history: jax.Array
    key: jax.Array


class Stopping(NamedTuple):
    """Stopping-rule hyper-parameters of :func:`~madness_ppl.infer.fit_map` (traced: changing them recompiles
    nothing)."""

    min_steps: jax.Array
    window: jax.Array
    rtol: jax.Array
    tol: jax.Array


def _init_loc(
    site: dict | None = None,
    values: Mapping[str, Any] | None = None,
    fallback: Callable = init_to_median,
):
    """``init_to_value`` with a ``fallback`` strategy for the sites not in ``values``."""
    if site is None:
        return functools.partial(_init_loc, values=values, fallback=fallback)
    if site["type"] == "sample" and not site["is_observed"] and site["name"] in (values or {}):
        return values[site["name"]]
    return fallback(site)


def _build(static: Static, args: tuple, kwargs: dict, init_values: Mapping | None, key: jax.Array):
    """SVI + AutoDelta objects (trace-time only) and the initial SVI state.

    ``init_values=None`` builds the objects for their structure only (the initial state is
    discarded): a cheap init strategy keeps that dead code small.
    """
    init_loc_fn = (
        init_to_feasible
        if init_values is None
        else functools.partial(_init_loc, values=init_values, fallback=static.init_fallback)
    )
    guide = AutoDelta(static.model, init_loc_fn=init_loc_fn)
    optim = static.optimizer if static.method == "svi" else optax.identity()
    svi = SVI(static.model, guide, optax_to_numpyro(optim), Trace_ELBO())
    svi_state = svi.init(key, *args, **kwargs)
    return svi, guide, svi_state


def _unconstrained(svi: SVI, opt: Any, method: str) -> dict:
    return svi.optim.get_params(opt.optim_state) if method == "svi" else opt.params


def _single_init(
    static: Static, dyn: list, init_values: dict, scale_values: dict, key: jax.Array
) -> FitState:
    args, kwargs = static.spec.merge(dyn)
    svi, guide, svi_state = _build(static, args, kwargs, init_values, key)
    if static.method == "svi":
        opt = svi_state
    else:
        u = svi.optim.get_params(svi_state.optim_state)
        by_param = {f"{site}_{guide.prefix}_loc": v for site, v in scale_values.items()}
        unknown = set(by_param) - set(u)
        if unknown:
            sites = sorted(name[: -len(f"_{guide.prefix}_loc")] for name in u)
            raise ValueError(
                f"scale= names no latent site of the model: {sorted(scale_values)}"
                f" (latent sites: {sites})"
            )
        scale = {
            name: jnp.broadcast_to(jnp.asarray(by_param.get(name, 1.0), v.dtype), v.shape)
            for name, v in u.items()
        }
        opt = lbfgs_init(u, static.optimizer, scale)
    u = _unconstrained(svi, opt, static.method)
    leaves = jax.tree_util.tree_leaves(u)
    dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
    free = sum(int(np.prod(leaf.shape)) for leaf in leaves) > 0
    zero = jnp.zeros((), dtype)
    return FitState(
        opt=opt,
        step=jnp.zeros((), jnp.int32),
        prev_loss=zero,
        avg=zero,
        avg_ref=zero,
        done=jnp.asarray(not free),
        converged=jnp.asarray(not free),
        history=jnp.full((static.max_steps,), jnp.nan, dtype),
        key=key,
    )


def _guide_point_log_joint(
    static: Static, guide: AutoDelta, params: dict, args: tuple, kwargs: dict, key: jax.Array
) -> tuple[dict, jax.Array, dict]:
    """The ``AutoDelta`` guide's point (constrained values by site), :math:`\\log p(y, x)` of
    the model there and the model's trace; the sites are summed in the order the model runs
    them (:func:`numpyro.infer.util.log_density`)."""
    latents = guide.median(params)
    log_joint, trace = log_density(handlers.seed(static.model, key), args, kwargs, latents)
    return latents, log_joint, trace


def _unconstrained_loss(
    static: Static, svi: SVI, guide: AutoDelta, args: tuple, kwargs: dict, key: jax.Array
) -> Callable:
    """The fit's loss as a function of the unconstrained parameters ``u``:
    :math:`-\\log p(y, T(u))` at the ``AutoDelta`` guide's point (steps and the curvature check).

    This is the guide's ``Trace_ELBO`` (a point mass has zero entropy), summed over the sites
    in the order the model runs them (:func:`_guide_point_log_joint`, as the final program).
    ``Trace_ELBO`` itself sums over a ``set`` of site names, whose order follows Python's
    string-hash seed: the step program then lowered to one of two variants, and a new process
    could miss its own persistent-cache entry (:mod:`madness_ppl.cache`).
    """

    def loss_u(u):
        _, log_joint, _ = _guide_point_log_joint(
            static, guide, svi.constrain_fn(u), args, kwargs, key
        )
        return -log_joint

    return loss_u


def _make_body(
    static: Static, dyn: list, hyper: Stopping, key: jax.Array
) -> Callable[[FitState], FitState]:
    """One optimisation step and the stopping rule, as a function of the fit state."""
    args, kwargs = static.spec.merge(dyn)
    svi, guide, start = _build(static, args, kwargs, None, key)
    min_steps, window, rtol, tol = hyper
    loss_u = _unconstrained_loss(static, svi, guide, args, kwargs, key)

    params = jax.tree_util.tree_leaves(svi.optim.get_params(start.optim_state))
    n_elements = max(sum(int(np.prod(v.shape)) for v in params), 1)

    def svi_body(s: FitState) -> FitState:
        opt, loss = svi.stable_update(s.opt, *args, **kwargs)
        dtype = s.prev_loss.dtype
        loss = jnp.asarray(loss, dtype)
        k = s.step + 1
        first = s.step == 0
        delta = jnp.where(first, 0.0, s.prev_loss - loss).astype(dtype)
        w = window.astype(dtype)
        avg = jnp.where(first, 0.0, (1 - 1 / w) * s.avg + delta / w).astype(dtype)
        avg_ref = jnp.where(k <= window, avg, s.avg_ref)
        plateau = avg < rtol.astype(dtype) * avg_ref
        finite = jnp.isfinite(loss)
        late = finite & (k >= min_steps)
        # converged: the smoothed decrease is small in absolute terms (nats per latent element),
        # not only relative to the first window's (a plateau of Adam far from the optimum)
        converged = late & (k > window) & (jnp.abs(avg) <= tol.astype(dtype) * n_elements)
        return FitState(
            opt=opt,
            step=k,
            prev_loss=loss,
            avg=avg,
            avg_ref=avg_ref,
            done=(late & plateau) | converged | ~finite | (k >= static.max_steps),
            converged=converged,
            history=lax.dynamic_update_index_in_dim(s.history, loss, s.step, 0),
            key=s.key,
        )

    def lbfgs_body(s: FitState) -> FitState:
        # prev_loss: last accepted loss; avg: the absolute tolerance (nats), set at the start
        new, accepted, decrease = lbfgs_step(loss_u, s.opt, static.optimizer)
        dtype = s.prev_loss.dtype
        k = s.step + 1
        n_free = jnp.sum(new.grad != 0).astype(dtype)  # padded sources have zero gradient
        tolerance = jnp.where(s.step == 0, tol.astype(dtype) * jnp.maximum(n_free, 1.0), s.avg)
        small = (decrease <= tolerance) & (new.predicted <= tolerance)
        converged = accepted & (k >= min_steps) & small
        stalled = (~accepted) & (new.alpha < MIN_ALPHA)
        return FitState(
            opt=new,
            step=k,
            prev_loss=new.value,
            avg=tolerance,
            avg_ref=s.avg_ref,
            done=converged | stalled | (k >= static.max_steps),
            converged=converged,
            history=lax.dynamic_update_index_in_dim(s.history, new.value, s.step, 0),
            key=s.key,
        )

    return svi_body if static.method == "svi" else lbfgs_body


def _single_advance(
    static: Static, dyn: list, state: FitState, stop_at: jax.Array, hyper: Stopping
) -> FitState:
    """Steps until done or ``stop_at``, in a device-side ``lax.while_loop``."""
    body = _make_body(static, dyn, hyper, state.key)
    return lax.while_loop(lambda s: (~s.done) & (s.step < stop_at), body, state)


def _single_step(static: Static, dyn: list, state: FitState, hyper: Stopping) -> FitState:
    """One step; a finished fit is left unchanged (so extra steps are harmless no-ops)."""
    new = _make_body(static, dyn, hyper, state.key)(state)
    return jax.tree.map(lambda n, o: jnp.where(state.done, o, n), new, state)


def _single_check(
    static: Static, dyn: list, state: FitState, allow_restart: jax.Array
) -> tuple[FitState, jax.Array]:
    """Confirm a converged ``"lbfgs"`` fit with the exact Hessian diagonal.

    Where the diagonal Newton decrement exceeds the tolerance, the fit restarts from its
    current point with a fresh memory and the Jacobi preconditioner (``allow_restart``), or
    is marked not converged (the last check).
    """
    args, kwargs = static.spec.merge(dyn)
    svi, guide, _ = _build(static, args, kwargs, None, state.key)
    loss_u = _unconstrained_loss(static, svi, guide, args, kwargs, state.key)
    x, unravel = jax.flatten_util.ravel_pytree(state.opt.params)
    diagonal = hessian_diagonal(lambda x: loss_u(unravel(x)), x)
    decrement, scale = diagonal_newton_decrement(state.opt.grad, diagonal)
    confirmed = decrement <= state.avg  # avg holds the tolerance of an "lbfgs" fit
    restart = state.converged & ~confirmed & allow_restart
    fresh = state._replace(
        opt=lbfgs_init(state.opt.params, static.optimizer, unravel(scale.astype(x.dtype))),
        done=jnp.asarray(False),
        converged=jnp.asarray(False),
    )
    new = jax.tree.map(lambda f, o: jnp.where(restart, f, o), fresh, state)
    return new._replace(converged=new.converged & confirmed), restart


def _single_final(static: Static, dyn: list, state: FitState) -> dict:
    args, kwargs = static.spec.merge(dyn)
    svi, guide, _ = _build(static, args, kwargs, None, state.key)
    params = svi.constrain_fn(_unconstrained(svi, state.opt, static.method))
    latents, log_joint, trace = _guide_point_log_joint(
        static, guide, params, args, kwargs, state.key
    )
    deterministics = {n: s["value"] for n, s in trace.items() if s["type"] == "deterministic"}
    chi2, n_pixels, observed = _gaussian_stats(trace)
    return {
        "params": latents,
        "deterministics": deterministics,
        "loss": -log_joint,
        "chi2": chi2,
        "n_pixels": n_pixels,
        "observed": observed,
    }


def _gaussian_stats(trace: dict) -> tuple[jax.Array, jax.Array, dict]:
    """chi² and element count over the unmasked elements of observed Normal and Student-t
    sites (standardised residuals (x - loc)² / scale² for both)."""
    chi2 = jnp.zeros(())
    n_pixels = jnp.zeros((), jnp.int32)
    observed = {}
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = jnp.asarray(site["value"])
        mask = jnp.ones(value.shape, bool)
        if site.get("mask") is not None:
            mask = mask & site["mask"]
        fn = site["fn"]
        while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
            if isinstance(fn, MaskedDistribution):
                mask = mask & jnp.asarray(fn._mask, bool)
            fn = fn.base_dist
        if not isinstance(fn, Normal | StudentT):
            # runs while the final program is traced: once per compilation, not per call
            warnings.warn(
                f"observed site {name!r} is {type(fn).__name__}, not Normal or StudentT: "
                "MAPResult.chi2, n_pixels and reduced_chi2 cover those sites only (NaN/0 when there "
                "are none); judge this site's fit from its own distribution",
                UserWarning,
                stacklevel=2,
            )
            continue
        mask = jnp.broadcast_to(mask, value.shape)
        chi2 = chi2 + normal_chi2(value, fn.loc, fn.scale, mask)
        n_pixels = n_pixels + jnp.sum(mask)
        observed[name] = jnp.where(mask, value, jnp.nan)
    return chi2, n_pixels, observed


def _maybe_vmap(fn: Callable, static: Static, n_batched: int, n_shared: int) -> Callable:
    """``fn(static, dyn, *batched, *shared)``, vmapped over fields when ``static`` is batched."""
    if static.batch_axes is None:
        return functools.partial(fn, static)
    in_axes = (list(static.batch_axes),) + (0,) * n_batched + (None,) * n_shared
    return jax.vmap(functools.partial(fn, static), in_axes=in_axes)


def _drop_weak_types(tree: Any) -> Any:
    """Drop weak types so that a state fed back into a program matches its input types."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.result_type(x)), tree)


@functools.partial(jax.jit, static_argnums=0, compiler_options=ONCE)
def init_program(
    static: Static, dyn: list, init_values: dict, scale_values: dict, key: jax.Array
) -> FitState:
    """The compiled start of a fit: build the guide at ``init_values``, set the L-BFGS scales."""
    return _drop_weak_types(
        _maybe_vmap(_single_init, static, 2, 1)(dyn, init_values, scale_values, key)
    )


@functools.partial(jax.jit, static_argnums=0)
def advance_program(
    static: Static, dyn: list, state: FitState, stop_at: jax.Array, hyper: Stopping
) -> FitState:
    """Steps in ``lax.while_loop`` until every fit stops or reaches step ``stop_at``."""
    return _drop_weak_types(_maybe_vmap(_single_advance, static, 1, 2)(dyn, state, stop_at, hyper))


@functools.partial(jax.jit, static_argnums=0)
def step_program(static: Static, dyn: list, state: FitState, hyper: Stopping) -> FitState:
    """One step of every fit (a no-op on a fit that has stopped)."""
    return _drop_weak_types(_maybe_vmap(_single_step, static, 1, 1)(dyn, state, hyper))


@functools.partial(jax.jit, static_argnums=0, compiler_options=ONCE)
def check_program(
    static: Static, dyn: list, state: FitState, allow_restart: jax.Array
) -> tuple[FitState, jax.Array]:
    """The curvature check of a converged L-BFGS fit (the diagonal Newton decrement): the
    state, restarted with the Jacobi preconditioner where the check fails and
    ``allow_restart``, and which fits restarted."""
    new, restart = _maybe_vmap(_single_check, static, 1, 1)(dyn, state, allow_restart)
    return _drop_weak_types(new), restart


@functools.partial(jax.jit, static_argnums=0)
def final_program(static: Static, dyn: list, state: FitState) -> dict:
    """The fit's results at its final parameters: constrained values, deterministic sites,
    loss and the Gaussian :math:`\\chi^2` of the observed sites."""
    return _maybe_vmap(_single_final, static, 1, 0)(dyn, state)


# --------------------------------------------------------------------------------------------
# The loops that drive the step programs
# --------------------------------------------------------------------------------------------
VERIFY_MAX_ELEMENTS = 64  # fit_map(verify=None) checks L-BFGS fits up to this many latents
MAX_RESTARTS = 2  # restarts after a failed curvature check; the next failure is final

_HOST_LAG = 1  # steps in flight before the host reads a "done" flag (keeps the device busy)


def host_loop(static, dyn, state, hyper, bar, task) -> FitState:
    """Dispatch one jitted step at a time; stop once every fit reports ``done``.

    Dispatch is asynchronous: the host reads the ``done`` flag of the step ``_HOST_LAG``
    steps back, which is (almost always) already computed, so the device never waits for
    Python. The few steps dispatched after convergence are no-ops on a finished state.
    """
    pending: collections.deque = collections.deque()
    for step in range(static.max_steps):
        state = step_program(static, dyn, state, hyper)
        pending.append(state.done)
        if len(pending) > _HOST_LAG:
            if np.all(np.asarray(pending.popleft())):
                break
            if bar is not None and task is not None and step % 10 == 0:
                bar.update(task, completed=step)
    return state


def device_loop(static, dyn, state, hyper, chunk_size, bar, task) -> FitState:
    """Run chunks of steps inside ``lax.while_loop``; the host checks between chunks."""
    max_steps = static.max_steps
    chunk = chunk_size or (20 if task is not None else max_steps)
    for start in range(0, max_steps, chunk):
        stop = min(start + chunk, max_steps)
        state = advance_program(static, dyn, state, jnp.asarray(stop, jnp.int32), hyper)
        if task is not None:
            bar.update(task, completed=stop)
        if stop >= max_steps or np.all(np.asarray(state.done)):
            break
    return state
