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
