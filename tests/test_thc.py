"""The THC score (utils/thc.py) on hand-worked examples and against the paper's published values on its released
data (benchmark/reference/consistency/), and the report's --sweep and --thc options on small synthetic suites."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import report, thc  # noqa: E402
from utils.thc import intervals, rank_intervals, thc_score  # noqa: E402


def runs(*pairs):
    """(seeds=2, tasks) scores whose interval on each task is [mean - std, mean + std] = the given (lo, hi): the two
    seeds are lo and hi (mean (lo + hi) / 2, population std (hi - lo) / 2)."""
    return np.array([[lo for lo, _ in pairs], [hi for _, hi in pairs]], dtype=float)


# --- the score on hand-worked examples -------------------------------------------------------------------------------

def test_interval_is_mean_plus_minus_population_std():
    # seeds 0 and 2: mean 1, std with ddof 0 = 1 (ddof 1 would give sqrt(2)); seeds 3, 3, 3: [3, 3]
    np.testing.assert_array_equal(intervals(np.array([[0.0, 3.0], [2.0, 3.0]])), [[0.0, 2.0], [3.0, 3.0]])
    np.testing.assert_array_equal(intervals(np.array([[0.0, 3.0], [2.0, 3.0], [1.0, 3.0]]))[1], [3.0, 3.0])


def test_ranks_of_separate_overlapping_and_touching_intervals():
    # separate: [9, 11] > [7, 8] > [1, 2]: positions 1, 2, 3 (given in another order)
    np.testing.assert_array_equal(rank_intervals([1, 9, 7], [2, 11, 8]), [3, 1, 2])
    # A [9, 11] overlaps B [7.5, 9.5]; C [4, 6] lies below both. Sorted by upper bound: A, B, C.
    # A: first overlapping from the top = itself (b = 0); first wholly below = C at position 2 (e = 2): (0+1+2)/2 = 1.5
    # B: A's lower bound 9 <= 9.5 (b = 0); C's 6 < 7.5 (e = 2): 1.5.  C: b = 2, nothing below (e = 3): (2+1+3)/2 = 3
    np.testing.assert_array_equal(rank_intervals([9, 7.5, 4], [11, 9.5, 6]), [1.5, 1.5, 3])
    # a chain: A [9, 11] ~ B [7.5, 9.5] ~ C [6, 8], A and C apart. A: e = 2 (C's 8 < 9): 1.5.
    # B: b = 0, nothing wholly below 7.5 (C reaches 8): e = 3, (0+1+3)/2 = 2.  C: b = 1 (A's 9 > 8, B's 7.5 <= 8): 2.5
    np.testing.assert_array_equal(rank_intervals([9, 7.5, 6], [11, 9.5, 8]), [1.5, 2, 2.5])
    # touching: [2, 4] and [0, 2] share the point 2: overlap (lo <= hi), not wholly below (hi < lo fails): both 1.5
    np.testing.assert_array_equal(rank_intervals([2, 0], [4, 2]), [1.5, 1.5])
    # identical intervals: all tie at the middle position (1 + 3) / 2 = 2
    np.testing.assert_array_equal(rank_intervals([0, 0, 0], [0, 0, 0]), [2, 2, 2])
    # the official loop's sentinel [-100, -100] would leave B at rank 1 (its lower bound -110 <= -100, nothing
    # strictly below it); here the worst of two separate intervals is 2 whatever the scale
    np.testing.assert_array_equal(rank_intervals([-51, -110], [-49, -90]), [1, 2])


def test_perfect_consistency_is_zero():
    # three values, two tasks, the same separate order on both: ranks 1, 2, 3 twice, every spread 0
    result = thc_score({"a": runs((9, 11), (90, 110)), "b": runs((5, 7), (50, 60)), "c": runs((0, 1), (0, 10))})
    assert (result.mean, result.std) == (0.0, 0.0)
    assert {v: r.tolist() for v, r in result.ranks.items()} == {"a": [1, 1], "b": [2, 2], "c": [3, 3]}


def test_maximal_inconsistency_is_one():
    # three values, three tasks, orders abc, bca, cab (separate intervals): a ranks 1, 3, 2; b 2, 1, 3; c 3, 2, 1.
    # each spreads 3 - 1 = 2 = k - 1: spread 1, THC 1 +- 0
    hi, mid, lo = (10, 11), (5, 6), (0, 1)
    result = thc_score({"a": runs(hi, lo, mid), "b": runs(mid, hi, lo), "c": runs(lo, mid, hi)})
    assert (result.mean, result.std) == (1.0, 0.0)
    assert result.ranks["a"].tolist() == [1, 3, 2]
    # two values, swapped on two tasks: ranks 1, 2 and 2, 1; spread 1 / (2 - 1) = 1 each
    assert thc_score({4: runs((5, 6), (0, 1)), 8: runs((0, 1), (5, 6))})[:2] == (1.0, 0.0)


def test_ties_by_hand():
    # task 1, the chain above: a 1.5, b 2, c 2.5; task 2, separate, c > b > a: a 3, b 2, c 1.
    # spreads (k - 1 = 2): a |3 - 1.5| / 2 = 0.75, b 0, c |2.5 - 1| / 2 = 0.75.
    # THC = mean 0.5; std (ddof 1) = sqrt((0.25^2 + 0.5^2 + 0.25^2) / 2) = sqrt(0.1875)
    result = thc_score({"a": runs((9, 11), (0, 1)), "b": runs((7.5, 9.5), (5, 6)), "c": runs((6, 8), (10, 11))})
    assert result.spread == {"a": 0.75, "b": 0.0, "c": 0.75}
    assert result.mean == pytest.approx(0.5, abs=1e-15) and result.std == pytest.approx(np.sqrt(0.1875), abs=1e-15)
    # a positive affine map of a task's scores (a normalisation) changes no rank
    scaled = {v: x * np.array([3.0, 0.5]) + np.array([-7.0, 100.0]) for v, x in
              {"a": runs((9, 11), (0, 1)), "b": runs((7.5, 9.5), (5, 6)), "c": runs((6, 8), (10, 11))}.items()}
    assert thc_score(scaled).spread == result.spread


@pytest.mark.parametrize("scores, fragment", [
    ({"a": np.zeros((2, 3))}, "at least 2 values"),
    ({"a": np.zeros((2, 1)), "b": np.ones((2, 1))}, "at least 2 tasks"),
    ({"a": np.zeros((2, 3)), "b": np.ones((2, 2))}, "same tasks"),
    ({"a": np.zeros(3), "b": np.ones(3)}, "same tasks"),
    ({"a": np.zeros((2, 2)), "b": np.array([[1.0, np.nan], [1.0, 1.0]])}, "finite"),
])
def test_bad_input(scores, fragment):
    with pytest.raises(ValueError, match=fragment):
        thc_score(scores)


# --- the paper's released data ---------------------------------------------------------------------------------------

def test_released_data_gives_every_published_value():
    """Every THC value the website lists (constants.py @ e38bbbb), recomputed from the released final scores: equal
    to 1e-12, hence to the 2 decimals the website prints."""
    rows = thc.published_rows()
    assert len(rows) == 80  # 40M: 19 DrQ(eps) + 20 DER; 100k: 20 + 21
    wrong = [(r["regime"], r["agent"], r["name"], r["ours"], r["published"]) for r in rows if not r["exact"]]
    assert not wrong, wrong
    assert all(r["printed"] for r in rows)
    batch = next(r for r in rows if (r["regime"], r["agent"], r["hparam"]) == ("40M", "DER", "batch_sizes"))
    assert batch["k"] == 4 and f"{batch['ours'][0]:.2f} ± {batch['ours'][1]:.2f}" == "0.67 ± 0.24"


def test_released_data_is_the_studys():
    """The stored arrays are the study's: 5 seeds x 26 games per value, and the IQM over those 130 scores of DER's
    batch sizes at 40M is the one docs' method card small-batch.md took from the pickles (1.151, 1.218, 1.036,
    0.760 for B = 4, 8, 16, 32). The one incomplete array (40M dense normalisation, DER BatchNorm: 25 games) is
    refused, as the official code fails on it."""
    data = thc.load_released("40M")
    assert len(data["games"]) == 26 and data["games"][0] == "Alien"
    batch = data["hparams"]["batch_sizes"]["DER"]
    assert list(batch) == ["4", "8", "16", "32"] and all(x.shape == (5, 26) and x.dtype == np.float32
                                                           for x in batch.values())
    iqm = [stats.trim_mean(x.ravel().astype(float), 0.25) for x in batch.values()]
    np.testing.assert_allclose(iqm, [1.151, 1.218, 1.036, 0.760], atol=5e-4)
    assert data["hparams"]["normalizations"]["DER"]["BatchNorm"].shape == (5, 25)
    with pytest.raises(ValueError, match="same tasks"):
        thc_score(data["hparams"]["normalizations"]["DER"])


def test_published_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["thc", "--published"])
    thc.main()
    out = capsys.readouterr().out
    assert "80 of 80 published values reproduced" in out
    assert "| 40M | DER | Batch Size (batch_sizes) | 4 | 0.6667 ± 0.2357 | 0.6667 ± 0.2357 | yes (to 1e-12) |" in out


# --- report --sweep and --thc ----------------------------------------------------------------------------------------

# Arm -> batch size; per task the two seeds' final returns (lo, hi), chosen so that the intervals are those of
# test_ties_by_hand: Acrobot-v1 (the first task, sorted) a chain b8 ~ b16 ~ b32, CartPole-v1 b32 > b16 > b8.
ARMS = {"b8": 8, "b16": 16, "b32": 32}
RETURNS = {("b8", "Acrobot-v1"): (-110, -90), ("b16", "Acrobot-v1"): (-125, -105), ("b32", "Acrobot-v1"): (-140, -120),
           ("b8", "CartPole-v1"): (180, 220), ("b16", "CartPole-v1"): (280, 320), ("b32", "CartPole-v1"): (380, 420)}


def write_run(runs_dir, arm, env_id, seed, score, args, script="dqn.py", srank=None):
    run_dir = os.path.join(runs_dir, f"{arm}__{env_id}__s{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"status": "completed", "eval_return_mean": score, "sps": 100, "total_timesteps": 1000}, f)
    with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
        f.write("global_step,episodic_return,episodic_length,task\n")
        f.writelines(f"{step},{score},10,{env_id}\n" for step in range(250, 1001, 250))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"args": {"seed": seed, "run_name": os.path.basename(run_dir), "env_id": env_id, "torch_threads": 1,
                            "learning_rate": 2.5e-4, **args}, "command": [f"/somewhere/algos/{script}"]}, f)
    if srank is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir)
        for step, value in ((500, 0.0), (1000, srank)):
            writer.add_scalar("plasticity/srank", value, step)
        writer.close()


@pytest.fixture
def sweep_suite(tmp_path):
    runs_dir = tmp_path / "sweep" / "runs"
    for arm, batch in ARMS.items():
        for t in ("Acrobot-v1", "CartPole-v1"):
            for seed, score in zip((1, 2), RETURNS[(arm, t)]):
                # srank's last logged value (step 1000): batch + seed
                write_run(str(runs_dir), arm, t, seed, float(score), {"batch_size": batch}, srank=batch + seed)
    return str(tmp_path / "sweep")


def test_sweep_and_thc_sections_by_hand(sweep_suite, tmp_path):
    out = str(tmp_path / "out")
    text = open(report.report(sweep_suite, out, reps=100, make_figures=False, sweep="batch_size", thc="batch_size",
                              keys=["plasticity/srank"])).read()
    lines = text.splitlines()
    assert "## Sweep over batch_size" in lines and "No other field differs between values." in text
    # normalised: Acrobot (x + 500) / 500, CartPole x / 500. Per task the IQM of 2 runs is their mean; pooled, the
    # IQM of 4 scores is the mean of the middle two: b8 {0.36, 0.44, 0.78, 0.82} -> 0.61,
    # b16 {0.56, 0.64, 0.75, 0.79} -> 0.695, b32 {0.72, 0.76, 0.76, 0.84} -> 0.76. Rows in numeric order 8, 16, 32.
    rows = [line for line in lines if line.startswith(("| 8 | b8 |", "| 16 | b16 |", "| 32 | b32 |"))]
    assert [r.split(" | ")[0] for r in rows] == ["| 8", "| 16", "| 32"], rows
    for row, (acrobot, cartpole, pooled) in zip(rows, [(0.8, 0.4, 0.61), (0.77, 0.6, 0.695), (0.74, 0.8, 0.76)]):
        cells = row.split(" | ")
        assert cells[2] == "2" and [c.split(" [")[0] for c in cells[3:6]] == [f"{acrobot:.3f}", f"{cartpole:.3f}",
                                                                              f"{pooled:.3f}"], row
    # srank: per run batch + seed at the last step; mean over seeds 1, 2 = batch + 1.5, min batch + 1, max batch + 2
    assert "| 8 | 9.500 [9.000, 10.000] (2/2 runs) | 9.500 [9.000, 10.000] (2/2 runs) |" in lines
    assert "| 32 | 33.500 [33.000, 34.000] (2/2 runs) | 33.500 [33.000, 34.000] (2/2 runs) |" in lines
    # THC: test_ties_by_hand's ranks and spreads (normalising changes no rank): 0.5 +- sqrt(0.1875) = 0.433
    assert "## Hyper-parameter consistency (THC) of batch_size" in lines
    assert "THC = 0.500 ± 0.433 over 3 values and 2 tasks" in text
    assert any(line.startswith("| 8 | 0.750 | 1.5 ([0.780, 0.820]) | 3 ([0.360, 0.440]) |") for line in lines)
    assert any(line.startswith("| 16 | 0.000 | 2 (") for line in lines)
    assert any(line.startswith("| 32 | 0.750 | 2.5 (") for line in lines)


def test_sweep_figure(tmp_path):
    # the figure alone (the report's other figures take seconds): pooled and per-task IQM, one logged key
    iqm = {v: {c: (v / 100, v / 100 - 0.1, v / 100 + 0.1) for c in ("pooled", "A", "B")} for v in (8, 16, 32)}
    finals = {"plasticity/srank": {v: {"A": (v, v - 1, v + 1)} for v in (8, 16, 32)}}
    paths = report.sweep_figure(str(tmp_path), ("batch_size",), iqm, finals, ["A", "B"], True, "return", "g2_")
    assert [os.path.basename(p) for p in paths] == ["g2_sweep_batch_size.png", "g2_sweep_batch_size.pdf"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_sweep_over_two_fields(tmp_path):
    """A PPO-style grid: arms differ in num_envs and num_steps; batch_size (derived) differs too and is named."""
    runs_dir = tmp_path / "grid" / "runs"
    for (envs, steps), score in {(4, 128): 100.0, (8, 64): 200.0, (4, 64): 300.0, (16, 32): 400.0}.items():
        for seed in (1, 2):
            write_run(str(runs_dir), f"e{envs}s{steps}", "CartPole-v1", seed, score + seed,
                      {"num_envs": envs, "num_steps": steps, "batch_size": envs * steps})
    text = open(report.report(str(tmp_path / "grid"), str(tmp_path / "out"), reps=50, make_figures=False,
                              sweep="num_envs,num_steps")).read()
    assert "## Sweep over num_envs,num_steps" in text
    assert "Other fields that differ between values (set by the arms or derived from num_envs,num_steps): " \
           "batch_size." in text
    rows = [line.split(" | ")[:3] for line in text.splitlines() if line.startswith("| (")]
    assert rows == [["| (4, 64)", "e4s64", "2"], ["| (4, 128)", "e4s128", "2"], ["| (8, 64)", "e8s64", "2"],
                    ["| (16, 32)", "e16s32", "2"]]
    # one task: no pooled column; IQM of (301, 302) = 301.5, raw returns normalised by CartPole's 500
    assert f"| (4, 64) | e4s64 | 2 | {301.5 / 500:.3f} [" in text and "pooled" not in text


def test_powers_of_two():
    assert report.powers_of_two([4, 8, 0.5, 64.0]) and not report.powers_of_two([4, 12])
    assert not report.powers_of_two([True, 2]) and not report.powers_of_two(["8", 16])


def add_arm(suite, arm, args, script="dqn.py", tasks=("Acrobot-v1", "CartPole-v1")):
    for t in tasks:
        for seed in (1, 2):
            write_run(os.path.join(suite, "runs"), arm, t, seed, 1.0, args, script=script)


@pytest.mark.parametrize("option, value, extra, fragments", [
    ("--sweep", "batch_sise", None, ("--sweep batch_sise: no field batch_sise", "close: batch_size")),
    ("--thc", "batch_size", ("b32_lr", {"batch_size": 32, "learning_rate": 1e-3}, "dqn.py"),
     ("arms b32 and b32_lr share batch_size = 32", "learning_rate (0.00025 vs 0.001)")),
    ("--sweep", "batch_size", ("redo32", {"batch_size": 32}, "dqn_redo.py"),
     ("arms b32 and redo32 share batch_size = 32", "script (dqn.py vs dqn_redo.py)")),
    ("--sweep", "batch_size,", None, ("expected FIELD or FIELD,FIELD",)),
])
def test_sweep_errors_are_one_line(sweep_suite, tmp_path, monkeypatch, option, value, extra, fragments):
    if extra:
        add_arm(sweep_suite, extra[0], extra[1], extra[2])
    monkeypatch.setattr(sys, "argv", ["report", sweep_suite, "--out", str(tmp_path / "out"), "--reps", "20",
                                      option, value])
    with pytest.raises(SystemExit) as exc:
        report.main()
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not os.path.exists(tmp_path / "out" / "report.md")


def test_thc_needs_two_tasks_and_two_values(tmp_path):
    runs_dir = tmp_path / "one" / "runs"
    for arm, batch in ARMS.items():
        for seed in (1, 2):
            write_run(str(runs_dir), arm, "CartPole-v1", seed, 100.0 * seed, {"batch_size": batch})
    with pytest.raises(SystemExit, match="THC needs at least 2 tasks and 2 values .* 1 task"):
        report.report(str(tmp_path / "one"), str(tmp_path / "out"), reps=20, make_figures=False, thc="batch_size")
    runs_dir = tmp_path / "same" / "runs"
    for t in ("CartPole-v1", "Acrobot-v1"):
        for seed in (1, 2):
            write_run(str(runs_dir), "only", t, seed, 100.0 * seed, {"batch_size": 32})
    with pytest.raises(SystemExit, match="2 task\\(s\\) and 1 value"):
        report.report(str(tmp_path / "same"), str(tmp_path / "out"), reps=20, make_figures=False, thc="batch_size")
