"""Command-line behaviour of algos/dqn.py: determinism, one-line errors for bad input, and divergence handling."""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import (
    assert_diverged_cleanly, assert_one_line_error, assert_seed_determinism, read_json, run_script, script_path,
)

DQN = script_path("dqn")
# a budget with learning updates and a mostly greedy policy afterwards, so the trained network drives the data
DETERMINISM_FLAGS = ["--env-id", "CartPole-v1", "--total-timesteps", 1500, "--learning-starts", 300,
                     "--buffer-size", 1500, "--batch-size", 32, "--eval-episodes", 0, "--metrics-every", 0,
                     "--device", "cpu"]


def run_dqn(tmp_path, run_name: str, *flags):
    return run_script(DQN, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name], cwd=str(tmp_path))


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    assert_seed_determinism(run_dqn, tmp_path, *DETERMINISM_FLAGS)


def test_unknown_env_id_suggests_close_match(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-id", "Cartpole-v1")
    assert_one_line_error(proc, "Cartpole-v1", "CartPole-v1")


def test_continuous_action_env_is_rejected(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-id", "HalfCheetah-v4")
    line = assert_one_line_error(proc, "HalfCheetah-v4")
    assert "discrete" in line.lower()


def test_task_sequence_with_different_observation_shapes_is_rejected(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-ids", "CartPole-v1", "Acrobot-v1", "--steps-per-task", 100)
    assert_one_line_error(proc, "observation")


# Regression: an Atari sequence with --full-action-space False and different minimal action sets (Breakout 4,
# Pong 6) was once accepted, building the Q-network with task 0's 4 actions so Pong's actions 4 and 5 were never taken.
def test_task_sequence_with_different_action_spaces_is_rejected(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-ids", "Breakout-v5", "Pong-v5", "--steps-per-task", 100,
                   "--full-action-space", "False", "--eval-episodes", 0)
    assert_one_line_error(proc, "action")


def test_task_sequence_needs_steps_per_task(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-ids", "CartPole-v1", "CartPole-v0")
    assert_one_line_error(proc, "--steps-per-task")


def test_eval_checkpoint_must_exist(tmp_path):
    proc = run_dqn(tmp_path, "bad", "--env-id", "CartPole-v1", "--eval-checkpoint", str(tmp_path / "missing.pt"))
    assert_one_line_error(proc, "missing.pt")


def test_cuda_without_a_gpu_is_rejected(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = run_dqn(tmp_path, "bad", "--env-id", "CartPole-v1", "--device", "cuda")
    assert_one_line_error(proc, "cuda")


def test_huge_learning_rate_diverges_cleanly(tmp_path):
    """An absurd learning rate makes the TD loss non-finite within a few updates: the run stops with a one-line
    error, a non-zero exit status and summary status "diverged"."""
    total = 1000
    proc = run_dqn(tmp_path, "div", "--env-id", "CartPole-v1", "--learning-rate", 1e30, "--total-timesteps", total,
                   "--learning-starts", 100, "--buffer-size", 1000, "--batch-size", 32, "--eval-episodes", 0,
                   "--metrics-every", 0, "--device", "cpu")
    summary = assert_diverged_cleanly(proc, os.path.join(str(tmp_path), "div"))
    assert 100 < summary["global_step"] < total


def test_nan_loss_in_process_raises_diverged(dqn, monkeypatch, tmp_path):
    """run() itself: a NaN TD loss raises Diverged and still writes summary.json with status "diverged"."""
    real_td_loss = dqn.td_loss
    calls = []

    def nan_td_loss(*args, **kwargs):
        out = real_td_loss(*args, **kwargs)
        calls.append(1)
        return (out[0] * math.nan, *out[1:])

    monkeypatch.setattr(dqn, "td_loss", nan_td_loss)
    args = dqn.Args(env_id="CartPole-v1", total_timesteps=400, learning_starts=100, buffer_size=500, batch_size=16,
                    eval_episodes=0, metrics_every=0, device="cpu", output_dir=str(tmp_path), run_name="nan")
    with pytest.raises(dqn.Diverged):
        dqn.run(args)
    assert len(calls) == 1, "the run went on after a NaN loss"
    summary = read_json(os.path.join(str(tmp_path), "nan", "summary.json"))
    assert summary["status"] == "diverged" and "nan" in summary["error"]
    assert summary["num_updates"] == 0  # the NaN loss was never applied
    assert summary["global_step"] > 100
