"""One definition per summary statistic (madness_ppl.stats), checked against known answers."""

import numpy as np
import pytest

from madness_ppl.stats import abs68, field_bootstrap, median, width68


def test_width68_is_sigma_for_a_gaussian_and_blind_to_a_bias():
    x = np.random.default_rng(0).normal(size=200_000)
    assert width68(x) == pytest.approx(1.0, abs=0.01)
    assert width68(x + 5.0) == pytest.approx(width68(x))
    # abs68 sees the bias: the 68 % radius around zero of N(5, 1) is about 5.47
    assert abs68(x) == pytest.approx(0.994, abs=0.01)
    assert abs68(x + 5.0) == pytest.approx(5.47, abs=0.02)


def test_non_finite_values_are_dropped_and_nothing_is_nan():
    assert median([1.0, np.nan, 3.0, np.inf]) == 2.0
    assert width68([np.nan, np.inf]) != width68([np.nan, np.inf])  # nan
    assert np.isnan(abs68([])) and np.isnan(median([]))


def test_field_bootstrap_resamples_whole_fields():
    # two fields of identical values give a zero-width interval; the statistic sees fields
    fields = [np.ones(5), np.ones(7)]
    assert field_bootstrap(fields, lambda fs: float(np.mean(np.concatenate(fs)))) == (1.0,) * 3
    value, low, high = field_bootstrap(
        [np.full(3, k, float) for k in range(10)],
        lambda fs: float(np.mean(np.concatenate(fs))),
        n=2000,
    )
    assert value == 4.5 and low < 4.5 < high
    # the standard error of a mean of 10 fields spread uniformly over 0..9 is ~0.9
    assert 2.5 < high - low < 4.5


def test_field_bootstrap_of_several_statistics_pairs_their_draws():
    # fields of (a, b) with b = 2a: the ratio b/a is 2 in every draw, so a paired interval has
    # zero width, while a and b alone have wide ones
    fields = [(float(k), 2.0 * k) for k in range(1, 11)]

    def stats(fs):
        a = np.mean([f[0] for f in fs])
        b = np.mean([f[1] for f in fs])
        return [a, b, b / a, np.nan]

    value, low, high = field_bootstrap(fields, stats, n=500)
    assert value.shape == low.shape == high.shape == (4,)
    np.testing.assert_allclose(value[:3], [5.5, 11.0, 2.0])
    assert low[0] < 5.5 < high[0] and low[1] < 11.0 < high[1]
    np.testing.assert_allclose([low[2], high[2]], [2.0, 2.0])
    assert np.isnan(value[3]) and np.isnan(low[3]) and np.isnan(high[3])
    # the scalar form of the same statistic gives the same interval (same draws)
    assert field_bootstrap(fields, lambda fs: stats(fs)[0], n=500) == (
        value[0],
        low[0],
        high[0],
    )
