"""Tests of the scene building blocks: placement, likelihood, padding and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

from madness_ppl.scene import (
    blend_model,
    bucket_size,
    default_variance,
    galaxy_latents,
    gaussian_likelihood,
    pad_sources,
    place_stamps,
    prepare_blend,
    validate_scene_inputs,
)
from madness_ppl.toy import LinearGaussianPrior

B, S, H, W = 2, 15, 32, 32


def gaussian_stamps(n: int, sigma: float = 1.8, size: int = S) -> jax.Array:
    """Smooth, well-sampled stamps with different fluxes per source and band."""
    c = jnp.arange(size) - size // 2
    yy, xx = jnp.meshgrid(c, c, indexing="ij")
    profile = jnp.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    flux = 100.0 * (1.0 + jnp.arange(n * B, dtype=float).reshape(n, B))
    return flux[:, :, None, None] * profile / profile.sum()


def centroid(image: jax.Array) -> tuple[float, float]:
    """(x, y) first moment of a 2-D image."""
    i, j = jnp.meshgrid(jnp.arange(image.shape[0]), jnp.arange(image.shape[1]), indexing="ij")
    total = image.sum()
    return float((image * j).sum() / total), float((image * i).sum() / total)


# ------------------------------------------------------------------------------- place_stamps
@pytest.mark.parametrize("subpixel", [False, True])
def test_flux_is_conserved_for_inner_sources(subpixel):
    stamps = gaussian_stamps(3)
    positions = jnp.array([[10.2, 11.7], [20.5, 15.0], [15.9, 21.3]])
    image = place_stamps(stamps, positions, (H, W), subpixel=subpixel)
    np.testing.assert_allclose(image.sum((1, 2)), stamps.sum((0, 2, 3)), rtol=1e-5)


def test_integer_position_equals_manual_slicing():
    stamps = jax.random.normal(jax.random.key(1), (1, B, S, S))
    x, y = 11, 19  # column, row
    image = place_stamps(stamps, jnp.array([[x, y]], float), (H, W), subpixel=False)
    expected = (
        jnp.zeros((B, H, W))
        .at[:, y - S // 2 : y + S // 2 + 1, x - S // 2 : x + S // 2 + 1]
        .set(stamps[0])
    )
    np.testing.assert_array_equal(image, expected)
    # Rounding: a position within half a pixel lands on the same pixel.
    image2 = place_stamps(stamps, jnp.array([[x + 0.4, y - 0.4]]), (H, W), subpixel=False)
    np.testing.assert_array_equal(image2, expected)


@pytest.mark.parametrize(
    "x, y",
    [
        (0.0, 3.0),
        (31.0, 30.0),
        (2.0, 0.0),
        (-0.5, -0.5),
        (31.4, 31.4),
        (100.0, 5.0),
        (-40.0, -40.0),
    ],
)
def test_stamp_partly_or_wholly_outside_keeps_exactly_the_infield_part(x, y):
    stamps = jax.random.normal(jax.random.key(2), (1, B, S, S))
    image = place_stamps(stamps, jnp.array([[x, y]]), (H, W), subpixel=False)
    # Reference: place on a big canvas, then crop.
    pad = 2 * S + 100
    big = jnp.zeros((B, H + 2 * pad, W + 2 * pad))
    iy, ix = int(np.floor(y + 0.5)) + pad, int(np.floor(x + 0.5)) + pad
    big = big.at[:, iy - S // 2 : iy + S // 2 + 1, ix - S // 2 : ix + S // 2 + 1].set(stamps[0])
    np.testing.assert_array_equal(image, big[:, pad : pad + H, pad : pad + W])


def test_host_side_pasting_and_cutting_use_the_fit_s_pixels_at_half_integers():
    """numpy's rint rounds 12.5 to 12 where the fit rounds up to 13: the host-side stamps
    (catalog, flux re-distribution, Laplace errors) must sit on the fitted model's pixels."""
    from madness_ppl.cutouts import extract_cutouts, paste_stamps

    stamps = jax.random.uniform(jax.random.key(5), (3, B, S, S))
    positions = np.array([[12.5, 10.5], [13.5, 20.5], [7.49, 22.51]])
    fitted = np.asarray(place_stamps(stamps, jnp.asarray(positions), (H, W), subpixel=False))
    np.testing.assert_allclose(paste_stamps(stamps, positions, (B, H, W)), fitted, rtol=1e-6)
    alone = place_stamps(stamps[:1], jnp.asarray(positions[:1]), (H, W), subpixel=False)
    np.testing.assert_array_equal(
        extract_cutouts(np.asarray(alone), positions[:1], S)[0], stamps[0]
    )


def test_stamp_larger_than_field_is_clipped():
    stamps = jnp.ones((1, 1, 9, 9))
    image = place_stamps(stamps, jnp.array([[1.0, 2.0]]), (4, 3), subpixel=False)
    np.testing.assert_array_equal(image, jnp.ones((1, 4, 3)))


def test_zero_subpixel_shift_equals_no_shift():
    stamps = gaussian_stamps(2)
    positions = jnp.array([[10.0, 12.0], [20.0, 16.0]])
    a = place_stamps(stamps, positions, (H, W), subpixel=True)
    b = place_stamps(stamps, positions, (H, W), subpixel=False)
    np.testing.assert_allclose(a, b, atol=1e-5 * float(b.max()))


@pytest.mark.parametrize("dx, dy", [(0.5, 0.0), (0.0, 0.5), (0.3, -0.25), (-0.45, 0.4)])
def test_subpixel_shift_moves_the_centroid(dx, dy):
    stamps = gaussian_stamps(1)[:, :1]
    x0, y0 = 15.0, 16.0
    base = place_stamps(stamps, jnp.array([[x0, y0]]), (H, W), subpixel=True)[0]
    moved = place_stamps(stamps, jnp.array([[x0 + dx, y0 + dy]]), (H, W), subpixel=True)[0]
    cx0, cy0 = centroid(base)
    cx1, cy1 = centroid(moved)
    assert cx1 - cx0 == pytest.approx(dx, abs=1e-3)
    assert cy1 - cy0 == pytest.approx(dy, abs=1e-3)
    np.testing.assert_allclose(moved.sum(), base.sum(), rtol=1e-5)


def test_subpixel_is_continuous_across_the_rounding_boundary():
    stamps = gaussian_stamps(1)
    a = place_stamps(stamps, jnp.array([[15.4999, 16.0]]), (H, W))
    b = place_stamps(stamps, jnp.array([[15.5001, 16.0]]), (H, W))
    np.testing.assert_allclose(a, b, atol=1e-3 * float(a.max()))


def test_place_stamps_under_jit_vmap_and_grad():
    stamps = gaussian_stamps(2)
    positions = jnp.array([[10.3, 12.1], [20.6, 16.2]])
    f = jax.jit(lambda s, p: place_stamps(s, p, (H, W)))
    np.testing.assert_allclose(
        f(stamps, positions), place_stamps(stamps, positions, (H, W)), rtol=1e-6
    )
    batch = jax.vmap(f, in_axes=(None, 0))(stamps, jnp.stack([positions, positions + 1.0]))
    assert batch.shape == (2, B, H, W)

    target = place_stamps(stamps, positions + jnp.array([0.2, -0.1]), (H, W))

    def loss(p):
        return jnp.sum((place_stamps(stamps, p, (H, W)) - target) ** 2)

    g = jax.grad(loss)(positions)
    eps = 1e-2
    fd = (loss(positions.at[0, 0].add(eps)) - loss(positions.at[0, 0].add(-eps))) / (2 * eps)
    assert np.all(np.isfinite(g))
    assert float(g[0, 0]) == pytest.approx(float(fd), rel=2e-2)
    gs = jax.grad(lambda s: place_stamps(s, positions, (H, W)).sum())(stamps)
    np.testing.assert_allclose(gs, jnp.ones_like(stamps), rtol=1e-5)


def test_place_stamps_with_no_source_and_nan_position():
    empty = place_stamps(jnp.zeros((0, B, S, S)), jnp.zeros((0, 2)), (H, W))
    np.testing.assert_array_equal(empty, jnp.zeros((B, H, W)))
    nan = place_stamps(gaussian_stamps(1), jnp.array([[jnp.nan, 4.0]]), (H, W), subpixel=False)
    assert nan.shape == (B, H, W) and np.all(np.isfinite(nan))


# ----------------------------------------------------------------------------- model pieces
def test_galaxy_latents_mask_removes_padded_sources_from_the_density():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=3)
    z = jnp.arange(12.0).reshape(4, 3) / 10

    def model(mask):
        galaxy_latents("z", prior.latent_distribution(), 4, source_mask=mask)

    full, _ = log_density(model, (None,), {}, {"z": z})
    masked, _ = log_density(model, (jnp.array([True, True, False, False]),), {}, {"z": z})
    np.testing.assert_allclose(full, prior.log_prob(z).sum(), rtol=1e-6)
    np.testing.assert_allclose(masked, prior.log_prob(z[:2]).sum(), rtol=1e-6)
    assert galaxy_latents("z", prior.latent_distribution(), 0).shape == (0, 3)


def test_gaussian_likelihood_masks_nan_pixels_without_poisoning_gradients():
    field = jnp.ones((B, 4, 5)).at[0, 1, 2].set(jnp.nan).at[1, 3, 3].set(jnp.inf)
    variance = jnp.full((B, 4, 5), 2.0).at[0, 1, 2].set(0.0)
    mask = jnp.isfinite(field)

    def logp(m):
        trace = handlers.trace(
            lambda: gaussian_likelihood("obs", m, field, variance, pixel_mask=mask)
        ).get_trace()
        return trace["obs"]["fn"].log_prob(trace["obs"]["value"])

    model = jnp.full((B, 4, 5), 0.5)
    value, grad = jax.value_and_grad(logp)(model)
    n = int(mask.sum())
    expected = n * (-0.5 * 0.25 / 2.0 - 0.5 * np.log(2 * np.pi * 2.0))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert np.all(np.isfinite(grad))
    assert float(grad[0, 1, 2]) == 0.0 and float(grad[1, 3, 3]) == 0.0


def test_default_variance():
    field = jnp.array([[[-5.0, 10.0]], [[3.0, 0.0]]])
    np.testing.assert_allclose(default_variance(field, 100.0), [[[100.0, 110.0]], [[103.0, 100.0]]])
    np.testing.assert_allclose(
        default_variance(field, jnp.array([1.0, 2.0])), [[[1.0, 11.0]], [[5.0, 2.0]]]
    )


def test_blend_model_sites():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=3)
    positions = jnp.array([[8.0, 9.0], [20.0, 21.0], [0.0, 0.0]])
    mask = jnp.array([True, True, False])
    z = jax.random.normal(jax.random.key(3), (3, 3))
    _, trace = log_density(
        blend_model,
        (jnp.zeros((B, H, W)), positions, jnp.ones((B, H, W)), prior),
        {"source_mask": mask},
        {"z": z},
    )
    stamps = trace["stamps"]["value"]
    assert stamps.shape == (3, B, S, S)
    np.testing.assert_array_equal(stamps[2], 0.0)
    np.testing.assert_allclose(trace["flux"]["value"], stamps.sum((-1, -2)))
    np.testing.assert_allclose(
        trace["model_image"]["value"].sum((1, 2)), stamps.sum((0, 2, 3)), rtol=1e-5
    )
    assert trace["obs"]["is_observed"]


def test_predictive_with_field_none_draws_noisy_fields_of_the_stated_variance():
    """NumPyro's obs=None convention: Predictive simulates fields (prior- and posterior-
    predictive) whose residuals from the model image have the given variance; masked pixels
    of a drawn field are 0."""
    from numpyro.infer import Predictive

    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=3)
    positions = jnp.array([[8.0, 9.0], [20.0, 21.0]])
    variance = jnp.stack([jnp.full((H, W), 4.0), jnp.full((H, W), 25.0)])
    mask = jnp.ones((H, W), bool).at[:4, :4].set(False)
    draws = Predictive(blend_model, num_samples=200)(
        jax.random.key(1), None, positions, variance, prior, pixel_mask=mask
    )
    assert draws["obs"].shape == (200, B, H, W) and draws["z"].shape == (200, 2, 3)
    noise = (draws["obs"] - draws["model_image"])[:, :, mask]
    np.testing.assert_allclose(noise.var(axis=(0, 2)), [4.0, 25.0], rtol=0.02)
    assert float(jnp.abs(draws["obs"][:, :, :4, :4]).max()) < 1e-12
    # galaxies differ between draws (the latents were drawn too)
    assert float(draws["model_image"].std(axis=0).max()) > 1.0

    # posterior predictive: latents fixed by posterior_samples, only the noise is new
    z = jnp.broadcast_to(draws["z"][0], (50, 2, 3))
    fixed = Predictive(blend_model, posterior_samples={"z": z})(
        jax.random.key(2), None, positions, variance, prior
    )
    np.testing.assert_allclose(
        fixed["model_image"], draws["model_image"][:1].repeat(50, 0), rtol=1e-5
    )
    assert float(fixed["obs"].std(axis=0)[1].mean()) == pytest.approx(5.0, rel=0.05)


# ----------------------------------------------------------------------- padding & validation
def test_bucket_and_pad_sources():
    assert [bucket_size(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 20, 32, 33, 64, 65)] == [
        0, 1, 2, 4, 4, 6, 8, 10, 16, 18, 20, 32, 36, 64, 72,
    ]  # fmt: skip
    sizes = [bucket_size(n) for n in range(1, 200)]
    assert all(b >= n for n, b in zip(range(1, 200), sizes, strict=True))
    assert sizes == sorted(sizes)  # monotone: more sources never get a smaller plate
    waste = [b - n for n, b in zip(range(1, 200), sizes, strict=True)]
    assert max(waste[4:32]) <= 1 and max(waste[32:64]) <= 3 and max(waste) <= 7
    pos, mask = pad_sources(np.arange(6.0).reshape(3, 2))
    assert pos.shape == (4, 2) and mask.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(pos[:3], np.arange(6.0).reshape(3, 2))
    pos, mask = pad_sources(np.zeros((0, 2)), 2)
    assert pos.shape == (2, 2) and not mask.any()
    with pytest.raises(ValueError, match="smaller than the number of sources"):
        pad_sources(np.zeros((3, 2)), 2)


@pytest.fixture
def good():
    prior = LinearGaussianPrior.random(jax.random.key(0), n_bands=B, stamp_size=S, latent_dim=3)
    field = np.ones((B, H, W), np.float32)
    return field, np.array([[3.0, 4.0], [31.0, 0.0]]), np.ones_like(field), prior


def test_validate_accepts_good_inputs_edges_and_zero_sources(good):
    field, positions, variance, prior = good
    assert validate_scene_inputs(field, positions, variance, prior) is None
    edges = np.array([[-0.5, -0.5], [31.49, 31.49], [0.0, 31.0]])
    assert validate_scene_inputs(field, edges, variance, prior) is None
    assert validate_scene_inputs(field, np.zeros((0, 2)), variance, prior) is None


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda f, p, v: (f[0], p, v[0]), "field must be 3-D"),
        (lambda f, p, v: (np.ones((3, H, W)), p, np.ones((3, H, W))), "field has 3 bands but the prior has 2"),
        (lambda f, p, v: (f, p, v[:, :10]), "variance shape"),
        (lambda f, p, v: (f, p, v * 0), "variance must be finite and > 0"),
        (lambda f, p, v: (f, p, -v), "variance must be finite and > 0"),
        (lambda f, p, v: (f, p, np.where(np.arange(W) == 3, np.nan, v)), "variance must be finite"),
        (lambda f, p, v: (f, p[:, :1], v), r"positions must have shape \(n_sources, 2\)"),
        (lambda f, p, v: (f, np.array([[3.0, 4.0], [32.0, 5.0]]), v), r"source 1 at \(x=32.0, y=5.0\) is outside"),
        (lambda f, p, v: (f, np.array([[-0.6, 4.0]]), v), "source 0 .* is outside the field"),
        (lambda f, p, v: (f, np.array([[1.0, 4.0], [np.nan, 2.0]]), v), "source 1 has a non-finite position"),
    ],
)  # fmt: skip
def test_validate_errors(good, change, match):
    field, positions, variance, prior = good
    f, p, v = change(field, positions, variance)
    with pytest.raises(ValueError, match=match):
        validate_scene_inputs(f, p, v, prior)


def test_validate_nonfinite_pixels_are_masked_or_rejected(good):
    field, positions, variance, prior = good
    field = field.copy()
    field[1, 5, 6] = np.nan
    field[0, 2, 2] = np.inf
    with pytest.raises(ValueError, match="2 NaN/inf pixels not covered by pixel_mask"):
        validate_scene_inputs(field, positions, variance, prior, mask_nonfinite=False)
    mask = validate_scene_inputs(field, positions, variance, prior)
    assert mask.shape == field.shape and (~mask).sum() == 2 and not mask[1, 5, 6]
    given = np.isfinite(field)
    assert (
        validate_scene_inputs(
            field, positions, variance, prior, pixel_mask=given, mask_nonfinite=False
        ).sum()
        == given.sum()
    )
    # Bad variance under a masked pixel is fine; padded sources outside are not checked.
    variance = variance.copy()
    variance[1, 5, 6] = 0.0
    inputs = prepare_blend(
        field,
        np.array([[3.0, 4.0], [99.0, 99.0]]),
        variance,
        prior,
        source_mask=np.array([True, False]),
    )
    assert np.all(np.isfinite(inputs.field)) and np.all(inputs.variance > 0)
    assert inputs.pixel_mask.dtype == bool and inputs.kwargs["source_mask"].tolist() == [
        True,
        False,
    ]


def test_prepare_blend_pads(good):
    field, _, variance, prior = good
    inputs = prepare_blend(field, np.zeros((3, 2)), variance, prior, pad=True)
    assert inputs.positions.shape == (4, 2) and inputs.source_mask.tolist() == [True] * 3 + [False]
    assert inputs.pixel_mask is None and len(inputs.args) == 4
