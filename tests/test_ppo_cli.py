"""Command-line behaviour of algos/ppo.py: determinism, one-line errors for bad input, and divergence handling."""

from __future__ import annotations

import math
import os

import pytest

from helpers import (
    assert_diverged_cleanly, assert_one_line_error, assert_seed_determinism, load_script, read_json, run_script,
    script_path,
)

PPO = script_path("ppo")
DETERMINISM_FLAGS = ["--env-id", "CartPole-v1", "--total-timesteps", 768, "--num-envs", 2, "--num-steps", 64,
                     "--eval-episodes", 0, "--metrics-every", 0, "--device", "cpu"]


def run_ppo(tmp_path, run_name: str, *flags):
    return run_script(PPO, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name], cwd=str(tmp_path),
                      env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    assert_seed_determinism(run_ppo, tmp_path, *DETERMINISM_FLAGS)


def test_unknown_env_id_suggests_close_match(tmp_path):
    assert_one_line_error(run_ppo(tmp_path, "bad", "--env-id", "Hoper-v4"), "Hoper-v4", "Hopper-v4")


def test_task_sequence_with_different_spaces_is_rejected(tmp_path):
    proc = run_ppo(tmp_path, "bad", "--env-ids", "CartPole-v1", "Acrobot-v1", "--steps-per-task", 512)
    assert_one_line_error(proc, "observation and action spaces")


@pytest.mark.parametrize("flags,fragments", [
    (dict(env_id="Highway-v0"), ("Highway-v0", "observations")),  # 2-D Box observations
    (dict(env_id="CarRacing-v3"), ("CarRacing-v3", "observations")),  # channel-last pixels, continuous actions
    (dict(env_id="Go9x9-v1"), ("Go9x9-v1", "observations")),  # MultiBinary observations
    (dict(env_ids=("CartPole-v1", "CartPole-v0"), steps_per_task=1000), ("--steps-per-task", "512")),
    (dict(env_ids=("CartPole-v1", "CartPole-v0")), ("--steps-per-task",)),
    (dict(env_ids=("Hopper-v4", "CheetahRun-v1"), steps_per_task=2048), ("observation and action spaces",)),
    (dict(env_ids=("CheetahRun-v1", "Hopper-v4"), steps_per_task=2048), ("observation and action spaces",)),
    (dict(env_id="Hopper-v4", total_timesteps=100), ("2048",)),  # less than one rollout
    (dict(env_id="Pong-v5", norm_obs=True), ("--norm-obs",)),
    (dict(env_id="CartPole-v1", num_minibatches=0), ("--num-minibatches",)),
    (dict(env_id="CartPole-v1", num_minibatches=1000), ("--num-minibatches",)),
])
def test_bad_input_is_a_user_error(flags, fragments):
    """resolve_args rejects these before any work (main() turns UserError into the one-line exit-2 error above)."""
    ppo = load_script("ppo")
    with pytest.raises(ppo.UserError) as err:
        ppo.resolve_args(ppo.Args(**flags))
    assert "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_huge_learning_rate_diverges_cleanly(tmp_path):
    """An absurd learning rate makes the loss non-finite within a few updates: the run stops with a one-line error,
    exit status 3 and summary status "diverged"."""
    total = 2048
    proc = run_ppo(tmp_path, "div", "--env-id", "CartPole-v1", "--learning-rate", 1e30, "--total-timesteps", total,
                   "--num-envs", 2, "--num-steps", 64, "--eval-episodes", 0, "--metrics-every", 0, "--device", "cpu")
    summary = assert_diverged_cleanly(proc, os.path.join(str(tmp_path), "div"))
    assert 0 < summary["global_step"] < total


def test_nan_loss_in_process_raises_diverged(monkeypatch, tmp_path):
    """run() itself: a NaN loss raises Diverged before any update is applied and still writes summary.json."""
    ppo = load_script("ppo")
    real_loss = ppo.ppo_loss
    calls = []

    def nan_loss(*args, **kwargs):
        loss, stats, hidden = real_loss(*args, **kwargs)
        calls.append(1)
        return loss * math.nan, stats, hidden

    monkeypatch.setattr(ppo, "ppo_loss", nan_loss)
    args = ppo.Args(env_id="CartPole-v1", total_timesteps=512, num_envs=2, num_steps=64, eval_episodes=0,
                    metrics_every=0, device="cpu", output_dir=str(tmp_path), run_name="nan")
    with pytest.raises(ppo.Diverged):
        ppo.run(args)
    assert len(calls) == 1, "the run went on after a NaN loss"
    summary = read_json(os.path.join(str(tmp_path), "nan", "summary.json"))
    assert summary["status"] == "diverged" and "nan" in summary["error"]
    assert summary["num_updates"] == 0 and summary["global_step"] == 128
