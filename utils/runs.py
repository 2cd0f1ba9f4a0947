"""Reading the files a run writes under runs/<run_name>/ (docs/conventions.md, section 5)."""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import NamedTuple


class ScalarEvent(NamedTuple):
    step: int
    value: float
    wall_time: float


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_flags(run_dir: str) -> dict:
    """The resolved flags of a run: `args` of its config.json (docs/conventions.md, section 5), which also holds
    `tasks`, `family`, `command` and versions at the top level."""
    config = read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(config.get("args"), dict):
        raise ValueError("config.json has no `args` object")
    return config["args"]


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts of strings) of a CSV file such as episodes.csv."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, row)) for row in reader]
    return header, rows


def read_scalars(run_dir: str) -> dict[str, list[ScalarEvent]]:
    """Every TensorBoard scalar of a run directory: tag -> [ScalarEvent(step, value, wall_time), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[ScalarEvent]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(ScalarEvent(e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    return out


def collect(runs_dir: str) -> list[dict]:
    """One row per run directory under `runs_dir` (a suite's runs/ folder): arm, env_id and seed from the run name
    `<arm>__<env_id>__s<seed>` (benchmark/launch.py), with status, final scores, and the reason a run is unusable
    (missing or unreadable summary, not completed, non-finite score) in `excluded` (None when usable)."""
    import math

    rows = []
    for name in sorted(os.listdir(runs_dir)):
        run_dir = os.path.join(runs_dir, name)
        parts = name.split("__")
        if not os.path.isdir(run_dir) or len(parts) != 3 or not parts[2].startswith("s"):
            continue
        row = {"run": name, "arm": parts[0], "env_id": parts[1], "seed": int(parts[2][1:]), "dir": run_dir,
               "status": None, "score": None, "eval_return": None, "train_return": None, "excluded": None}
        try:
            summary = read_json(os.path.join(run_dir, "summary.json"))
        except (OSError, ValueError):
            row["excluded"] = "no readable summary.json (killed or still running)"
            rows.append(row)
            continue
        row.update(status=summary.get("status"), eval_return=summary.get("eval_return_mean"),
                   train_return=summary.get("final_train_return"), sps=summary.get("sps"))
        row["score"] = row["eval_return"] if row["eval_return"] is not None else row["train_return"]
        if row["status"] != "completed":
            row["excluded"] = f"status {row['status']}: {summary.get('error', '')}".strip()
        elif row["score"] is None or not math.isfinite(row["score"]):
            row["excluded"] = f"no finite score ({row['score']})"
        rows.append(row)
    return rows


def window_means(steps: list[int], values: list[float], total_steps: int, points: int) -> list[float | None]:
    """Mean of the values whose step falls in each of `points` equal windows of [0, total_steps] (a step at or past
    total_steps counts in the last); an empty window takes the previous window's value, the leading empty ones are
    None (no value yet). The binning of episode_curve and of the report's --keys curves."""
    sums, counts = [0.0] * points, [0] * points
    for step, value in zip(steps, values):
        k = min(points - 1, int(step * points / max(total_steps, 1)))
        sums[k] += value
        counts[k] += 1
    out, last = [], None
    for s, c in zip(sums, counts):
        last = s / c if c else last
        out.append(last)
    return out


def episode_curve(run_dir: str, total_steps: int, points: int) -> list[float] | None:
    """Mean return of the episodes ending in each of `points` equal windows of [0, total_steps]; an empty window
    takes the previous window's value (the first ones the first available value). None if no episode ended."""
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    if not rows:
        return None
    values = window_means([int(r["global_step"]) for r in rows], [float(r["episodic_return"]) for r in rows],
                          total_steps, points)
    first = next(v for v in values if v is not None)
    return [first if v is None else v for v in values]


def steps_to_reach(run_dir: str, threshold: float, window: int = 10) -> float:
    """The first global step at which the mean return of the last `window` training episodes (episodes.csv, in
    order) is at least `threshold`: a sample-efficiency measure (how soon a run reaches a given return). The first
    `window - 1` episodes alone never count, so one lucky early episode does not either. `inf` if the run never
    reaches it (a censored run)."""
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    returns = [float(r["episodic_return"]) for r in rows]
    for i in range(window - 1, len(rows)):
        if sum(returns[i + 1 - window: i + 1]) / window >= threshold:
            return float(rows[i]["global_step"])
    return float("inf")
