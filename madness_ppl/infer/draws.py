"""From unconstrained NUTS draws to the groups of an :class:`arviz.InferenceData`.

:func:`postprocess` maps the draws back to constrained latents and recomputes the kept
deterministic sites in jitted batches; :func:`default_dims` names their axes from the
model's plates and from the dimension names the caller (or the model, through a
``site_dims`` attribute) declares.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import jax
import numpy as np

from madness_ppl.chunks import map_chunks
from madness_ppl.infer.target import Target

__all__ = ["DEFAULT_KEEP", "default_dims", "inference_data", "kept_sites", "postprocess"]

#: Deterministic sites kept in the posterior group by default (when the model has them).
DEFAULT_KEEP: tuple[str, ...] = ("flux",)


def kept_sites(keep: Sequence[str] | str, deterministic: Sequence[str]) -> list[str]:
    """The deterministic sites to store: ``keep``, checked against the model's sites.

    Names of :data:`DEFAULT_KEEP` that the model lacks are skipped; an explicit name it
    lacks raises :class:`ValueError`.
    """
    if isinstance(keep, str):
        if keep != "all":
            raise ValueError(f"keep must be a sequence of site names or 'all', got {keep!r}")
        return list(deterministic)
    keep = tuple(keep)
    if keep == DEFAULT_KEEP:
        return [name for name in keep if name in deterministic]
    missing = [name for name in keep if name not in deterministic]
    if missing:
        raise ValueError(
            f"keep names {missing}, which are not deterministic sites of the model "
            f"(it has {list(deterministic)})"
        )
    return list(keep)


def postprocess(
    target: Target, data: Any, positions: dict, names: Sequence[str], batch: int
) -> dict[str, np.ndarray]:
    """Constrained latents and kept deterministic sites, in jitted batches of draws.

    The last batch is padded so that one compiled program (per target, sites and shapes)
    serves all batches and later calls; the sites not in ``names`` are dead code in it.
    """
    names = tuple(names)
    leaves = jax.tree_util.tree_leaves(positions)
    if not leaves:
        return {}
    n_chains, n_draws = leaves[0].shape[:2]
    total = n_chains * n_draws
    flat = jax.tree.map(lambda x: x.reshape(total, *x.shape[2:]), positions)
    batch = max(1, min(int(batch), total))
    constrain = functools.partial(_constrained, target, names, data)
    out = map_chunks(constrain, flat, batch, pad=True)
    return {name: out[name].reshape(n_chains, n_draws, *out[name].shape[1:]) for name in names}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _constrained(target: Target, names: tuple[str, ...], data: Any, u: dict) -> dict:
    out = jax.vmap(lambda v: target.constrain(data, v))(u)
    return {name: out[name] for name in names}


def default_dims(
    model_trace: dict,
    posterior: Mapping[str, np.ndarray],
    observed: Mapping[str, np.ndarray],
    site_dims: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """ArviZ dimension names: plate names for the axes of sample sites, then ``site_dims``.

    A declared name list applies to a posterior site (axes after ``(chain, draw)``) or an
    observed site when its length matches the number of axes and every axis named after a
    plate of the model has that plate's size.
    """
    dims: dict[str, list[str]] = {}
    plate_sizes: dict[str, int] = {}
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        value = np.shape(site["value"])
        event = len(site["fn"].event_shape)
        names = [f"{name}_dim_{i}" for i in range(len(value))]
        for frame in site["cond_indep_stack"]:
            axis = len(value) - event + frame.dim
            if 0 <= axis < len(value) and value[axis] == frame.size:
                names[axis] = frame.name
                plate_sizes[frame.name] = frame.size
        if any(not n.startswith(f"{name}_dim_") for n in names):
            dims[name] = names
    for name, labels in (site_dims or {}).items():
        if name in posterior:
            shape = posterior[name].shape[2:]
        elif name in observed:
            shape = np.shape(observed[name])
        else:
            continue
        fits = all(
            label not in plate_sizes or size == plate_sizes[label]
            for label, size in zip(labels, shape, strict=False)
        )
        if len(shape) == len(labels) and fits:
            dims[name] = list(labels)
    return dims


def inference_data(
    model_trace: dict,
    posterior: dict[str, np.ndarray],
    stats: dict[str, np.ndarray],
    attrs: dict[str, Any],
    *,
    site_dims: Mapping[str, Sequence[str]] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> az.InferenceData:
    """The :class:`arviz.InferenceData` of a run: ``posterior`` (with ``attrs``),
    ``sample_stats`` and the model's observed sites as ``observed_data``.

    Axis names: :func:`default_dims` from the plates and ``site_dims``, then ``dims`` over
    them unconditionally.
    """
    observed = {
        name: np.asarray(site["value"])
        for name, site in model_trace.items()
        if site["type"] == "sample" and site["is_observed"]
    }
    names = default_dims(model_trace, posterior, observed, site_dims)
    names.update({k: list(v) for k, v in (dims or {}).items()})
    stats = {**stats, "tree_depth": np.asarray(stats["tree_depth"], np.int64)}
    return az.from_dict(
        posterior=posterior,
        sample_stats=stats,
        observed_data=observed,
        dims=names,
        coords=dict(coords or {}),
        posterior_attrs=attrs,
        sample_stats_attrs={"max_tree_depth": attrs["max_tree_depth"]},
    )
