"""End-to-end runs of algos/sac.py as a subprocess: outputs (config.json, episodes.csv, summary.json, TensorBoard) on
MuJoCo and DeepMind Control, the checkpoint round trip, a task sequence, determinism, one-line errors for bad input
and divergence handling."""

from __future__ import annotations

import math
import os
from importlib.metadata import version

import numpy as np
import pytest
import torch

from helpers import (
    assert_diverged_cleanly, assert_one_line_error, describe, load_script, read_csv, read_json, read_scalars,
    run_script, script_path,
)

SAC = script_path("sac")
EPISODES_HEADER = ["global_step", "episodic_return", "episodic_length", "task"]
TINY = ["--learning-starts", 100, "--buffer-size", 1000, "--batch-size", 32, "--device", "cpu"]


def run_sac(tmp_dir, run_name: str, *flags):
    return run_script(SAC, [*flags, "--output-dir", str(tmp_dir), "--run-name", run_name], cwd=str(tmp_dir))


def run_ok(tmp_dir, run_name: str, *flags) -> str:
    """Run sac.py; assert it exits 0; returns the run directory."""
    proc = run_sac(tmp_dir, run_name, *flags)
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(tmp_dir), run_name)


# ---------------------------------------------------------------------------------------------------------------
# MuJoCo (Hopper-v4, 2 envs): every output, and the checkpoint
# ---------------------------------------------------------------------------------------------------------------

HOPPER_STEPS = 400


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hopper")
    return run_ok(tmp, "hopper", "--env-id", "Hopper-v4", "--total-timesteps", HOPPER_STEPS, "--num-envs", 2, *TINY,
                  "--save-model", "--eval-episodes", 2, "--eval-every", 200, "--metrics-every", 50,
                  "--metrics-batch-size", 64, "--log-every", 20, "--seed", 3)


def test_config_json(hopper_run):
    config = read_json(os.path.join(hopper_run, "config.json"))
    args = config["args"]
    assert args["env_id"] == "Hopper-v4" and args["seed"] == 3 and args["total_timesteps"] == HOPPER_STEPS
    assert args["num_envs"] == 2 and args["learning_starts"] == 100 and args["save_model"] is True
    # CleanRL's defaults where not overridden
    assert (args["gamma"], args["tau"], args["policy_lr"], args["q_lr"], args["policy_frequency"],
            args["target_network_frequency"], args["autotune"], args["replay_ratio"]) == (
        0.99, 0.005, 3e-4, 1e-3, 2, 1, True, 1.0)
    assert config["tasks"] == ["Hopper-v4"] and config["family"] == "mujoco"
    assert config["versions"]["torch"] == version("torch")
    assert config["versions"]["envpool"] == version("envpool")
    assert "git_commit" in config


def test_episodes_csv(hopper_run):
    header, rows = read_csv(os.path.join(hopper_run, "episodes.csv"))
    assert header == EPISODES_HEADER
    assert len(rows) >= 5  # a random Hopper falls within tens of steps
    steps = [int(r["global_step"]) for r in rows]
    assert all(r["task"] == "Hopper-v4" for r in rows)
    assert all(1 <= int(r["episodic_length"]) <= 1000 for r in rows)
    assert all(math.isfinite(float(r["episodic_return"])) for r in rows)
    assert steps == sorted(steps) and steps[-1] <= HOPPER_STEPS and all(s % 2 == 0 for s in steps)


def test_summary_json(hopper_run):
    summary = read_json(os.path.join(hopper_run, "summary.json"))
    _, rows = read_csv(os.path.join(hopper_run, "episodes.csv"))
    returns = [float(r["episodic_return"]) for r in rows]
    assert summary["status"] == "completed"
    assert summary["global_step"] == summary["total_timesteps"] == HOPPER_STEPS
    # replay ratio 1: one critic update per env step after learning starts (2 per vector step from step 102 on)
    assert summary["num_updates"] == HOPPER_STEPS - 100
    assert summary["sps"] > 0 and summary["wall_time_s"] > 0 and summary["peak_memory_mb"] > 0
    assert summary["num_episodes"] == len(rows)
    assert summary["final_train_return"] == pytest.approx(np.mean(returns[-10:]))
    assert len(summary["eval_returns"]) == 2
    assert summary["eval_return_mean"] == pytest.approx(np.mean(summary["eval_returns"]))
    assert os.path.isfile(summary["model_path"])


def test_tensorboard(hopper_run):
    scalars = read_scalars(hopper_run)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/num_updates",
                "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values", "losses/actor_loss",
                "losses/alpha", "losses/alpha_loss", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    for net in ("actor", "qf1", "qf2"):
        for key in ("dormant_tau0", "dormant_tau0.1", "grad_inactive_tau0", "grad_inactive_tau0.1"):
            for suffix in ("", "/fc1", "/fc2"):
                tag = f"plasticity/{net}/{key}{suffix}"
                assert tag in scalars, f"{tag} missing"
                assert all(0.0 <= v <= 1.0 for _, v in scalars[tag])
        for key in ("srank", "feature_norm", "param_norm", "grad_norm"):
            assert f"plasticity/{net}/{key}" in scalars
        assert all(1 <= v <= 64 for _, v in scalars[f"plasticity/{net}/srank"])
    assert len(scalars["plasticity/actor/srank"]) == (HOPPER_STEPS - 100) // 50
    _, rows = read_csv(os.path.join(hopper_run, "episodes.csv"))
    logged = [(int(r["global_step"]), float(r["episodic_return"])) for r in rows]
    tb = sorted(scalars["charts/episodic_return"])  # TensorBoard and the CSV agree (TensorBoard stores float32)
    assert [s for s, _ in tb] == sorted(s for s, _ in logged)
    assert [v for _, v in tb] == pytest.approx([v for _, v in sorted(logged)], rel=1e-6, abs=1e-5)
    assert all(math.isfinite(v) for _, v in scalars["losses/qf_loss"])
    # alpha starts at 1 and is tuned down and up by Adam(q_lr): it moved, and stays positive
    alphas = [v for _, v in scalars["losses/alpha"]]
    assert all(v > 0 for v in alphas) and alphas[-1] != 1.0
    # --eval-every 200: evaluations at 200 and 400 steps, then the final one at the end
    assert [step for step, _ in scalars["eval/episodic_return"]] == [200, 400, HOPPER_STEPS]
    summary = read_json(os.path.join(hopper_run, "summary.json"))
    assert scalars["eval/episodic_return"][-1][1] == pytest.approx(summary["eval_return_mean"])


def test_checkpoint_holds_the_trained_actor(hopper_run):
    """model.pt loads with weights_only=True; re-evaluating its actor as the run did gives the run's final
    evaluation returns exactly (deterministic actions, same seeds)."""
    sac = load_script("sac")
    checkpoint = torch.load(os.path.join(hopper_run, "model.pt"), weights_only=True)
    assert checkpoint["obs_shape"] == [11] and checkpoint["n_actions"] == 3
    assert set(checkpoint) >= {"model", "qf1", "qf2", "log_alpha", "args"}
    actor = sac.Actor(11, -np.ones(3), np.ones(3))
    actor.load_state_dict(checkpoint["model"])
    for name in ("qf1", "qf2"):
        sac.SoftQNetwork(11, 3).load_state_dict(checkpoint[name])
    args = sac.Args(**checkpoint["args"])
    returns = sac.evaluate(actor, "Hopper-v4", args, args.eval_episodes, args.seed, torch.device("cpu"))
    summary = read_json(os.path.join(hopper_run, "summary.json"))
    assert returns == summary["eval_returns"]


def test_eval_checkpoint_run(hopper_run, tmp_path):
    run_dir = run_ok(tmp_path, "evaluated", "--env-id", "Hopper-v4", "--eval-checkpoint",
                     os.path.join(hopper_run, "model.pt"), "--eval-episodes", 2, "--seed", 3, "--device", "cpu")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed"
    assert summary["global_step"] == 0 and summary["num_updates"] == 0  # no training happened
    assert summary["eval_returns"] == read_json(os.path.join(hopper_run, "summary.json"))["eval_returns"]


def test_eval_checkpoint_of_another_env_is_rejected(hopper_run, tmp_path):
    """A Hopper actor cannot be evaluated on HalfCheetah (17 inputs, 6 actions): one line naming both tasks."""
    proc = run_sac(tmp_path, "bad", "--env-id", "HalfCheetah-v4", "--eval-checkpoint",
                   os.path.join(hopper_run, "model.pt"), "--eval-episodes", 1)
    assert_one_line_error(proc, "HalfCheetah-v4", "Hopper-v4", "--eval-checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# DeepMind Control and a task sequence
# ---------------------------------------------------------------------------------------------------------------


def test_dmc_smoke(tmp_path):
    total, cap = 300, 100
    run_dir = run_ok(tmp_path, "cheetah", "--env-id", "CheetahRun-v1", "--total-timesteps", total, *TINY,
                     "--max-episode-steps", cap, "--eval-episodes", 1, "--metrics-every", 50,
                     "--metrics-batch-size", 64, "--log-every", 20)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["family"] == "dmc" and config["args"]["max_episode_steps"] == cap
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == total
    assert summary["num_updates"] == total - 100
    assert len(summary["eval_returns"]) == 1 and 0.0 <= summary["eval_returns"][0] <= cap
    header, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    assert header == EPISODES_HEADER
    # every DMC episode runs to the cap (truncation); one env: each takes cap steps plus the auto-reset step
    assert [int(r["global_step"]) for r in rows] == [100, 201]
    assert all(int(r["episodic_length"]) == cap and 0.0 <= float(r["episodic_return"]) <= cap for r in rows)
    scalars = read_scalars(run_dir)
    for tag in ("losses/qf_loss", "losses/actor_loss", "plasticity/actor/dormant_tau0.1", "plasticity/qf2/srank",
                "charts/episodic_return", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"


def test_task_sequence(tmp_path):
    per_task, cap = 200, 50
    run_dir = run_ok(tmp_path, "sequence", "--env-ids", "WalkerStand-v1", "WalkerWalk-v1", "--steps-per-task",
                     per_task, *TINY, "--max-episode-steps", cap, "--eval-episodes", 1, "--metrics-every", 0)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["tasks"] == ["WalkerStand-v1", "WalkerWalk-v1"] and config["family"] == "dmc"
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == 2 * per_task
    assert summary["num_updates"] == 2 * per_task - 100
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    tasks = [r["task"] for r in rows]
    # 50-step episodes + the auto-reset step: 3 finish in each task; the unfinished 4th is dropped at the switch
    assert tasks == ["WalkerStand-v1"] * 3 + ["WalkerWalk-v1"] * 3
    assert [int(r["global_step"]) for r in rows] == [50, 101, 152, 250, 301, 352]
    assert all(int(r["episodic_length"]) == cap for r in rows)
    scalars = read_scalars(run_dir)
    assert scalars.get("charts/task_index") == [(per_task, 1.0)]


# ---------------------------------------------------------------------------------------------------------------
# Determinism, bad input, divergence
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    flags = ["--env-id", "Hopper-v4", "--total-timesteps", 400, *TINY, "--eval-episodes", 0, "--metrics-every", 0]
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_dir = run_ok(tmp_path, name, *flags, "--seed", seed)
        with open(os.path.join(run_dir, "episodes.csv"), "rb") as f:
            runs[name] = f.read()
        assert read_json(os.path.join(run_dir, "summary.json"))["num_updates"] == 300
    # 300 of the 400 steps are taken by the learning actor, so the networks drive the data
    assert runs["a"].count(b"\n") > 10
    assert runs["a"] == runs["b"], "two runs with the same seed wrote different episodes.csv"
    assert runs["a"] != runs["c"], "runs with different seeds wrote the same episodes.csv"


def test_discrete_action_env_is_rejected(tmp_path):
    proc = run_sac(tmp_path, "bad", "--env-id", "CartPole-v1")
    assert_one_line_error(proc, "CartPole-v1", "continuous (Box) action space", "Discrete(2)")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # failed before any work


def test_unknown_env_id_suggests_close_match(tmp_path):
    proc = run_sac(tmp_path, "bad", "--env-id", "HalfCheeta-v4")
    assert_one_line_error(proc, "HalfCheeta-v4", "HalfCheetah-v4")


def test_huge_learning_rate_diverges_cleanly(tmp_path):
    """An absurd critic learning rate makes the loss non-finite after one update: one line, exit status 3,
    summary status "diverged"."""
    total = 400
    proc = run_sac(tmp_path, "div", "--env-id", "Hopper-v4", "--q-lr", 1e30, "--total-timesteps", total, *TINY,
                   "--eval-episodes", 0, "--metrics-every", 0)
    summary = assert_diverged_cleanly(proc, os.path.join(str(tmp_path), "div"))
    assert 100 < summary["global_step"] < total
