r"""Summaries of posterior samples: diagnostics, flux and colour tables, pixel uncertainty maps.

* :func:`summarize_diagnostics`: R-hat, bulk and tail effective sample sizes, divergences and
  saturated trees of an :class:`arviz.InferenceData`, with warnings when they are bad;
* :func:`flux_table`: per-source posterior mean, standard deviation and equal-tailed credible
  intervals of the per-band fluxes and of the colours, as an :class:`astropy.table.Table`;
* :func:`pixel_std_maps`: per-source, per-pixel posterior mean and standard deviation of the
  decoded stamps, accumulated over the draws in batches (Welford/Chan), so that the images
  of all draws are never held at once.

Examples
--------
>>> import numpy as np, arviz as az
>>> rng = np.random.default_rng(0)
>>> flux = rng.normal([[100.0, 200.0]], 10.0, size=(1, 1000, 1, 2))  # (chain, draw, source, band)
>>> idata = az.from_dict(posterior={"flux": flux})
>>> table = flux_table(idata, ["g", "r"])
>>> [round(float(table[c][0]), -1) for c in ("flux_g", "flux_r", "flux_r_sd")]
[100.0, 200.0, 10.0]

Why one module of ~540 lines: the three summaries read the same InferenceData layout (sites,
chains, draws) and share its checks; split, each would re-derive it.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from astropy import units as u
from astropy.table import Table
from jax.typing import ArrayLike

from madness_ppl.galaxy_model import GalaxyModel

__all__ = [
    "Diagnostics",
    "PixelMoments",
    "flux_table",
    "mixed",
    "mixing",
    "pixel_std_maps",
    "summarize_diagnostics",
    "worst_component",
]


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------
class Diagnostics(NamedTuple):
    r"""Convergence and efficiency summary of a NUTS run.

    Attributes
    ----------
    num_chains, num_draws
        Chains and kept draws per chain.
    max_rhat
        Largest rank-normalised split :math:`\hat R` over all scalar latent components (NaN
        with one chain).
    min_ess_bulk, min_ess_tail
        Smallest bulk and tail effective sample sizes over all scalar latent components
        (all chains together).
    divergences
        Number of divergent transitions after warm-up.
    max_depth_hits
        Number of draws whose trajectory reached the maximum tree depth (a sign of a tiny
        step size or a badly scaled posterior; costly, not a bias).
    mean_acceptance
        Mean acceptance statistic.
    problems
        Human-readable descriptions of the failed checks (empty when all pass).
    """

    num_chains: int
    num_draws: int
    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    divergences: int
    max_depth_hits: int
    mean_acceptance: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems


def summarize_diagnostics(
    idata: az.InferenceData,
    *,
    var_names: Sequence[str] | None = None,
    max_rhat: float = 1.01,
    min_ess_per_chain: float = 100.0,
    warn: bool = True,
) -> Diagnostics:
    r"""Check a NUTS run against the usual thresholds (Vehtari et al. 2021).

    Fails when

    * any transition diverged (the sampler could not follow the posterior's geometry: the
      draws may be biased);
    * with more than one chain, :math:`\hat R > 1.01` for some component;
    * the bulk or tail ESS of some component is below ``min_ess_per_chain`` times the number
      of chains (100 per chain: Monte Carlo errors of means and quantiles are then about
      a tenth of a posterior standard deviation);
    * some trajectories hit the maximum tree depth (efficiency only).

    Parameters
    ----------
    idata
        Output of :func:`~madness_ppl.infer.sample_posterior` (or any InferenceData with a
        ``posterior`` group; ``sample_stats`` is optional).
    var_names
        Variables to check; default: the latent sites recorded by ``sample_posterior``
        (attribute ``latent_sites``), else every posterior variable.
    max_rhat, min_ess_per_chain
        Thresholds.
    warn
        Issue one :class:`UserWarning` listing the problems, if any.

    Returns
    -------
    Diagnostics

    References
    ----------
    A. Vehtari, A. Gelman, D. Simpson, B. Carpenter and P.-C. Bürkner (2021),
    *Rank-normalization, folding, and localization: an improved R-hat for assessing
    convergence of MCMC*, Bayesian Analysis 16, 667.
    """
    post = idata.posterior
    if var_names is None:
        latent = str(post.attrs.get("latent_sites", ""))
        var_names = [v for v in latent.split(",") if v in post] or list(post.data_vars)
    num_chains, num_draws = int(post.sizes["chain"]), int(post.sizes["draw"])
    rhat, ess_bulk, ess_tail = mixing(post, var_names)

    divergences, depth_hits, accept = 0, 0, float("nan")
    stats = getattr(idata, "sample_stats", None)
    if stats is not None:
        if "diverging" in stats:
            divergences = int(np.asarray(stats["diverging"]).sum())
        max_depth = post.attrs.get("max_tree_depth", stats.attrs.get("max_tree_depth"))
        if "tree_depth" in stats and max_depth is not None:
            depth_hits = int((np.asarray(stats["tree_depth"]) >= int(max_depth)).sum())
        if "acceptance_rate" in stats:
            accept = float(np.mean(stats["acceptance_rate"]))

    problems = []
    total = num_chains * num_draws
    if divergences:
        problems.append(
            f"{divergences} of {total} transitions diverged: the draws may be biased "
            "(try a larger target_accept or dense_mass=True)"
        )
    remedy = (
        f"draw more (num_samples=, or max_extensions= to extend until mixed), or check only "
        f"the sites you report (converge_on=, e.g. ('flux',); checked now: {', '.join(var_names)})"
    )
    if num_chains > 1 and rhat > max_rhat:
        where = worst_component(post, var_names, "rhat")
        problems.append(
            f"max R-hat {rhat:.3f} > {max_rhat} at {where}: the chains disagree; {remedy}"
        )
    floor = min_ess_per_chain * num_chains
    if min(ess_bulk, ess_tail) < floor:
        method = "bulk" if ess_bulk <= ess_tail else "tail"
        where = worst_component(post, var_names, method)
        problems.append(
            f"min bulk ESS {ess_bulk:.0f} / tail ESS {ess_tail:.0f} < {floor:.0f} "
            f"({min_ess_per_chain:.0f} per chain), worst at {where}; {remedy}"
        )
    if depth_hits:
        problems.append(f"{depth_hits} of {total} trajectories hit the maximum tree depth")
    result = Diagnostics(
        num_chains=num_chains,
        num_draws=num_draws,
        max_rhat=rhat,
        min_ess_bulk=ess_bulk,
        min_ess_tail=ess_tail,
        divergences=divergences,
        max_depth_hits=depth_hits,
        mean_acceptance=accept,
        problems=tuple(problems),
    )
    if warn and problems:
        warnings.warn("NUTS diagnostics: " + "; ".join(problems), UserWarning, stacklevel=2)
    return result


def mixing(posterior: Any, var_names: Sequence[str]) -> tuple[float, float, float]:
    r"""Worst mixing statistics over every scalar component of ``var_names``.

    Parameters
    ----------
    posterior
        An :class:`xarray.Dataset` with ``(chain, draw, ...)`` variables (an InferenceData's
        ``posterior`` group).
    var_names
        Variables to summarise.

    Returns
    -------
    tuple of float
        ``(max R-hat, min bulk ESS, min tail ESS)``: rank-normalised split :math:`\hat R`
        (NaN with one chain) and effective sample sizes of all chains together (Vehtari et
        al. 2021); constant components are ignored (NaN when nothing is left).
    """
    var_names = list(var_names)
    num_chains = int(posterior.sizes["chain"])

    def extreme(ds, fn) -> float:
        values = [np.asarray(ds[v]).ravel() for v in ds.data_vars]
        values = np.concatenate(values) if values else np.array([])
        values = values[np.isfinite(values)]
        return float(fn(values)) if values.size else float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant components give NaN
        ess_bulk = extreme(az.ess(posterior, var_names=var_names, method="bulk"), np.min)
        ess_tail = extreme(az.ess(posterior, var_names=var_names, method="tail"), np.min)
        rhat = (
            extreme(az.rhat(posterior, var_names=var_names), np.max)
            if num_chains > 1
            else float("nan")
        )
    return rhat, ess_bulk, ess_tail


def worst_component(
    posterior: Any, var_names: Sequence[str], statistic: Literal["rhat", "bulk", "tail"]
) -> str:
    """Where the worst mixing statistic is: ``"site[i, j]"`` (largest R-hat or smallest ESS).

    Parameters
    ----------
    posterior
        An :class:`xarray.Dataset` with ``(chain, draw, ...)`` variables.
    var_names
        Variables to search.
    statistic
        ``"rhat"`` (largest rank-normalised split R-hat), ``"bulk"`` or ``"tail"`` (smallest ESS).

    Returns
    -------
    str
        The site name and the index of its worst scalar component (``"sky"`` for a scalar
        site), or ``"?"`` when no component is finite.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant components give NaN
        if statistic == "rhat":
            values, sign = az.rhat(posterior, var_names=list(var_names)), 1.0
        else:
            values, sign = az.ess(posterior, var_names=list(var_names), method=statistic), -1.0
    best, where = -np.inf, "?"
    for name in values.data_vars:
        array = sign * np.asarray(values[name], dtype=float)
        if not np.any(np.isfinite(array)):
            continue
        flat = int(np.nanargmax(np.where(np.isfinite(array), array, -np.inf)))
        if array.flat[flat] > best:
            best = array.flat[flat]
            index = np.unravel_index(flat, array.shape)
            where = f"{name}[{', '.join(map(str, index))}]" if array.ndim else str(name)
    return where


def mixed(
    posterior: Any,
    var_names: Sequence[str],
    *,
    max_rhat: float = 1.01,
    min_ess_per_chain: float = 100.0,
) -> bool:
    """Whether the chains of ``var_names`` pass :func:`summarize_diagnostics`' R-hat and ESS
    checks (divergences and tree depth aside, which more draws do not mend)."""
    rhat, bulk, tail = mixing(posterior, var_names)
    floor = min_ess_per_chain * int(posterior.sizes["chain"])
    # NaN (one chain; only constant components) fails no check, as in summarize_diagnostics
    return not (rhat > max_rhat or min(bulk, tail) < floor)


# --------------------------------------------------------------------------------------------
# Flux and colour table
# --------------------------------------------------------------------------------------------
def flux_table(
    idata: az.InferenceData,
    bands: Sequence[str],
    *,
    intervals: Sequence[float] = (0.68, 0.9),
    site: str = "flux",
    colours: Sequence[tuple[str, str]] | None = None,
    zeropoints: Sequence[float] | None = None,
    systematic: ArrayLike | None = None,
    seed: int = 0,
) -> Table:
    r"""Per-source posterior summaries of fluxes and colours.

    For source :math:`i`, band :math:`b` and draws :math:`f^{(s)}_{ib}`, the table gives the
    posterior mean, standard deviation and, for each level :math:`\gamma` in ``intervals``,
    the equal-tailed credible interval :math:`[q_{(1-\gamma)/2}, q_{(1+\gamma)/2}]`. Colours
    are magnitude differences computed draw by draw,

    .. math::

        c^{(s)}_{i, ab} = -2.5 \log_{10}\big(f^{(s)}_{ia} / f^{(s)}_{ib}\big)
        + (\mathrm{zp}_a - \mathrm{zp}_b),

    so their intervals carry the full (non-Gaussian, correlated) posterior of both fluxes.
    Draws with a non-positive flux in either band are left out of that colour's summaries
    (all of them: NaN).

    Parameters
    ----------
    idata
        Posterior with a ``site`` variable of shape ``(chain, draw, n_sources, n_bands)``
        (:func:`~madness_ppl.infer.sample_posterior` on
        :func:`~madness_ppl.scene.blend_model`).
    bands
        Band names, in the order of the last axis.
    intervals
        Credible levels in (0, 1).
    site
        Name of the flux variable.
    colours
        Band pairs ``(a, b)`` for colours ``a - b``; default: adjacent bands.
    zeropoints
        Magnitude zeropoints per band (electrons), to turn instrumental colours into
        calibrated ones; default: instrumental (zeropoints cancel to 0).
    systematic
        Optional ``(n_sources, n_bands)`` standard deviations of errors the likelihood does not
        hold (:func:`~madness_ppl.uncertainty.systematic_flux_errors`): every flux draw gets
        independent Gaussian noise of that sd, :math:`f^{(s)} + s\,\xi^{(s)}`, so means stay
        and widths add in quadrature (independently per band: colours widen too).
    seed
        Seed of that noise.

    Returns
    -------
    astropy.table.Table
        One row per source: ``source``; for each band ``flux_<b>``, ``flux_<b>_sd``,
        ``flux_<b>_lo<P>``, ``flux_<b>_hi<P>`` (electrons; ``P`` the level in per cent); for
        each colour ``<a>-<b>``, ``<a>-<b>_sd``, ``<a>-<b>_lo<P>``, ``<a>-<b>_hi<P>`` (mag).
        ``meta`` records the levels.
    """
    bands = [str(b) for b in bands]
    samples = np.asarray(idata.posterior[site], np.float64)
    if samples.ndim != 4 or samples.shape[-1] != len(bands):
        raise ValueError(
            f"posterior {site!r} must be (chain, draw, source, band) with {len(bands)} bands, "
            f"got shape {samples.shape}"
        )
    levels = [float(g) for g in intervals]
    if not all(0.0 < g < 1.0 for g in levels):
        raise ValueError(f"interval levels must be in (0, 1), got {levels}")
    flat = samples.reshape(-1, *samples.shape[2:])  # (draws, source, band)
    if systematic is not None:
        extra = np.asarray(systematic, np.float64)
        if extra.shape != flat.shape[1:] or not np.all(np.isfinite(extra) & (extra >= 0)):
            raise ValueError(
                f"systematic must be finite, >= 0 and of shape {flat.shape[1:]} (source, band), "
                f"got shape {extra.shape}"
            )
        flat = flat + extra * np.random.default_rng(seed).normal(size=flat.shape)
    index = {b: k for k, b in enumerate(bands)}
    if colours is None:
        colours = list(itertools.pairwise(bands))
    colours = [(str(a), str(b)) for a, b in colours]
    for a, b in colours:
        if a not in index or b not in index:
            raise ValueError(f"colour {a}-{b} uses a band not in {bands}")
    zp = np.zeros(len(bands)) if zeropoints is None else np.asarray(zeropoints, float)
    if zp.shape != (len(bands),):
        raise ValueError(f"need one zeropoint per band ({len(bands)}), got {zp.shape}")

    table = Table()
    table["source"] = np.arange(flat.shape[1])
    for b in bands:
        _add_summary(table, f"flux_{b}", flat[:, :, index[b]], levels, u.electron)
    for a, b in colours:
        fa, fb = flat[:, :, index[a]], flat[:, :, index[b]]
        valid = (fa > 0) & (fb > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            colour = -2.5 * np.log10(np.where(valid, fa / np.where(valid, fb, 1.0), np.nan))
        _add_summary(table, f"{a}-{b}", colour + (zp[index[a]] - zp[index[b]]), levels, u.mag)
    table.meta["intervals"] = levels
    table.meta["interval_kind"] = "equal-tailed"
    table.meta["n_draws"] = int(flat.shape[0])
    return table


def _add_summary(table: Table, name: str, draws: np.ndarray, levels, unit) -> None:
    """Mean, sd and equal-tailed intervals of ``draws (n_draws, n_sources)`` (NaN-aware)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        table[name] = np.nanmean(draws, axis=0) * unit
        table[f"{name}_sd"] = np.nanstd(draws, axis=0, ddof=1) * unit
        for g in levels:
            lo, hi = np.nanquantile(draws, [(1 - g) / 2, (1 + g) / 2], axis=0)
            pct = _percent(g)
            table[f"{name}_lo{pct}"] = lo * unit
            table[f"{name}_hi{pct}"] = hi * unit


def _percent(level: float) -> str:
    """``0.68 -> '68'``, ``0.955 -> '95.5'``."""
    return f"{100 * level:.10g}"


# --------------------------------------------------------------------------------------------
# Per-pixel posterior moments of decoded stamps
# --------------------------------------------------------------------------------------------
class PixelMoments(NamedTuple):
    """Per-source, per-pixel posterior moments of the decoded stamps.

    Attributes
    ----------
    mean
        Posterior mean stamp, ``(n_sources, bands, S, S)``, electrons.
    std
        Posterior standard deviation per pixel (``ddof=1``), same shape.
    count
        Number of draws accumulated.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int


def pixel_std_maps(
    latents: az.InferenceData | ArrayLike,
    prior: GalaxyModel,
    *,
    site: str = "z",
    batch_size: int = 64,
    max_draws: int | None = None,
) -> PixelMoments:
    r"""Per-pixel posterior mean and standard deviation of each source's decoded stamp.

    With draws :math:`z^{(s)}_i` of source :math:`i`'s latent, the stamps
    :math:`x^{(s)}_i = f(z^{(s)}_i)` are decoded ``batch_size`` draws at a time, and each
    batch's moments are merged into running ones (Chan, Golub & LeVeque 1979; Welford's
    update for batches), in float64: for running count, mean and sum of squared deviations
    :math:`(n_A, \bar x_A, M_A)` and a batch's :math:`(n_B, \bar x_B, M_B)`,

    .. math::

        n = n_A + n_B, \quad \delta = \bar x_B - \bar x_A, \quad
        \bar x = \bar x_A + \delta\,\frac{n_B}{n}, \quad
        M = M_A + M_B + \delta^2 \frac{n_A n_B}{n},

    and finally :math:`\mathrm{sd} = \sqrt{M / (n - 1)}`. Memory: one batch of stamps,
    ``batch_size x n_sources x B x S x S`` floats, whatever the number of draws.

    Parameters
    ----------
    latents
        An InferenceData with a posterior variable ``site`` of shape
        ``(chain, draw, n_sources, d)``, or an array ``(..., n_sources, d)`` whose leading
        axes are draws.
    prior
        Anything with ``decode(z) -> (..., B, S, S)`` (a pytree such as
        :class:`~madness_ppl.prior.GalaxyPrior` or :class:`~madness_ppl.toy.LinearGaussianPrior`).
    site
        Latent variable name in ``latents`` (InferenceData only).
    batch_size
        Draws decoded per batch (one compiled program; the last batch is padded).
    max_draws
        Use at most this many draws, evenly spaced (thinning), e.g. to bound the cost.

    Returns
    -------
    PixelMoments
        ``mean`` and ``std`` of shape ``(n_sources, B, S, S)`` (float64), and ``count``.

    Examples
    --------
    >>> import jax, numpy as np
    >>> from madness_ppl.toy import LinearGaussianPrior
    >>> prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=2, stamp_size=9,
    ...                                    latent_dim=3)
    >>> z = np.random.default_rng(0).normal(size=(500, 2, 3))  # 500 draws, 2 sources
    >>> maps = pixel_std_maps(z, prior, batch_size=128)
    >>> maps.std.shape, maps.count
    ((2, 2, 9, 9), 500)
    """
    if isinstance(latents, az.InferenceData):
        draws = np.asarray(latents.posterior[site])
    else:
        draws = np.asarray(latents)
    if draws.ndim < 3:
        raise ValueError(f"latents must be (..., n_sources, d) with draws first, got {draws.shape}")
    draws = draws.reshape(-1, *draws.shape[-2:])
    if max_draws is not None and draws.shape[0] > max_draws:
        keep = np.linspace(0, draws.shape[0] - 1, int(max_draws)).round().astype(int)
        draws = draws[keep]
    total = draws.shape[0]
    if total < 2:
        raise ValueError("need at least two draws for a standard deviation")
    batch_size = max(1, min(int(batch_size), total))

    count, mean, m2 = 0, None, None
    for first in range(0, total, batch_size):
        chunk = draws[first : first + batch_size]
        size = chunk.shape[0]
        weight = np.zeros(batch_size, chunk.dtype)
        weight[:size] = 1.0
        if size < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - size, 0)])
        b_mean, b_m2 = (np.asarray(x, np.float64) for x in _batch_moments(prior, chunk, weight))
        if mean is None:
            count, mean, m2 = size, b_mean, b_m2
            continue
        n = count + size
        delta = b_mean - mean
        mean = mean + delta * (size / n)
        m2 = m2 + b_m2 + delta**2 * (count * size / n)
        count = n
    return PixelMoments(mean=mean, std=np.sqrt(m2 / (count - 1)), count=count)


@jax.jit
def _batch_moments(
    prior: GalaxyModel, z: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted mean and sum of squared deviations of the decoded stamps of one batch."""
    stamps = prior.decode(z)  # (k, n, B, S, S)
    w = weight.astype(stamps.dtype).reshape(-1, *([1] * (stamps.ndim - 1)))
    n = jnp.sum(w)
    mean = jnp.sum(w * stamps, axis=0) / n
    m2 = jnp.sum(w * (stamps - mean) ** 2, axis=0)
    return mean, m2
