"""A small, resumable epoch loop shared by the three training stages.

Each stage supplies a pure, jitted ``step(state, batch, key) -> (state, loss)`` and a
``validate(state) -> dict`` of metrics. The loop draws a seeded permutation per epoch, shows a
rich progress bar, records the mean training loss and the validation metrics per epoch, and writes
an atomic checkpoint after every epoch; with ``resume`` it restarts after the last finished epoch
with the identical random stream (keys and permutations derive from ``(seed, epoch)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from madness_ppl.progress import progress_bar
from madness_ppl.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["EpochLog", "batches", "run_epochs"]


class EpochLog(NamedTuple):
    """What one epoch of a stage did."""

    epoch: int
    train_loss: float
    metrics: dict[str, float]
    seconds: float
    samples_per_s: float


def batches(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    r"""Shuffle ``arrays`` (same first axis) and cut them into full minibatches (the last partial
    batch is dropped, so every step has one shape and compiles once).

    With ``weights`` (one non-negative number per sample) the epoch is instead ``n`` draws with
    replacement, sample *i* drawn with probability :math:`w_i / \sum_j w_j`.
    """
    n = len(next(iter(arrays.values())))
    if n < batch_size:
        raise ValueError(f"{n} training samples are fewer than one batch of {batch_size}")
    if weights is None:
        order = rng.permutation(n)
    else:
        order = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    return [
        {k: v[order[s : s + batch_size]] for k, v in arrays.items()}
        for s in range(0, n - batch_size + 1, batch_size)
    ]


def run_epochs(
    name: str,
    *,
    step: Callable[[Any, dict, jax.Array], tuple[Any, jax.Array]],
    state: Any,
    data: dict[str, np.ndarray],
    validate: Callable[[Any], dict[str, float]],
    epochs: int,
    batch_size: int,
    seed: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    weights: np.ndarray | None = None,
    fingerprint: str | None = None,
    upstream: str | None = None,
) -> tuple[Any, list[EpochLog]]:
    """Train ``state`` for ``epochs`` epochs over ``data``; return the final state and the log.

    ``weights`` (optional, one per sample) makes each epoch a weighted draw with replacement
    (see :func:`batches`).  ``fingerprint`` (e.g. the JSON of the settings) is stored with each
    checkpoint; resuming from a checkpoint with another fingerprint raises ``ValueError`` instead
    of silently continuing a different run whose arrays happen to have the same shapes.
    ``upstream`` (a digest of the frozen parameters the stage learns on, e.g. the encoder under
    the flow) is stored too: a checkpoint made on other upstream parameters is stale, so the
    stage starts afresh (and says so) rather than resuming it.
    """
    if weights is not None:
        weights = np.asarray(weights, dtype=float)
        n = len(next(iter(data.values())))
        if weights.shape != (n,) or not np.all(np.isfinite(weights) & (weights >= 0)):
            raise ValueError(f"weights must be {n} finite non-negative numbers")
        if weights.sum() <= 0:
            raise ValueError("weights must not all be zero")
    history: list[EpochLog] = []
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        resumed, record = load_checkpoint(checkpoint, state)
        stored = record.get("fingerprint")  # absent from checkpoints written before 0.2
        if stored is not None and stored != fingerprint:
            raise ValueError(
                f"checkpoint {checkpoint} was written with other settings "
                f"({stored}) than this run ({fingerprint}); "
                "remove it or run with the original settings"
            )
        if record.get("upstream") != upstream:
            print(
                f"{name}: checkpoint {checkpoint} was trained on other upstream parameters "
                "(an earlier stage changed since); training this stage afresh"
            )
        else:
            state = resumed
            history = [EpochLog(**h) for h in record["history"]]
            start_epoch = record["epoch"] + 1
    n_batches = len(next(iter(data.values()))) // batch_size
    with progress_bar(progress, "steps", "loss {task.fields[loss]:.4g}", remaining=True) as bar:
        for epoch in range(start_epoch, epochs):
            task = bar.add_task(f"{name} epoch {epoch + 1}/{epochs}", total=n_batches, loss=np.nan)
            rng = np.random.default_rng([seed, epoch])
            keys = jax.random.split(jax.random.key(seed * 100003 + epoch), n_batches)
            losses = []
            t0 = time.perf_counter()
            for k, batch in enumerate(batches(data, batch_size, rng, weights)):
                state, loss = step(state, batch, keys[k])
                losses.append(loss)
                if k % 20 == 0:
                    bar.update(task, completed=k + 1, loss=float(loss))
            mean_loss = float(np.mean(jax.device_get(losses)))
            seconds = time.perf_counter() - t0
            bar.update(task, completed=n_batches, loss=mean_loss)
            metrics = {k: float(v) for k, v in validate(state).items()}
            history.append(
                EpochLog(epoch, mean_loss, metrics, seconds, n_batches * batch_size / seconds)
            )
            bar.console.print(
                f"{name} epoch {epoch + 1}: train loss {mean_loss:.4g}, "
                + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + f", {history[-1].samples_per_s:.0f} samples/s"
            )
            if checkpoint is not None:
                record = {
                    "epoch": epoch,
                    "history": [h._asdict() for h in history],
                    "fingerprint": fingerprint,
                    "upstream": upstream,
                }
                save_checkpoint(checkpoint, state, record)
    return state, history
