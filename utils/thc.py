"""The THC score (Tuning Hyperparameter Consistency) of "On the consistency of hyper-parameter selection in
value-based deep RL" (Obando-Ceron, Araujo, Courville, Castro, RLC 2024): how much the ranking of one
hyper-parameter's values changes from task to task. 0: every task ranks the values the same way; 1: each value is
ranked best on some task and worst on another.

Reimplemented from the official `get_thc_metric`, joaogui1/Consistent-Data-Analysis @ 9bb8832, utils.py lines
24-25 (`get_int_estimate`), 42-60 (`interval_to_ranking`), 66-83 (`get_game_rankings`) and 96-113
(`get_thc_metric`); docs/benchmark.md, section "Sweeps and hyper-parameter consistency". tests/test_thc.py checks it
on hand-worked examples and, on the released data (benchmark/reference/consistency/), against every THC value the
paper's website lists.
"""

from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple

import numpy as np


class THC(NamedTuple):
    mean: float  # the THC score: mean over values of `spread`
    std: float  # sample standard deviation (ddof 1) of `spread` over values
    spread: dict  # value -> (max - min of its rank over tasks) / (k - 1)
    ranks: dict  # value -> (tasks,) rank per task, 1 = best; ties share the midpoint of their positions
    intervals: dict  # value -> (tasks, 2) array of [mean - std, mean + std] over seeds


def intervals(x: np.ndarray) -> np.ndarray:
    """(seeds, tasks) final scores -> (tasks, 2) intervals [mean - std, mean + std] over seeds, std with ddof 0
    (utils.py lines 24-25: `np.mean(v) - np.std(v)`, `np.mean(v) + np.std(v)` over one game's seeds). Computed in the
    array's floating dtype, as NumPy does there: the released data is float32, and so are its bounds."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(float)
    out = np.empty((x.shape[1], 2), dtype=x.dtype)
    for j in range(x.shape[1]):  # one task's seeds at a time, as the official code reduces them
        column = np.ascontiguousarray(x[:, j])
        mean, std = np.mean(column), np.std(column)
        out[j] = mean - std, mean + std
    return out


def rank_intervals(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The rank of each of n intervals [lo_i, hi_i] on one task, 1 = best (utils.py lines 42-60,
    `interval_to_ranking`):

    1. sort the intervals by upper bound, highest first (Python's stable sort: equal upper bounds keep their order,
       which does not change any rank below);
    2. for the interval at (0-based) position i of that order: b = the first position p <= i whose interval reaches
       up to it, lo_p <= hi_i (the first interval it overlaps, counting from the top; p = i at the latest);
       e = the first position q > i whose interval lies wholly below it, hi_q < lo_i, or n when none does;
    3. its rank is (b + 1 + e) / 2, the midpoint of the 1-based positions b + 1 ... e it could take: an interval
       that overlaps no other gets its position, overlapping intervals tie.

    One deliberate difference: the official loop ends the search of step 2 at a sentinel interval [-100, -100]
    (line 44) and leaves the rank at its initial 1 when no interval lies below lo_i, which happens for the last
    interval only when lo_i <= -100. On human-normalised scores (the released data: lowest lower bound -3.45) the
    sentinel is never reached first, so both give the same ranks; on raw returns such as Acrobot's (-500 to 0) the
    sentinel would rank the worst value first. Here e = n then, the rank the sentinel gives whenever lo_i > -100."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    order = sorted(range(len(hi)), key=lambda i: -hi[i])
    lo_s, hi_s = lo[order], hi[order]
    n = len(order)
    ranks = np.empty(n)
    for i in range(n):
        b = next((p for p in range(i + 1) if lo_s[p] <= hi_s[i]), 0)
        e = next((q for q in range(i + 1, n) if hi_s[q] < lo_s[i]), n)
        ranks[order[i]] = (b + 1 + e) / 2
    return ranks


def thc_score(scores: Mapping[Hashable, np.ndarray]) -> THC:
    """THC of one hyper-parameter: `scores` maps each of its k >= 2 values to the (seeds, tasks) final scores of
    the runs with that value, on the same >= 2 tasks in the same order (seed counts may differ between values).

    1. Per task and value, the interval [mean - std, mean + std] over seeds (`intervals`; utils.py lines 24-25,
       78-81).
    2. Per task, the values ranked by their intervals, overlapping ones tied (`rank_intervals`; lines 42-60, 82-83).
    3. Per value, the spread of its rank over tasks, max - min, divided by k - 1, the largest possible spread
       (lines 105-111: `np.ptp` of the ranks grouped by value, over `len(df_deviations) - 1`).
    4. THC = the mean of the k spreads; reported with their standard deviation, ddof 1 (line 113: pandas'
       `Series.mean()` and `Series.std()`, whose default ddof is 1).

    The official code labels the rows of its per-value table in `data.keys()` order while pandas orders them as the
    first game's ranking (line 105 against 107), so its per-value spreads can carry another value's name; the mean
    and std do not depend on the labels, and `spread` here is keyed by the right value. Any positive affine map of a
    task's scores (normalisation) leaves the ranks, hence THC, unchanged."""
    if len(scores) < 2:
        raise ValueError(f"THC needs at least 2 values of the hyper-parameter, got {len(scores)}")
    arrays = {v: np.asarray(x) for v, x in scores.items()}
    shapes = {x.shape[1] if x.ndim == 2 else None for x in arrays.values()}
    if None in shapes or len(shapes) != 1:
        raise ValueError("THC needs one (seeds, tasks) array per value, all on the same tasks; got shapes "
                         + ", ".join(f"{v}: {x.shape}" for v, x in arrays.items()))
    tasks = shapes.pop()
    if tasks < 2:
        raise ValueError(f"THC needs at least 2 tasks, got {tasks}")
    if any(x.shape[0] < 1 or not np.isfinite(x).all() for x in arrays.values()):
        raise ValueError("THC needs at least one run per value and finite scores")
    values = list(arrays)
    bounds = {v: intervals(x) for v, x in arrays.items()}
    ranks = {v: np.empty(tasks) for v in values}
    for j in range(tasks):
        r = rank_intervals(np.array([bounds[v][j, 0] for v in values]), np.array([bounds[v][j, 1] for v in values]))
        for v, rank in zip(values, r):
            ranks[v][j] = rank
    k = len(values)
    spread = {v: float(np.ptp(ranks[v])) / (k - 1) for v in values}
    s = np.array(list(spread.values()))
    return THC(float(s.mean()), float(s.std(ddof=1)), spread, ranks, bounds)
