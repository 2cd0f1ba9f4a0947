"""End-to-end runs of algos/dqn.py as a subprocess: outputs (config.json, episodes.csv, summary.json, TensorBoard),
checkpoint round trip, an Atari run with episodic life, and a task sequence."""

from __future__ import annotations

import math
import os
from importlib.metadata import version

import numpy as np
import pytest
import torch

from helpers import describe, read_csv, read_json, read_scalars, run_script, script_path

DQN = script_path("dqn")
EPISODES_HEADER = ["global_step", "episodic_return", "episodic_length", "task"]
CARTPOLE_STEPS = 2000


def run_dqn(tmp_dir, run_name: str, *flags) -> str:
    """Run dqn.py with outputs under tmp_dir; assert it exits 0; returns the run directory."""
    proc = run_script(DQN, [*flags, "--output-dir", str(tmp_dir), "--run-name", run_name, "--device", "cpu"],
                      cwd=str(tmp_dir))
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_dir), run_name)
    assert os.path.isdir(run_dir), describe(proc)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# CartPole: every output, and the checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cartpole")
    return run_dqn(tmp, "cartpole", "--env-id", "CartPole-v1", "--total-timesteps", CARTPOLE_STEPS,
                   "--learning-starts", 500, "--buffer-size", 2000, "--batch-size", 32, "--save-model",
                   "--eval-episodes", 3, "--eval-every", 800, "--metrics-every", 20, "--log-every", 20, "--seed", 3)


def test_config_json(cartpole_run):
    config = read_json(os.path.join(cartpole_run, "config.json"))
    args = config["args"]
    assert args["env_id"] == "CartPole-v1" and args["seed"] == 3 and args["total_timesteps"] == CARTPOLE_STEPS
    assert args["learning_starts"] == 500 and args["save_model"] is True
    # family defaults are resolved before being recorded: no None left for the algorithm's hyperparameters
    for key in ("learning_rate", "adam_eps", "replay_ratio", "target_network_frequency", "end_e",
                "exploration_steps", "eval_epsilon", "clip_rewards"):
        assert args[key] is not None, key
    assert config["tasks"] == ["CartPole-v1"]
    assert config["versions"]["torch"] == version("torch")
    assert config["versions"]["envpool"] == version("envpool")
    assert "git_commit" in config


def test_episodes_csv(cartpole_run):
    header, rows = read_csv(os.path.join(cartpole_run, "episodes.csv"))
    assert header == EPISODES_HEADER
    assert len(rows) >= 5
    steps = [int(r["global_step"]) for r in rows]
    lengths = [int(r["episodic_length"]) for r in rows]
    assert all(r["task"] == "CartPole-v1" for r in rows)
    # CartPole pays 1 per step, so an episode's return is its length
    assert all(float(r["episodic_return"]) == n for r, n in zip(rows, lengths))
    assert all(1 <= n <= 500 for n in lengths)
    assert all(a < b for a, b in zip(steps, steps[1:])) and steps[-1] <= CARTPOLE_STEPS
    # one env: an episode of n agent steps ends n steps after the previous one's end plus EnvPool's auto-reset step
    assert steps[0] == lengths[0]
    assert all(b - a == n + 1 for a, b, n in zip(steps, steps[1:], lengths[1:]))


def test_summary_json(cartpole_run):
    summary = read_json(os.path.join(cartpole_run, "summary.json"))
    _, rows = read_csv(os.path.join(cartpole_run, "episodes.csv"))
    returns = [float(r["episodic_return"]) for r in rows]
    assert summary["status"] == "completed"
    assert summary["global_step"] == summary["total_timesteps"] == CARTPOLE_STEPS
    assert summary["sps"] > 0 and summary["wall_time_s"] > 0 and summary["peak_memory_mb"] > 0
    assert summary["num_updates"] > 0
    assert summary["num_episodes"] == len(rows)
    assert summary["final_train_return"] == pytest.approx(np.mean(returns[-10:]))
    assert len(summary["eval_returns"]) == 3
    assert all(1 <= r <= 500 for r in summary["eval_returns"])
    assert summary["eval_return_mean"] == pytest.approx(np.mean(summary["eval_returns"]))
    assert os.path.isfile(summary["model_path"])


def test_tensorboard(cartpole_run):
    scalars = read_scalars(cartpole_run)
    for tag in ("charts/episodic_return", "charts/SPS", "losses/td_loss", "plasticity/dormant_tau0.1",
                "plasticity/srank", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    _, rows = read_csv(os.path.join(cartpole_run, "episodes.csv"))
    logged = [(int(r["global_step"]), float(r["episodic_return"])) for r in rows]
    assert sorted(scalars["charts/episodic_return"]) == logged  # TensorBoard and the CSV agree
    assert all(math.isfinite(v) for _, v in scalars["losses/td_loss"])
    assert all(0.0 <= v <= 1.0 for _, v in scalars["plasticity/dormant_tau0.1"])
    # --eval-every 800: evaluations at 800 and 1600 steps, then the final one at the end
    assert [step for step, _ in scalars["eval/episodic_return"]] == [800, 1600, CARTPOLE_STEPS]
    summary = read_json(os.path.join(cartpole_run, "summary.json"))
    assert scalars["eval/episodic_return"][-1][1] == pytest.approx(summary["eval_return_mean"])


# BUG in dqn.py (exposed by the two tests below): the checkpoint stores `n_actions` as numpy.int64 (gymnasium's
# Discrete.n), which torch.load(..., weights_only=True) refuses ("Unsupported global: numpy._core.multiarray.scalar"),
# so model.pt cannot be loaded as documented and --eval-checkpoint fails. Fix: save int(n_actions).
def test_checkpoint_holds_the_trained_network(dqn, cartpole_run):
    """model.pt loads with weights_only=True into a QNetwork, and re-evaluating it as the run did gives the run's
    final evaluation returns exactly (so the checkpoint is the network that was evaluated)."""
    checkpoint = torch.load(os.path.join(cartpole_run, "model.pt"), weights_only=True)
    q_network = dqn.QNetwork(tuple(checkpoint["obs_shape"]), checkpoint["n_actions"])
    q_network.load_state_dict(checkpoint["model"])
    args = dqn.Args(**checkpoint["args"])
    returns = dqn.evaluate(q_network, "CartPole-v1", args, args.eval_episodes, args.eval_epsilon, args.seed,
                           torch.device("cpu"))
    summary = read_json(os.path.join(cartpole_run, "summary.json"))
    assert returns == summary["eval_returns"]


def test_eval_checkpoint_run(cartpole_run, tmp_path):
    model = os.path.join(cartpole_run, "model.pt")
    run_dir = run_dqn(tmp_path, "evaluated", "--env-id", "CartPole-v1", "--eval-checkpoint", model,
                      "--eval-episodes", 2)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed"
    assert len(summary["eval_returns"]) == 2 and all(1 <= r <= 500 for r in summary["eval_returns"])
    assert summary["global_step"] == 0 and summary["num_updates"] == 0  # no training happened


def test_eval_checkpoint_of_another_env_is_rejected(cartpole_run, tmp_path):
    """A CartPole network cannot be evaluated on Acrobot (6 inputs, 3 actions): one line naming both tasks."""
    model = os.path.join(cartpole_run, "model.pt")
    proc = run_script(DQN, ["--env-id", "Acrobot-v1", "--eval-checkpoint", model, "--eval-episodes", 1,
                            "--output-dir", str(tmp_path)], cwd=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Acrobot-v1" in lines[0] and "CartPole-v1" in lines[0], describe(proc)


# ---------------------------------------------------------------------------------------------------------------
# Atari
# ---------------------------------------------------------------------------------------------------------------


def test_atari_smoke(tmp_path):
    total, max_steps = 480, 100
    run_dir = run_dqn(tmp_path, "breakout", "--env-id", "Breakout-v5", "--total-timesteps", total, "--num-envs", 2,
                      "--learning-starts", 200, "--buffer-size", 2000, "--max-episode-steps", max_steps,
                      "--eval-episodes", 1, "--metrics-every", 10, "--metrics-batch-size", 64, "--log-every", 10,
                      "--episodic-life")
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["family"] == "atari" and config["args"]["episodic_life"] is True
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == total
    assert summary["num_updates"] > 0 and len(summary["eval_returns"]) == 1
    header, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    assert header == EPISODES_HEADER
    assert len(rows) >= 2 and len(rows) == summary["num_episodes"]
    for r in rows:
        assert r["task"] == "Breakout-v5"
        assert float(r["episodic_return"]) >= 0 and 1 <= int(r["episodic_length"]) <= max_steps
    scalars = read_scalars(run_dir)
    for tag in ("losses/td_loss", "plasticity/dormant_tau0/conv1", "plasticity/grad_inactive_tau0/fc1",
                "plasticity/srank", "charts/episodic_return", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"


# ---------------------------------------------------------------------------------------------------------------
# Task sequence
# ---------------------------------------------------------------------------------------------------------------


def test_task_sequence(tmp_path):
    per_task = 500
    run_dir = run_dqn(tmp_path, "sequence", "--env-ids", "CartPole-v1", "CartPole-v0", "--steps-per-task", per_task,
                      "--learning-starts", 200, "--buffer-size", 1000, "--batch-size", 32, "--eval-episodes", 1,
                      "--metrics-every", 0)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["tasks"] == ["CartPole-v1", "CartPole-v0"]
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == 2 * per_task
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    tasks = [r["task"] for r in rows]
    assert set(tasks) == {"CartPole-v1", "CartPole-v0"}
    # episodes are logged under the task being played, in order
    switch = tasks.index("CartPole-v0")
    assert all(t == "CartPole-v1" for t in tasks[:switch]) and all(t == "CartPole-v0" for t in tasks[switch:])
    assert all(int(r["global_step"]) <= per_task for r in rows[:switch])
    assert all(int(r["global_step"]) > per_task for r in rows[switch:])
    # CartPole-v0's 200-step cap applies after the switch
    assert all(int(r["episodic_length"]) <= 200 for r in rows[switch:])
    scalars = read_scalars(run_dir)
    assert scalars.get("charts/task_index") == [(per_task, 1.0)]
