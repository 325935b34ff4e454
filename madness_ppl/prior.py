r"""The learned galaxy prior: VAE decoder + normalizing flow + encoders, and its NumPyro face.

A :class:`GalaxyPrior` bundles everything a scene model needs to know about galaxies:

* a decoder :math:`f: \mathbb{R}^d \to \mathbb{R}_+^{B \times S \times S}` mapping a latent
  vector to a noiseless stamp in electrons (:meth:`GalaxyPrior.decode`);
* a flow density :math:`p(z)` over the latent space (:meth:`GalaxyPrior.log_prob`,
  :meth:`GalaxyPrior.latent_distribution`);
* the VAE encoder and the deblending encoder used to initialise a fit.

It is a JAX pytree (parameters are leaves, the :class:`PriorConfig` is static), so it can be passed
as an argument to jitted functions.  :class:`FlowPrior` wraps the flow as a
``numpyro.distributions.Distribution`` for use in ``numpyro.sample`` statements.

Weights are stored as a directory holding ``weights.safetensors`` (flattened parameter tree,
``/``-joined keys) and ``config.json``; priors shipped with the package live in
``madness_ppl/weights/<name>/`` and load by name:

>>> import jax
>>> prior = GalaxyPrior.init(jax.random.key(0), PriorConfig(bands=("g", "r"), stamp_size=15))
>>> prior.decode(jax.numpy.zeros((3, prior.latent_dim))).shape
(3, 2, 15, 15)

Why one module of ~680 lines: :class:`GalaxyPrior` (about half of it) is one object with its
saving and loading; the configuration and the flow distribution are what it is made of.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import safetensors.numpy
from jax.typing import ArrayLike
from numpyro.distributions import constraints

from madness_ppl.atomic import swap_into_place
from madness_ppl.errors import OutputDirectoryError, PriorFileError
from madness_ppl.galaxy_model import zero_bands
from madness_ppl.nn import flow as _flow
from madness_ppl.nn import vae as _vae
from madness_ppl.nn.flow import FlowConfig, standard_normal_log_prob
from madness_ppl.nn.vae import EncoderOutput, NetworkConfig

__all__ = [
    "FORMAT_VERSION",
    "FlowConfig",
    "FlowPrior",
    "GalaxyPrior",
    "NetworkConfig",
    "PriorConfig",
    "available_priors",
    "standard_normal_log_prob",
]

#: Version of the on-disk format written by :meth:`GalaxyPrior.save`.
FORMAT_VERSION = 1

Params = Any
_WEIGHTS_FILE = "weights.safetensors"
_CONFIG_FILE = "config.json"
_COMPONENTS = ("decoder", "flow", "encoder", "deblender")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Static description of a galaxy prior (hashable; ``metadata`` is not hashed or compared).

    Parameters
    ----------
    survey
        Name of the survey the prior was trained for.
    bands
        Band names, in the channel order of the stamps.
    stamp_size
        Side ``S`` of the (odd, square) stamps.
    normalisation
        Electrons per network unit, one value per band (a single number applies to every band).
        Band *b* of a stamp is divided by ``normalisation[b]`` before the networks see it;
        per-band values (e.g. the typical peak pixel of each band) keep every output channel
        at unit scale, so a faint band (LSST *u*) is not learned as zero.
    network
        VAE architecture; defaults to ``NetworkConfig.lean`` with matching bands and stamp size.
    flow
        Flow architecture; defaults to ``FlowConfig(latent_dim=network.latent_dim)``.
    version
        Version string of the weights.
    reference_fwhm_pixels
        The model frame (:mod:`madness_ppl.psf`): the decoder draws galaxies convolved with a
        circular Gaussian of this FWHM in pixels in every band, and a scene convolves them with
        the difference kernel to the observed PSF. ``None`` (priors up to v0.2): the decoder
        draws galaxies at the survey's default PSF of each band (``Survey.psf``), which is then
        the reference.
    metadata
        Free-form JSON-serialisable information (training data, metrics, ...).
    """

    survey: str = "lsst"
    bands: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")
    stamp_size: int = 45
    normalisation: float | tuple[float, ...] = 1e4
    network: NetworkConfig | None = None
    flow: FlowConfig | None = None
    version: str = "0.0.0"
    reference_fwhm_pixels: float | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        bands = tuple(str(b) for b in self.bands)
        object.__setattr__(self, "bands", bands)
        norm = np.asarray(self.normalisation, dtype=float)
        if norm.ndim > 1 or (norm.ndim == 1 and len(norm) != len(bands)):
            raise ValueError(
                f"normalisation needs one value per band ({len(bands)}), got {self.normalisation}"
            )
        norm = np.broadcast_to(norm, (len(bands),))
        if not np.all(np.isfinite(norm) & (norm > 0)):
            raise ValueError(f"normalisation must be positive and finite, got {self.normalisation}")
        object.__setattr__(self, "normalisation", tuple(float(v) for v in norm))
        object.__setattr__(self, "metadata", dict(self.metadata))
        network = self.network
        if network is None:
            network = NetworkConfig.lean(bands=len(bands), stamp_size=self.stamp_size)
            object.__setattr__(self, "network", network)
        if self.flow is None:
            object.__setattr__(self, "flow", FlowConfig(latent_dim=network.latent_dim))
        if network.bands != len(bands) or network.stamp_size != self.stamp_size:
            raise ValueError(
                f"network expects {network.bands} bands of {network.stamp_size} pixels but the "
                f"prior has {len(bands)} bands {bands} of {self.stamp_size} pixels"
            )
        if self.flow.latent_dim != network.latent_dim:
            raise ValueError(
                f"flow latent_dim {self.flow.latent_dim} != network latent_dim {network.latent_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation."""
        return {
            "survey": self.survey,
            "bands": list(self.bands),
            "stamp_size": self.stamp_size,
            "normalisation": list(self.normalisation),
            "network": self.network.to_dict(),
            "flow": self.flow.to_dict(),
            "version": self.version,
            "reference_fwhm_pixels": self.reference_fwhm_pixels,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriorConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["network"] = NetworkConfig.from_dict(data["network"])
        data["flow"] = FlowConfig.from_dict(data["flow"])
        return cls(**data)


# ----------------------------------------------------------------------------- distribution


class FlowPrior(dist.Distribution):
    r"""The flow density over galaxy latent vectors as a NumPyro distribution.

    :math:`z = T(u)`, :math:`u \sim N(0, I_d)`, with exact density
    :math:`\log p(z) = \log N(T^{-1}(z)) + \log|\det \partial T^{-1}/\partial z|`.
    The event shape is ``(d,)``; every batch element shares the same flow parameters.

    Parameters
    ----------
    params
        Flow parameters (a pytree of arrays; a pytree data field of the distribution).
    config
        The flow configuration.
    batch_shape
        Batch shape; usually left empty and set by ``numpyro.plate`` via :meth:`expand`.
    validate_args
        Passed to :class:`numpyro.distributions.Distribution`.

    Examples
    --------
    >>> import jax, numpyro
    >>> cfg = FlowConfig(latent_dim=4, n_layers=2, hidden=(8,))
    >>> prior = FlowPrior(_flow.init_flow(jax.random.key(0), cfg), cfg)
    >>> def model():
    ...     with numpyro.plate("sources", 3):
    ...         return numpyro.sample("z", prior)
    >>> numpyro.handlers.seed(model, 0)().shape
    (3, 4)
    """

    support = constraints.real_vector
    pytree_data_fields = ("params",)
    pytree_aux_fields = ("config",)

    def __init__(
        self,
        params: Params,
        config: FlowConfig,
        *,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
    ):
        self.params = params
        self.config = config
        super().__init__(
            batch_shape=tuple(int(b) for b in batch_shape),
            event_shape=(config.latent_dim,),
            validate_args=validate_args,
        )

    def sample(self, key: jax.Array, sample_shape: Sequence[int] = ()) -> jax.Array:
        """Draw ``sample_shape + batch_shape + (d,)`` latent vectors (reparameterised)."""
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        return _flow.flow_sample(self.params, self.config, key, shape)

    def log_prob(self, value: ArrayLike) -> jax.Array:
        """Exact log density, broadcast against the batch shape."""
        lp = _flow.flow_log_prob(self.params, self.config, value)
        return jnp.broadcast_to(lp, jnp.broadcast_shapes(lp.shape, tuple(self.batch_shape)))

    def expand(self, batch_shape: Sequence[int]) -> FlowPrior:
        """Same flow with a larger batch shape (the parameters are shared, nothing is copied)."""
        batch_shape = tuple(int(b) for b in batch_shape)
        try:
            compatible = jnp.broadcast_shapes(tuple(self.batch_shape), batch_shape) == batch_shape
        except ValueError:
            compatible = False
        if not compatible:
            raise ValueError(f"cannot expand batch shape {self.batch_shape} to {batch_shape}")
        return FlowPrior(
            self.params, self.config, batch_shape=batch_shape, validate_args=self._validate_args
        )


# ----------------------------------------------------------------------------- galaxy prior


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class GalaxyPrior:
    """A trained (or freshly initialised) galaxy prior; a JAX pytree.

    Parameters
    ----------
    config
        Static configuration (pytree auxiliary data).
    decoder_params, flow_params
        Parameters of the VAE decoder and of the latent flow.
    encoder_params
        Parameters of the VAE encoder (``None`` if not shipped).
    deblender_params
        Parameters of the deblending encoder (same architecture as the encoder); ``None`` makes
        :meth:`deblend_encode` fall back to the VAE encoder.
    """

    config: PriorConfig
    decoder_params: Params
    flow_params: Params
    encoder_params: Params | None = None
    deblender_params: Params | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def init(
        cls, key: jax.Array, config: PriorConfig | None = None, *, deblender: bool = False
    ) -> GalaxyPrior:
        """Randomly initialised prior (the starting point of training, and of tests).

        Parameters
        ----------
        key
            A ``jax.random`` key.
        config
            The configuration; defaults to ``PriorConfig()`` (LSST bands, 45 pixels, lean nets).
        deblender
            Also initialise separate deblending-encoder parameters.
        """
        config = PriorConfig() if config is None else config
        k_dec, k_flow, k_enc, k_deb = jax.random.split(key, 4)
        return cls(
            config=config,
            decoder_params=_init_component("decoder", k_dec, config),
            flow_params=_init_component("flow", k_flow, config),
            encoder_params=_init_component("encoder", k_enc, config),
            deblender_params=_init_component("deblender", k_deb, config) if deblender else None,
        )

    def replace(self, **changes: Any) -> GalaxyPrior:
        """A copy with some fields replaced (e.g. trained parameters)."""
        return dataclasses.replace(self, **changes)

    # -- properties -----------------------------------------------------------------------

    @property
    def bands(self) -> tuple[str, ...]:
        """Band names, in channel order."""
        return self.config.bands

    @property
    def stamp_size(self) -> int:
        """Side ``S`` of the decoded stamps."""
        return self.config.stamp_size

    @property
    def latent_dim(self) -> int:
        """Dimension ``d`` of the latent space."""
        return self.config.network.latent_dim

    @property
    def normalisation(self) -> np.ndarray:
        """Electrons per network unit of each band, shape ``(bands, 1, 1)`` (broadcasts on stamps)."""
        return np.asarray(self.config.normalisation, np.float32)[:, None, None]

    @property
    def psf_aware(self) -> bool:
        """Whether the encoders read the observed PSF (``network.psf_features > 0``)."""
        return self.config.network.psf_features > 0

    def dead_bands(self, n_samples: int = 64, seed: int = 0) -> tuple[str, ...]:
        """Bands in which the decoder outputs exactly zero for every sample of the flow.

        Such a band cannot be modelled: every source gets flux 0 there whatever the data. Read
        from ``config.metadata["dead_bands"]`` (written when a prior is trained), else decided
        from the weights (``n_samples`` latents drawn from the flow, decoded) once per object.
        """
        stored = self.config.metadata.get("dead_bands")
        if stored is not None:
            return tuple(stored)
        if "_dead_bands" not in self.__dict__:  # a cache, not a field
            object.__setattr__(self, "_dead_bands", zero_bands(self, n_samples, seed))
        return self.__dict__["_dead_bands"]

    def reference_psf(self) -> np.ndarray | None:
        """The model frame's PSF per band, ``(bands, S, S)`` with unit sum, or ``None`` when the
        decoder draws PSF-free galaxies (unknown survey and no reference FWHM).

        A Gaussian of ``config.reference_fwhm_pixels`` when set; otherwise (priors up to v0.2)
        the default PSF of the prior's survey, :meth:`madness_ppl.survey.Survey.psf`.
        """
        from madness_ppl import psf as _psf

        cfg = self.config
        if cfg.reference_fwhm_pixels is not None:
            return _psf.reference_psf(
                len(cfg.bands), cfg.stamp_size, fwhm_pixels=cfg.reference_fwhm_pixels
            )
        return _survey_psf(cfg.survey, cfg.bands, cfg.stamp_size)

    # -- networks -------------------------------------------------------------------------

    def decode(self, z: ArrayLike) -> jax.Array:
        """Noiseless stamps in electrons, ``(..., bands, S, S)``, from latents ``(..., d)``."""
        net = _vae.decode(self.decoder_params, self.config.network, z)
        return net * self.normalisation

    def encode(
        self, stamps: ArrayLike, *, with_scale: bool = False, psf: ArrayLike | None = None
    ) -> jax.Array | EncoderOutput:
        """VAE-encode isolated stamps in electrons, ``(..., bands, S, S)``.

        Returns the latent mean ``(..., d)``, or the full :class:`EncoderOutput`
        (mean and Cholesky factor) when ``with_scale`` is true. ``psf``: the stamps' PSF
        descriptors ``(..., bands, k)`` (:func:`madness_ppl.psf.psf_descriptor`), read by a
        PSF-aware encoder (:attr:`psf_aware`) and ignored by the others; a PSF-aware encoder
        given none assumes the stamps are at its model-frame PSF (:meth:`reference_psf`,
        zero descriptors): pass the stamps' own descriptors when they are observed through
        another PSF (:func:`madness_ppl.deblend.deblend` always does).
        """
        if self.encoder_params is None:
            raise ValueError("this prior has no encoder parameters")
        return self._encode(self.encoder_params, stamps, with_scale, psf)

    def deblend_encode(
        self, cutouts: ArrayLike, *, with_scale: bool = False, psf: ArrayLike | None = None
    ) -> jax.Array | EncoderOutput:
        """Latent of the central galaxy of blended cutouts in electrons, ``(..., bands, S, S)``.

        Uses the deblending encoder, or the VAE encoder when none is available; see
        :meth:`encode` for the return value and ``psf``.
        """
        params = self.deblender_params
        if params is None:
            params = self.encoder_params
        if params is None:
            raise ValueError("this prior has neither deblender nor encoder parameters")
        return self._encode(params, cutouts, with_scale, psf)

    def _encode(self, params: Params, stamps: ArrayLike, with_scale: bool, psf=None):
        x = jnp.asarray(stamps) / self.normalisation
        if self.psf_aware and psf is None:  # no PSF given: the model frame's own
            psf = np.zeros((len(self.bands), self.config.network.psf_features), np.float32)
        out = _vae.encode(params, self.config.network, x, psf if self.psf_aware else None)
        return out if with_scale else out.mean

    def log_prob(self, z: ArrayLike) -> jax.Array:
        """Flow log density of latents ``(..., d)``; shape ``(...)``."""
        return _flow.flow_log_prob(self.flow_params, self.config.flow, z)

    def latent_distribution(self, batch_shape: Sequence[int] = ()) -> FlowPrior:
        """The flow prior over latents as a NumPyro distribution."""
        return FlowPrior(self.flow_params, self.config.flow, batch_shape=batch_shape)

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``weights.safetensors`` and ``config.json`` into the directory ``path``.

        The directory is assembled next to its destination and moved into place with
        ``os.replace``, so readers never see a half-written prior.

        Parameters
        ----------
        path
            Destination directory.
        overwrite
            Replace an existing prior directory; otherwise raise ``FileExistsError``. A
            directory that is not a saved prior (no weights file, or other files in it) is
            never replaced (:class:`~madness_ppl.errors.OutputDirectoryError`).

        Returns
        -------
        Path
            The destination directory.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if path.exists():
            _check_replaceable(path)
        components = {c: p for c, p in self._components().items() if p is not None}
        tensors: dict[str, np.ndarray] = {}
        for component, params in components.items():
            tensors.update(_flatten(params, component))
        document = {
            "format_version": FORMAT_VERSION,
            "components": list(components),
            "config": self.config.to_dict(),
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"  # fails early if not JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            safetensors.numpy.save_file(
                tensors, str(tmp / _WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)}
            )
            (tmp / _CONFIG_FILE).write_text(text)
            tmp.chmod(0o755)
            swap_into_place(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> GalaxyPrior:
        """Load a prior saved by :meth:`save`.

        Parameters
        ----------
        name_or_path
            A bare name (e.g. ``"lsst"``) is looked up first among the priors shipped in
            ``madness_ppl/weights/``; anything else (or a name that is not shipped but exists as a
            local directory) is read as a directory path.  Use ``"./lsst"`` or a ``Path`` to force
            a local directory.

        Raises
        ------
        FileNotFoundError
            No such shipped prior / directory, or a file missing in it.
        ValueError
            (:class:`~madness_ppl.errors.PriorFileError`) Unsupported format version, invalid
        JSON or configuration keys, an unreadable weights file, tensors missing, unexpected,
        of the wrong shape or holding NaN/inf.
        """
        source = _resolve(name_or_path)
        config_file = source / _CONFIG_FILE
        weights_file = source / _WEIGHTS_FILE
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"{source} has no {f.name}; is it a saved GalaxyPrior?")
        try:
            document = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PriorFileError(
                f"{config_file} is not valid JSON ({err})", str(config_file)
            ) from None
        if not isinstance(document, dict):
            raise PriorFileError(f"{config_file} does not hold a JSON object", document)
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise PriorFileError(
                f"unsupported prior format version {version!r} in {source}; this version of "
                f"madness_ppl reads format version {FORMAT_VERSION}",
                version,
            )
        try:
            config = PriorConfig.from_dict(document["config"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PriorFileError(
                f"{config_file}: invalid prior configuration ({type(err).__name__}: {err})",
                document.get("config"),
            ) from None
        components = list(document.get("components", _COMPONENTS[:3]))
        unknown = [c for c in components if c not in _COMPONENTS]
        if unknown:
            raise PriorFileError(f"{config_file}: unknown components {unknown}", unknown)
        try:
            tensors = safetensors.numpy.load(weights_file.read_bytes())
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise PriorFileError(
                f"{weights_file} is not a readable safetensors file ({type(err).__name__}: {err})",
                str(weights_file),
            ) from None
        bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
        if bad:
            raise PriorFileError(
                f"{weights_file}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]!r}); the "
                "prior is damaged",
                bad,
            )
        params: dict[str, Params] = {}
        for component in components:
            template = jax.eval_shape(
                lambda c=component: _init_component(c, jax.random.key(0), config)
            )
            params[component] = _unflatten(template, tensors, component, source)
        extra = sorted(tensors)
        if extra:
            raise PriorFileError(
                f"{source}: unexpected tensors {extra[:5]} (total {len(extra)})", extra
            )
        for required in ("decoder", "flow"):
            if required not in params:
                raise PriorFileError(f"{source}: the prior has no {required} parameters", required)
        return cls(
            config=config,
            decoder_params=params["decoder"],
            flow_params=params["flow"],
            encoder_params=params.get("encoder"),
            deblender_params=params.get("deblender"),
        )

    # -- misc -----------------------------------------------------------------------------

    def _components(self) -> dict[str, Params | None]:
        return {
            "decoder": self.decoder_params,
            "flow": self.flow_params,
            "encoder": self.encoder_params,
            "deblender": self.deblender_params,
        }

    def __repr__(self) -> str:
        n = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(self))
        c = self.config
        return (
            f"GalaxyPrior(survey={c.survey!r}, bands={c.bands}, stamp_size={c.stamp_size}, "
            f"latent_dim={c.network.latent_dim}, version={c.version!r}, n_params={n})"
        )


jax.tree_util.register_dataclass(
    GalaxyPrior,
    data_fields=["decoder_params", "flow_params", "encoder_params", "deblender_params"],
    meta_fields=["config"],
)


@functools.lru_cache(maxsize=8)
def _survey_psf(survey: str, bands: tuple[str, ...], size: int) -> np.ndarray | None:
    """The default PSF images of a named survey's bands (unit sum), or ``None`` if unknown."""
    from madness_ppl.survey import Survey

    try:
        known = Survey.named(survey)
    except (KeyError, ValueError):
        return None
    if any(b not in known.band_names for b in bands):
        return None
    images = known.psf_images(size, bands)
    images.setflags(write=False)
    return images


def _check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is a saved prior (and holds nothing else)."""
    if not path.is_dir():
        raise OutputDirectoryError(f"{path} is a file, not a prior directory", str(path))
    entries = {p.name for p in path.iterdir()}
    ours = {_CONFIG_FILE, _WEIGHTS_FILE, "README.md", "report.json"}
    foreign = sorted(e for e in entries if e not in ours and not e.endswith(".png"))
    if entries and (foreign or _WEIGHTS_FILE not in entries):
        detail = f"it holds {foreign[:5]}" if foreign else f"it has no {_WEIGHTS_FILE}"
        raise OutputDirectoryError(
            f"refusing to replace {path}: it is not a saved prior ({detail}); choose a new "
            "directory",
            str(path),
        )


def available_priors() -> list[str]:
    """Names of the priors shipped in ``madness_ppl/weights/`` (possibly empty)."""
    root = _weights_root()
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir() and (child / _CONFIG_FILE).is_file()
    )


# ----------------------------------------------------------------------------- helpers


def _weights_root():
    return importlib.resources.files("madness_ppl") / "weights"


def _resolve(name_or_path: str | os.PathLike):
    """A shipped prior's directory (a Traversable) or a local directory (a Path)."""
    if isinstance(name_or_path, str) and _NAME_RE.match(name_or_path):
        shipped = _weights_root() / name_or_path
        if shipped.is_dir():
            return shipped
        if not Path(name_or_path).is_dir():
            raise FileNotFoundError(
                f"no shipped prior named {name_or_path!r}; available: {available_priors()}"
            )
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"no prior directory at {str(path)!r}")
    return path


def _init_component(component: str, key: jax.Array, config: PriorConfig) -> Params:
    if component == "decoder":
        return _vae.init_decoder(key, config.network)
    if component == "flow":
        return _flow.init_flow(key, config.flow)
    if component in ("encoder", "deblender"):
        return _vae.init_encoder(key, config.network)
    raise ValueError(f"unknown prior component {component!r}")


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: Params, prefix: str) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join([prefix, *(_key_str(k) for k in path)]): np.ascontiguousarray(leaf)
        for path, leaf in leaves
    }


def _unflatten(template: Params, tensors: dict[str, np.ndarray], prefix: str, source) -> Params:
    """Fill ``template`` (a pytree of ShapeDtypeStructs) from ``tensors``, popping used keys."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, spec in paths:
        key = "/".join([prefix, *(_key_str(k) for k in path)])
        if key not in tensors:
            raise PriorFileError(f"{source}: tensor {key!r} is missing from {_WEIGHTS_FILE}", key)
        value = tensors.pop(key)
        if value.shape != tuple(spec.shape):
            raise PriorFileError(
                f"{source}: tensor {key!r} has shape {value.shape} but the configuration "
                f"expects {tuple(spec.shape)}",
                value.shape,
            )
        leaves.append(jnp.asarray(value, dtype=spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
