"""The scarlet2 peer runner (``madness_ppl.peers.scarlet2``), which the headline benchmark tables
depend on: on a blend with a known answer it must return each source's flux and a model that
explains the data. Needs scarlet2 (the ``bench`` or ``docs`` extra); CI runs this file after
installing the docs extra."""

from __future__ import annotations

import numpy as np
import pytest

scarlet2 = pytest.importorskip("scarlet2")

from madness_ppl.peers.scarlet2 import run_scarlet2  # noqa: E402

BANDS = ["g", "r", "i"]
SIZE = 41
PSF_SIGMA = 1.2


def _gaussian(size: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    """Unit-sum circular Gaussian on a ``size x size`` grid, centre ``(x, y)``."""
    y, x = np.mgrid[:size, :size]
    g = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _two_galaxy_field(noise: float, seed: int = 0):
    """Two Gaussian galaxies 14 px apart (their light overlaps a little), three bands with
    different colours, observed through a Gaussian PSF: the observed profile of each is a
    Gaussian of width ``sqrt(sigma_gal^2 + sigma_psf^2)``."""
    positions = np.array([[13.0, 20.0], [27.0, 20.0]])
    sigmas = (2.0, 2.5)
    fluxes = np.array([[2000.0, 4000.0, 5000.0], [3000.0, 2500.0, 1500.0]])
    truth = np.zeros((2, 3, SIZE, SIZE))
    for k, (pos, sigma) in enumerate(zip(positions, sigmas, strict=True)):
        profile = _gaussian(SIZE, tuple(pos), np.hypot(sigma, PSF_SIGMA))
        truth[k] = fluxes[k][:, None, None] * profile
    rng = np.random.default_rng(seed)
    field = truth.sum(0) + rng.normal(0.0, noise, truth.shape[1:])
    variance = np.full(field.shape, noise**2)
    psfs = np.stack([_gaussian(15, (7.0, 7.0), PSF_SIGMA)] * 3)
    return field, variance, positions, psfs, fluxes


def test_scarlet2_recovers_the_fluxes_of_a_known_blend():
    field, variance, positions, psfs, fluxes = _two_galaxy_field(noise=2.0)
    out = run_scarlet2(field, variance, positions, psfs, BANDS, stamp_size=25, max_iter=300)
    assert out["fluxes"].shape == (2, 3) and out["models"].shape == (2, 3, 25, 25)
    assert np.all(np.isfinite(out["fluxes"]))
    # each source's total flux in every band within 5 % (measured: within 1.6 %; with the
    # positions swapped, errors of 30-230 %)
    np.testing.assert_allclose(out["fluxes"], fluxes, rtol=0.05)
    # colours are each source's own: the first is red, the second blue
    assert out["fluxes"][0, 2] > out["fluxes"][0, 0] and out["fluxes"][1, 0] > out["fluxes"][1, 2]
    assert 0 < out["n_iter"] <= 300 and out["n_fallback_init"] in (0, 1, 2)
    assert out["seconds"] > 0 and out["seconds_total"] >= out["seconds"]
    assert isinstance(out["converged"], bool)


def test_scarlet2_refuses_inputs_that_do_not_fit_together():
    field, variance, positions, psfs, _ = _two_galaxy_field(noise=2.0)
    with pytest.raises(ValueError, match="band names"):
        run_scarlet2(field, variance, positions, psfs, BANDS[:2])
    with pytest.raises(ValueError, match="odd"):
        run_scarlet2(field, variance, positions, psfs, BANDS, stamp_size=24)
    with pytest.raises(ValueError, match="must be equal"):
        run_scarlet2(field, variance[:2], positions, psfs, BANDS)
    empty = run_scarlet2(field, variance, np.zeros((0, 2)), psfs, BANDS)
    assert empty["fluxes"].shape == (0, 3) and empty["converged"] is None


def test_checkpoints_show_what_a_shorter_fit_returns():
    # one run to 60 steps with checkpoints gives, at step 20, what max_iter=20 returns, so a
    # max_iter sweep needs one run; the loss falls along the way
    field, variance, positions, psfs, _ = _two_galaxy_field(noise=2.0)
    common = dict(stamp_size=25, e_rel=0.0)
    long = run_scarlet2(
        field, variance, positions, psfs, BANDS, max_iter=60, checkpoints=(20, 60), **common
    )
    short = run_scarlet2(field, variance, positions, psfs, BANDS, max_iter=20, **common)
    assert sorted(long["fluxes_at"]) == [20, 60]
    np.testing.assert_allclose(long["fluxes_at"][20], short["fluxes"], rtol=1e-5)
    np.testing.assert_allclose(long["fluxes_at"][60], long["fluxes"], rtol=1e-5)
    assert len(long["loss_trace"]) == len(long["max_change_trace"]) == 60
    assert long["loss_trace"][-1] < long["loss_trace"][0]
    # one box size per source, from the caller (e.g. the true sizes)
    boxed = run_scarlet2(
        field, variance, positions, psfs, BANDS, max_iter=5, box_sizes=[[17], [21]], **common
    )
    assert boxed["fluxes"].shape == (2, 3)
    with pytest.raises(ValueError, match="box-size lists for 2 sources"):
        run_scarlet2(field, variance, positions, psfs, BANDS, box_sizes=[[17]])
