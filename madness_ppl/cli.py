"""The ``madness-ppl`` command line: simulate data, train priors, deblend fields, run the demo.

``deblend-many`` runs :func:`madness_ppl.batch.deblend_many` (many fields or tiles, resumable).

Heavy libraries (JAX, galsim) are imported inside the commands so that ``--help`` is instant.
Errors in user input (:class:`madness_ppl.errors.MadnessInputError`, missing or existing files,
an output path that is a file, a full disk) are reported as one clear line and exit code 2,
without a traceback; any other exception is a bug and shows its traceback. Warnings about
suspicious input (:class:`~madness_ppl.errors.MadnessInputWarning`) print as one line each.
Ctrl-C exits with code 130 and leaves no half-written output.

Why one module of ~740 lines: one typer command per job, each a thin body over the library (the
signatures are most of the length); the Ctrl-C handling lives in :mod:`madness_ppl.interrupt`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from madness_ppl.interrupt import Interrupt

#: ``--shear-response`` of ``deblend`` and ``deblend-many``.
ShearResponseOption = Annotated[
    bool,
    typer.Option(
        help="add shapes e1, e2 and shear responses R11..R22 to the catalog "
        "(calibrated weak lensing; about doubles the time)"
    ),
]

#: ``--max-steps``, ``--threshold`` and ``--contrast`` of ``deblend`` and ``deblend-many``
#: (their defaults are :class:`~madness_ppl.options.DeblendOptions`'s).
MaxStepsOption = Annotated[int, typer.Option(help="maximum MAP optimisation steps")]
ThresholdOption = Annotated[float, typer.Option(help="detection threshold (coadd sigma)")]
ContrastOption = Annotated[
    float,
    typer.Option(help="detection: sep deblending contrast (0.001 splits faint neighbours)"),
]
FitSkyOption = Annotated[
    bool,
    typer.Option(
        help="fit a constant sky level per band with the galaxies (a background subtraction "
        "that left a residual level); the catalog header records it as SKY_<band>"
    ),
]


def _deblend_options(
    max_steps: int, threshold: float, contrast: float, fit_sky: bool, shear_response: bool
):
    """The :class:`~madness_ppl.options.DeblendOptions` of the deblending commands' flags."""
    from madness_ppl.options import DeblendOptions, Detection

    return DeblendOptions(
        detection=Detection(threshold=threshold, contrast=contrast),
        max_steps=max_steps,
        fit_sky=fit_sky,
        shear_response=shear_response,
    )


#: What Ctrl-C / SIGTERM do in this process (commands set its ``graceful`` and ``message``).
INTERRUPT = Interrupt()

app = typer.Typer(
    name="madness-ppl",
    help="Deblend multi-band survey images with a learned galaxy prior in NumPyro.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


FIELD_LAYOUTS = (
    "Field layouts (FITS, planes found by EXTNAME in any HDU order): an image cube (bands, H, W) "
    "with BANDS='g,r,i' (HDU IMAGE/SCI or any unnamed one), or one 2-D HDU per band (EXTNAME or "
    "BAND keyword), or one file per band; optional VARIANCE/VAR or WEIGHT/IVAR (inverse "
    "variance) planes and a MASK integer bit plane (bad bits: --bad-bits, default any nonzero "
    "bit), each a cube or one <PLANE>_<band> HDU per band; a PSF cube (EXTNAME PSF, BANDS in its "
    "header) or PSF_<band> planes (default: the survey PSF, with a warning). Masked pixels, zero weights and "
    "NaN/inf pixels do not enter the fit. With a celestial WCS the catalog gets ra, dec."
)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from madness_ppl.errors import MadnessInputWarning

    if issubclass(category, MadnessInputWarning):
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


@app.callback()
def _root(
    compile_cache: Annotated[
        bool,
        typer.Option(
            help="reuse compiled programs across runs (cache in $MADNESS_PPL_CACHE_DIR or "
            "~/.cache/madness_ppl/jax)"
        ),
    ] = True,
) -> None:
    """Deblend multi-band survey images with a learned galaxy prior in NumPyro."""
    warnings.showwarning = _show_warning
    if compile_cache:
        from madness_ppl.cache import use_compilation_cache

        use_compilation_cache()


class DatasetKind(enum.StrEnum):
    """What ``simulate`` produces."""

    isolated = "isolated"
    blends = "blends"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn user errors into one line + exit 2; let anything else (a bug) propagate."""
    from madness_ppl.errors import MadnessInputError

    try:
        yield
    except (
        MadnessInputError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
    ) as err:
        _fail(str(err))
    except OSError as err:
        if err.errno in _DISK_ERRNOS:
            name = f"{err.filename}: " if err.filename else ""
            _fail(f"{name}{os.strerror(err.errno)}")
        raise
    except KeyboardInterrupt:
        typer.secho("interrupted: no output was written", err=True)
        raise typer.Exit(code=130) from None


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
    if parts[0] < 0 or parts[1] < parts[0]:
        _fail(f"--n-galaxies must be a range 0 <= min <= max (e.g. 3:5), got {text!r}")
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
    overwrite: Annotated[
        bool, typer.Option(help="replace a dataset directory madness-ppl wrote (built beside it)")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="keep finished shards of an interrupted run")
    ] = False,
    plot: Annotated[
        bool, typer.Option(help="save an asinh g-r-i figure of the first item")
    ] = False,
    psf: Annotated[
        str,
        typer.Option(
            help="PSF the galaxies are drawn with: survey (its PSF per band) or reference "
            "(the 1.5 px Gaussian model frame of PSF-aware priors, for train --psf-aware)"
        ),
    ] = "survey",
) -> None:
    """Simulate a dataset of isolated galaxy stamps or blended fields (galsim, offline)."""
    import numpy as np

    from madness_ppl.errors import MadnessInputError
    from madness_ppl.simulate import BlendConfig, CatalogConfig, iter_shards, simulate_dataset

    INTERRUPT.graceful = workers > 1
    INTERRUPT.message = (
        "interrupted: finished shards are complete, no partial shard was left; "
        "rerun with --resume to continue"
    )
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
            psf=psf,
        )
    except (MadnessInputError, FileExistsError) as err:
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


def _echo_trained(out: Path, report: dict) -> None:
    """One line on a trained prior: where it is, its held-out r flux error and chi2."""
    rec = report["reconstruction"]
    typer.echo(
        f"saved prior to {out}; r-band flux error {rec['r_aperture_flux_rel_error']}, "
        f"chi2/pixel {rec['chi2_per_pixel']:.3f}; report in {out}.work/report.json"
    )


@app.command()
def train(
    isolated_train: Annotated[Path, typer.Argument(help="isolated-stamp training dataset")],
    isolated_val: Annotated[Path, typer.Argument(help="isolated-stamp held-out dataset")],
    blends_train: Annotated[Path, typer.Argument(help="central-galaxy blends, training")],
    blends_val: Annotated[Path, typer.Argument(help="central-galaxy blends, held-out")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory of the trained prior")],
    preset: Annotated[
        str, typer.Option(help="networks: lean (default), reference (MADNESS sizes) or v0.1.0")
    ] = "lean",
    latent_dim: Annotated[int, typer.Option(help="latent dimension")] = 16,
    vae_epochs: Annotated[int, typer.Option(help="stage 1 epochs")] = 10,
    flow_epochs: Annotated[int, typer.Option(help="stage 2 epochs")] = 30,
    deblender_epochs: Annotated[int, typer.Option(help="stage 3 epochs")] = 4,
    beta: Annotated[float, typer.Option(help="KL weight of the VAE loss")] = 0.1,
    vae_lr: Annotated[float, typer.Option(help="peak learning rate of the VAE stage")] = 1e-3,
    snr_cap: Annotated[
        float | None, typer.Option(help="VAE per-galaxy loss weights 1/(1+SNR^2/cap^2); 0: off")
    ] = None,
    augment: Annotated[
        bool, typer.Option(help="VAE: random square symmetry + fresh noise per minibatch")
    ] = True,
    flux_weight_power: Annotated[
        float | None, typer.Option(help="VAE: draw stamps with probability ~ flux^power")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="minibatch size of stages 1 and 3")] = 64,
    max_train: Annotated[int | None, typer.Option(help="cap on training samples")] = None,
    seed: Annotated[int, typer.Option(help="master random seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue from <out>.work checkpoints")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing prior at --out")] = False,
    version: Annotated[str, typer.Option(help="version string stored with the weights")] = "0.0.0",
    note: Annotated[
        list[str] | None, typer.Option(help="a line for the model card's notes (repeatable)")
    ] = None,
    psf_aware: Annotated[
        bool,
        typer.Option(
            help="PSF-aware prior (v0.3): datasets simulated with --psf reference, every stamp "
            "observed through a random PSF (Kolmogorov/Moffat, FWHM 0.35-1.7 arcsec)"
        ),
    ] = False,
    psf_bank_size: Annotated[
        int, typer.Option(help="--psf-aware: number of random PSFs in the kernel bank")
    ] = 1024,
) -> None:
    """Train a galaxy prior (VAE, flow, deblending encoder) on simulated datasets."""
    import dataclasses as dc

    from madness_ppl.train import TrainConfig, train_prior
    from madness_ppl.train.psfs import PSFDistribution

    if preset not in ("lean", "reference", "v0.1.0"):
        _fail(f"--preset must be lean, reference or v0.1.0, got {preset!r}")
    base = TrainConfig()
    cap = base.vae.snr_cap if snr_cap is None else (snr_cap or None)
    config = TrainConfig(
        preset=preset,
        latent_dim=latent_dim,
        vae=dc.replace(
            base.vae,
            epochs=vae_epochs,
            beta=beta,
            batch_size=batch_size,
            learning_rate=vae_lr,
            snr_cap=cap,
            augment=augment,
            flux_weight_power=(
                base.vae.flux_weight_power if flux_weight_power is None else flux_weight_power
            ),
        ),
        flow=dc.replace(base.flow, epochs=flow_epochs),
        deblender=dc.replace(base.deblender, epochs=deblender_epochs, batch_size=batch_size),
        seed=seed,
        max_train=max_train,
        psf=PSFDistribution() if psf_aware else None,
        psf_bank_size=psf_bank_size,
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
            version=version,
            notes=tuple(note or ()),
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        _fail(str(err))
    _echo_trained(out, report)


@app.command("train-survey")
def train_survey(
    survey: Annotated[str, typer.Argument(help="survey name: lsst, hsc, euclid_vis, ...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory of the trained prior")],
    data: Annotated[
        Path | None, typer.Option(help="where the simulated datasets go (default <out>.data)")
    ] = None,
    n_isolated: Annotated[int, typer.Option(help="isolated training stamps")] = 56_000,
    n_blends: Annotated[int, typer.Option(help="central-galaxy training blends")] = 12_000,
    vae_epochs: Annotated[int, typer.Option(help="VAE epochs")] = 10,
    data_seed: Annotated[
        int, typer.Option(help="datasets use seeds data_seed+1..+4 (LSST v0.3: 100, HSC: 200)")
    ] = 100,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    workers: Annotated[int, typer.Option(help="simulation worker processes")] = 1,
    version: Annotated[str, typer.Option(help="version string stored with the weights")] = "0.0.0",
) -> None:
    """Simulate a survey's training sets and train a PSF-aware prior on them: one command.

    The recipe of the shipped priors (isolated model-frame stamps, central-galaxy blends,
    every stamp observed through random PSFs in training). Rerun the same command after an
    interruption: finished datasets are kept and training resumes from <out>.work.
    """
    from madness_ppl.train.recipe import RecipeData, train_survey_prior

    sizes = RecipeData(
        isolated_train=n_isolated,
        isolated_val=min(3_000, max(n_isolated // 10, 64)),
        blends_train=n_blends,
        blends_val=min(1_000, max(n_blends // 10, 64)),
    )
    with _user_errors():
        _, report = train_survey_prior(
            survey,
            out,
            data_dir=data,
            sizes=sizes,
            vae_epochs=vae_epochs,
            data_seed=data_seed,
            seed=seed,
            workers=workers,
            version=version,
        )
    _echo_trained(out, report)


def _load_prior(prior: str):
    from madness_ppl.prior import GalaxyPrior

    with _user_errors():
        return GalaxyPrior.load(prior)


def _point_sources_option(option: str | None, positions: Path | None) -> list[int] | None:
    """Row indices of ``--point-sources``, or the positions table's ``point_source`` column."""
    import numpy as np

    from madness_ppl.errors import MadnessInputError

    if option is not None:
        if positions is None:
            raise MadnessInputError("--point-sources needs --positions (rows of that table)")
        try:
            return [int(v) for v in option.split(",") if v.strip()]
        except ValueError:
            raise MadnessInputError(
                f"--point-sources takes row numbers like 0,3; got {option!r}", option
            ) from None
    if positions is None:
        return None
    from madness_ppl.positions import read_point_flags

    flags = read_point_flags(positions)
    return None if flags is None else np.flatnonzero(flags).tolist()


@app.command(epilog=FIELD_LAYOUTS)
def deblend(
    field: Annotated[
        list[Path],
        typer.Argument(
            help="FITS field (image, variance/weight, mask planes), or one file per band"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    positions: Annotated[
        Path | None,
        typer.Option(
            help="table (FITS/ECSV/CSV) with x, y pixel or ra, dec (WCS) columns; a boolean "
            "point_source column marks stars"
        ),
    ] = None,
    prior: Annotated[str, typer.Option(help="shipped prior name or directory")] = "lsst",
    max_steps: MaxStepsOption = 200,
    threshold: ThresholdOption = 3.0,
    contrast: ContrastOption = 0.005,
    bad_bits: Annotated[
        str | None,
        typer.Option(
            help="MASK bits that mark bad pixels: an integer mask (0x5) or plane names from the "
            "MP_* header keywords (BAD,SAT,CR); default BAD,SAT,NO_DATA,EDGE,SUSPECT when the "
            "header names planes, else any nonzero bit"
        ),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="refuse larger fields (pixels per band); use deblend-many for them")
    ] = 2048 * 2048,
    overwrite: Annotated[
        bool, typer.Option(help="replace an output directory madness-ppl wrote")
    ] = False,
    psf: Annotated[
        Path | None,
        typer.Option(
            help="FITS file of the field's PSF per band: a PSF cube with BANDS in its header "
            "(or PSF_<band> planes); default the field file's PSF HDU, else the survey's "
            "default PSF (with a warning)"
        ),
    ] = None,
    zeropoint: Annotated[
        float | None,
        typer.Option(
            help="AB magnitude of a pixel value of 1 (default: the header's FLUXMAG0/MAGZERO, "
            "or BUNIT nJy; electrons when it says none)"
        ),
    ] = None,
    flux_scale: Annotated[
        str | None,
        typer.Option(help="electrons per pixel unit: one number or one per band (3.4e3,3.5e3,...)"),
    ] = None,
    fit_sky: FitSkyOption = False,
    shear_response: ShearResponseOption = False,
    point_sources: Annotated[
        str | None,
        typer.Option(
            help="rows of --positions to fit as stars, the PSF times free fluxes (0-based: "
            "0,3); default: the table's boolean point_source column when it has one, else none"
        ),
    ] = None,
) -> None:
    """Deblend a multi-band FITS field; write per-source models, residual, catalog and figure.

    Pixels in other units than electrons (an HSC coadd on zero point 27, a Rubin image in nJy)
    are converted to the prior's electrons with the header's zero point or --zeropoint /
    --flux-scale; the catalog's fluxes are electrons and its header says so (FLUXUNIT,
    ESCALE_<band>), magnitudes are AB.
    """
    from madness_ppl.errors import MadnessInputError

    with _user_errors():
        if out.exists() and not out.is_dir():
            raise MadnessInputError(f"--out {out} is a file; give a directory", str(out))
        if out.exists() and not overwrite:
            raise FileExistsError(f"output directory {out} exists; pass --overwrite to replace it")
        from madness_ppl.atomic import check_output_dir
        from madness_ppl.io import PRODUCT_FILES

        inputs = [*field, *([positions] if positions else []), *([psf] if psf else [])]
        check_output_dir(out, overwrite=overwrite, known=PRODUCT_FILES, inputs=inputs)
        galaxy_prior = _load_prior(prior)

        import numpy as np

        from madness_ppl.deblend import deblend as run_deblend
        from madness_ppl.deblend import field_for_prior
        from madness_ppl.io import read_field, read_positions, write_products
        from madness_ppl.prepare import psf_for_prior

        data = read_field(field[0] if len(field) == 1 else field, bad_bits=bad_bits)
        height, width = data.image.shape[-2:]
        if height * width > max_pixels:
            raise MadnessInputError(
                f"{field[0]} is {width}x{height} pixels per band, more than --max-pixels "
                f"{max_pixels}; deblend it in patches with `madness-ppl deblend-many` (bounded "
                "memory, resumable) or raise --max-pixels",
                (height, width),
            )
        from madness_ppl.units import electrons_per_unit

        scale = electrons_per_unit(
            galaxy_prior,
            data.header,
            zeropoint=zeropoint,
            flux_scale=[float(v) for v in flux_scale.split(",")] if flux_scale else None,
        )
        image, variance = field_for_prior(data, galaxy_prior, scale, source=str(field[0]))
        psf_images = psf_for_prior(data, galaxy_prior, psf)
        pos = read_positions(positions, (height, width), wcs=data.wcs) if positions else None
        if pos is not None and not len(pos):
            pos = np.zeros((0, 2))
        stars = _point_sources_option(point_sources, positions)
        result = run_deblend(
            image,
            variance,
            pos,
            prior=galaxy_prior,
            source=str(field[0]) if len(field) == 1 else ", ".join(map(str, field)),
            psf=psf_images,
            options=_deblend_options(max_steps, threshold, contrast, fit_sky, shear_response),
            point_sources=stars,
        )
        write_products(
            out, result, overwrite=overwrite, inputs=inputs, wcs=data.wcs, flux_scale=scale
        )
    typer.echo(f"deblended {len(result.positions)} sources; wrote {out}")


@app.command("deblend-many", epilog=FIELD_LAYOUTS)
def deblend_many(
    inputs: Annotated[list[Path], typer.Argument(help="FITS fields or tiles (any size)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (resumed if rerun)")],
    positions: Annotated[
        list[Path] | None,
        typer.Option(
            help="positions table per input, in input order (repeat the option); a boolean "
            "point_source column marks stars (fitted as the PSF times free fluxes)"
        ),
    ] = None,
    prior: Annotated[str, typer.Option(help="shipped prior name or directory")] = "lsst",
    workers: Annotated[int, typer.Option(help="1: this process; N: a dask LocalCluster")] = 1,
    scheduler: Annotated[
        str | None, typer.Option(help="address of a running dask scheduler (overrides --workers)")
    ] = None,
    patch_size: Annotated[int, typer.Option(help="patch side in pixels")] = 128,
    batch_size: Annotated[
        int, typer.Option(help="patches per vmapped fit (small on CPU, larger on GPU)")
    ] = 2,
    max_steps: MaxStepsOption = 200,
    threshold: ThresholdOption = 3.0,
    contrast: ContrastOption = 0.005,
    bad_bits: Annotated[
        str | None,
        typer.Option(help="MASK bits that mark bad pixels (see deblend --help)"),
    ] = None,
    zeropoint: Annotated[
        float | None,
        typer.Option(help="AB magnitude of a pixel value of 1 (default: each file's header)"),
    ] = None,
    fit_sky: FitSkyOption = False,
    shear_response: ShearResponseOption = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Deblend many fields or large tiles in patches and batches into one catalog; resumable.

    Rerun the same command after an interruption: finished batches are skipped and failed ones
    retried. Writes catalog.fits / catalog.ecsv, manifest.json and batches/ under --out.
    """
    from madness_ppl.batch import BatchConfig
    from madness_ppl.batch import deblend_many as run_many

    INTERRUPT.graceful = workers > 1 or scheduler is not None
    INTERRUPT.message = "interrupted: finished batches are kept; rerun the command to resume"

    with _user_errors():
        config = BatchConfig(
            prior=prior,
            patch_size=patch_size,
            batch_size=batch_size,
            bad_bits=bad_bits,
            zeropoint=zeropoint,
            options=_deblend_options(max_steps, threshold, contrast, fit_sky, shear_response),
        )
        report = run_many(
            inputs,
            out,
            config=config,
            positions=positions or None,
            workers=workers,
            scheduler=scheduler,
            progress=progress,
        )
    m = report.manifest
    run = m["this_run"]
    typer.echo(
        f"{m['n_sources']} sources in {len(m['finished'])}/{m['n_batches']} batches "
        f"({len(m['failed'])} failed); this run: {run['galaxies']} galaxies in "
        f"{run['wall_s']:.1f} s ({run['galaxies_per_s']:.2f} galaxies/s); wrote {out}"
    )
    if m["failed"]:
        for f in m["failed"]:
            typer.secho(f"batch {f['id']} failed: {f['error']}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="output directory (a previous demo output there is replaced)"
        ),
    ] = Path("madness-demo"),
    seed: Annotated[int, typer.Option(help="random seed of the simulated field")] = 0,
    n_galaxies: Annotated[str, typer.Option(help="galaxy count range")] = "12:20",
    field_size: Annotated[int, typer.Option(help="field side in pixels (0.2 arcsec)")] = 205,
    prior: Annotated[str, typer.Option(help="shipped prior name or directory")] = "lsst",
) -> None:
    """Simulate an LSST-depth blended field, deblend it with the shipped prior, compare to truth."""
    import time

    import numpy as np
    from rich.console import Console
    from rich.table import Table as RichTable

    from madness_ppl import measure
    from madness_ppl.atomic import check_output_dir
    from madness_ppl.deblend import deblend as run_deblend
    from madness_ppl.io import PRODUCT_FILES, write_products
    from madness_ppl.simulate import BlendConfig, make_blend
    from madness_ppl.survey import Survey

    start = time.perf_counter()
    with _user_errors():
        check_output_dir(out, overwrite=True, known=PRODUCT_FILES)  # only our own output
        galaxy_prior = _load_prior(prior)
        survey = Survey.named(galaxy_prior.config.survey).select_bands(galaxy_prior.bands)
        config = BlendConfig(field_size=field_size, n_galaxies=_parse_range(n_galaxies), margin=5)
        blend = make_blend(survey, rng=np.random.default_rng(seed), config=config)
        result = run_deblend(blend.field, prior=galaxy_prior)
        elapsed = time.perf_counter() - start
        write_products(out, result, overwrite=True)

    r = galaxy_prior.bands.index("r") if "r" in galaxy_prior.bands else len(galaxy_prior.bands) // 2
    band = galaxy_prior.bands[r]
    scores = measure.compare_to_truth(blend, result, band)
    table = RichTable(
        title=f"{band}-band fluxes (electrons): truth vs madness_ppl (model; data re-distributed "
        "by the models) vs blend aperture"
    )
    columns = ("id", "x", "y", f"true {band}", "model ± sd", "error", "re-distributed", "error")
    for name in (*columns, 'aperture r=1"', "error"):
        table.add_column(name, justify="right")
    for row in scores:
        truth = row["true_flux"]
        table.add_row(
            str(row["id"]),
            f"{row['x']:.1f}",
            f"{row['y']:.1f}",
            f"{truth:.0f}",
            f"{row['flux']:.0f} ± {row['flux_err']:.0f}",
            f"{row['flux'] / truth - 1:+.1%}",
            f"{row['flux_redist']:.0f}",
            f"{row['flux_redist'] / truth - 1:+.1%}",
            f"{row['aperture']:.0f}",
            f"{row['aperture'] / row['true_aperture'] - 1:+.1%}",
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to fit, keep rows whole
        console = Console(width=140)
    console.print(table)
    err = np.abs(scores["flux"] / scores["true_flux"] - 1)
    err_redistributed = np.abs(scores["flux_redist"] / scores["true_flux"] - 1)
    console.print(
        f"{len(blend.positions)} galaxies simulated, {len(result.positions)} detected, "
        f"{len(scores)} matched; median |flux error| {np.median(err):.1%} (model), "
        f"{np.median(err_redistributed):.1%} (re-distributed); "
        f"reduced chi2 {float(result.fit.reduced_chi2) if result.fit is not None else float('nan'):.3f}; "
        f"{elapsed:.1f} s including compilation; figure {out / 'deblend.png'}"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``madness-ppl`` and ``python -m madness_ppl``.

    Ctrl-C removes the temporary outputs being written and ends the process with code 130
    (see :class:`~madness_ppl.interrupt.Interrupt`); commands with worker processes first get a ``KeyboardInterrupt``
    to shut them down. SIGTERM (what batch schedulers send) is handled the same way and
    ends with code 143.
    """
    INTERRUPT.install()
    code: int | str | None = 0
    try:
        app(args=argv, prog_name="madness-ppl")
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:
        code = 130
    if INTERRUPT.interrupted:
        code = INTERRUPT.exit_code
    INTERRUPT.uninstall()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    if INTERRUPT.interrupted or code == 130:
        os._exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.exit(code or 0)
