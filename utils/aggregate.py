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
    """{"X,Y": (scores_X, scores_Y)} -> {"X,Y": (P(X > Y), low, high)}; the run counts of X and Y may differ.

    P(X > Y) is rliable's: per task, P(x > y) + P(x = y) / 2 over all run pairs (the Mann-Whitney U statistic
    divided by n_x n_y), averaged over tasks. The interval is the same stratified independent bootstrap as
    rliable's (runs of X and of Y resampled independently within each task, percentile interval), computed in one
    vectorised pass: a resample only changes how often each run is drawn, so with C_t[i, j] = [x_i > y_j] +
    [x_i = y_j] / 2 and draw counts a, b, a task's statistic is a^T C_t b / (n_x n_y). rliable's loop over
    Mann-Whitney tests takes minutes for a few pairs; this takes milliseconds."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (x, y) in pairs.items():
        _check({"x": x, "y": y})
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{key}: X and Y must have the same tasks")
        (n, tasks), m = x.shape, y.shape[0]
        c = (x.T[:, :, None] > y.T[:, None, :]) + 0.5 * (x.T[:, :, None] == y.T[:, None, :])  # (tasks, n, m)
        point = float(c.mean(axis=(1, 2)).mean())
        a = _draw_counts(rng, reps, tasks, n)
        b = _draw_counts(rng, reps, tasks, m)
        boot = np.einsum("rtn,tnm,rtm->r", a, c, b) / (n * m * tasks)
        low, high = np.percentile(boot, [50 * (1 - ci), 100 - 50 * (1 - ci)])
        out[key] = (point, float(low), float(high))
    return out


def _draw_counts(rng: np.random.Generator, reps: int, tasks: int, n: int) -> np.ndarray:
    """How often each of n runs is drawn when n runs are resampled with replacement: (reps, tasks, n)."""
    idx = rng.integers(0, n, (reps * tasks, n)) + n * np.arange(reps * tasks)[:, None]
    return np.bincount(idx.ravel(), minlength=reps * tasks * n).reshape(reps, tasks, n).astype(float)


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
