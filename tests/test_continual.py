"""benchmark/continual.py on synthetic task-sequence runs: visit scores, start scores, recovery steps and policy-path
measures equal what the definitions give by hand; runs without a sequence are excluded with the reason."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import continual  # noqa: E402

TASKS = ["A-v0", "B-v0", "A-v0"]
S = 1000  # steps per visit


def write_run(runs, arm, seed, episodes, tasks=TASKS, gtr_tasks=None):
    """episodes: list of (global_step, return)."""
    run_dir = os.path.join(runs, f"{arm}__seq__s{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"args": {"env_id": tasks[0], "env_ids": tasks, "steps_per_task": S if len(tasks) > 1 else None},
                   "tasks": tasks, "family": "test"}, f)  # the layout the scripts write (flags under "args")
    summary = {"status": "completed", "eval_return_mean": 1.0, "final_train_return": 1.0, "total_timesteps": 3 * S}
    if gtr_tasks:
        summary["gtr_tasks"] = gtr_tasks
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
        f.write("global_step,episodic_return,episodic_length,task\n")
        for step, ret in episodes:
            f.write(f"{step},{ret},10,x\n")


def episodes(levels, drop=None):
    """An episode every 10 steps; return `levels[v]` during visit v, except `drop` = (visit, until_step, value):
    a low value from the start of that visit until that many steps into it."""
    out = []
    for step in range(10, 3 * S + 1, 10):
        v = (step - 1) // S
        value = levels[v]
        if drop and drop[0] == v and step - v * S <= drop[1]:
            value = drop[2]
        out.append((step, value))
    return out


def test_visit_measures_by_hand(tmp_path):
    runs = str(tmp_path / "suite" / "runs")
    path = [dict(task=t, travelled=2.0 * (v + 1), displacement=1.0) for v, t in enumerate(TASKS)]
    # visit 3 (A again): 0 until 300 steps in, then 1.0; the reference is visit 1's end score 1.0
    write_run(runs, "m", 1, episodes([1.0, 0.5, 1.0], drop=(2, 300, 0.0)), gtr_tasks=path)
    m = continual.visit_measures(os.path.join(runs, "m__seq__s1"))
    assert m["score"] == [1.0, 0.5, 1.0]
    # first quarter of visit 3: episodes ending at 2010..2250: all 0.0 (drop lasts until 2300)
    assert m["start"] == [1.0, 0.5, 0.0]
    # the 20-episode moving average reaches 0.9 once 18 of the last 20 episodes are 1.0: episodes 301..480 steps in
    # are 1.0 from 310 on, so the 18th is at 480
    assert m["recovery"] == [10, 10, 480] and m["recovered"] == [True, True, True]
    assert m["travelled"] == [2.0, 4.0, 6.0] and m["displacement"] == [1.0, 1.0, 1.0]


def test_never_recovered_counts_the_whole_visit(tmp_path):
    runs = str(tmp_path / "suite" / "runs")
    write_run(runs, "m", 1, episodes([1.0, 0.5, 0.5]))  # A's second visit stays at half its first end score
    m = continual.visit_measures(os.path.join(runs, "m__seq__s1"))
    assert m["recovery"][2] == S and m["recovered"][2] is False


def test_report_tables_and_exclusions(tmp_path):
    runs = str(tmp_path / "suite" / "runs")
    rng = np.random.default_rng(0)
    truth = {}
    for arm, base in (("good", 0.8), ("bad", 0.3)):
        for seed in range(1, 6):
            levels = list(np.round(base + 0.1 * rng.random(3), 3))
            truth[(arm, seed)] = levels
            write_run(runs, arm, seed, episodes(levels))
    write_run(runs, "good", 9, episodes([1, 1, 1]), tasks=["A-v0"])  # not a sequence
    path = continual.report(str(tmp_path / "suite"), str(tmp_path / "out"), compare=["good,bad"], reps=300)
    text = open(path).read()
    for arm in ("good", "bad"):
        x = np.array([truth[(arm, s)] for s in range(1, 6)])
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | 5 |"))
        assert f"{stats.trim_mean(x, 0.25, axis=None):.3f} [" in row
    assert "| good,bad | 1.000 [" in text
    assert "`good__seq__s9`: no per-visit measures: config.json has no task sequence" in text
    assert "Divergence travelled" not in text  # no run wrote gtr_tasks
    assert os.path.getsize(tmp_path / "out" / "continual_curves.png") > 1000


def test_trust_region_activity_per_visit(tmp_path):
    """gtr/beyond_sigma and gtr/penalty, averaged within each visit's steps (v S, (v + 1) S]."""
    from torch.utils.tensorboard import SummaryWriter

    runs = str(tmp_path / "suite" / "runs")
    write_run(runs, "m", 1, episodes([1.0, 0.5, 1.0]))
    run_dir = os.path.join(runs, "m__seq__s1")
    writer = SummaryWriter(run_dir)
    for step, beyond, penalty in ((500, 0.1, 0.01), (1000, 0.3, 0.03), (1500, 0.5, 0.2), (2600, 0.0, 0.0)):
        writer.add_scalar("gtr/beyond_sigma", beyond, step)
        writer.add_scalar("gtr/penalty", penalty, step)
    writer.close()
    m = continual.visit_measures(run_dir)
    assert np.allclose(m["beyond_sigma"], [0.2, 0.5, 0.0]) and np.allclose(m["penalty"], [0.02, 0.2, 0.0])
    text = open(continual.report(str(tmp_path / "suite"), str(tmp_path / "out"), reps=50, make_figures=False)).read()
    assert "| m | 0.200 | 0.500 | 0.000 |" in text and "| m | 0.0200 | 0.2000 | 0.0000 |" in text


def test_single_task_runs_of_one_visit_are_from_scratch_references(tmp_path):
    runs = str(tmp_path / "suite" / "runs")
    write_run(runs, "m", 1, episodes([1.0, 0.5, 1.0]))
    for seed, level in ((1, 0.9), (2, 0.7)):  # B-v0 alone for one visit: score = mean of the last 25%
        run_dir = os.path.join(runs, f"scratch__B-v0__s{seed}")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"args": {"env_id": "B-v0", "env_ids": None, "total_timesteps": S}}, f)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"status": "completed", "total_timesteps": S, "final_train_return": level}, f)
        with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
            f.write("global_step,episodic_return,episodic_length,task\n")
            f.writelines(f"{step},{0.0 if step <= 750 else level},10,B-v0\n" for step in range(10, S + 1, 10))
    other = os.path.join(runs, "long__B-v0__s1")  # two visits long: no visit's reference
    os.makedirs(other)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({"args": {"env_id": "B-v0", "total_timesteps": 2 * S}}, f)
    with open(os.path.join(other, "summary.json"), "w") as f:
        json.dump({"status": "completed", "final_train_return": 1.0}, f)
    with open(os.path.join(other, "episodes.csv"), "w") as f:
        f.write("global_step,episodic_return,episodic_length,task\n1990,1.0,10,B-v0\n")
    text = open(continual.report(str(tmp_path / "suite"), str(tmp_path / "out"), reps=50, make_figures=False)).read()
    assert "| scratch | B-v0 | 2 | 0.800 | 2: 0.500 |" in text
    assert "(2 as from-scratch references)" in text
    assert "`long__B-v0__s1`: no per-visit measures: a single-task run that is no visit's from-scratch reference" in text
