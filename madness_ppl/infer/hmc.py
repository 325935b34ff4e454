r"""Posterior samples of any NumPyro model with NUTS: :func:`sample_posterior`.

For a model with latents :math:`\theta` (unconstrained :math:`u`, :math:`\theta = T(u)`) and
data :math:`y`, the No-U-Turn sampler (Hoffman & Gelman 2014) draws from

.. math::

    p(u \mid y) \propto \exp(-U(u)), \qquad
    U(u) = -\log p(y, T(u)) - \log\lvert\det \partial T / \partial u\rvert,

the *potential energy* that NumPyro builds from the model
(:func:`numpyro.infer.util.potential_energy`). Both backends run the same target: NumPyro's
``NUTS`` or BlackJAX's ``nuts`` after ``window_adaptation`` (Stan's windowed adaptation of
the step size and of a diagonal or dense mass matrix), started at the MAP
(:func:`~madness_ppl.infer.fit_map`). The result is an :class:`arviz.InferenceData` whose
``posterior`` holds the latent sites and the chosen deterministic sites (for
:func:`~madness_ppl.scene.blend_model`: ``z`` and the per-source, per-band ``flux``),
``sample_stats`` the NUTS statistics and ``observed_data`` the data.

**Gradients on CPU.** NUTS builds its trajectories inside ``lax.while_loop``; XLA:CPU runs
convolutions inside loops several times slower than the same program in straight-line code.
With ``gradient="callback"`` the potential and its gradient are computed by a separately
compiled straight-line program called from inside the loop
(:func:`~madness_ppl.infer.gradient.callback_potential`); the default ``"auto"`` does so on
CPU when the model contains a convolution.

**Layout.** This module checks the options and assembles the result; the model is bound to
its data as a hashable :class:`~madness_ppl.infer.target.Target` (the arrays traced, so every
program below is compiled once per model and shapes and a second field reuses it); the
starting point is checked in :mod:`~madness_ppl.infer.start`, the samplers run in
:mod:`~madness_ppl.infer.backends` (on the potential only: they do not know the model),
and the draws become ArviZ groups in :mod:`~madness_ppl.infer.draws`. Axis names come from
the model's plates and from the caller: ``dims``, or a ``site_dims`` attribute of the model
(:func:`~madness_ppl.scene.blend_model` declares ``flux: (sources, band)``, ...).

Examples
--------
>>> import jax.numpy as jnp
>>> import numpyro, numpyro.distributions as dist
>>> def model(y):
...     mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
...     numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
>>> idata = sample_posterior(
...     model, jnp.array([1.0, 2.0, 3.0]), num_warmup=200, num_samples=400, diagnose=False
... )
>>> idata.posterior["mu"].shape  # (chain, draw)
(1, 400)
>>> abs(float(idata.posterior["mu"].mean()) - 1.99) < 0.2  # exact: N(1.993, 0.577^2)
True

References
----------
M. D. Hoffman and A. Gelman (2014), *The No-U-Turn Sampler*, JMLR 15, 1593.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import arviz as az
import jax
import numpy as np
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import transform_fn

from madness_ppl.errors import MadnessInputError
from madness_ppl.infer.backends import BACKENDS, Backend, NUTSSettings
from madness_ppl.infer.draws import DEFAULT_KEEP, inference_data, kept_sites, postprocess
from madness_ppl.infer.gradient import (
    CallbackPotential,
    Gradient,
    callback_data,
    callback_potential,
    use_callback,
)
from madness_ppl.infer.map import MAPResult
from madness_ppl.infer.start import check_mass_matrix, checked_start, init_values
from madness_ppl.infer.summary import mixed, summarize_diagnostics
from madness_ppl.infer.target import Target

__all__ = ["DEFAULT_KEEP", "NUTSSettings", "callback_potential", "sample_posterior"]


def sample_posterior(
    model: Callable,
    *args: Any,
    init: MAPResult | Mapping[str, Any] | None = None,
    backend: Backend = "numpyro",
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 1,
    dense_mass: bool = False,
    inverse_mass_matrix: Any = None,
    adapt_mass_matrix: bool = True,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    seed: int = 0,
    progress: bool = False,
    keep: Sequence[str] | Literal["all"] = DEFAULT_KEEP,
    gradient: Gradient = "auto",
    chain_method: Literal["sequential", "vectorized"] = "sequential",
    postprocess_batch: int = 100,
    max_extensions: int = 0,
    converge_on: Sequence[str] | None = None,
    max_rhat: float = 1.01,
    min_ess_per_chain: float = 100.0,
    diagnose: bool = True,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    **kwargs: Any,
) -> az.InferenceData:
    r"""Draw posterior samples of a NumPyro model with NUTS, started at the MAP.

    Parameters
    ----------
    model
        A NumPyro model (plain function) with continuous latent sites.
    *args, **kwargs
        Model arguments (e.g. ``*prepare_blend(...).args``). Keyword names used by this
        function cannot be model keywords.
    init
        Starting point: a :class:`~madness_ppl.infer.MAPResult` (its ``params``; a warning is
        raised if it did not converge) or constrained values by site name. Sites not given
        start at a uniform draw in :math:`[-2, 2]` of the unconstrained space
        (NumPyro's ``init_to_value`` fallback). Every chain starts at the same point.
    backend
        ``"numpyro"`` (``numpyro.infer.NUTS``) or ``"blackjax"`` (``blackjax.nuts`` after
        ``blackjax.window_adaptation``); both give the same :class:`arviz.InferenceData`
        layout.
    num_warmup, num_samples, num_chains
        Adaptation steps (discarded), kept draws per chain, number of chains (run one after
        the other, each with its own adaptation).
    dense_mass
        Adapt a dense mass matrix (correlated latents, e.g. blended neighbours) instead of a
        diagonal one.
    inverse_mass_matrix
        Initial inverse mass matrix :math:`M^{-1}` over the flattened unconstrained latents
        (sites sorted by name, each raveled row-major, as
        :func:`~madness_ppl.infer.laplace_approximation` orders them): ``(k,)`` (diagonal) or
        ``(k, k)`` (dense; implies ``dense_mass=True``). NUTS mixes when :math:`M^{-1}`
        matches the posterior covariance; for :func:`~madness_ppl.scene.blend_model` the
        Laplace covariance at the MAP
        (:func:`~madness_ppl.uncertainty.laplace_flux_errors`, ``.covariance``; for any
        model :func:`~madness_ppl.infer.laplace_approximation`) makes the
        sampled space approximately white, :math:`u = L^{-1}(z - \hat z)` with
        :math:`L L^\top = M^{-1}`, which a short warm-up cannot learn for hundreds of
        correlated latents. ``None``: the identity. ``numpyro`` backend only.
    adapt_mass_matrix
        Adapt the mass matrix during warm-up (Stan's windows, starting from
        ``inverse_mass_matrix``); ``False`` keeps it fixed and adapts the step size only.
    target_accept
        Target mean acceptance probability of the step-size adaptation.
    max_tree_depth
        Maximum number of trajectory doublings (at most :math:`2^{10} - 1` leapfrog steps by
        default).
    seed
        Seed of the sampler's ``jax.random`` key.
    progress
        Show progress bars.
    keep
        Deterministic sites stored in the posterior group, or ``"all"``. Latent sites are
        always stored. Large sites (``stamps``, ``model_image``) take ``num_chains x
        num_samples`` times their size: keep only what you need, or recompute per-pixel
        summaries from the latents (:func:`~madness_ppl.infer.pixel_std_maps`). Names of the
        default that the model lacks are skipped; an explicit name it lacks is an error.
    gradient
        ``"inline"``: differentiate the potential inside the sampler's compiled loop.
        ``"callback"``: evaluate it and its gradient in a separate straight-line program
        called from the loop (faster on CPU for convolutional decoders; under
        ``chain_method="vectorized"`` it runs once per chain). ``"auto"`` (default): ``"callback"`` on the CPU backend when the potential
        contains a convolution, else ``"inline"``.
    chain_method
        How the ``numpyro`` backend runs several chains: ``"sequential"`` (one after the
        other) or ``"vectorized"`` (``vmap``: chains in lock-step, each iteration costs the
        longest of their trajectories; worth it on accelerators). The ``blackjax`` backend
        runs chains one after the other with one compiled program.
    postprocess_batch
        Draws per batch when computing deterministic sites from the latents after sampling.
    max_extensions
        Draw up to this many further blocks of ``num_samples`` draws per chain while the
        chains of ``converge_on`` have not mixed: :math:`\hat R > ` ``max_rhat`` or a bulk or
        tail ESS below ``min_ess_per_chain`` times the number of chains
        (``madness_ppl.infer.summary.mixed``). The chains continue from their last
        states with the adapted step size and mass matrix (no new warm-up, and the compiled
        programs of the first block serve every block); diagnostics, ``posterior`` and
        ``sample_stats`` cover all blocks, and the posterior attribute ``blocks`` says how
        many were drawn. ``0`` (default): one block, as asked. Extending until a threshold
        is met is a stopping rule on the draws; keep ``num_samples`` large enough that one
        block is a fair run on its own.
    converge_on
        Sites whose mixing decides the extensions and the diagnostics' R-hat and ESS
        (e.g. ``("flux",)`` when the fluxes are what is reported); default the latent
        sites.
    max_rhat, min_ess_per_chain
        Thresholds of those checks (Vehtari et al. 2021: 1.01 and 100 per chain).
    diagnose
        Summarise R-hat (more than one chain), bulk and tail ESS and divergences
        (:func:`~madness_ppl.infer.summarize_diagnostics`, on ``converge_on``) and warn when
        they are bad.
    dims, coords
        Extra ArviZ dimension names per site and coordinates (merged over the defaults:
        plate names for sample sites, then the model's ``site_dims`` attribute where the
        shapes fit, e.g. ``("sources", "band")`` for ``flux`` of
        :func:`~madness_ppl.scene.blend_model`).

    Returns
    -------
    arviz.InferenceData
        ``posterior`` (latents + kept deterministic sites, ``(chain, draw, ...)``),
        ``sample_stats`` (``diverging``, ``tree_depth``, ``n_steps`` leapfrog steps,
        Hamiltonian ``energy``, ``step_size``, ``acceptance_rate``, ``lp`` :math:`= -U(u)`),
        ``observed_data``. The posterior group's
        attributes record the backend, the gradient mode, ``sampling_time`` (seconds of
        warm-up and sampling, compilation included when this call compiled) and ``latent_sites``.

    Raises
    ------
    ValueError
        If the log density or its gradient is not finite at the starting point (the message
        names the offending sites), if a latent site is partly masked out, e.g. padded
        sources in ``source_mask`` (their latents have an improper, flat posterior: pass the
        real sources only), or for bad options.

    Notes
    -----
    The deterministic sites are recomputed from the latents after sampling, in jitted
    batches of ``postprocess_batch`` draws in which the sites not kept are dead code, so
    the memory held never exceeds one batch of the large ones.

    For :func:`~madness_ppl.scene.blend_model` the posterior of :math:`z` includes the
    prior's non-Gaussian shape, and of ``flux`` the decoder's non-linearity; for the toy
    :class:`~madness_ppl.toy.LinearGaussianPrior` it is exactly Gaussian
    (:func:`~madness_ppl.toy.linear_gaussian_posterior`).
    """
    _check_choices(backend, gradient, max_extensions)
    if inverse_mass_matrix is not None:
        inverse_mass_matrix = np.asarray(inverse_mass_matrix, np.float64)
        dense_mass = dense_mass or inverse_mass_matrix.ndim == 2
    settings = NUTSSettings(
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        dense_mass=dense_mass,
        target_accept=target_accept,
        max_tree_depth=max_tree_depth,
        progress=progress,
        chain_method=chain_method,
        inverse_mass_matrix=inverse_mass_matrix,
        adapt_mass_matrix=adapt_mass_matrix,
    ).check(backend)

    values = init_values(init)
    key = jax.random.key(seed)
    key_init, key_run = jax.random.split(key)
    target, data = Target.bind(model, args, kwargs)
    start_values, model_trace = checked_start(target, data, values, key_init)
    latents = list(start_values)
    if not latents:
        raise MadnessInputError(
            "sample_posterior: the model has no latent sample site to sample (every site is "
            "observed or deterministic; e.g. blend_model with zero sources)",
            value=None,
        )
    deterministic = [name for name, site in model_trace.items() if site["type"] == "deterministic"]
    kept = kept_sites(keep, deterministic)
    transforms = {name: biject_to(model_trace[name]["fn"].support) for name in start_values}
    u0 = transform_fn(transforms, start_values, invert=True)
    callback = use_callback(gradient, functools.partial(target, data), u0)
    potential = CallbackPotential(target) if callback else target
    if inverse_mass_matrix is not None:
        check_mass_matrix(inverse_mass_matrix, u0)

    monitored = _monitored_sites(converge_on, latents, kept)
    ess = {"min_ess_per_chain": min_ess_per_chain}
    runner, names = BACKENDS[backend], (*latents, *kept)
    with callback_data(target, data) if callback else contextlib.nullcontext():
        draws, posterior, blocks = _sample_until_mixed(
            runner,
            potential,
            target,
            data,
            u0,
            key_run,
            settings,
            names,
            postprocess_batch,
            monitored,
            max_extensions,
            {"max_rhat": max_rhat, **ess},
        )
    attrs = {
        "inference_library": backend,
        "gradient": "callback" if callback else "inline",
        "num_warmup": int(num_warmup),
        "max_tree_depth": int(max_tree_depth),
        "dense_mass": int(bool(dense_mass)),
        "mass_matrix": "given" if inverse_mass_matrix is not None else "identity",
        "adapt_mass_matrix": int(bool(adapt_mass_matrix)),
        "target_accept": float(target_accept),
        "sampling_time": float(draws.elapsed),
        "latent_sites": ",".join(latents),
        "blocks": blocks,
    }
    site_dims = {**getattr(model, "site_dims", {})}
    idata = inference_data(
        model_trace, posterior, draws.stats, attrs, site_dims=site_dims, dims=dims, coords=coords
    )
    if diagnose:
        problems = summarize_diagnostics(
            idata, var_names=monitored, warn=False, max_rhat=max_rhat, **ess
        ).problems
        if problems:
            warnings.warn("NUTS diagnostics: " + "; ".join(problems), UserWarning, stacklevel=2)
    return idata


def _check_choices(backend: str, gradient: str, max_extensions: int) -> None:
    """Refuse an unknown backend or gradient route, or a negative ``max_extensions``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'numpyro' or 'blackjax', got {backend!r}")
    if gradient not in ("auto", "inline", "callback"):
        raise ValueError(f"gradient must be 'auto', 'inline' or 'callback', got {gradient!r}")
    if int(max_extensions) < 0:
        raise ValueError(f"max_extensions must be >= 0, got {max_extensions}")


def _sample_until_mixed(
    runner: Any,
    potential: Callable,
    target: Target,
    data: Any,
    u0: Any,
    key: jax.Array,
    settings: NUTSSettings,
    names: Sequence[str],
    postprocess_batch: int | None,
    monitored: Sequence[str],
    max_extensions: int,
    mixing: dict[str, float],
) -> tuple[Any, dict[str, np.ndarray], int]:
    """Run the chains, then extend them by blocks of ``num_samples`` draws (at most
    ``max_extensions`` times) until the ``monitored`` sites pass :func:`mixed` with the
    ``mixing`` thresholds; returns the draws, the stored sites' values and the block count."""
    draws = runner.run(potential, data, u0, key, settings)
    posterior = postprocess(target, data, draws.positions, names, postprocess_batch)
    blocks = 1
    while blocks <= max_extensions and not mixed(
        az.convert_to_dataset({name: posterior[name] for name in monitored}), monitored, **mixing
    ):
        more = runner.extend(potential, data, draws.resume, settings)
        new = postprocess(target, data, more.positions, names, postprocess_batch)
        posterior = {k: np.concatenate([v, new[k]], axis=1) for k, v in posterior.items()}
        draws, blocks = draws.then(more), blocks + 1
    return draws, posterior, blocks


def _monitored_sites(
    converge_on: Sequence[str] | None, latents: Sequence[str], kept: Sequence[str]
) -> list[str]:
    """The sites whose mixing decides the extensions (default: every latent site); each must
    be stored."""
    monitored = list(latents if converge_on is None else converge_on)
    unknown = [name for name in monitored if name not in (*latents, *kept)]
    if unknown:
        raise ValueError(
            f"converge_on names {unknown}, which are not stored sites "
            f"(latent {latents}, kept {kept})"
        )
    return monitored
