"""Aggregate metrics with rliable's stratified bootstrap, made reproducible.

rliable draws its bootstrap samples from NumPy's *global* generator (its `random_state` argument does not make
two calls agree), so every call here seeds the global generator first and restores its state afterwards.
Scores are arrays of shape (runs, tasks), already normalised, with no NaN (callers exclude and list failed runs).
"""

from __future__ import annotations

import contextlib

import numpy as np

METRICS = ("IQM", "Median", "Mean", "Optimality Gap")


@contextlib.contextmanager
def seeded_global_numpy(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check(scores: dict[str, np.ndarray]):
    for name, x in scores.items():
        if x.ndim < 2:
            raise ValueError(f"{name}: scores must be (runs, tasks[, points]), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: scores contain NaN or inf; exclude those runs first")


def point_metrics(x: np.ndarray) -> np.ndarray:
    """IQM, median, mean and optimality gap (gamma = 1) of a (runs, tasks) array, as rliable defines them."""
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_median(x), metrics.aggregate_mean(x),
                     metrics.aggregate_optimality_gap(x)])


def aggregate(scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0, ci: float = 0.95):
    """{arm: (runs, tasks)} -> {arm: {metric: (point, low, high)}} with stratified-bootstrap intervals."""
    from rliable import library

    _check(scores)
    with seeded_global_numpy(seed):
        points, intervals = library.get_interval_estimates(scores, point_metrics, reps=reps,
                                                           confidence_interval_size=ci)
    return {arm: {m: (float(points[arm][i]), float(intervals[arm][0, i]), float(intervals[arm][1, i]))
                  for i, m in enumerate(METRICS)} for arm in scores}


def probability_of_improvement(pairs: dict[str, tuple[np.ndarray, np.ndarray]], reps: int = 2000, seed: int = 0,
                               ci: float = 0.95):
    """{"X,Y": (scores_X, scores_Y)} -> {"X,Y": (P(X > Y), low, high)}; the run counts of X and Y may differ."""
    from rliable import library, metrics

    for x, y in pairs.values():
        _check({"x": x, "y": y})
    with seeded_global_numpy(seed):
        points, intervals = library.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps,
                                                           confidence_interval_size=ci)
    return {k: (float(np.squeeze(points[k])), float(intervals[k][0].squeeze()), float(intervals[k][1].squeeze()))
            for k in pairs}


def iqm_curve(scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0, ci: float = 0.95):
    """{arm: (runs, tasks, points)} -> {arm: (iqm[points], low[points], high[points])}: sample-efficiency curves
    with pointwise stratified-bootstrap intervals."""
    from rliable import library, metrics

    _check(scores)

    def per_point(x):
        return np.array([metrics.aggregate_iqm(x[..., t]) for t in range(x.shape[-1])])

    with seeded_global_numpy(seed):
        points, intervals = library.get_interval_estimates(scores, per_point, reps=reps,
                                                           confidence_interval_size=ci)
    return {arm: (points[arm], intervals[arm][0], intervals[arm][1]) for arm in scores}
