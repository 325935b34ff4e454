"""Tests for the convolutional VAE in madness_ppl.nn.vae."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from madness_ppl.nn.vae import (
    EncoderOutput,
    NetworkConfig,
    decode,
    encode,
    init_decoder,
    init_encoder,
    kl_to_standard_normal,
    sample_latent,
    set_amplitude_offset,
)

TINY = NetworkConfig.tiny()


def blobs(n: int, cfg: NetworkConfig, seed: int = 0) -> np.ndarray:
    """Round Gaussian blobs of random width and flux, (n, bands, S, S), normalised units."""
    rng = np.random.default_rng(seed)
    s = cfg.stamp_size
    yy, xx = np.mgrid[:s, :s] - s // 2
    width = rng.uniform(1.0, 3.0, size=(n, 1, 1, 1))
    flux = rng.uniform(0.2, 1.0, size=(n, cfg.bands, 1, 1))
    return (flux * np.exp(-(xx**2 + yy**2) / (2 * width**2))).astype(np.float32)


def test_shapes_and_batch_dims_tiny():
    enc = init_encoder(jax.random.key(0), TINY)
    dec = init_decoder(jax.random.key(1), TINY)
    x = jnp.asarray(blobs(6, TINY)).reshape(2, 3, 2, 15, 15)
    out = encode(enc, TINY, x)
    assert isinstance(out, EncoderOutput)
    assert out.mean.shape == (2, 3, 3) and out.scale_tril.shape == (2, 3, 3, 3)
    # leading dims are independent: same as encoding the flattened batch
    flat = encode(enc, TINY, x.reshape(6, 2, 15, 15))
    np.testing.assert_allclose(out.mean.reshape(6, 3), flat.mean, rtol=1e-5, atol=1e-6)
    # unbatched input
    assert encode(enc, TINY, x[0, 0]).mean.shape == (3,)
    # Cholesky factor: lower triangular with a positive diagonal
    tril = np.asarray(flat.scale_tril)
    assert np.all(np.triu(tril, k=1) == 0)
    assert np.all(np.diagonal(tril, axis1=-2, axis2=-1) > 0)
    assert np.any(np.tril(tril, k=-1) != 0)
    img = decode(dec, TINY, out.mean)
    assert img.shape == (2, 3, 2, 15, 15)
    assert decode(dec, TINY, jnp.zeros(3)).shape == (2, 15, 15)


@pytest.mark.parametrize("stamp_size", [45, 33])
def test_lean_shapes_and_positive_output(stamp_size):
    cfg = NetworkConfig.lean(stamp_size=stamp_size)
    dec = init_decoder(jax.random.key(1), cfg)
    z = 2.0 * jax.random.normal(jax.random.key(2), (3, cfg.latent_dim))
    img = decode(dec, cfg, z)
    assert img.shape == (3, 6, stamp_size, stamp_size)
    assert float(img.min()) >= 0.0
    assert float(img.max()) > 0.0
    if stamp_size == 45:  # the encoder's shapes are checked at one size to keep the test quick
        mean, scale_tril = encode(init_encoder(jax.random.key(0), cfg), cfg, img)
        assert mean.shape == (3, 16) and scale_tril.shape == (3, 16, 16)
        assert np.all(np.isfinite(mean))


def test_config_validation_and_presets():
    ref = NetworkConfig.reference()
    assert ref.encoder_channels == (32, 128, 256, 512) and ref.decoder_channels == (128, 96, 64)
    assert ref.latent_dim == 16 and ref.decoder_refine
    assert NetworkConfig() == NetworkConfig.lean()
    assert NetworkConfig.from_dict(ref.to_dict()) == ref
    assert hash(NetworkConfig(encoder_channels=[16, 32, 64, 128])) == hash(NetworkConfig())
    with pytest.raises(ValueError, match="odd"):
        NetworkConfig(stamp_size=44)
    with pytest.raises(ValueError, match="activation"):
        NetworkConfig(activation="swish")
    with pytest.raises(ValueError, match="stamps of shape"):
        encode(init_encoder(jax.random.key(0), TINY), TINY, jnp.zeros((1, 3, 15, 15)))
    with pytest.raises(ValueError, match="latents of shape"):
        decode(init_decoder(jax.random.key(0), TINY), TINY, jnp.zeros((1, 4)))


def test_diagonal_head_and_softplus_output():
    cfg = NetworkConfig(**{**TINY.to_dict(), "full_covariance": False})
    cfg = NetworkConfig(**{**cfg.to_dict(), "output_activation": "softplus", "activation": "gelu"})
    enc = init_encoder(jax.random.key(0), cfg)
    dec = init_decoder(jax.random.key(1), cfg)
    assert not any("slope" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(dec))
    tril = np.asarray(encode(enc, cfg, blobs(4, cfg)).scale_tril)
    off_diagonal = tril - np.einsum("...ii->...i", tril)[..., None] * np.eye(3)
    assert np.all(off_diagonal == 0) and np.all(np.einsum("...ii->...i", tril) > 0)
    assert float(decode(dec, cfg, jnp.ones((2, 3))).min()) > 0.0


def test_jit_and_grad_through_decode_without_recompiling():
    dec = init_decoder(jax.random.key(1), TINY)
    target = jnp.asarray(blobs(4, TINY))

    @jax.jit
    def loss(params, z):
        return jnp.sum((decode(params, TINY, z) - target) ** 2)

    z = jax.random.normal(jax.random.key(3), (4, 3))
    g_params, g_z = jax.grad(loss, argnums=(0, 1))(dec, z)
    assert g_z.shape == z.shape and np.all(np.isfinite(g_z)) and float(jnp.abs(g_z).max()) > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(g_params))
    # plain calls compile once per (config, shape)
    decode(dec, TINY, z)
    size = decode._cache_size()
    decode(init_decoder(jax.random.key(9), TINY), TINY, z + 1.0)
    assert decode._cache_size() == size


def test_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 3))
    tril = np.tril(rng.normal(size=(2, 3, 3)), k=-1) + np.eye(3) * rng.uniform(0.5, 2, (2, 1, 3))
    cov = tril @ np.swapaxes(tril, -1, -2)
    expected = 0.5 * (
        np.trace(cov, axis1=-2, axis2=-1) + np.sum(mean**2, -1) - 3 - np.linalg.slogdet(cov)[1]
    )
    np.testing.assert_allclose(kl_to_standard_normal(mean, tril), expected, rtol=1e-5)
    draws = sample_latent(jax.random.key(0), jnp.zeros((20000, 3)), jnp.asarray(tril[0]))
    np.testing.assert_allclose(np.cov(np.asarray(draws).T), cov[0], atol=0.15)


def test_few_optax_steps_lower_a_vae_loss():
    enc = init_encoder(jax.random.key(0), TINY)
    dec = init_decoder(jax.random.key(1), TINY)
    data = jnp.asarray(blobs(16, TINY))
    # the data-dependent start of the amplitude head, as training does
    dec = set_amplitude_offset(dec, TINY, jnp.log(jnp.median(data.sum((-2, -1)), axis=0)))
    params = {"encoder": enc, "decoder": dec}
    opt = optax.adam(3e-3)
    state = jax.jit(opt.init)(params)  # eager init would compile once per leaf shape

    def loss_fn(p, key):
        q = encode(p["encoder"], TINY, data)
        z = sample_latent(key, q.mean, q.scale_tril)
        rec = jnp.sum((decode(p["decoder"], TINY, z) - data) ** 2, axis=(-3, -2, -1))
        return jnp.mean(rec / 1e-3 + kl_to_standard_normal(q.mean, q.scale_tril))

    @jax.jit
    def step(p, s, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, key)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    keys = jax.random.split(jax.random.key(2), 40)
    losses = []
    for key in keys:
        params, state, loss = step(params, state, key)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.parametrize(
    ("stamp_size", "channels"),
    [(45, (16, 8, 4)), (33, (16, 8, 4)), (21, (8, 4)), (15, (8, 4))],
)
@pytest.mark.parametrize("upsampling", ["subpixel", "transpose"])
def test_decoder_grids_odd_and_even(stamp_size, channels, upsampling):
    # grid side ceil(S / 2**n): 6 (even) for S=45, 5 (odd) for S=33, 6 for 21, 4 for 15
    cfg = NetworkConfig(
        bands=3,
        stamp_size=stamp_size,
        latent_dim=4,
        encoder_channels=(4, 8),
        encoder_dense=16,
        decoder_dense=16,
        decoder_channels=channels,
        upsampling=upsampling,
    )
    dec = init_decoder(jax.random.key(1), cfg)
    z = 2.0 * jax.random.normal(jax.random.key(2), (5, 4))
    img = np.asarray(decode(dec, cfg, z))
    assert img.shape == (5, 3, stamp_size, stamp_size)
    assert img.min() >= 0.0 and np.all(np.isfinite(img))
    # the amplitude head sets each band's total flux: exp(a_b) times a unit-sum profile
    flux = img.sum(axis=(-2, -1))
    assert np.all(flux > 0)
    # the output is drawn from the latent (a decoder that ignored z, or drew a constant or an
    # empty plane, fails): measured over these grids, two latents differ by 27-96 % of the
    # peak, band fluxes spread by 60-125 % over the five latents, pixels vary by 88-121 %
    assert np.abs(img[0] - img[1]).max() > 0.1 * img.max()
    assert np.all(flux.std(axis=0) > 0.2 * flux.mean(axis=0))
    assert np.all(img.std(axis=(-2, -1)) > 0.3 * img.mean(axis=(-2, -1)))


def test_depth_to_space_is_the_inverse_of_space_to_depth():
    from madness_ppl.nn.vae import depth_to_space

    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    # space-to-depth by hand: (n, h, w, c) -> (n, h/2, w/2, 4c) with channel order (dy, dx, c)
    s2d = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 2, 3, 12)
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(s2d))), x)


def test_amplitude_head_gives_the_total_flux():
    cfg = NetworkConfig(**{**TINY.to_dict(), "amplitude": True})
    dec = init_decoder(jax.random.key(1), cfg)
    z = jax.random.normal(jax.random.key(2), (4, 3))
    # change only the amplitude bias: the profile is untouched, every flux scales by e^{+1}
    shifted = jax.tree_util.tree_map(lambda a: a, dec)
    shifted["decoder/amplitude"]["b"] = dec["decoder/amplitude"]["b"] + 1.0
    ratio = np.asarray(decode(shifted, cfg, z).sum((-2, -1)) / decode(dec, cfg, z).sum((-2, -1)))
    np.testing.assert_allclose(ratio, np.e, rtol=1e-4)


def test_configs_written_before_v02_load_as_they_were_trained():
    old = NetworkConfig.v010().to_dict()
    for key in ("upsampling", "amplitude", "input_transform"):
        del old[key]
    legacy = NetworkConfig.from_dict(old)
    assert legacy == NetworkConfig.v010()
    assert legacy.upsampling == "transpose" and not legacy.amplitude
    assert legacy.input_transform == "linear"
    assert NetworkConfig().upsampling == "subpixel"
    with pytest.raises(ValueError, match="upsampling"):
        NetworkConfig(upsampling="bilinear")
    with pytest.raises(ValueError, match="posterior_scale_init"):
        NetworkConfig(posterior_scale_init=0.0)


def test_warp_stretches_a_round_gaussian_by_the_shear_matrix():
    from madness_ppl.nn.vae import shear_matrix, warp_stamps

    np.testing.assert_allclose(np.asarray(shear_matrix(jnp.zeros(3))), np.eye(2), atol=1e-6)
    # A = diag(e^g, e^-g) for (s, a, b) = (0, g, 0): second moments scale by e^{+-2g}
    yy, xx = np.mgrid[:41, :41] - 20.0
    blob = np.exp(-(xx**2 + yy**2) / (2 * 3.0**2))[None, :, :, None].astype(np.float32)
    g = 0.25
    out = np.asarray(warp_stamps(jnp.asarray(blob), jnp.asarray([[0.0, g, 0.0]])))[0, :, :, 0]
    qxx = (out * xx**2).sum() / out.sum()
    qyy = (out * yy**2).sum() / out.sum()
    np.testing.assert_allclose(qxx / qyy, np.exp(4 * g), rtol=0.02)
    # (0, 0, b) shears along the diagonal: positive xy moment, equal xx and yy
    out = np.asarray(warp_stamps(jnp.asarray(blob), jnp.asarray([[0.0, 0.0, g]])))[0, :, :, 0]
    assert (out * xx * yy).sum() > 0.1 * (out * xx**2).sum()
    np.testing.assert_allclose((out * xx**2).sum(), (out * yy**2).sum(), rtol=1e-3)
    # the identity warp leaves any stamp unchanged
    noise = np.random.default_rng(0).random((2, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(warp_stamps(jnp.asarray(noise), jnp.zeros((2, 3))), noise, atol=1e-6)
