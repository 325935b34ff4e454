"""The shipped priors' recipe as one call: simulate a survey's four datasets, then train.

:func:`train_survey_prior` is ``madness-ppl train-survey``: the datasets of the PSF-aware LSST
prior v0.3 (isolated model-frame stamps and central-galaxy blends, :func:`recipe_datasets`) for
any survey :meth:`madness_ppl.survey.Survey.named` knows, and
:func:`~madness_ppl.train.pipeline.train_prior` on them with a
:class:`~madness_ppl.train.psfs.PSFDistribution`. Every step resumes: rerun the same call after
an interruption.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

from madness_ppl.simulate import BlendConfig, simulate_dataset
from madness_ppl.train.pipeline import TrainConfig, train_prior
from madness_ppl.train.psfs import PSFDistribution

__all__ = ["SHIPPED_SIZES", "RecipeData", "recipe_datasets", "train_survey_prior"]


class RecipeData(NamedTuple):
    """Sizes of the recipe's datasets (stamps or fields) and their shard sizes."""

    isolated_train: int = 56_000
    isolated_val: int = 3_000
    blends_train: int = 12_000
    blends_val: int = 1_000


#: The sizes of the shipped priors' datasets.
SHIPPED_SIZES = RecipeData()


def recipe_datasets(
    survey: str,
    data_dir: str | os.PathLike,
    *,
    sizes: RecipeData = SHIPPED_SIZES,
    stamp_size: int = 45,
    data_seed: int = 100,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Path, Path, Path]:
    """Simulate (or finish) the four datasets of the recipe under ``data_dir``.

    ``<survey>_iso_train``, ``<survey>_iso_val`` (isolated stamps) and ``<survey>_bl_train``,
    ``<survey>_bl_val`` (fields of one stamp's size with 1-3 galaxies, one at the centre, the
    others within 2"), all drawn at the model-frame PSF (``psf="reference"``) with seeds
    ``data_seed + 1`` ... ``data_seed + 4``. The LSST v0.3 prior's datasets are
    ``data_seed=100``, the HSC prior's ``200``. A finished dataset is kept, a partial one
    resumed.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    blends = BlendConfig(
        field_size=stamp_size,
        n_galaxies=(1, 3),
        max_shift=2.0,
        central_galaxy=True,
        stamp_size=stamp_size,
    )
    plan = [
        ("iso_train", "isolated", sizes.isolated_train, 2000, None),
        ("iso_val", "isolated", sizes.isolated_val, 1000, None),
        ("bl_train", "blends", sizes.blends_train, 1000, blends),
        ("bl_val", "blends", sizes.blends_val, 1000, blends),
    ]
    paths = []
    for k, (name, kind, n, shard_size, blend_config) in enumerate(plan):
        path = data_dir / f"{survey.lower()}_{name}"
        done = path / ".complete"
        if not done.exists():
            simulate_dataset(
                path,
                kind=kind,
                n=n,
                survey=survey,
                stamp_size=stamp_size,
                blend_config=blend_config,
                shard_size=shard_size,
                workers=workers,
                seed=data_seed + k + 1,
                resume=path.exists(),
                progress=progress,
                psf="reference",
            )
            done.touch()
        paths.append(path)
    return tuple(paths)  # type: ignore[return-value]


def train_survey_prior(
    survey: str,
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    sizes: RecipeData = SHIPPED_SIZES,
    vae_epochs: int = 10,
    data_seed: int = 100,
    seed: int = 0,
    workers: int = 1,
    version: str = "0.0.0",
    notes: tuple[str, ...] = (),
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Simulate the recipe's datasets for ``survey`` and train a PSF-aware prior on them.

    Parameters
    ----------
    survey
        A survey name (``"lsst"``, ``"hsc"``, ...).
    out
        Directory of the trained prior (its checkpoints go to ``<out>.work``; an interrupted
        run resumes from them).
    data_dir
        Where the datasets go (default ``<out>.data``).
    sizes, data_seed
        Dataset sizes and seeds (:func:`recipe_datasets`).
    vae_epochs
        VAE epochs (the flow and the deblending encoder keep
        :class:`~madness_ppl.train.pipeline.TrainConfig`'s 30 and 4).
    seed, version, notes, progress
        As in :func:`~madness_ppl.train.pipeline.train_prior`.

    Returns
    -------
    tuple
        The prior and its report, as :func:`~madness_ppl.train.pipeline.train_prior`.
    """
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out.with_name(out.name + ".data")
    datasets = recipe_datasets(
        survey, data_dir, sizes=sizes, data_seed=data_seed, workers=workers, progress=progress
    )
    base = TrainConfig()
    config = TrainConfig(
        vae=dataclasses.replace(base.vae, epochs=vae_epochs),
        seed=seed,
        psf=PSFDistribution(),
    )
    work = out.with_name(out.name + ".work")
    return train_prior(
        *datasets,
        out,
        config=config,
        resume=work.exists(),
        progress=progress,
        version=version,
        notes=notes,
    )
