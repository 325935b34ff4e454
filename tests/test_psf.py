"""The model frame's PSF handling: difference kernels, convolution, and bad PSFs."""

from __future__ import annotations

import galsim
import jax.numpy as jnp
import numpy as np
import pytest

from madness_ppl.psf import (
    REFERENCE_FWHM_PIXELS,
    PSFError,
    check_psf,
    convolve_stamps,
    difference_kernel,
    kernel_grid,
    psf_descriptor,
    psf_images,
    reference_psf,
)
from madness_ppl.survey import Survey

SCALE = 0.2
BANDS = ("g", "r")


@pytest.mark.parametrize("fwhm", [0.5, 0.8, 1.3])
def test_gaussian_pair_gives_the_analytic_difference_kernel(fwhm):
    # K^(k) = exp(-2 pi^2 (s_P^2 - s_R^2) |k|^2): the pixel response cancels in P^/R^
    reference = reference_psf(1, 45)
    psf = psf_images([fwhm], pixel_scale=SCALE, size=45, profile="gaussian")
    grid = 63
    k_hat = np.asarray(difference_kernel(psf, reference, grid=grid).fourier[0])
    ky = np.fft.fftfreq(grid)[:, None]
    kx = np.fft.rfftfreq(grid)[None, :]
    s2 = (fwhm / SCALE / 2.3548) ** 2 - (REFERENCE_FWHM_PIXELS / 2.3548) ** 2
    analytic = np.exp(-2 * np.pi**2 * s2 * (kx**2 + ky**2))
    err = np.abs(k_hat - analytic)
    # the sampled reference Gaussian aliases near the Nyquist frequency (0.5 cycles/px)
    assert err[np.hypot(kx, ky) < 0.25].max() < 3e-3
    assert err.max() < 0.02
    assert abs(k_hat[0, 0] - 1.0) < 1e-5  # flux conserved (regulariser: 1e-6)


def test_even_and_odd_psf_images_give_the_same_kernel():
    odd = psf_images([0.9], pixel_scale=SCALE, size=41, profile="moffat")
    even = galsim.Moffat(beta=3.5, fwhm=0.9).drawImage(nx=40, ny=40, scale=SCALE).array[None]
    ref = reference_psf(1, 45)
    k_odd = np.asarray(difference_kernel(odd, ref, grid=55).fourier)
    k_even = np.asarray(difference_kernel(even / even.sum(), ref, grid=55).fourier)
    assert np.abs(k_odd - k_even).max() < 5e-3


@pytest.mark.parametrize("factor", [0.8, 1.0, 1.3])
def test_convolving_the_model_frame_reproduces_galsim_at_the_observed_psf(factor):
    survey = Survey.lsst()
    fwhm = factor * survey.band("r").psf_fwhm
    galaxy = galsim.Exponential(half_light_radius=0.5, flux=1e4).shear(e1=0.3, e2=-0.1)
    observed_psf = galsim.Kolmogorov(fwhm=fwhm)
    direct = galsim.Convolve(galaxy, observed_psf).drawImage(nx=45, ny=45, scale=SCALE).array
    model = galsim.Convolve(galaxy, galsim.Gaussian(fwhm=REFERENCE_FWHM_PIXELS * SCALE))
    model = model.drawImage(nx=45, ny=45, scale=SCALE).array
    psf = check_psf(observed_psf.drawImage(nx=75, ny=75, scale=SCALE).array[None], ["r"])
    grid = kernel_grid(psf, 45)
    kernel = difference_kernel(psf, reference_psf(1, 45), grid=grid)
    out = np.asarray(convolve_stamps(jnp.asarray(model[None], jnp.float32), kernel.fourier))[0]
    lo = (grid - 45) // 2
    out = out[lo : lo + 45, lo : lo + 45]
    assert np.abs(out - direct).max() < 3e-3 * direct.max()
    assert abs(out.sum() / direct.sum() - 1) < 5e-3


def test_convolution_conserves_flux_and_shifts():
    stamp = np.zeros((1, 1, 15, 15), np.float32)
    stamp[0, 0, 7, 7] = 1.0
    delta = np.ones((1, 21, 11), np.complex64)  # K^ = 1: pad and shift only
    out = np.asarray(convolve_stamps(stamp, delta, shifts=np.array([[1.0, -2.0]])))
    assert out.shape == (1, 1, 21, 21)
    assert abs(out.sum() - 1.0) < 1e-5
    assert np.unravel_index(out[0, 0].argmax(), (21, 21)) == (10 - 2, 10 + 1)


def test_psf_narrower_than_the_reference_is_refused_by_band():
    ref = reference_psf(2, 45)
    good = psf_images([0.8], pixel_scale=SCALE, size=45)[0]
    narrow = psf_images([0.15], pixel_scale=SCALE, size=45, profile="gaussian")[0]
    with pytest.raises(PSFError, match=r"band .r.*narrower"):
        difference_kernel(np.stack([good, narrow]), ref, grid=45, bands=BANDS)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.__setitem__((0, 3, 3), np.nan), "NaN/inf"),
        (lambda p: p.__setitem__(0, 0.0), "all zero"),
        (lambda p: p.__setitem__(1, -p[1]), "<= 0"),
    ],
)
def test_bad_psf_images_give_typed_errors(edit, message):
    psf = psf_images([0.8, 0.8], pixel_scale=SCALE, size=25)
    edit(psf)
    with pytest.raises(PSFError, match=message):
        check_psf(psf, BANDS)


def test_wrong_band_count_and_shape_are_refused():
    psf = psf_images([0.8, 0.8, 0.8], pixel_scale=SCALE, size=25)
    with pytest.raises(PSFError, match="3 band images but the prior has 2"):
        check_psf(psf, BANDS)
    with pytest.raises(PSFError, match="square"):
        check_psf(np.ones((2, 5, 7)), BANDS)


def test_psf_too_wide_for_the_stamp_is_refused():
    wide = psf_images([3.0, 3.0], pixel_scale=SCALE, size=81, profile="gaussian")
    with pytest.raises(PSFError, match="too wide"):
        check_psf(wide, BANDS, stamp_size=45)
    assert check_psf(wide, BANDS).shape == (2, 81, 81)  # fine without a stamp to fit


def test_descriptor_orders_psfs_by_size_and_reads_ellipticity():
    psf = psf_images([0.5, 1.0], pixel_scale=SCALE, size=45, e1=[0.05, 0.0])
    d = psf_descriptor(psf)
    assert d.shape == (2, 3)
    assert d[1, 0] - d[0, 0] == pytest.approx(np.log(2.0), abs=0.1)
    assert d[0, 1] == pytest.approx(0.05, abs=0.015) and abs(d[1, 1]) < 0.01


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.7])
def test_field_path_matches_galsim_and_the_per_stamp_path(factor):
    # two galaxies, one partly outside the field, at sub-pixel positions: the scene's two
    # convolutions (per stamp, per field canvas) agree with each other and with galsim
    from madness_ppl.psf import with_field_transform
    from madness_ppl.scene import render_image

    fwhm = factor * Survey.lsst().band("r").psf_fwhm
    observed_psf = galsim.Kolmogorov(fwhm=fwhm)
    reference = galsim.Gaussian(fwhm=REFERENCE_FWHM_PIXELS * SCALE)
    galaxies = [
        galsim.Exponential(half_light_radius=0.4, flux=1e4).shear(e1=0.3, e2=-0.1),
        galsim.Sersic(n=3, half_light_radius=0.3, flux=5e3),
    ]
    positions = np.array([[20.3, 24.8], [58.6, 3.2]], np.float32)  # (x, y), 64x60 field
    height, width = 60, 64
    truth = np.zeros((height, width))
    for galaxy, (x, y) in zip(galaxies, positions, strict=True):
        drawn = galsim.Convolve(galaxy, observed_psf).drawImage(
            nx=width, ny=height, scale=SCALE, offset=(x - (width - 1) / 2, y - (height - 1) / 2)
        )
        truth += drawn.array
    model = np.stack(
        [galsim.Convolve(g, reference).drawImage(nx=45, ny=45, scale=SCALE).array for g in galaxies]
    )[:, None].astype(np.float32)
    psf = check_psf(observed_psf.drawImage(nx=75, ny=75, scale=SCALE).array[None], ["r"])
    kernel = difference_kernel(psf, reference_psf(1, 45), grid=kernel_grid(psf, 45))
    per_field = with_field_transform(kernel, (height, width), n_sources=8, stamp_size=45)
    assert per_field.field is not None  # 8 sources: the canvas is cheaper
    stamp_path = np.asarray(render_image(model, positions, (height, width), psf=kernel))[0]
    field_path = np.asarray(render_image(model, positions, (height, width), psf=per_field))[0]
    assert np.abs(field_path - stamp_path).max() < 1e-3 * truth.max()
    assert abs(field_path.sum() / stamp_path.sum() - 1) < 5e-4  # kernel tails wrap apart
    assert np.abs(field_path - truth).max() < 5e-3 * truth.max()


def test_field_transform_only_when_cheaper_and_for_its_shape():
    from madness_ppl.psf import with_field_transform
    from madness_ppl.scene import render_image

    psf = psf_images([0.8], pixel_scale=SCALE, size=45)
    kernel = difference_kernel(psf, reference_psf(1, 45), grid=75)
    assert with_field_transform(kernel, (400, 400), n_sources=2, stamp_size=45).field is None
    small = with_field_transform(kernel, (40, 40), n_sources=8, stamp_size=45)
    assert small.field is not None
    stamps = np.zeros((1, 1, 45, 45), np.float32)
    with pytest.raises(ValueError, match="field transform"):
        render_image(stamps, np.zeros((1, 2), np.float32), (200, 200), psf=small)
