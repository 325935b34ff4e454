"""The ``madness-ppl`` command line: simulate data, train priors, deblend fields, run the demo.

Heavy libraries (JAX, galsim) are imported inside the commands so that ``--help`` is instant.
Errors in user input are reported as one clear line and exit code 2, without a traceback.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="madness-ppl",
    help="Deblend multi-band survey images with a learned galaxy prior in NumPyro.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Deblend multi-band survey images with a learned galaxy prior in NumPyro."""


class DatasetKind(enum.StrEnum):
    """What ``simulate`` produces."""

    isolated = "isolated"
    blends = "blends"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _parse_range(text: str) -> tuple[int, int]:
    """``"12:20"`` -> (12, 20); ``"5"`` -> (5, 5)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        _fail(f"--n-galaxies must look like 5 or 12:20, got {text!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        _fail(f"--n-galaxies must look like 5 or 12:20, got {text!r}")
    return parts[0], parts[1]


@app.command()
def simulate(
    kind: Annotated[DatasetKind, typer.Argument(help="isolated stamps or blended fields")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (new or empty)")],
    n: Annotated[int, typer.Option("--n", "-n", help="number of stamps / fields")] = 1000,
    survey: Annotated[str, typer.Option(help="survey name: lsst, hsc, euclid_vis, ...")] = "lsst",
    bands: Annotated[str | None, typer.Option(help="comma-separated subset of bands")] = None,
    stamp_size: Annotated[int, typer.Option(help="odd stamp side in pixels")] = 45,
    field_size: Annotated[int, typer.Option(help="blends: field side in pixels")] = 205,
    n_galaxies: Annotated[str, typer.Option(help="blends: count range, e.g. 12:20")] = "12:20",
    density: Annotated[
        float | None, typer.Option(help="blends: galaxies per arcmin^2 (overrides --n-galaxies)")
    ] = None,
    max_shift: Annotated[
        float | None, typer.Option(help="blends: max offset from the centre in arcsec")
    ] = None,
    min_separation: Annotated[float, typer.Option(help="blends: min separation, arcsec")] = 0.0,
    central_galaxy: Annotated[
        bool, typer.Option(help="blends: put galaxy 0 at the field centre")
    ] = False,
    mag_faint: Annotated[float, typer.Option(help="faintest i-band magnitude")] = 25.3,
    shard_size: Annotated[int, typer.Option(help="items per shard file")] = 1000,
    workers: Annotated[int, typer.Option(help="worker processes")] = 1,
    seed: Annotated[int, typer.Option(help="master random seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    resume: Annotated[
        bool, typer.Option(help="keep finished shards of an interrupted run")
    ] = False,
    plot: Annotated[
        bool, typer.Option(help="save an asinh g-r-i figure of the first item")
    ] = False,
) -> None:
    """Simulate a dataset of isolated galaxy stamps or blended fields (galsim, offline)."""
    import numpy as np

    from madness_ppl.simulate import BlendConfig, CatalogConfig, iter_shards, simulate_dataset

    band_tuple = tuple(b.strip() for b in bands.split(",")) if bands else None
    try:
        catalog_config = CatalogConfig(mag_faint=mag_faint)
        blend_config = BlendConfig(
            field_size=field_size,
            n_galaxies=_parse_range(n_galaxies),
            density=density,
            max_shift=max_shift,
            min_separation=min_separation,
            central_galaxy=central_galaxy,
            stamp_size=stamp_size,
        )
        shards = simulate_dataset(
            out,
            kind=kind.value,
            n=n,
            survey=survey,
            bands=band_tuple,
            stamp_size=stamp_size,
            blend_config=blend_config,
            catalog_config=catalog_config,
            shard_size=shard_size,
            workers=workers,
            seed=seed,
            overwrite=overwrite,
            resume=resume,
        )
    except (ValueError, FileExistsError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        typer.secho(
            "interrupted: finished shards are complete, no partial shard was left; "
            "rerun with --resume to continue",
            err=True,
        )
        raise typer.Exit(code=130) from None
    typer.echo(f"wrote {len(shards)} shard(s) to {out}")
    if plot:
        from madness_ppl.plot import plot_panels
        from madness_ppl.simulate import read_config

        config = read_config(out)
        first = next(iter_shards(out))
        if kind is DatasetKind.blends:
            k = int(first["n_sources"][0])
            images = {"blend (noisy)": first["field"][0], "noiseless": first["noiseless"][0]}
            positions = first["positions"][0, :k]
        else:
            images = {"noisy": first["noisy"][0], "noiseless": first["noiseless"][0]}
            positions = None
        from madness_ppl.survey import Survey

        sky_sigma = Survey.named(survey).select_bands(config["bands"]).sky_sigma
        figure = out / "preview.png"
        plot_panels(
            images,
            config["bands"],
            noise=np.asarray(sky_sigma),
            positions=positions,
            path=str(figure),
            title=f"{config['survey']} {kind.value}: item 0",
        )
        typer.echo(f"figure: {figure}")


@app.command()
def train(
    isolated_train: Annotated[Path, typer.Argument(help="isolated-stamp training dataset")],
    isolated_val: Annotated[Path, typer.Argument(help="isolated-stamp held-out dataset")],
    blends_train: Annotated[Path, typer.Argument(help="central-galaxy blends, training")],
    blends_val: Annotated[Path, typer.Argument(help="central-galaxy blends, held-out")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory of the trained prior")],
    preset: Annotated[str, typer.Option(help="network sizes: lean or reference")] = "lean",
    latent_dim: Annotated[int, typer.Option(help="latent dimension")] = 16,
    vae_epochs: Annotated[int, typer.Option(help="stage 1 epochs")] = 10,
    flow_epochs: Annotated[int, typer.Option(help="stage 2 epochs")] = 30,
    deblender_epochs: Annotated[int, typer.Option(help="stage 3 epochs")] = 4,
    beta: Annotated[float, typer.Option(help="KL weight of the VAE loss")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="minibatch size of stages 1 and 3")] = 64,
    max_train: Annotated[int | None, typer.Option(help="cap on training samples")] = None,
    seed: Annotated[int, typer.Option(help="master random seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue from <out>.work checkpoints")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing prior at --out")] = False,
) -> None:
    """Train a galaxy prior (VAE, flow, deblending encoder) on simulated datasets."""
    import dataclasses as dc

    from madness_ppl.train import TrainConfig, train_prior

    if preset not in ("lean", "reference"):
        _fail(f"--preset must be lean or reference, got {preset!r}")
    base = TrainConfig()
    config = TrainConfig(
        preset=preset,
        latent_dim=latent_dim,
        vae=dc.replace(base.vae, epochs=vae_epochs, beta=beta, batch_size=batch_size),
        flow=dc.replace(base.flow, epochs=flow_epochs),
        deblender=dc.replace(base.deblender, epochs=deblender_epochs, batch_size=batch_size),
        seed=seed,
        max_train=max_train,
    )
    try:
        _, report = train_prior(
            isolated_train,
            isolated_val,
            blends_train,
            blends_val,
            out,
            config=config,
            resume=resume,
            overwrite=overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        _fail(str(err))
    rec = report["reconstruction"]
    typer.echo(
        f"saved prior to {out}; r-band flux error {rec['r_aperture_flux_rel_error']}, "
        f"chi2/pixel {rec['chi2_per_pixel']:.3f}; report in {out}.work/report.json"
    )


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m madness_ppl``."""
    app()
