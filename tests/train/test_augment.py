"""On-the-fly augmentation: the square's symmetries are exact for simulated galaxies; fresh noise
has the survey's variance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from madness_ppl.simulate import make_catalog
from madness_ppl.simulate.stamps import draw_galaxy, galaxy_parameters
from madness_ppl.survey import Survey
from madness_ppl.train.augment import add_noise, random_dihedral


def _transforms(image):
    """The 8 elements of D4 acting on the last two axes, by hand."""
    out = []
    for fy, fx, tr in itertools.product((False, True), repeat=3):
        x = image[..., ::-1, :] if fy else image
        x = x[..., :, ::-1] if fx else x
        out.append(np.swapaxes(x, -1, -2) if tr else x)
    return out


def test_random_dihedral_draws_each_element_of_the_group():
    image = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)  # no symmetry of its own
    batch = jnp.broadcast_to(jnp.asarray(image), (400, 2, 5, 5))
    out = np.asarray(random_dihedral(jax.random.key(0), batch))
    candidates = np.stack(_transforms(image))
    which = [
        int(np.flatnonzero(np.all(candidates == o, axis=(1, 2, 3)))[0]) for o in out
    ]  # each output is exactly one group element, channels transformed together
    counts = np.bincount(which, minlength=8)
    assert counts.min() > 20  # 400 draws over 8 elements: ~50 each


def test_symmetries_of_the_square_map_a_simulated_galaxy_onto_another():
    # the PSF is round and the pixel square: mirroring the stamp of a galaxy with shear (g1, g2)
    # and offset (dx, dy) gives the stamp of the mirrored galaxy, pixel for pixel
    survey = Survey.lsst().select_bands(["r", "i"])
    cat = make_catalog(1, survey, rng=np.random.default_rng(3))
    cat["g1"], cat["g2"] = 0.3, -0.2
    cat["bulge_g1"], cat["bulge_g2"] = 0.15, -0.1
    params = galaxy_parameters(cat, survey)
    offset = (0.3, -0.2)
    image = draw_galaxy(params, 0, survey, stamp_size=25, offset=offset)

    def mirrored(sign_g1, sign_g2, offset):
        p = {k: v.copy() for k, v in params.items()}
        for g, sign in (("g1", sign_g1), ("g2", sign_g2)):
            p[g] *= sign
            p[f"bulge_{g}"] *= sign
        return draw_galaxy(p, 0, survey, stamp_size=25, offset=offset)

    scale = image.max()
    # x -> -x: e2 changes sign; transpose (x <-> y): e1 changes sign
    np.testing.assert_allclose(
        image[..., :, ::-1], mirrored(1, -1, (-offset[0], offset[1])), atol=1e-4 * scale
    )
    np.testing.assert_allclose(
        np.swapaxes(image, -1, -2), mirrored(-1, 1, (offset[1], offset[0])), atol=1e-4 * scale
    )


def test_add_noise_has_the_survey_variance():
    sky = np.array([4.0, 100.0], np.float32)
    noiseless = np.zeros((2000, 2, 3, 3), np.float32)
    noiseless[:, :, 1, 1] = 400.0
    noisy = np.asarray(add_noise(jax.random.key(0), noiseless, sky))
    residual = noisy - noiseless
    var = residual.var(axis=0)
    # sky only off the centre, sky + source (Poisson) at the centre; 2000 draws: ~3 % error
    np.testing.assert_allclose(var[:, 0, 0], sky, rtol=0.1)
    np.testing.assert_allclose(var[:, 1, 1], sky + 400.0, rtol=0.1)
    assert abs(residual.mean()) < 0.5
