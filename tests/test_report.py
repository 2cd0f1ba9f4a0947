"""benchmark/report.py on synthetic run directories: exclusions are listed with reasons, aggregates equal direct
NumPy computations on the runs used, figures and report.md are written."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import report  # noqa: E402
from utils import scores  # noqa: E402
from utils.runs import collect  # noqa: E402

TASKS = ("CartPole-v1", "Acrobot-v1")


def write_run(runs_dir, arm, env_id, seed, score, status="completed", total=1000, plasticity=None):
    run_dir = os.path.join(runs_dir, f"{arm}__{env_id}__s{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"status": status, "eval_return_mean": score, "final_train_return": score, "sps": 1000,
                   "total_timesteps": total}, f)
    with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
        f.write("global_step,episodic_return,episodic_length,task\n")
        for step in range(100, total + 1, 100):
            f.write(f"{step},{score * step / total},10,{env_id}\n")
    if plasticity is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir)
        for step in range(100, total + 1, 100):
            writer.add_scalar("plasticity/dormant_tau0.1", plasticity * step / total, step)
        writer.close()
    return run_dir


@pytest.fixture
def suite(tmp_path):
    runs = tmp_path / "suite" / "runs"
    runs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for arm, centre in (("base", 150.0), ("method", 300.0)):
        for t in TASKS:
            for seed in range(1, 6):
                value = centre + 20 * rng.standard_normal() if t == "CartPole-v1" else -centre + 10 * rng.random()
                write_run(str(runs), arm, t, seed, float(value), plasticity=0.1 if arm == "base" else 0.02)
                truth[(arm, t, seed)] = value
    # runs that must be excluded, each for its own reason
    write_run(str(runs), "method", "CartPole-v1", 6, float("nan"))
    write_run(str(runs), "method", "Acrobot-v1", 7, 1.0, status="diverged")
    os.makedirs(runs / "method__CartPole-v1__s8")  # killed: no summary
    write_run(str(runs), "base", "CartPole-v1", 9, 100.0)  # a 6th CartPole run: dropped to equalise counts
    return str(tmp_path / "suite"), truth


def test_collect_lists_exclusions_with_reasons(suite):
    suite_dir, _ = suite
    rows = {r["run"]: r for r in collect(os.path.join(suite_dir, "runs"))}
    assert "no finite score" in rows["method__CartPole-v1__s6"]["excluded"]
    assert "diverged" in rows["method__Acrobot-v1__s7"]["excluded"]
    assert "no readable summary" in rows["method__CartPole-v1__s8"]["excluded"]
    assert rows["base__CartPole-v1__s1"]["excluded"] is None


def test_report_aggregates_equal_numpy(suite, tmp_path):
    suite_dir, truth = suite
    out = str(tmp_path / "report")
    path = report.report(suite_dir, out, compare=["method,base"], reps=300, points=5)
    text = open(path).read()
    for arm in ("base", "method"):
        x = np.array([[scores.normalize(t, truth[(arm, t, s)]) for t in sorted(TASKS)] for s in range(1, 6)])
        iqm = stats.trim_mean(x, 0.25, axis=None)
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | 5 |"))
        assert f"{iqm:.3f} [" in row, (arm, iqm, row)
    for run, why in (("method__CartPole-v1__s6", "no finite score"), ("method__Acrobot-v1__s7", "diverged"),
                     ("method__CartPole-v1__s8", "no readable summary"), ("base__CartPole-v1__s9", "equalised")):
        line = next(line for line in text.splitlines() if f"`{run}`" in line)
        assert why in line
    assert "| method,base |" in text
    for name in ("aggregates", "performance_profile", "sample_efficiency", "plasticity", "probability_of_improvement"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 1000, name


def test_plasticity_figure_for_per_network_keys(tmp_path):
    """SAC logs its diagnostics per network (plasticity/qf1/..., plasticity/actor/...): they get curves too."""
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "sac" / "runs"
    runs.mkdir(parents=True)
    for arm in ("sac", "sac_reset"):
        for seed in (1, 2):
            run_dir = write_run(str(runs), arm, "Hopper-v4", seed, 100.0 + seed)
            writer = SummaryWriter(run_dir)
            for step in range(100, 1001, 100):
                writer.add_scalar("plasticity/qf1/dormant_tau0.1", 0.1 if arm == "sac" else 0.3, step)
            writer.close()
    rows = [r for r in collect(str(runs)) if r["excluded"] is None]
    curves = report.plasticity_curves({arm: [r for r in rows if r["arm"] == arm] for arm in ("sac", "sac_reset")}, 5)
    assert set(curves) == {"plasticity/qf1/dormant_tau0.1"}
    np.testing.assert_allclose(curves["plasticity/qf1/dormant_tau0.1"]["sac_reset"][1], 0.3)
    out = str(tmp_path / "report")
    report.report(str(tmp_path / "sac"), out, compare=["sac_reset,sac"], reps=100, points=5)
    assert os.path.getsize(os.path.join(out, "plasticity.png")) > 1000


def test_report_is_reproducible(suite, tmp_path):
    suite_dir, _ = suite
    a = open(report.report(suite_dir, str(tmp_path / "a"), ["method,base"], reps=200, make_figures=False)).read()
    b = open(report.report(suite_dir, str(tmp_path / "b"), ["method,base"], reps=200, make_figures=False)).read()
    strip = lambda s: [line for line in s.splitlines() if not line.startswith("Report built")]  # noqa: E731
    assert strip(a) == strip(b)


def atari100k_suite(tmp_path, sticky=0.0, total=100_000, games=("Alien", "Pong", "Breakout")):
    runs = tmp_path / "atari" / "runs"
    for game in games:
        for seed in range(1, 6):
            run_dir = write_run(str(runs), "mine", f"{game}-v5", seed, 100.0 * seed, total=total)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump({"args": {"env_id": f"{game}-v5", "total_timesteps": total, "sticky_action_prob": sticky},
                           "family": "atari"}, f)  # the layout the scripts write (flags under "args")
    return str(tmp_path / "atari")


def test_published_arms_match_the_reference_files(tmp_path):
    suite_dir = atari100k_suite(tmp_path)
    path = report.report(suite_dir, reps=200, make_figures=False, published=["BBF", "DER"],
                         compare=["mine,published:BBF"])
    text = open(path).read()
    tasks = ["Alien-v5", "Breakout-v5", "Pong-v5"]
    for agent in ("BBF", "DER"):
        data = scores.load_published(agent)
        n = min(len(data[g]) for g in ("Alien", "Breakout", "Pong"))
        x = np.array([scores.normalize(t, np.array(data[t[:-3]][:n])) for t in tasks]).T
        iqm = stats.trim_mean(x.ravel(), 0.25)
        row = next(line for line in text.splitlines() if line.startswith(f"| published:{agent} |"))
        assert row.split("|")[2].strip() == str(n)
        assert row.split("|")[3].strip().startswith(f"{iqm:.3f} ["), (row, iqm)
        assert f"first {n} runs per game" in text
    assert "| mine,published:BBF |" in text


@pytest.mark.parametrize("kind", ["sticky", "budget", "not_atari100k"])
def test_published_arms_need_the_atari100k_protocol(tmp_path, kind):
    if kind == "sticky":
        suite_dir = atari100k_suite(tmp_path, sticky=0.25)
    elif kind == "budget":
        suite_dir = atari100k_suite(tmp_path, total=200_000)
    else:
        suite_dir = atari100k_suite(tmp_path, games=("Alien", "Tennis"))  # Tennis is not an Atari 100k game
    text = open(report.report(suite_dir, reps=100, make_figures=False, published=["BBF"])).read()
    assert "published:BBF |" not in text and "Published arms left out" in text
    assert ("Tennis-v5 not among" in text) if kind == "not_atari100k" else ("Atari 100k protocol" in text)


def test_arms_on_different_tasks_are_reported_per_group(tmp_path):
    """A suite mixing families (SAC on one task set, PPO on another) gets one section per task set, each with its
    own aggregates and figures; a comparison across sets is skipped with a note. An arm whose runs all failed on
    one of its tasks stays in its group (and is excluded there with the reason) instead of forming a new group."""
    runs = tmp_path / "mixed" / "runs"
    truth = {}
    for arm, tasks in (("sac", ("Pendulum-v1",)), ("sac_sem", ("Pendulum-v1",)),
                       ("ppo", TASKS), ("ppo_sem", TASKS), ("ppo_broken", TASKS)):
        for t in tasks:
            for seed in range(1, 4):
                value = float(-100 * seed if t == "Pendulum-v1" else 50 * seed + len(arm))
                broken = arm == "ppo_broken" and t == "Acrobot-v1"
                write_run(str(runs), arm, t, seed, value, status="diverged" if broken else "completed")
                truth[(arm, t, seed)] = value
    path = report.report(str(tmp_path / "mixed"), str(tmp_path / "out"), compare=["ppo_sem,ppo", "sac_sem,ppo"],
                         reps=200, points=4)
    text = open(path).read()
    assert "## Group 1: ppo, ppo_broken, ppo_sem" in text and "## Group 2: sac, sac_sem" in text
    assert "Comparison sac_sem,ppo skipped: the two arms were run on different tasks." in text
    assert "| ppo_sem,ppo |" in text
    # group 2 is Pendulum only (no normalisation reference): raw returns, IQM over 3 runs x 1 task
    x = np.array([truth[("sac_sem", "Pendulum-v1", s)] for s in range(1, 4)])
    row = next(line for line in text.splitlines() if line.startswith("| sac_sem | 3 |"))
    assert f"{stats.trim_mean(x, 0.25):.3f} [" in row
    group2 = text[text.index("## Group 2"):]
    assert "| arm | runs per task | IQM | Median | Mean | mean SPS |" in group2  # no optimality gap on raw returns
    assert "Optimality Gap" in text[:text.index("## Group 2")]
    # group 1 is normalised over CartPole and Acrobot; ppo_broken is dropped, not regrouped
    x = np.array([[scores.normalize(t, truth[("ppo", t, s)]) for t in sorted(TASKS)] for s in range(1, 4)])
    row = next(line for line in text.splitlines() if line.startswith("| ppo | 3 |"))
    assert f"{stats.trim_mean(x, 0.25, axis=None):.3f} [" in row
    assert not any(line.startswith("| ppo_broken |") for line in text.splitlines())
    assert "`ppo_broken__CartPole-v1__s1`: arm has no usable run on Acrobot-v1" in text
    for prefix in ("g1_", "g2_"):
        assert os.path.getsize(tmp_path / "out" / f"{prefix}aggregates.png") > 1000


def test_raw_returns_of_several_tasks_are_reported_per_task(tmp_path):
    """MinAtar has no normalisation reference: raw returns of games with very different scales are never pooled.
    The aggregates and probability of improvement are per task ((runs, 1) arrays), and per_task_curves replaces
    the figures that pool tasks."""
    runs = tmp_path / "minatar" / "runs"
    truth = {("base", "MinAtar-Breakout"): [2.0, 4.0, 6.0, 20.0],
             ("method", "MinAtar-Breakout"): [30.0, 31.0, 35.0, 40.0],
             ("base", "MinAtar-Asterix"): [1000.0, 1200.0, 1500.0, 3000.0],
             ("method", "MinAtar-Asterix"): [100.0, 200.0, 300.0, 900.0]}
    for (arm, t), values in truth.items():
        for seed, value in enumerate(values, start=1):
            write_run(str(runs), arm, t, seed, value)
    out = tmp_path / "out"
    path = report.report(str(tmp_path / "minatar"), str(out), compare=["method,base"], reps=100, points=5)
    text = open(path).read()
    lines = text.splitlines()
    assert "| task | arm | runs | IQM | Median | Mean | min | max | mean SPS |" in text
    assert "not pooled across tasks" in text
    for (arm, t), values in truth.items():
        x = np.array(values)
        iqm = (np.sort(x)[1] + np.sort(x)[2]) / 2  # 4 runs: trim_mean(0.25) keeps the middle two
        assert iqm == stats.trim_mean(x, 0.25)
        row = next(line for line in lines if line.startswith(f"| {t} | {arm} | 4 |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[3].startswith(f"{iqm:.3f} [") and cells[5].startswith(f"{x.mean():.3f} ["), row
        assert cells[6:] == [f"{x.min():.3f}", f"{x.max():.3f}", "1000"], row
    # tasks sorted: Asterix, Breakout; the per-task means table holds the same hand-computed means
    for arm in ("base", "method"):
        means = [np.mean(truth[(arm, t)]) for t in ("MinAtar-Asterix", "MinAtar-Breakout")]
        assert f"| {arm} | {means[0]:.3f} | {means[1]:.3f} |" in lines
    # no pooled aggregate over the two games
    assert "| arm | runs per task |" not in text and "### Aggregates" not in text and "## Aggregates" not in text
    assert not any(line.startswith(("| base | 4 |", "| method | 4 |")) for line in lines)
    # method beats base on every Breakout run pair and loses on every Asterix one
    assert "| task | X, Y | P(X > Y) [95% CI] |" in text
    assert "| MinAtar-Breakout | method,base | 1.000 [1.000, 1.000] |" in lines
    assert "| MinAtar-Asterix | method,base | 0.000 [0.000, 0.000] |" in lines
    assert not any(line.startswith("| method,base |") for line in lines)  # no pooled probability of improvement
    assert os.path.getsize(out / "per_task_curves.png") > 1000 and os.path.getsize(out / "per_task_curves.pdf") > 1000
    assert "- `per_task_curves.png`" in lines and "- `probability_of_improvement.png`" in lines
    for name in ("aggregates", "performance_profile", "sample_efficiency"):
        assert not (out / f"{name}.png").exists(), name
    # the curves: episodes.csv binned into 5 windows; the last holds steps 800, 900, 1000 (returns 0.8-1.0 x score)
    used = {arm: [r for r in collect(str(runs)) if r["arm"] == arm] for arm in ("base", "method")}
    curves = report.task_curves(used, ["MinAtar-Asterix", "MinAtar-Breakout"], 5)
    steps, c = curves["MinAtar-Asterix"]["base"]
    assert steps.tolist() == [200, 400, 600, 800, 1000] and c.shape == (4, 5)
    assert np.allclose(c[:, -1], 0.9 * np.array(truth[("base", "MinAtar-Asterix")]))


def write_episodes(run_dir, returns, steps=None):
    with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
        f.write("global_step,episodic_return,episodic_length,task\n")
        for i, value in enumerate(returns):
            f.write(f"{(steps or range(10, 10 * len(returns) + 1, 10))[i]},{value},1,T\n")


def test_steps_to_reach_by_hand(tmp_path):
    from utils.runs import steps_to_reach

    run = str(tmp_path)
    write_episodes(run, [0, 0, 5, 5, 5, 5, 9])
    assert steps_to_reach(run, 5, window=3) == 50  # episodes 3-5 (steps 30, 40, 50): the first full window at 5
    assert steps_to_reach(run, 5, window=1) == 30
    assert steps_to_reach(run, 19 / 3, window=3) == 70  # (5 + 5 + 9) / 3
    assert steps_to_reach(run, 6.5, window=3) == float("inf")  # never: censored
    write_episodes(run, [9, 0, 0, 0])
    assert steps_to_reach(run, 5, window=3) == float("inf")  # one lucky first episode is not a window of 3
    assert steps_to_reach(run, 5, window=1) == 10


def test_reach_table_medians_and_never(suite, tmp_path):
    suite_dir, truth = suite
    path = report.report(suite_dir, str(tmp_path / "r"), reps=200, make_figures=False, reach={"CartPole-v1": 150.0},
                         reach_window=10)
    text = open(path).read()
    assert "## Steps to reach a return" in text
    rows = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| CartPole-v1 | 150 |")}
    assert set(rows) == {"base", "method"}
    # write_run's episodes ramp linearly to the run's score at steps 100, 200, ..., 1000: the only full window of 10
    # is at step 1000, with mean score * 0.55 (method ~300: reached; base ~150: never)
    expected = [1000.0 if truth[("method", "CartPole-v1", seed)] * 0.55 >= 150 else float("inf") for seed in range(1, 6)]
    reached = int(np.isfinite(expected).sum())
    assert reached >= 3 and f"| {reached}/5 | 1,000 [" in rows["method"]
    assert "| 0/5 |" in rows["base"] or "| 0/6 |" in rows["base"]
    assert "never [never, never]" in rows["base"]
    assert "Acrobot" not in "".join(rows.values())  # no threshold for it: no row


@pytest.mark.parametrize("values, fragment", [(["x=abc"], "TASK=RETURN"), (["3", "CartPole-v1=4"], "not both")])
def test_bad_reach_arguments(values, fragment):
    with pytest.raises(SystemExit, match=fragment):
        report.parse_reach(values)
    assert report.parse_reach(["MinAtar/Breakout=12.5"]) == {"MinAtar-Breakout": 12.5}
    assert report.parse_reach(["7"]) == {"*": 7.0}


def write_scalars(run_dir, key, steps, values):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    for step, value in zip(steps, values):
        writer.add_scalar(key, value, step)
    writer.close()


def test_key_curve_binning_by_hand(tmp_path):
    """--keys bins a run's events into --points windows of [0, its total_timesteps]: mean in a window, an empty
    window carries the previous value forward, the windows before the first event are NaN, step = total is last."""
    from utils.runs import window_means

    runs = tmp_path / "runs"
    run_dir = write_run(str(runs), "arm", "CartPole-v1", 1, 1.0, total=1000)
    # windows of 200 steps: [0, 200) [200, 400) [400, 600) [600, 800) [800, 1000]
    write_scalars(run_dir, "eval/episodic_return", [450, 550, 590, 1000], [2.0, 4.0, 6.0, 10.0])
    rows = collect(str(runs))
    curves = report.key_curves({"arm": rows}, ["eval/episodic_return", "value/bias"], 5)
    steps, c, n = curves["eval/episodic_return"]["CartPole-v1"]["arm"]
    assert steps.tolist() == [200, 400, 600, 800, 1000] and n == 1
    np.testing.assert_array_equal(c, [[np.nan, np.nan, 4.0, 4.0, 10.0]])  # (2 + 4 + 6) / 3, carried, last
    steps, c, n = curves["value/bias"]["CartPole-v1"]["arm"]  # not logged: no row, the run still counted
    assert c.shape == (0, 5) and n == 1 and not report.key_logged(curves["value/bias"])
    assert window_means([0, 999, 1000, 5000], [1.0, 2.0, 3.0, 4.0], 1000, 2) == [1.0, 3.0]
    assert window_means([], [], 1000, 3) == [None, None, None]


def keys_suite(tmp_path):
    """2 arms x 2 tasks x 3 seeds logging value/bias at steps 100, 800, 1000 (values -5, a, a + 2; last window of
    4 over 1000 steps: [750, 1000], mean a + 1), except method on Acrobot-v1 seed 3, which never logs it."""
    runs = tmp_path / "keys" / "runs"
    last = {}
    for i, arm in enumerate(("base", "method")):
        for j, t in enumerate(TASKS):
            for seed in (1, 2, 3):
                run_dir = write_run(str(runs), arm, t, seed, 50.0 + seed)
                if (arm, t, seed) == ("method", "Acrobot-v1", 3):
                    continue
                a = 10.0 * i + 100.0 * j + seed
                write_scalars(run_dir, "value/bias", [100, 800, 1000], [-5.0, a, a + 2])
                last[(arm, t, seed)] = a + 1
    return str(tmp_path / "keys"), last


def test_logged_keys_table_by_hand(tmp_path):
    suite_dir, last = keys_suite(tmp_path)
    keys = ["value/bias", "least/stop_rate"]
    text = open(report.report(suite_dir, str(tmp_path / "k"), reps=100, points=4, make_figures=False,
                              keys=keys)).read()
    plain = open(report.report(suite_dir, str(tmp_path / "p"), reps=100, points=4, make_figures=False)).read()
    lines = text.splitlines()
    assert "## Logged keys" in lines and "least/stop_rate: logged by no run." in lines
    assert "| arm | Acrobot-v1 | CartPole-v1 |" in lines  # tasks sorted as in the per-task table
    for arm in ("base", "method"):
        cells = []
        for t in sorted(TASKS):
            x = np.array([last[(arm, t, s)] for s in (1, 2, 3) if (arm, t, s) in last])
            cells.append(f"{x.mean():.3f} [{x.min():.3f}, {x.max():.3f}] ({len(x)}/3 runs)")
        assert f"| {arm} | " + " | ".join(cells) + " |" in lines, (arm, cells)
    assert "| method | 112.500 [112.000, 113.000] (2/3 runs) |" in text  # Acrobot: a = 111, 112; a + 1
    assert "Runs that did not log `value/bias` (missing): 1." in lines
    # without --keys the report is the same, less the section
    strip = lambda s: [x for x in s.splitlines() if not x.startswith("Report built")]  # noqa: E731
    start = lines.index("## Logged keys")
    end = start + next(k for k, x in enumerate(lines[start + 1:], 1) if x.startswith("## "))
    assert strip("\n".join(lines[:start - 1] + lines[end - 1:])) == strip(plain)
    assert "Logged keys" not in plain


def test_keys_figure_per_group_from_the_command_line(tmp_path, monkeypatch):
    suite_dir, _ = keys_suite(tmp_path)
    run_dir = write_run(os.path.join(suite_dir, "runs"), "sac", "Pendulum-v1", 1, -200.0)  # a second task group
    write_scalars(run_dir, "value/bias", [500], [0.5])
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["report", suite_dir, "--out", str(out), "--reps", "50", "--points", "4",
                                      "--keys", "value/bias", "eval/episodic_return"])
    report.main()
    text = (out / "report.md").read_text()
    assert text.count("### Logged keys") == 2 and text.count("eval/episodic_return: logged by no run.") == 2
    assert "| sac | 0.500 [0.500, 0.500] (1/1 runs) |" in text  # step 500 of 1000: window 3 of 4, carried to 4
    for name in ("g1_keys", "g2_keys"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(out / f"{name}.{ext}") > 1000, name
    assert "- `g1_keys.png`" in text.splitlines()


@pytest.mark.parametrize("task", ["CartPole-v1", "MinAtar-Breakout"])
def test_auc_of_a_run_by_hand(tmp_path, task):
    """--auc: a run's AUC is the mean of its training-return curve over --points windows of [0, total_timesteps]
    (here 5 windows of 200 steps; step = total counts in the last): a window's mean return, an empty window keeps
    the previous window's value, the windows before the first episode take the first non-empty one's. Normalised
    where the task has a reference (CartPole-v1: / 500), raw returns otherwise (MinAtar)."""
    runs = tmp_path / "auc" / "runs"
    # run 1: nothing in [0, 200); (2 + 4) / 2 in [200, 400); nothing in [400, 600); 10; 20 -> [3, 3, 3, 10, 20]
    write_episodes(write_run(str(runs), "arm", task, 1, 20.0), [2.0, 4.0, 10.0, 20.0], steps=[250, 350, 650, 1000])
    # run 2: (1 + 3) / 2 in [0, 200); nothing until 1000 -> [2, 2, 2, 2, 5]
    write_episodes(write_run(str(runs), "arm", task, 2, 5.0), [1.0, 3.0, 5.0], steps=[100, 150, 1000])
    by_hand = np.array([(3 + 3 + 3 + 10 + 20) / 5, (2 + 2 + 2 + 2 + 5) / 5])  # 7.8, 2.6
    if task == "CartPole-v1":
        by_hand = by_hand / 500
    text = open(report.report(str(tmp_path / "auc"), str(tmp_path / "out"), reps=100, points=5,
                              make_figures=False, auc=True)).read()
    assert "## Area under the training curve" in text and "over 5 equal windows" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {task} | arm | 2 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4].startswith(f"{by_hand.mean():.3f} [")  # mean AUC over the two runs
    assert cells[5:7] == [f"{by_hand.min():.3f}", f"{by_hand.max():.3f}"]  # lowest and highest AUC over runs
    assert cells[7] == f"{(20.0 + 5.0) / 2 / (500 if task == 'CartPole-v1' else 1):.3f}"  # mean final score
    used = {"arm": sorted((r for r in collect(str(runs))), key=lambda r: r["seed"])}
    curves, _ = report.curve_matrices(used, [task], task == "CartPole-v1", 5)
    np.testing.assert_allclose(curves["arm"].mean(axis=2)[:, 0], by_hand)


def test_arms_of_different_budgets_keep_their_own_steps(tmp_path):
    """An arm's curve is drawn over its own budget: in one group a 1,000-step arm's 5 points sit at 200..1,000 and
    a 5,000-step arm's at 1,000..5,000 (not both on the budget of whichever run came last)."""
    runs = tmp_path / "mixed" / "runs"
    for seed in (1, 2):
        write_run(str(runs), "short", "MinAtar-Breakout", seed, 8.0, total=1000)
        write_run(str(runs), "long", "MinAtar-Breakout", seed, 25.0, total=5000)
    rows = sorted(collect(str(runs)), key=lambda r: (r["arm"], r["seed"]))
    used = {arm: [r for r in rows if r["arm"] == arm] for arm in ("short", "long")}
    curves, steps = report.curve_matrices(used, ["MinAtar-Breakout"], False, 5)
    np.testing.assert_allclose(steps["short"], [200, 400, 600, 800, 1000])
    np.testing.assert_allclose(steps["long"], [1000, 2000, 3000, 4000, 5000])
    assert curves["short"].shape == curves["long"].shape == (2, 1, 5)
    # write_run's returns rise linearly to the final score: each arm's curve rises over its own windows
    assert (np.diff(curves["short"][0, 0]) > 0).all() and (np.diff(curves["long"][0, 0]) > 0).all()
    assert 7 < curves["short"][0, 0, -1] <= 8 and 22 < curves["long"][0, 0, -1] <= 25


def early_late_suite(tmp_path, tasks):
    """Arms `early` and `late` with equal final scores on every run (seed s: F = 100 + 10 s, from a start of 0, or
    -500 + ... on Acrobot-v1): `early` reaches F by step 300 of 1000, `late` ramps linearly to it at step 1000."""
    runs = tmp_path / "el" / "runs"
    for t in tasks:
        start, final = (-500.0, lambda s: -100.0 - 10 * s) if t == "Acrobot-v1" else (0.0, lambda s: 100.0 + 10 * s)
        for seed in range(1, 5):
            f = final(seed)
            for arm, reach in (("early", 300), ("late", 1000)):
                run_dir = write_run(str(runs), arm, t, seed, f)
                steps = list(range(100, 1001, 100))
                write_episodes(run_dir, [start + (f - start) * min(1.0, s / reach) for s in steps], steps=steps)
    return str(tmp_path / "el")


@pytest.mark.parametrize("tasks", [("CartPole-v1", "Acrobot-v1"), ("MinAtar-Breakout", "MinAtar-Asterix")])
def test_auc_separates_an_early_learner_from_a_late_one(tmp_path, tasks):
    """Equal final scores (probability of improvement 0.5 on them), but `early` spends longer at its final return:
    a larger AUC on every run, P(early > late) on AUC = 1 per task (and pooled where the group is normalised, not
    for raw MinAtar returns) and a positive relative change, the ratio of the mean AUCs."""
    suite_dir = early_late_suite(tmp_path, tasks)
    text = open(report.report(suite_dir, str(tmp_path / "out"), compare=["early,late"], reps=200, points=10,
                              make_figures=False, auc=True)).read()
    lines = text.splitlines()
    normalised = "CartPole-v1" in tasks
    assert ("| early,late | 0.500 [" if normalised else f"| {tasks[0]} | early,late | 0.500 [") in text  # finals
    rows = {line.split(" | ")[0][2:]: line for line in lines if "| early,late | " in line and line.count("|") == 7}
    assert set(rows) == set(tasks) | ({"all tasks (pooled)"} if normalised else set())
    for t, row in rows.items():
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2].startswith("1.000 ["), row  # every early run's AUC is above every late run's
        mean_x, mean_y = float(cells[3]), float(cells[4])
        change = float(cells[5].rstrip("%")) / 100  # from the unrounded means: within the shown ones' rounding
        assert mean_x > mean_y > 0 and change > 0, row
        assert (mean_x - 5e-4) / (mean_y + 5e-4) - 1 - 5e-4 <= change <= (mean_x + 5e-4) / (mean_y - 5e-4) - 1 + 5e-4
    # the mean AUCs by hand, in returns: F times the mean over windows of the ramp. Window k is [100 k, 100 k + 100):
    # the first episode (step 100) is in window 1, so window 0 takes its value; steps 900 and 1000 share the last
    ramp = {"early": np.mean([1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1]),
            "late": np.mean([0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, (0.9 + 1.0) / 2])}
    if not normalised:  # raw returns of two games: per task only, no pooled AUC table
        assert "| arm | runs per task | IQM AUC | Mean AUC |" not in lines and "Tasks in raw returns" in text
        finals = 100 + 10 * np.arange(1, 5)
        for arm in ("early", "late"):
            row = next(line for line in lines  # the AUC table's row (9 bars; the aggregates' row has 10)
                       if line.startswith(f"| MinAtar-Breakout | {arm} | 4 |") and line.count("|") == 9)
            assert row.split(" | ")[4].startswith(f"{finals.mean() * ramp[arm]:.3f} ["), row
    else:
        assert "| arm | runs per task | IQM AUC | Mean AUC |" in lines
        assert "Tasks in raw returns" not in text


def test_auc_off_leaves_the_report_unchanged(suite, tmp_path, monkeypatch):
    """Without --auc the report is the one it was (no section, the same figures); with it, the same plus the
    section (from the command line)."""
    suite_dir, _ = suite
    plain = open(report.report(suite_dir, str(tmp_path / "p"), compare=["method,base"], reps=100, points=5)).read()
    monkeypatch.setattr(sys, "argv", ["report", suite_dir, "--out", str(tmp_path / "a"), "--reps", "100", "--points",
                                      "5", "--compare", "method,base", "--auc"])
    report.main()
    lines = (tmp_path / "a" / "report.md").read_text().splitlines()
    assert "Area under" not in plain
    start = lines.index("## Area under the training curve")
    end = start + next(k for k, x in enumerate(lines[start + 1:], 1) if x.startswith("## "))
    strip = lambda s: [x for x in s if not x.startswith("Report built")]  # noqa: E731
    assert strip(lines[:start - 1] + lines[end - 1:]) == strip(plain.splitlines())
    assert "| method,base |" in plain and "- `sample_efficiency.png`" in plain
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "p"))
