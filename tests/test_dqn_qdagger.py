"""algos/dqn_qdagger.py: the distillation loss against a hand computation (temperature, direction of the KL), the
progress / multiplier / learning-rate schedules, the replay file round trip, and end-to-end runs: a tiny teacher
(--save-model --save-replay) then a student (offline phase and online distillation, qdagger/ logs), no teacher =
dqn.py byte for byte, and bad teacher input as one-line errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import helpers
from helpers import call_main, describe, load_script, read_json, read_scalars, run_script, script_path

QDAGGER = script_path("dqn_qdagger")
TEACHER_FLAGS = ["--env-id", "CartPole-v1", "--total-timesteps", "600", "--learning-starts", "200", "--buffer-size",
                 "1000", "--batch-size", "32", "--eval-episodes", "2", "--metrics-every", "0", "--device", "cpu",
                 "--torch-threads", "1"]


@pytest.fixture(scope="module")
def qd():
    return load_script("dqn_qdagger")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny CartPole teacher trained by dqn_qdagger.py itself with no teacher (= dqn.py): model.pt, replay.npz."""
    out = tmp_path_factory.mktemp("teacher")
    proc = run_script(QDAGGER, [*TEACHER_FLAGS, "--save-model", "--save-replay", "--output-dir", out, "--run-name",
                                "t"], cwd=str(out))
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(out), "t")


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(x, tau):
    e = [math.exp(v / tau) for v in x]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_distillation_loss_is_kl_teacher_to_student_at_temperature(qd, tau):
    teacher = [[3.0, 0.0, -2.0], [0.2, 0.9, 0.1]]
    student = [[0.0, 1.0, 0.5], [1.5, -0.2, 0.0]]
    forward = [kl(softmax(t, tau), softmax(s, tau)) for t, s in zip(teacher, student)]  # KL(p_T || p_S)
    reverse = [kl(softmax(s, tau), softmax(t, tau)) for t, s in zip(teacher, student)]  # KL(p_S || p_T)
    assert abs(np.mean(forward) - np.mean(reverse)) > 0.1 * np.mean(forward)  # the case pins the direction
    got = qd.distillation_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                               tau).item()
    assert got == pytest.approx(np.mean(forward), rel=1e-9)  # batch mean, no tau^2 factor
    same = qd.distillation_loss(torch.tensor(teacher), torch.tensor(teacher), tau).item()
    assert same == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("progress, multiplier", [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (1.7, 0.0), (-0.3, 1.3)])
def test_multiplier_lambda_and_lr_at_given_progress(qd, progress, multiplier):
    m = qd.qdagger_multiplier(1.0, progress, online_steps=1000, decay_period=5000)
    assert m == pytest.approx(multiplier)
    assert 3.0 * m == pytest.approx(3.0 * multiplier)  # lambda_t = lambda_0 * m
    assert qd.qdagger_learning_rate(m, 1e-4, 1e-5) == pytest.approx(multiplier * 1e-4 + (1 - multiplier) * 1e-5)


def test_multiplier_is_zero_past_the_decay_period_and_stays_zero(qd):
    assert qd.qdagger_multiplier(1.0, 0.2, online_steps=5001, decay_period=5000) == 0.0
    assert qd.qdagger_multiplier(1.0, 0.2, online_steps=10**9, decay_period=0) == pytest.approx(0.8)  # 0: no cut-off
    assert qd.qdagger_multiplier(0.0, -1.0, online_steps=10, decay_period=5000) == 0.0  # 0 is final (official)
    assert qd.qdagger_learning_rate(0.0, 1e-4, 1e-5) == pytest.approx(1e-5)
    assert qd.qdagger_progress(60.0, 110.0, 10.0) == pytest.approx(0.5, rel=1e-6)  # random subtracted twice


def test_step_updates_progress_when_an_episode_ends(qd):
    class Opt:
        param_groups = [{"lr": None}]
    args = qd.Args(distill_coef=2.0, progress_episodes=2, distill_decay_period=100, qdagger_lr_start=1e-3,
                   qdagger_lr_end=1e-4)
    state = dict(multiplier=1.0, progress=0.0, teacher_return=110.0, random_return=10.0, lr=1e-3, distill_loss=0.0)
    state["lambda"] = 2.0
    qd.qdagger_step(state, [20.0], [(0, 20.0, 5)], 10, args, Opt)  # one episode < progress_episodes: unchanged
    assert state["multiplier"] == 1.0 and Opt.param_groups[0]["lr"] is None
    qd.qdagger_step(state, [20.0, 40.0], [(0, 40.0, 5)], 20, args, Opt)  # mean 30: g = 0.2
    assert state["progress"] == pytest.approx(0.2) and state["lambda"] == pytest.approx(1.6)
    assert Opt.param_groups[0]["lr"] == pytest.approx(0.8e-3 + 0.2e-4)
    qd.qdagger_step(state, [20.0, 40.0], [], 101, args, Opt)  # past the decay period, no episode needed
    assert state["multiplier"] == 0.0 and state["lambda"] == 0.0 and Opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    qd.qdagger_step(state, [0.0, 0.0], [(0, 0.0, 5)], 102, args, Opt)  # stays 0
    assert state["multiplier"] == 0.0


def test_replay_file_round_trip(qd, tmp_path):
    rb = qd.ReplayBuffer(40, 2, (4, 84, 84), np.uint8, stacked=True)
    rng = np.random.default_rng(0)
    for t in range(30):
        obs = rng.integers(0, 255, (2, 4, 84, 84), dtype=np.uint8)
        rb.add(obs, np.array([t % 3, 1]), np.array([0.5, -1.0]), np.array([t == 9, False]), np.zeros(2, bool),
               np.array([t == 0, t == 0]), np.array([True, t != 12]))
    path = str(tmp_path / "replay.npz")
    qd.write_replay(rb, path)
    back = qd.read_replay(path, (4, 84, 84), np.uint8, 4, True, 1)
    for name in qd.REPLAY_ARRAYS:
        assert np.array_equal(getattr(back, name), getattr(rb, name)), name
    assert (back.rows, back.pos, back.full) == (rb.rows, rb.pos, rb.full)
    a, b = rb.sample(16, np.random.default_rng(1), 3), back.sample(16, np.random.default_rng(1), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(qd.UserError, match="actions outside"):
        qd.read_replay(path, (4, 84, 84), np.uint8, 2, True, 1)


def test_teacher_then_student_end_to_end(teacher, tmp_path):
    proc = run_script(QDAGGER, [*TEACHER_FLAGS, "--total-timesteps", "1500", "--teacher-checkpoint",
                                os.path.join(teacher, "model.pt"), "--teacher-replay",
                                os.path.join(teacher, "replay.npz"), "--offline-steps", "30", "--log-every", "10",
                                "--teacher-return", "500", "--random-return", "0", "--progress-episodes", "3",
                                "--distill-decay-period", "0", "--save-model",
                                "--output-dir", tmp_path, "--run-name", "s"], cwd=str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "s")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and (summary["teacher_return"], summary["random_return"]) == (500, 0)
    scalars = read_scalars(run_dir)
    for key in ("teacher_return", "random_return", "offline/td_loss", "offline/distill_loss", "distill_loss",
                "lambda", "progress", "multiplier", "lr"):
        assert f"qdagger/{key}" in scalars, key
    assert [step for step, _ in scalars["qdagger/offline/td_loss"]] == [10, 20, 30]
    returns = [float(row["episodic_return"]) for row in helpers.read_csv(os.path.join(run_dir, "episodes.csv"))[1]]
    for (step, lam), (_, m), (_, g), (_, lr) in zip(*(scalars[f"qdagger/{k}"] for k in
                                                      ("lambda", "multiplier", "progress", "lr"))):
        assert lam == pytest.approx(3.0 * m) and m == pytest.approx(max(1 - g, 0.0), abs=1e-6)
        assert lr == pytest.approx(m * 2.5e-4 + (1 - m) * 2.5e-5, rel=1e-5)  # CartPole: lr_start = --learning-rate
    assert 0 < scalars["qdagger/progress"][-1][1] <= max(returns) / 500
    # the student's model.pt is a --save-model checkpoint: it evaluates, and it can teach
    proc = run_script(QDAGGER, [*TEACHER_FLAGS, "--eval-checkpoint", os.path.join(run_dir, "model.pt"),
                                "--output-dir", tmp_path, "--run-name", "e"], cwd=str(tmp_path))
    assert proc.returncode == 0, describe(proc)


def test_measured_teacher_and_random_returns(qd, teacher, tmp_path):
    settings = dict(total_timesteps=300, learning_starts=200, buffer_size=1000, batch_size=32, eval_episodes=2,
                    metrics_every=0)
    run_dir = helpers.run_in_process(qd, tmp_path, "m", "CartPole-v1", settings, offline_steps=0,
                                     teacher_checkpoint=os.path.join(teacher, "model.pt"))
    summary = read_json(os.path.join(run_dir, "summary.json"))
    # the teacher's own end-of-training evaluation used the same episodes (seed 1, --eval-episodes 2)
    assert summary["teacher_return"] == pytest.approx(read_json(os.path.join(teacher, "summary.json"))["eval_return_mean"])
    assert 5 < summary["random_return"] < 60  # uniform-random CartPole episodes (about 22 on average)
    scalars = read_scalars(run_dir)
    assert scalars["qdagger/teacher_return"] == [(0, pytest.approx(summary["teacher_return"]))]


def test_no_teacher_is_dqn_exactly(qd, tmp_path):
    dqn = load_script("dqn")
    base = helpers.run_dqn_smoke(dqn, tmp_path, "dqn", "CartPole-v1", seed=3, metrics_every=0)
    ours = helpers.run_dqn_smoke(qd, tmp_path, "qdagger", "CartPole-v1", seed=3, metrics_every=0, save_replay=True)
    helpers.assert_same_run(base, ours, "dqn_qdagger.py without a teacher")
    assert os.path.isfile(os.path.join(ours, "replay.npz"))


def test_bad_teacher_input_is_one_line_errors(qd, teacher, tmp_path, capsys):
    model, replay = os.path.join(teacher, "model.pt"), os.path.join(teacher, "replay.npz")
    truncated = str(tmp_path / "truncated.npz")
    with open(replay, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[: os.path.getsize(replay) // 2])
    cases = [
        (["--env-id", "Acrobot-v1", "--teacher-checkpoint", model, "--offline-steps", "0"],
         ["--teacher-checkpoint", "(4,) and 2 actions", "Acrobot-v1 has (6,) and 3"]),
        (["--teacher-checkpoint", model, "--teacher-replay", str(tmp_path / "missing.npz")],
         ["--teacher-replay", "no such file"]),
        (["--teacher-checkpoint", model, "--teacher-replay", truncated, "--offline-steps", "5"],
         ["--teacher-replay", "not a replay file written by --save-replay"]),
        (["--teacher-checkpoint", model, "--offline-steps", "5"], ["--offline-steps 5 needs --teacher-replay"]),
        (["--offline-steps", "5"], ["need --teacher-checkpoint"]),
        (["--teacher-checkpoint", replay, "--offline-steps", "0"], ["--teacher-checkpoint", "safe loading"]),
        (["--teacher-checkpoint", model, "--offline-steps", "0", "--teacher-return", "5", "--random-return", "9"],
         ["--teacher-return (5.0) must be above --random-return (9.0)"]),
    ]
    for i, (flags, fragments) in enumerate(cases):
        code, lines = call_main(qd, [*TEACHER_FLAGS, "--output-dir", tmp_path, "--run-name", f"bad{i}", *flags], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (flags, code, lines)
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        summary = os.path.join(str(tmp_path), f"bad{i}", "summary.json")
        assert not os.path.exists(summary) or read_json(summary)["status"] == "failed"
        assert not os.path.exists(os.path.join(str(tmp_path), f"bad{i}", "model.pt"))
