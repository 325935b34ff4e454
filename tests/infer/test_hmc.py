"""Tests of sample_posterior: exact posterior of the linear-Gaussian toy blend, layout, bad input.

Monte Carlo tolerances come from the effective sample size of each checked moment: for a
standardised component :math:`u = (z - \\mu) / \\sigma` of the exact posterior, the sample
mean of :math:`u` (and of products :math:`u_i u_j`, whose expectation is the exact
correlation :math:`\\rho_{ij}`) has Monte Carlo standard error
:math:`\\mathrm{sd} / \\sqrt{\\mathrm{ESS}}` with the ESS of that very series, and every
estimate must lie within ``K_SIGMA`` standard errors (two-sided ``4.5``: a false alarm
probability of ~7e-6 per moment, < 1e-3 over the 90 moments of a test).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import potential_energy

from madness_ppl.infer import (
    MAPResult,
    callback_potential,
    flux_table,
    pixel_std_maps,
    sample_posterior,
    summarize_diagnostics,
)
from madness_ppl.infer.gradient import usable_cpus
from madness_ppl.prior import FlowConfig, GalaxyPrior, NetworkConfig, PriorConfig
from madness_ppl.scene import blend_model, default_variance, place_stamps
from madness_ppl.toy import LinearGaussianPrior, linear_gaussian_posterior

B, S, H, W, D = 2, 15, 32, 32, 4
POSITIONS = np.array([[12.3, 14.1], [17.6, 16.2], [14.0, 19.5]])  # three overlapping sources
K_SIGMA = 4.5


def make_blend(seed: int = 0):
    """A noisy blend drawn from the toy model."""
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=D)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(POSITIONS), D))
    image = place_stamps(prior.decode(jnp.asarray(z)), POSITIONS, (H, W), subpixel=False)
    variance = default_variance(image, 100.0)
    field = image + jnp.sqrt(variance) * rng.normal(size=image.shape).astype(np.float32)
    return prior, jnp.asarray(POSITIONS, jnp.float32), field, variance


@pytest.fixture(scope="module")
def blend():
    """Toy blend and a MAPResult at the exact posterior mode (= mean: the posterior is Gaussian)."""
    prior, positions, field, variance = make_blend(0)
    mode = linear_gaussian_posterior(field, positions, variance, prior).mean
    nan = jnp.asarray(jnp.nan)
    result = MAPResult(
        params={"z": mode},
        deterministics={},
        loss=nan,
        loss_history=jnp.full(1, jnp.nan),
        n_steps=jnp.asarray(0),
        converged=jnp.asarray(True),
        chi2=nan,
        n_pixels=jnp.asarray(field.size),
        observed={},
    )
    return prior, positions, field, variance, result


def mcse_check(draws: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> dict:
    """Standardised errors of the posterior mean and covariance in units of their MCSE.

    ``draws`` is ``(chain, draw, p)``; returns the largest ``|error| / MCSE`` of the means and
    of the ``p (p + 1) / 2`` second moments, and the smallest ESS involved.
    """
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    u = (draws - mean) / sd
    i, j = np.triu_indices(u.shape[-1])
    prod = u[..., i] * u[..., j]
    out = {}
    for name, series, target in (("mean", u, 0.0), ("cov", prod, corr[i, j])):
        ess = np.asarray(az.ess(az.convert_to_dataset(series), method="mean")["x"])
        mcse = series.reshape(-1, series.shape[-1]).std(0) / np.sqrt(ess)
        err = series.mean(axis=(0, 1)) - target
        out[name] = float(np.max(np.abs(err) / mcse))
        out[f"{name}_min_ess"] = float(ess.min())
    return out


# ------------------------------------------------------------------------------ exact answer
@pytest.mark.parametrize(
    ("backend", "num_chains", "num_samples"), [("numpyro", 1, 3000), ("blackjax", 2, 1500)]
)
def test_posterior_mean_and_covariance_match_closed_form(blend, backend, num_chains, num_samples):
    prior, positions, field, variance, result = blend
    exact = linear_gaussian_posterior(field, positions, variance, prior)
    idata = sample_posterior(
        blend_model,
        field,
        positions,
        variance,
        prior,
        init=result,
        backend=backend,
        num_warmup=300,
        num_samples=num_samples,
        num_chains=num_chains,
        seed=1,
    )
    assert set(idata.posterior.data_vars) == {"z", "flux"}  # default: latents + flux
    assert idata.posterior["z"].dims == ("chain", "draw", "sources", "z_dim_1")
    draws = np.asarray(idata.posterior["z"], np.float64).reshape(num_chains, num_samples, -1)
    check = mcse_check(
        draws, np.asarray(exact.mean).reshape(-1), np.asarray(exact.covariance, np.float64)
    )
    # Enough draws for the MCSE to be a reliable yardstick, and agreement within K_SIGMA.
    assert check["mean_min_ess"] > 400 and check["cov_min_ess"] > 400, check
    assert check["mean"] < K_SIGMA and check["cov"] < K_SIGMA, check
    diag = summarize_diagnostics(idata, warn=False)
    assert diag.ok and diag.divergences == 0
    assert num_chains == 1 or diag.max_rhat < 1.01


# ------------------------------------------------------------------------------ layout
def test_inference_data_layout_and_kept_sites(blend):
    prior, positions, field, variance, result = blend
    idata = sample_posterior(
        blend_model,
        field,
        positions,
        variance,
        prior,
        init=result.params,
        num_warmup=100,
        num_samples=50,
        keep=("flux", "model_image"),
        coords={"band": ["g", "r"]},
        diagnose=False,
    )
    post = idata.posterior
    assert set(post.data_vars) == {"z", "flux", "model_image"}
    assert post["z"].dims == ("chain", "draw", "sources", "z_dim_1")
    assert post["flux"].dims == ("chain", "draw", "sources", "band")
    assert post["model_image"].shape == (1, 50, B, H, W)
    assert list(post["band"].values) == ["g", "r"]
    # flux is the sum of each decoded stamp, per band
    stamps = prior.decode(jnp.asarray(post["z"].values[0]))
    np.testing.assert_allclose(post["flux"].values[0], stamps.sum(axis=(-1, -2)), rtol=1e-4)
    stats = idata.sample_stats
    assert set(stats.data_vars) == {
        "diverging",
        "tree_depth",
        "n_steps",
        "energy",
        "step_size",
        "acceptance_rate",
        "lp",
    }
    assert stats["diverging"].dtype == bool
    # tree depth d <=> 2^(d-1) <= n_steps <= 2^d - 1
    depth, steps = stats["tree_depth"].values, stats["n_steps"].values
    assert np.all((2 ** (depth - 1) <= steps) & (steps <= 2**depth - 1))
    np.testing.assert_array_equal(idata.observed_data["obs"].values, np.asarray(field))
    assert post.attrs["inference_library"] == "numpyro" and post.attrs["gradient"] == "inline"


def test_callback_potential_matches_inline(blend):
    prior, positions, field, variance, result = blend
    args = (field, positions, variance, prior)
    potential = jax.jit(lambda u: potential_energy(blend_model, args, {}, u))
    u = dict(result.params)
    wrapped = callback_potential(potential)
    v0, g0 = jax.jit(jax.value_and_grad(potential))(u)
    v1, g1 = jax.jit(jax.value_and_grad(wrapped))(u)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(
        g1["z"], g0["z"], rtol=1e-5, atol=1e-5 * float(jnp.abs(g0["z"]).max())
    )
    # under vmap the callback runs once per element
    batch = {"z": jnp.stack([u["z"], u["z"] + 0.1])}
    np.testing.assert_allclose(jax.vmap(wrapped)(batch), jax.vmap(potential)(batch), rtol=1e-6)


def test_conv_prior_uses_callback_gradient_on_cpu():
    prior = GalaxyPrior.init(
        jax.random.key(3),
        PriorConfig(
            bands=("g", "r"),
            stamp_size=15,
            network=NetworkConfig.tiny(),
            flow=FlowConfig(latent_dim=3, n_layers=2, hidden=(8,)),
        ),
    )
    positions = jnp.array([[10.0, 11.0], [15.0, 12.0]])
    z = jax.random.normal(jax.random.key(4), (2, 3))
    image = place_stamps(prior.decode(z), positions, (24, 24))
    variance = default_variance(image, 1.0e3)
    field = image + jnp.sqrt(variance) * jax.random.normal(jax.random.key(5), image.shape)
    idata = sample_posterior(
        blend_model,
        field,
        positions,
        variance,
        prior,
        init={"z": z},
        num_warmup=30,
        num_samples=10,
        diagnose=False,
    )
    # auto: CPU + convolutions (+ a second CPU for the callback's program)
    expected = "callback" if usable_cpus() >= 2 else "inline"
    assert idata.posterior.attrs["gradient"] == expected
    assert np.all(np.isfinite(idata.posterior["flux"].values))


def test_one_cpu_falls_back_to_inline_gradient(monkeypatch):
    """With one usable CPU the callback would deadlock: auto goes inline, callback is refused."""
    import madness_ppl.infer.gradient as gradient_module

    monkeypatch.setattr(gradient_module, "usable_cpus", lambda: 1)
    potential = lambda u: jnp.sum(u["x"] ** 2)  # noqa: E731
    example = {"x": jnp.ones(3)}
    assert not gradient_module.use_callback("auto", potential, example)
    with pytest.raises(ValueError, match="needs at least two CPUs"):
        gradient_module.use_callback("callback", potential, example)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_sampling_a_conv_prior_pinned_to_one_cpu_finishes():
    """Regression: pinned to one core, NUTS on a convolutional prior hung forever (callback)."""
    script = textwrap.dedent(
        """
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        import jax, jax.numpy as jnp
        from madness_ppl.infer import sample_posterior
        from madness_ppl.prior import FlowConfig, GalaxyPrior, NetworkConfig, PriorConfig
        from madness_ppl.scene import blend_model, default_variance, place_stamps
        net = NetworkConfig(bands=1, stamp_size=11, latent_dim=2, encoder_channels=(4,),
                            encoder_dense=8, decoder_dense=8, decoder_channels=(4,))
        prior = GalaxyPrior.init(jax.random.key(0), PriorConfig(bands=("r",), stamp_size=11,
                                 network=net, flow=FlowConfig(latent_dim=2, n_layers=1, hidden=(4,))))
        positions = jnp.array([[8.0, 8.0]])
        image = place_stamps(prior.decode(jnp.zeros((1, 2))), positions, (16, 16))
        variance = default_variance(image, 1.0)
        idata = sample_posterior(blend_model, image, positions, variance, prior,
                                 init={"z": jnp.zeros((1, 2))}, num_warmup=5, num_samples=5,
                                 diagnose=False)
        print("gradient", idata.posterior.attrs["gradient"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gradient inline" in out.stdout


# ------------------------------------------------------------------------------ bad input
def test_unconverged_map_warns_and_bad_diagnostics_warn(blend):
    prior, positions, field, variance, result = blend
    unconverged = result._replace(converged=jnp.asarray(False))
    with pytest.warns(UserWarning) as record:
        sample_posterior(
            blend_model,
            field,
            positions,
            variance,
            prior,
            init=unconverged,
            num_warmup=20,
            num_samples=10,
        )
    messages = [str(w.message) for w in record]
    assert any("did not converge" in m for m in messages)
    assert any("NUTS diagnostics" in m and "ESS" in m for m in messages)


def test_non_finite_data_names_the_observed_site(blend):
    prior, positions, field, variance, result = blend
    bad = field.at[0, 5, 5].set(jnp.nan)
    with pytest.raises(ValueError, match=r"not finite .* site\(s\) 'obs'"):
        sample_posterior(blend_model, bad, positions, variance, prior, init=result)


def test_bad_starting_point_names_the_site():
    def model(y):
        scale = numpyro.sample("scale", dist.Uniform(0.0, 1.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("penalty", jnp.where(mu > 5.0, -jnp.inf, 0.0))
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)

    y = jnp.ones(3)
    with pytest.raises(ValueError, match=r"site\(s\) \['scale'\] lies outside the support"):
        sample_posterior(model, y, init={"scale": 2.0, "mu": 0.0})
    with pytest.raises(ValueError, match=r"not finite .* site\(s\) 'penalty'"):
        sample_posterior(model, y, init={"scale": 0.5, "mu": 6.0})


def test_options_are_checked(blend):
    prior, positions, field, variance, result = blend
    args = (blend_model, field, positions, variance, prior)
    with pytest.raises(ValueError, match="padded source"):
        sample_posterior(*args, source_mask=jnp.array([True, True, False]))
    with pytest.raises(ValueError, match="not deterministic sites"):
        sample_posterior(*args, init=result, keep=("fluxes",), num_warmup=5, num_samples=5)
    with pytest.raises(ValueError, match="not latent sample sites"):
        sample_posterior(*args, init={"w": jnp.zeros((3, D))})
    with pytest.raises(ValueError, match="batched MAPResult"):
        batched = jax.tree.map(lambda x: jnp.stack([x, x]), result)
        sample_posterior(*args, init=batched)
    with pytest.raises(ValueError, match="backend"):
        sample_posterior(*args, backend="stan")


# ------------------------------------------------------------------------------ summaries
def test_flux_table_columns_units_and_colours():
    rng = np.random.default_rng(0)
    flux = np.exp(rng.normal(np.log([[[100.0, 250.0, 400.0]]]), 0.1, size=(2, 4000, 2, 3)))
    flux[0, 0, 1, 0] = -1.0  # a non-positive draw is left out of the colours only
    idata = az.from_dict(posterior={"flux": flux})
    table = flux_table(idata, ["g", "r", "i"], zeropoints=[28.0, 27.0, 27.5])
    assert len(table) == 2 and table.meta["intervals"] == [0.68, 0.9]
    for name in ("flux_r", "flux_r_sd", "flux_r_lo68", "flux_r_hi90", "g-r", "r-i_hi68"):
        assert name in table.colnames
    assert str(table["flux_g"].unit) == "electron" and str(table["g-r"].unit) == "mag"
    draws = flux.reshape(-1, 2, 3)
    np.testing.assert_allclose(table["flux_i"], draws[..., 2].mean(0))
    np.testing.assert_allclose(table["flux_i_lo90"], np.quantile(draws[..., 2], 0.05, axis=0))
    # colour g - r = -2.5 log10(100 / 250) + (28 - 27) = 1.995
    np.testing.assert_allclose(table["g-r"], 1.0 + 2.5 * np.log10(2.5), atol=0.01)
    assert np.all(table["flux_g_lo68"] < table["flux_g"]) and np.all(
        table["flux_g"] < table["flux_g_hi68"]
    )
    with pytest.raises(ValueError, match="bands"):
        flux_table(idata, ["g", "r"])


def test_flux_table_adds_systematic_errors_in_quadrature():
    rng = np.random.default_rng(1)
    flux = rng.normal([[[100.0, 300.0]]], [[[3.0, 4.0]]], size=(2, 20000, 1, 2))
    idata = az.from_dict(posterior={"flux": flux})
    plain = flux_table(idata, ["g", "r"])
    wider = flux_table(idata, ["g", "r"], systematic=[[4.0, 0.0]])
    np.testing.assert_allclose(wider["flux_g_sd"], np.hypot(plain["flux_g_sd"], 4.0), rtol=0.02)
    np.testing.assert_array_equal(wider["flux_r_sd"], plain["flux_r_sd"])  # 0: unchanged
    np.testing.assert_allclose(wider["flux_g"], plain["flux_g"], atol=0.1)
    half = wider["flux_g_hi68"] - wider["flux_g"]  # Gaussian: 68 % half-width = sd (5)
    np.testing.assert_allclose(half, 5.0 * 0.994, rtol=0.03)
    for bad in ([[4.0]], [[-1.0, 0.0]], [[np.nan, 0.0]]):
        with pytest.raises(ValueError, match="systematic"):
            flux_table(idata, ["g", "r"], systematic=bad)


def test_pixel_std_maps_streaming_matches_direct():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=9, latent_dim=D)
    z = np.random.default_rng(1).normal(size=(2, 150, 3, D)).astype(np.float32)
    stamps = np.asarray(prior.decode(z.reshape(-1, 3, D)), np.float64)
    idata = az.from_dict(posterior={"z": z})
    maps = pixel_std_maps(idata, prior, batch_size=64)  # 300 = 4 x 64 + 44: padded last batch
    assert maps.count == 300 and maps.std.shape == (3, B, 9, 9)
    np.testing.assert_allclose(maps.mean, stamps.mean(0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(maps.std, stamps.std(0, ddof=1), rtol=1e-4, atol=1e-3)
    # Linear decoder: per-pixel sd of W z + b for z ~ N(0, I) is the row norm of W.
    exact = np.linalg.norm(np.asarray(prior.weight), axis=1).reshape(B, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = pixel_std_maps(
            np.random.default_rng(2).normal(size=(4000, 1, D)), prior, batch_size=512
        )
    np.testing.assert_allclose(big.std[0], exact, rtol=0.05, atol=1e-3 * exact.max())


def test_model_without_latent_sites_is_refused():
    import numpyro
    import numpyro.distributions as dist

    from madness_ppl.errors import MadnessInputError

    def fixed(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(MadnessInputError, match="no latent sample site"):
        sample_posterior(fixed, jnp.ones(3), num_warmup=5, num_samples=5)


# ------------------------------------------------------------------------------ mass matrix
def test_laplace_mass_matrix_whitens_the_blend_and_matches_closed_form(blend):
    """The Laplace covariance as a fixed inverse mass matrix: exact draws, short trajectories."""
    from madness_ppl.uncertainty import laplace_flux_errors

    prior, positions, field, variance, result = blend
    exact = linear_gaussian_posterior(field, positions, variance, prior)
    laplace = laplace_flux_errors(prior, result.params["z"], positions, variance)
    np.testing.assert_allclose(laplace.covariance, exact.covariance, rtol=2e-3, atol=1e-6)
    idata = sample_posterior(
        blend_model,
        field,
        positions,
        variance,
        prior,
        init=result,
        inverse_mass_matrix=laplace.covariance,
        adapt_mass_matrix=False,
        num_warmup=300,
        num_samples=800,
        num_chains=2,
        seed=3,
    )
    assert idata.posterior.attrs["mass_matrix"] == "given"
    assert idata.posterior.attrs["dense_mass"] == 1
    draws = np.asarray(idata.posterior["z"], np.float64).reshape(2, 800, -1)
    check = mcse_check(
        draws, np.asarray(exact.mean).reshape(-1), np.asarray(exact.covariance, np.float64)
    )
    assert check["mean"] < K_SIGMA and check["cov"] < K_SIGMA, check
    # white target: near-independent draws from short trajectories (measured: min ESS of the
    # means ~2300 of 1600 draws, 6.5 leapfrog steps per draw, step size 0.72)
    assert check["mean_min_ess"] > 1000, check
    assert float(idata.sample_stats["n_steps"].mean()) < 12
    diag = summarize_diagnostics(idata, warn=False)
    assert diag.ok and diag.max_rhat < 1.01


#: chains that cannot reach the posterior: a far start, a mass matrix 10^6 too small, no warm-up
STUCK = dict(
    init={"mu": 40.0},
    inverse_mass_matrix=np.array([1e-6]),
    adapt_mass_matrix=False,
    num_warmup=0,
    num_chains=2,
    max_tree_depth=4,
)


def test_failed_mixing_warns_with_r_hat():
    """Chains that have not reached the posterior (far start, a mass matrix 10^6 too small, no
    warm-up) are flagged by split R-hat and ESS, and sample_posterior says so."""

    with pytest.warns(UserWarning, match=r"NUTS diagnostics: .*R-hat") as record:
        idata = sample_posterior(_normal_mean_model, jnp.zeros(4), num_samples=100, **STUCK)
    assert summarize_diagnostics(idata, warn=False).max_rhat > 1.1
    assert any("ESS" in str(w.message) for w in record)
    message = str(record[0].message)  # names the site and the remedies
    assert "R-hat" in message and " at mu" in message
    assert "converge_on=" in message and "max_extensions=" in message


def test_diagnostics_name_the_worst_component():
    """With a vector site, the warning points at the component that has not mixed (here
    z[1, 2], whose two chains sit 3 sd apart), not only at a number."""
    import arviz as az

    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 400, 3, 4))
    z[1, :, 1, 2] += 3.0
    sky = rng.normal(size=(2, 400))
    idata = az.from_dict(posterior={"z": z, "sky": sky})
    with pytest.warns(UserWarning, match=r"R-hat \d\.\d+ > 1\.01 at z\[1, 2\]"):
        diag = summarize_diagnostics(idata, var_names=["z", "sky"])
    assert diag.max_rhat > 1.5


def test_mass_matrix_is_checked(blend):
    prior, positions, field, variance, result = blend
    args = (blend_model, field, positions, variance, prior)
    k = len(POSITIONS) * D
    with pytest.raises(ValueError, match=rf"shape \({k},\) or \({k}, {k}\)"):
        sample_posterior(*args, init=result, inverse_mass_matrix=np.eye(k + 1))
    with pytest.raises(ValueError, match="positive definite"):
        sample_posterior(*args, init=result, inverse_mass_matrix=-np.eye(k))
    with pytest.raises(ValueError, match="non-finite"):
        sample_posterior(*args, init=result, inverse_mass_matrix=np.full(k, np.nan))
    with pytest.raises(ValueError, match="backend='numpyro'"):
        sample_posterior(*args, init=result, backend="blackjax", inverse_mass_matrix=np.ones(k))


def _normal_mean_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _compiled_counts() -> tuple[int, ...]:
    from madness_ppl.infer import backends, draws, gradient, start

    programs = (
        backends._numpyro_chain,
        backends._numpyro_more,
        backends._blackjax_warmup,
        backends._blackjax_sample,
        draws._constrained,
        start._start_terms,
        gradient._value_and_grad,
    )
    return tuple(p._cache_size() for p in programs)


@pytest.mark.parametrize(
    ("backend", "gradient", "n"),
    [("numpyro", "inline", 7), ("numpyro", "callback", 9), ("blackjax", "inline", 11)],
)
def test_a_second_field_of_the_same_shape_reuses_the_compiled_programs(backend, gradient, n):
    """New data of the same shape: no new compilation, and the draws follow the new data
    (exact posterior of a normal mean, prior N(0, 10^2), unit noise)."""
    if gradient == "callback" and usable_cpus() < 2:
        pytest.skip("the callback gradient needs two CPUs")
    rng = np.random.default_rng(3)
    options = dict(
        backend=backend, gradient=gradient, num_warmup=150, num_samples=300, diagnose=False
    )
    fresh = _compiled_counts()  # n is this case's own shape: nothing compiled for it yet
    sample_posterior(_normal_mean_model, jnp.asarray(rng.normal(size=n), jnp.float32), **options)
    first = _compiled_counts()
    assert first != fresh
    y = jnp.asarray(5.0 + rng.normal(size=n), jnp.float32)
    idata = sample_posterior(_normal_mean_model, y, seed=1, **options)
    assert _compiled_counts() == first
    precision = n + 1e-2
    mean, sd = float(y.sum()) / precision, precision**-0.5
    draws = idata.posterior["mu"].values.ravel()
    ess = float(az.ess(idata, var_names=["mu"])["mu"])
    assert abs(draws.mean() - mean) < K_SIGMA * sd / np.sqrt(ess)


def test_callback_data_is_bound_for_one_run_at_a_time():
    from madness_ppl.infer.gradient import CallbackPotential, callback_data

    def potential(data, u):
        return jnp.sum(data[0] * u["x"] ** 2)

    wrapped = CallbackPotential(potential)
    u, data = {"x": jnp.arange(3.0)}, [jnp.full(3, 2.0)]
    with pytest.raises(RuntimeError, match="outside callback_data"):
        jax.grad(wrapped, argnums=1)(data, u)
    with callback_data(potential, data):
        np.testing.assert_allclose(jax.grad(wrapped, argnums=1)(data, u)["x"], [0.0, 4.0, 8.0])
        with (
            pytest.raises(RuntimeError, match="already in progress"),
            callback_data(potential, data),
        ):
            pass


@pytest.mark.parametrize("chain_method", ["sequential", "vectorized"])
def test_the_numpyro_progress_bar_reaches_its_total(monkeypatch, chain_method):
    import contextlib

    from madness_ppl.infer import backends

    ticks, totals, waiting = [], [], []

    @contextlib.contextmanager
    def counter(enabled, description, total, transient=False, until_first=None):
        totals.append(total)
        waiting.append(until_first)
        yield ticks.append

    monkeypatch.setattr(backends, "progress_counter", counter)
    sample_posterior(
        _normal_mean_model,
        jnp.ones(5),
        num_chains=3,
        chain_method=chain_method,
        num_warmup=20,
        num_samples=30,
        progress=True,
        diagnose=False,
    )
    assert totals == [150] and sum(ticks) == 150
    assert "compiling" in waiting[0]  # the bar says what it waits for before the first draw


@pytest.mark.parametrize(
    ("backend", "chain_method"),
    [("numpyro", "sequential"), ("numpyro", "vectorized"), ("blackjax", "sequential")],
)
def test_extensions_continue_the_same_chains_until_they_mix(backend, chain_method):
    """A block too short for the ESS asked for is extended: the first block is the run without
    extensions draw for draw, every block continues its chains (no new warm-up, nothing
    recompiled for a second extended run), and all blocks sample the exact posterior."""
    from madness_ppl.infer import backends

    y = jnp.arange(6.0)
    options = dict(
        backend=backend,
        chain_method=chain_method,
        num_warmup=100,
        num_samples=25,
        num_chains=2,
        diagnose=False,
    )
    plain = sample_posterior(_normal_mean_model, y, **options)
    extended = sample_posterior(
        _normal_mean_model, y, max_extensions=20, min_ess_per_chain=100.0, **options
    )
    blocks = extended.posterior.attrs["blocks"]
    draws = extended.posterior["mu"].values
    assert 1 < blocks <= 21 and draws.shape == (2, 25 * blocks)
    assert extended.sample_stats["lp"].shape == (2, 25 * blocks)
    np.testing.assert_array_equal(draws[:, :25], plain.posterior["mu"].values)
    ess = float(az.ess(extended, var_names=["mu"])["mu"])
    # it stopped because the chains mixed (the ESS asked for: 100 per chain), not at the cap
    assert blocks < 21 and ess >= 200, (blocks, ess)
    # the step size adapted in warm-up is kept by every later block
    steps = extended.sample_stats["step_size"].values
    np.testing.assert_allclose(steps, steps[:, :1] * np.ones_like(steps))
    precision = 6 + 1e-2
    mean, sd = float(y.sum()) / precision, precision**-0.5
    assert abs(draws.mean() - mean) < K_SIGMA * sd / np.sqrt(ess)
    compiled = (backends._numpyro_more._cache_size(), backends._blackjax_sample._cache_size())
    sample_posterior(
        _normal_mean_model, y + 1.0, max_extensions=1, min_ess_per_chain=1e6, **options
    )
    assert (backends._numpyro_more._cache_size(), backends._blackjax_sample._cache_size()) == (
        compiled
    )


def test_mixed_chains_are_not_extended_and_stuck_ones_stop_at_the_limit():
    y = jnp.arange(4.0)
    enough = sample_posterior(
        _normal_mean_model,
        y,
        num_warmup=200,
        num_samples=1000,
        num_chains=2,
        max_extensions=3,
        min_ess_per_chain=50.0,
    )
    assert enough.posterior.attrs["blocks"] == 1
    assert summarize_diagnostics(enough, min_ess_per_chain=50.0, warn=False).ok
    with pytest.warns(UserWarning, match=r"NUTS diagnostics: .*R-hat"):
        stuck = sample_posterior(_normal_mean_model, y, num_samples=50, max_extensions=2, **STUCK)
    assert stuck.posterior.attrs["blocks"] == 3 and stuck.posterior.sizes["draw"] == 150


def test_extension_options_are_checked():
    y = jnp.arange(4.0)
    with pytest.raises(ValueError, match=r"converge_on names \['flux'\]"):
        sample_posterior(_normal_mean_model, y, converge_on=("flux",), num_samples=10)
    with pytest.raises(ValueError, match="max_extensions must be >= 0"):
        sample_posterior(_normal_mean_model, y, max_extensions=-1, num_samples=10)
