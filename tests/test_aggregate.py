"""utils/aggregate.py against direct NumPy computations on synthetic scores."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import aggregate  # noqa: E402


def numpy_iqm(x: np.ndarray) -> float:
    flat = np.sort(x.reshape(-1))
    n = len(flat)
    assert n % 4 == 0
    return float(flat[n // 4: n - n // 4].mean())


def numpy_metrics(x: np.ndarray) -> list[float]:
    task_means = x.mean(axis=0)
    return [numpy_iqm(x), float(np.median(task_means)), float(task_means.mean()),
            float(np.mean(1.0 - np.minimum(x, 1.0)))]


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    return {"base": rng.normal(0.5, 0.3, (8, 6)), "method": rng.normal(0.8, 0.3, (10, 6))}


def test_point_estimates_match_numpy(synthetic):
    out = aggregate.aggregate(synthetic, reps=200)
    for arm, x in synthetic.items():
        expected = numpy_metrics(x)
        for metric, value in zip(aggregate.METRICS, expected):
            point, low, high = out[arm][metric]
            assert point == pytest.approx(value, abs=1e-12), (arm, metric)
            assert low <= point <= high, (arm, metric)


def test_interval_matches_a_numpy_stratified_bootstrap(synthetic):
    """Resampling runs independently within each task, the 95% percentile interval of the IQM agrees with a direct
    NumPy implementation up to Monte-Carlo error."""
    x = synthetic["method"]
    rng = np.random.default_rng(1)
    reps = 4000
    boot = np.empty(reps)
    for r in range(reps):
        idx = rng.integers(0, x.shape[0], x.shape)  # per task (column), its own resample of runs
        boot[r] = numpy_iqm(np.take_along_axis(x, idx, axis=0))
    low, high = np.percentile(boot, [2.5, 97.5])
    _, rl_low, rl_high = aggregate.aggregate({"method": x}, reps=reps)["method"]["IQM"]
    assert rl_low == pytest.approx(low, abs=0.02) and rl_high == pytest.approx(high, abs=0.02)


def test_bootstrap_is_reproducible_and_leaves_the_global_generator_alone(synthetic):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = aggregate.aggregate(synthetic, reps=300, seed=7)
    b = aggregate.aggregate(synthetic, reps=300, seed=7)
    c = aggregate.aggregate(synthetic, reps=300, seed=8)
    assert a == b
    assert a != c
    assert np.array_equal(np.random.get_state()[1], before)


def test_probability_of_improvement_matches_numpy(synthetic):
    x, y = synthetic["method"], synthetic["base"]
    expected = np.mean([np.mean((x[:, t, None] > y[None, :, t]) + 0.5 * (x[:, t, None] == y[None, :, t]))
                        for t in range(x.shape[1])])
    point, low, high = aggregate.probability_of_improvement({"method,base": (x, y)}, reps=300)["method,base"]
    assert point == pytest.approx(expected, abs=1e-12)
    assert low <= point <= high
    same = aggregate.probability_of_improvement({"a,a": (x, x)}, reps=50)["a,a"][0]
    assert same == pytest.approx(0.5)


def test_iqm_curve_is_pointwise_iqm(synthetic):
    rng = np.random.default_rng(2)
    curves = {"arm": rng.random((8, 3, 5))}
    iqm, low, high = aggregate.iqm_curve(curves, reps=200)["arm"]
    assert iqm.shape == low.shape == high.shape == (5,)
    for t in range(5):
        assert iqm[t] == pytest.approx(numpy_iqm(curves["arm"][..., t]))
    assert np.all(low <= iqm) and np.all(iqm <= high)


def test_nan_scores_are_refused(synthetic):
    bad = synthetic["base"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aggregate.aggregate({"bad": bad}, reps=10)


def test_probability_of_improvement_interval_matches_rliable(synthetic):
    """The vectorised bootstrap gives rliable's interval (same resampling scheme) up to Monte-Carlo error."""
    from rliable import library, metrics

    x, y = synthetic["method"][:, :3], synthetic["base"][:, :3]
    ours = aggregate.probability_of_improvement({"m,b": (x, y)}, reps=3000, seed=0)["m,b"]
    with aggregate.seeded_global_numpy(0):
        point, interval = library.get_interval_estimates({"m,b": (x, y)}, metrics.probability_of_improvement,
                                                         reps=1500)
    assert ours[0] == pytest.approx(float(np.squeeze(point["m,b"])), abs=1e-12)
    assert ours[1] == pytest.approx(float(interval["m,b"][0].squeeze()), abs=0.03)
    assert ours[2] == pytest.approx(float(interval["m,b"][1].squeeze()), abs=0.03)
