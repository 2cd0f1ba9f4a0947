"""End-to-end runs of algos/ppo.py as a subprocess, one per environment family (classic control, Atari, MuJoCo,
DeepMind Control, MiniGrid task sequence): outputs (config.json, episodes.csv, summary.json, TensorBoard) and the
checkpoint round trip.

The runs get OMP_NUM_THREADS=1: on the shared 2-core test machine, PyTorch's OpenMP threads waiting for each other
made these tiny runs up to 5x slower under load. It changes no result."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import describe, load_script, read_csv, read_json, read_scalars, run_script, script_path

PPO = script_path("ppo")
EPISODES_HEADER = ["global_step", "episodic_return", "episodic_length", "task"]
LOSS_KEYS = ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/old_approx_kl",
             "losses/clipfrac", "losses/explained_variance", "charts/learning_rate", "charts/SPS")


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ppo(tmp_dir, run_name: str, *flags) -> str:
    """Run ppo.py with outputs under tmp_dir; assert it exits 0; returns the run directory."""
    proc = run_script(PPO, [*flags, "--output-dir", str(tmp_dir), "--run-name", run_name, "--device", "cpu"],
                      cwd=str(tmp_dir), env=quiet_env())
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_dir), run_name)
    assert os.path.isdir(run_dir), describe(proc)
    return run_dir


def check_run(run_dir: str, family: str, task: str, total: int, eval_episodes: int, hidden_layer: str):
    """What every family's run must produce."""
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["family"] == family and config["tasks"][-1] == task
    for key in ("num_envs", "num_steps", "learning_rate", "num_minibatches", "update_epochs", "clip_coef", "ent_coef",
                "clip_rewards", "norm_obs", "norm_reward", "total_timesteps"):
        assert config["args"][key] is not None, key  # family defaults are resolved before being recorded
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == total == summary["total_timesteps"]
    assert summary["num_updates"] > 0 and len(summary["eval_returns"]) == eval_episodes
    assert all(math.isfinite(r) for r in summary["eval_returns"])
    header, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    assert header == EPISODES_HEADER and len(rows) == summary["num_episodes"] >= 1
    scalars = read_scalars(run_dir)
    for tag in (*LOSS_KEYS, "plasticity/srank", "plasticity/param_norm", f"plasticity/dormant_tau0/{hidden_layer}",
                f"plasticity/grad_inactive_tau0.1/{hidden_layer}", "charts/episodic_return", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    assert all(math.isfinite(v) for key in LOSS_KEYS[:6] for _, v in scalars[key])
    return config, summary, rows, scalars


# ---------------------------------------------------------------------------------------------------------------
# CartPole: every output, the checkpoint
# ---------------------------------------------------------------------------------------------------------------

CARTPOLE_STEPS = 1024


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo_cartpole")
    return run_ppo(tmp, "cartpole", "--env-id", "CartPole-v1", "--total-timesteps", CARTPOLE_STEPS, "--num-envs", 2,
                   "--num-steps", 128, "--save-model", "--eval-episodes", 3, "--eval-every", 512,
                   "--metrics-every", 8, "--seed", 3)


def test_cartpole_outputs(cartpole_run):
    config, summary, rows, scalars = check_run(cartpole_run, "classic", "CartPole-v1", CARTPOLE_STEPS, 3, "actor.fc1")
    args = config["args"]
    assert (args["clip_coef"], args["ent_coef"], args["learning_rate"]) == (0.2, 0.01, 2.5e-4)
    assert (args["num_minibatches"], args["update_epochs"]) == (4, 4)
    assert args["norm_obs"] is False and args["norm_reward"] is False
    # CartPole pays 1 per step, so an episode's return is its length; the auto-reset step is not counted
    assert all(float(r["episodic_return"]) == int(r["episodic_length"]) for r in rows)
    assert summary["final_train_return"] == pytest.approx(np.mean([float(r["episodic_return"]) for r in rows[-10:]]))
    # 2 envs x 128 steps = 256 per iteration, 4 minibatches x 4 epochs = 16 updates per iteration
    assert summary["num_updates"] == 16 * CARTPOLE_STEPS // 256
    assert [s for s, _ in scalars["losses/approx_kl"]] == [256, 512, 768, 1024]
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs == pytest.approx([2.5e-4 * f for f in (1, 0.75, 0.5, 0.25)])  # annealed linearly over the run
    assert [s for s, _ in scalars["eval/episodic_return"]] == [512, 1024, 1024]  # --eval-every, then the final one
    logged = [(int(r["global_step"]), float(r["episodic_return"])) for r in rows]
    assert sorted(scalars["charts/episodic_return"]) == sorted(logged)  # TensorBoard and the CSV agree
    assert all(0.0 <= v <= 1.0 for _, v in scalars["plasticity/dormant_tau0.1"])
    assert "plasticity/srank/critic" in scalars and "plasticity/dormant_tau0/critic.fc2" in scalars


def test_checkpoint_holds_the_trained_agent(cartpole_run):
    """model.pt loads with weights_only=True into an Agent, and re-evaluating it as the run did gives the run's final
    evaluation returns exactly (so the checkpoint is the agent that was evaluated)."""
    ppo = load_script("ppo")
    checkpoint = torch.load(os.path.join(cartpole_run, "model.pt"), weights_only=True)
    agent = ppo.Agent(tuple(checkpoint["obs_shape"]), checkpoint["n_actions"], checkpoint["continuous"])
    agent.load_state_dict(checkpoint["model"])
    args = ppo.Args(**{**checkpoint["args"], "env_ids": tuple(checkpoint["args"]["env_ids"])})
    returns = ppo.evaluate(agent, "CartPole-v1", args, args.eval_episodes, args.seed, torch.device("cpu"))
    assert returns == read_json(os.path.join(cartpole_run, "summary.json"))["eval_returns"]


def test_eval_checkpoint_run(cartpole_run, tmp_path):
    model = os.path.join(cartpole_run, "model.pt")
    run_dir = run_ppo(tmp_path, "evaluated", "--env-id", "CartPole-v1", "--eval-checkpoint", model,
                      "--eval-episodes", 2)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == 0 and summary["num_updates"] == 0
    assert len(summary["eval_returns"]) == 2 and all(1 <= r <= 500 for r in summary["eval_returns"])


def test_eval_checkpoint_of_another_env_is_rejected(cartpole_run, tmp_path):
    model = os.path.join(cartpole_run, "model.pt")
    proc = run_script(PPO, ["--env-id", "Acrobot-v1", "--eval-checkpoint", model, "--eval-episodes", 1,
                            "--output-dir", str(tmp_path)], cwd=str(tmp_path), env=quiet_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Acrobot-v1" in lines[0] and "CartPole-v1" in lines[0], describe(proc)


# ---------------------------------------------------------------------------------------------------------------
# Other families
# ---------------------------------------------------------------------------------------------------------------


def test_atari_smoke(tmp_path):
    max_steps = 60
    run_dir = run_ppo(tmp_path, "breakout", "--env-id", "Breakout-v5", "--total-timesteps", 256, "--num-envs", 2,
                      "--num-steps", 32, "--max-episode-steps", max_steps, "--eval-episodes", 1, "--metrics-every", 8,
                      "--metrics-batch-size", 32)
    config, _, rows, scalars = check_run(run_dir, "atari", "Breakout-v5", 256, 1, "conv1")
    args = config["args"]
    assert args["episodic_life"] is True and args["clip_rewards"] is True and args["clip_coef"] == 0.1
    assert args["noop_max"] == 30 and args["sticky_action_prob"] == 0.0
    for r in rows:  # full games (episodic life only shapes learning), capped at max_steps agent steps
        assert float(r["episodic_return"]) >= 0 and 1 <= int(r["episodic_length"]) <= max_steps
    assert "plasticity/grad_inactive_tau0/fc1" in scalars and "plasticity/srank/critic" not in scalars


def test_mujoco_smoke(tmp_path):
    run_dir = run_ppo(tmp_path, "hopper", "--env-id", "Hopper-v4", "--total-timesteps", 256, "--num-envs", 2,
                      "--num-steps", 64, "--num-minibatches", 4, "--update-epochs", 2, "--max-episode-steps", 40,
                      "--eval-episodes", 2, "--metrics-every", 4, "--save-model")
    config, _, _, _ = check_run(run_dir, "continuous", "Hopper-v4", 256, 2, "critic.fc2")
    args = config["args"]
    assert args["norm_obs"] is True and args["norm_reward"] is True and args["ent_coef"] == 0.0
    assert args["learning_rate"] == 3e-4
    state = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]
    assert state["obs_norm.count"].item() > 256  # observation statistics are saved with the model
    assert state["actor_logstd"].shape == (1, 3)


def test_dmc_smoke(tmp_path):
    run_dir = run_ppo(tmp_path, "cheetah", "--env-id", "CheetahRun-v1", "--total-timesteps", 128, "--num-envs", 2,
                      "--num-steps", 32, "--num-minibatches", 2, "--update-epochs", 2, "--max-episode-steps", 30,
                      "--eval-episodes", 1, "--metrics-every", 2)
    _, _, rows, _ = check_run(run_dir, "continuous", "CheetahRun-v1", 128, 1, "actor.fc2")
    assert all(int(r["episodic_length"]) == 30 for r in rows)  # DMC episodes end by truncation only


def test_minigrid_task_sequence(tmp_path):
    per_task = 256
    run_dir = run_ppo(tmp_path, "minigrid", "--env-ids", "MiniGrid-Empty-5x5-v0", "MiniGrid-DoorKey-5x5-v0",
                      "--steps-per-task", per_task, "--num-envs", 4, "--num-steps", 32, "--max-episode-steps", 20,
                      "--eval-episodes", 2, "--metrics-every", 4)
    config, _, rows, scalars = check_run(run_dir, "classic", "MiniGrid-DoorKey-5x5-v0", 2 * per_task, 2, "actor.fc1")
    assert config["tasks"] == ["MiniGrid-Empty-5x5-v0", "MiniGrid-DoorKey-5x5-v0"]
    tasks = [r["task"] for r in rows]
    switch = tasks.index("MiniGrid-DoorKey-5x5-v0")
    assert set(tasks[:switch]) == {"MiniGrid-Empty-5x5-v0"} and set(tasks[switch:]) == {"MiniGrid-DoorKey-5x5-v0"}
    assert all(int(r["global_step"]) <= per_task for r in rows[:switch])
    assert all(int(r["global_step"]) > per_task for r in rows[switch:])
    assert scalars["charts/task_index"] == [(per_task, 1.0)]
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs == pytest.approx([2.5e-4 * (1 - i / 4) for i in range(4)])  # one schedule over the whole sequence
