"""Atomic checkpoints of training state (any pytree of arrays) for ``--resume``.

A checkpoint is one ``.npz`` holding the leaves of the pytree in flattening order plus a JSON
record (epoch, history, config). Loading needs a *template* pytree with the same structure (the
freshly initialised state), so no pickled code is ever executed. Files are written to a temporary
name and renamed, so a killed run leaves either the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from madness_ppl.atomic import atomic_savez

__all__ = ["load_checkpoint", "pytree_digest", "save_checkpoint"]


def save_checkpoint(path: str | os.PathLike, state: Any, record: dict[str, Any]) -> None:
    """Write ``state`` (a pytree of arrays) and a JSON-serialisable ``record`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["record"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    atomic_savez(path, **arrays)


def pytree_digest(tree: Any) -> str:
    """SHA-256 of a pytree's leaves (shapes, dtypes and bytes, in flattening order).

    A stage that learns on top of frozen parameters (the flow on the encoder's latents, the
    deblender on the encoder's targets) stores this digest of them with its checkpoints, so a
    resumed run notices when the stage below it has changed (e.g. trained for more epochs).
    """
    sha = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        array = np.ascontiguousarray(jax.device_get(leaf))
        sha.update(f"{array.shape}{array.dtype}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def load_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint into the structure of ``template``; return ``(state, record)``."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    with np.load(path) as data:
        stored = sorted(k for k in data.files if k.startswith("leaf_"))
        if len(stored) != len(leaves):
            raise ValueError(
                f"checkpoint {path} holds {len(stored)} arrays but the model has {len(leaves)}: "
                "it was written by a different configuration"
            )
        new = []
        for key, leaf in zip(stored, leaves, strict=True):
            value = data[key]
            if value.shape != np.shape(leaf):
                raise ValueError(
                    f"checkpoint {path}: {key} has shape {value.shape}, expected {np.shape(leaf)}"
                )
            new.append(value.astype(np.asarray(leaf).dtype, copy=False))
        record = json.loads(bytes(data["record"]).decode())
    return jax.tree_util.tree_unflatten(treedef, new), record
