"""algos/ppo_cchain.py: C-CHAIN's churn loss against hand computations (cross-entropy for discrete policies, squared
mean difference for Gaussian ones, gradients included), lambda's adaptation against the formula (floor, window,
start, restart at a task switch), the reference network exactly one optimizer step old, the regularisation
minibatches drawn independently of the training ones, --no-cchain and lambda 0 against ppo.py (same episodes), the
official per-setting defaults, end-to-end runs (perturbed CartPole sequence, MuJoCo, Atari) and bad input.
Also ppo.py's --obs-perturbation, which the continual Gym-control suite needs (docs/ppo.md, detail 17)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
SEQUENCE = dict(env_ids=("CartPole-v1", "CartPole-v1"), steps_per_task=1024, num_envs=2, num_steps=64,
                eval_episodes=2, metrics_every=0, obs_perturbation=2.0)


@pytest.fixture(scope="module")
def cchain():
    return load_script("ppo_cchain")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


# ---------------------------------------------------------------------------------------------------------------
# The churn loss and lambda
# ---------------------------------------------------------------------------------------------------------------


def test_discrete_churn_loss_is_the_cross_entropy_to_the_old_policy(cchain):
    """H(pi_ref, pi) = -sum_a pi_ref(a) log pi(a), averaged over states, written out; its gradient in the logits is
    pi - pi_ref per state (divided by the batch size), the gradient of KL(pi_ref || pi)."""
    current = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    reference = torch.tensor([[1.0, 0.0, -1.0], [3.0, -2.0, 0.5]])
    loss = cchain.churn_loss(current, reference, continuous=False)
    expected = 0.0
    for row in range(2):
        p_ref = [math.exp(v) for v in reference[row].tolist()]
        p_ref = [v / sum(p_ref) for v in p_ref]
        z = sum(math.exp(v) for v in current[row].tolist())
        expected += -sum(p * (c - math.log(z)) for p, c in zip(p_ref, current[row].tolist()))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    loss.backward()
    hand = (torch.softmax(current.detach(), -1) - torch.softmax(reference, -1)) / 2
    assert torch.allclose(current.grad, hand, atol=1e-7)
    # equal outputs: the loss is the reference's entropy and the gradient vanishes
    same = reference.clone().requires_grad_(True)
    value = cchain.churn_loss(same, reference, continuous=False)
    value.backward()
    entropy = -(torch.softmax(reference, -1) * torch.log_softmax(reference, -1)).sum(-1).mean()
    assert value.item() == pytest.approx(entropy.item(), rel=1e-6) and same.grad.abs().max() < 1e-7


def test_continuous_churn_loss_is_the_mean_squared_change_of_the_means(cchain):
    current = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    reference = torch.tensor([[0.0, -1.5], [2.5, 1.0], [1.0, 1.0]])
    loss = cchain.churn_loss(current, reference, continuous=True)
    assert loss.item() == pytest.approx((0.25 + 0.25 + 0.25 + 1.0) / 6)
    loss.backward()
    assert torch.allclose(current.grad, 2 * (current.detach() - reference) / 6)


def test_reference_gets_no_gradient(cchain):
    current = torch.randn(4, 3, requires_grad=True)
    reference = torch.randn(4, 3, requires_grad=True)
    for continuous in (False, True):
        cchain.churn_loss(current, reference, continuous).backward()
        assert reference.grad is None


def test_lambda_adapts_to_the_target_share_with_the_floor(cchain):
    args = cchain.Args(cchain_beta=1e4, cchain_lambda_min=1.0)
    policy, churn = [-0.01, 0.02, -0.03], [0.5, 0.7, 0.6]
    assert cchain.adapt_lambda(policy, churn, args) == pytest.approx(1e4 * 0.02 / (0.6 + 1e-8))
    assert cchain.adapt_lambda([1e-9], [10.0], args) == 1.0  # floored
    dmc = cchain.Args(cchain_beta=0.05, cchain_lambda_min=0.0)
    assert cchain.adapt_lambda([0.2], [1e-3], dmc) == pytest.approx(0.05 * 0.2 / (1e-3 + 1e-8))
    assert cchain.adapt_lambda([1e-9], [10.0], dmc) == pytest.approx(0.05 * 1e-10, rel=1e-6)  # no floor


@pytest.mark.parametrize("env_id, setting, expected", [
    ("CartPole-v1", "gym", (1e4, 1.0, 11, 50, 1.0)),
    ("Hopper-v4", "dmc", (0.05, 100.0, 50, 100, 0.0)),
    ("Breakout-v5", "procgen", (1e4, 10.0, 21, 200, 1.0)),
    ("MinAtar/Breakout", "gym", (1e4, 1.0, 11, 50, 1.0)),
])
def test_auto_setting_takes_the_official_defaults(cchain, env_id, setting, expected):
    args = cchain.Args(env_id=env_id)
    cchain.resolve_args(args)
    assert args.cchain_setting == setting
    assert (args.cchain_beta, args.cchain_lambda_init, args.cchain_adapt_start, args.cchain_window,
            args.cchain_lambda_min) == expected
    explicit = cchain.Args(env_id=env_id, cchain_setting="dmc", cchain_beta=0.3)
    cchain.resolve_args(explicit)
    assert (explicit.cchain_beta, explicit.cchain_lambda_init) == (0.3, 100.0)


# ---------------------------------------------------------------------------------------------------------------
# The mechanism inside a run
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps the script's functions to record, per optimizer step, the parameters before the step, and at the end
    of every iteration the lagged agent handed to churn_diagnostics; plus the minibatches each generator drew."""

    def __init__(self, module, monkeypatch):
        self.before_step, self.lagged_at_log, self.after_at_log, self.draws = [], [], [], []
        recorder = self
        adam = torch.optim.Adam

        class RecordingAdam(adam):
            def step(self, *a, **k):
                recorder.before_step.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
                return super().step(*a, **k)

        monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
        diagnostics, minibatches = module.churn_diagnostics, module.minibatches

        def churn_diagnostics(agent, lagged, obs, continuous):
            recorder.lagged_at_log.append([p.detach().clone() for p in lagged.parameters()])
            recorder.after_at_log.append(len(recorder.before_step))
            return diagnostics(agent, lagged, obs, continuous)

        def recording_minibatches(valid, num_minibatches, rng):
            out = minibatches(valid, num_minibatches, rng)
            recorder.draws.append((id(rng), [mb.copy() for mb in out]))
            return out

        monkeypatch.setattr(module, "churn_diagnostics", churn_diagnostics)
        monkeypatch.setattr(module, "minibatches", recording_minibatches)


def test_reference_is_the_agent_one_optimizer_step_old(cchain, tmp_path, monkeypatch):
    rec = Recorder(cchain, monkeypatch)
    run_in_process(cchain, tmp_path, "lag", "CartPole-v1", SMOKE)
    assert len(rec.lagged_at_log) == 8 and rec.after_at_log[-1] == len(rec.before_step) == 8 * 4 * 4
    for lagged, steps in zip(rec.lagged_at_log, rec.after_at_log):
        last, previous = rec.before_step[steps - 1], rec.before_step[steps - 2]
        assert all(torch.equal(a, b) for a, b in zip(lagged, last))  # the parameters before the last step
        assert not all(torch.equal(a, b) for a, b in zip(lagged, previous))


def test_regularisation_minibatches_are_independent_of_the_training_ones(cchain, tmp_path, monkeypatch):
    """With C-CHAIN on, each epoch draws a second permutation of the rollout's steps from its own generator: the
    training minibatches of the first iteration are those of --no-cchain (the base's stream is untouched), and the
    regularisation minibatches cover the same steps in another order."""
    rec = Recorder(cchain, monkeypatch)
    run_in_process(cchain, tmp_path, "on", "CartPole-v1", SMOKE, total_timesteps=128)
    on = rec.draws[:]
    rec.draws.clear()
    run_in_process(cchain, tmp_path, "off", "CartPole-v1", SMOKE, total_timesteps=128, cchain=False)
    off = rec.draws[:]
    assert len(off) == 4 and len(on) == 8  # 4 epochs; with C-CHAIN two draws per epoch
    generators_on = [g for g, _ in on]
    reg_id, train_id = generators_on[0], generators_on[1]  # each epoch: the regularisation draw, then the training
    assert reg_id != train_id and generators_on == [reg_id, train_id] * 4
    train_on = [mbs for g, mbs in on if g == train_id]
    reg_on = [mbs for g, mbs in on if g == reg_id]
    for a, b in zip(train_on, [mbs for _, mbs in off]):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for train, reg in zip(train_on, reg_on):
        assert sorted(np.concatenate(train)) == sorted(np.concatenate(reg))
        assert not all(np.array_equal(x, y) for x, y in zip(train, reg))


def test_no_cchain_and_lambda_zero_are_ppo_py(cchain, ppo, tmp_path):
    """--no-cchain is ppo.py's run; so is lambda held at 0 (the loss is computed and adds nothing); the default
    differs. The churn/ logs are written with C-CHAIN off too."""
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(cchain, tmp_path, "off", "CartPole-v1", SMOKE, cchain=False)
    zero = run_in_process(cchain, tmp_path, "zero", "CartPole-v1", SMOKE, cchain_lambda_init=0.0, cchain_adapt=False)
    on = run_in_process(cchain, tmp_path, "on", "CartPole-v1", SMOKE, cchain_lambda_init=100.0)
    assert_same_run(base, off, "ppo_cchain.py --no-cchain")
    assert_same_run(base, zero, "ppo_cchain.py --cchain-lambda-init 0 --no-cchain-adapt")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    assert open(os.path.join(on, "episodes.csv")).read() != open(os.path.join(base, "episodes.csv")).read()
    for run_dir, logged in ((off, False), (on, True)):
        scalars = read_scalars(run_dir)
        assert {"churn/policy", "churn/policy_kl", "churn/value"} <= scalars.keys()
        assert ("cchain/lambda" in scalars) == logged


def test_lambda_restarts_at_each_task_and_adapts_after_the_start(cchain, tmp_path):
    """Two tasks of 8 iterations; adaptation from the 3rd iteration of a task: lambda is the initial value for the
    first 2 iterations of each task, then the formula (>= the floor)."""
    run = run_in_process(cchain, tmp_path, "seq", "CartPole-v1", SEQUENCE, cchain_adapt_start=3,
                         cchain_lambda_init=7.0, cchain_lambda_min=0.0, cchain_beta=1.0)
    scalars = read_scalars(run)
    lam = [v for _, v in scalars["cchain/lambda"]]
    churn = [v for _, v in scalars["cchain/churn_loss"]]
    policy = [v for _, v in scalars["cchain/policy_loss"]]
    assert len(lam) == 16
    for task in range(2):
        block = slice(8 * task, 8 * task + 8)
        lam_t, churn_t, policy_t = lam[block], churn[block], policy[block]
        assert lam_t[:2] == [7.0, 7.0]
        for i in range(2, 8):
            expected = np.mean(np.abs(policy_t[:i + 1])) / (np.mean(churn_t[:i + 1]) + 1e-8)
            assert lam_t[i] == pytest.approx(expected, rel=1e-4)
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_churn_loss_is_off_for_the_first_two_steps(cchain, tmp_path, monkeypatch):
    """The official history must hold three copies before the loss is computed: of one iteration's 4 updates only the
    last 2 compute it (plus the one call of the churn/ logs); with --no-cchain only the logs call it."""
    calls = []
    loss = cchain.churn_loss
    monkeypatch.setattr(cchain, "churn_loss", lambda *a: calls.append(a[0].requires_grad) or loss(*a))
    settings = dict(SMOKE, total_timesteps=128, update_epochs=1, num_minibatches=4)
    run_in_process(cchain, tmp_path, "on", "CartPole-v1", settings)
    assert calls == [True, True, False]
    calls.clear()
    run_in_process(cchain, tmp_path, "off", "CartPole-v1", settings, cchain=False)
    assert calls == [False]


# ---------------------------------------------------------------------------------------------------------------
# ppo.py's perturbed task sequences (docs/ppo.md, detail 17)
# ---------------------------------------------------------------------------------------------------------------


def test_obs_offsets_are_per_seed_and_task(ppo):
    a = ppo.obs_offset(1, 1, 2.0, (4,))
    assert a.dtype == np.float32 and a.shape == (4,)
    assert np.array_equal(a, ppo.obs_offset(1, 1, 2.0, (4,)))
    assert not np.array_equal(a, ppo.obs_offset(1, 2, 2.0, (4,)))
    assert not np.array_equal(a, ppo.obs_offset(2, 1, 2.0, (4,)))
    draws = np.stack([ppo.obs_offset(1, k, 2.0, (4,)) for k in range(1, 400)])
    assert draws.std() == pytest.approx(2.0, rel=0.1)


def test_perturbed_levels_shift_the_observations(ppo):
    args = ppo.Args(env_ids=("CartPole-v1", "CartPole-v1", "CartPole-v1"), steps_per_task=512, obs_perturbation=2.0)
    ppo.resolve_args(args)
    seeds = [3, 4]
    plain = ppo.make_env("CartPole-v1", 2, seeds, args)
    level0 = ppo.make_env("CartPole-v1", 2, seeds, args, task_index=0)
    level2 = ppo.make_env("CartPole-v1", 2, seeds, args, task_index=2)
    offset = ppo.obs_offset(args.seed, 2, 2.0, (4,))
    obs_plain, obs0, obs2 = plain.reset()[0], level0.reset()[0], level2.reset()[0]
    assert np.array_equal(obs0, obs_plain) and np.allclose(obs2, obs_plain + offset)
    step_plain, step2 = plain.step(np.array([0, 1]))[0], level2.step(np.array([0, 1]))[0]
    assert np.allclose(step2, step_plain + offset)
    for env in (plain, level0, level2):
        env.close()


def test_perturbed_sequence_runs_and_evaluates_on_the_last_level(cchain, tmp_path):
    run = run_in_process(cchain, tmp_path, "seq", "CartPole-v1", SEQUENCE)
    summary = read_json(os.path.join(run, "summary.json"))
    assert summary["status"] == "completed" and len(summary["eval_returns"]) == 2
    assert read_json(os.path.join(run, "config.json"))["args"]["obs_perturbation"] == 2.0


@pytest.mark.parametrize("argv, fragments", [
    (["--env-id", "CartPole-v1", "--obs-perturbation", "2"], ["--obs-perturbation", "sequence"]),
    (["--env-ids", "MinAtar/Breakout", "MinAtar/Breakout", "--steps-per-task", "8192", "--obs-perturbation", "1"],
     ["--obs-perturbation", "vector"]),
    (["--env-ids", "CartPole-v1", "CartPole-v1", "--steps-per-task", "512", "--obs-perturbation", "-1"],
     ["--obs-perturbation", ">= 0"]),
])
def test_bad_perturbations_are_one_line_errors(ppo, capsys, argv, fragments):
    code, lines = call_main(ppo, [*argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and all(f in lines[0] for f in fragments), lines


@pytest.mark.parametrize("argv, fragment", [
    (["--cchain-beta", "-1"], "--cchain-beta"), (["--cchain-window", "0"], "--cchain-window"),
    (["--cchain-lambda-init", "-0.5"], "--cchain-lambda-init"), (["--cchain-lambda-min", "-1"], "--cchain-lambda-min"),
])
def test_bad_cchain_flags_are_one_line_errors(cchain, capsys, argv, fragment):
    code, lines = call_main(cchain, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines


# ---------------------------------------------------------------------------------------------------------------
# Other families
# ---------------------------------------------------------------------------------------------------------------


def test_mujoco_regularises_the_gaussian_means(cchain, tmp_path):
    run = run_in_process(cchain, tmp_path, "hopper", "Hopper-v4", dict(
        total_timesteps=256, num_envs=2, num_steps=64, num_minibatches=4, update_epochs=2, max_episode_steps=40,
        eval_episodes=1, metrics_every=4))
    config = read_json(os.path.join(run, "config.json"))["args"]
    assert config["cchain_setting"] == "dmc" and config["cchain_lambda_init"] == 100.0
    scalars = read_scalars(run)
    assert "churn/policy_kl" not in scalars and scalars["cchain/lambda"][0][1] == 100.0
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_atari_smoke(cchain, tmp_path):
    run = run_in_process(cchain, tmp_path, "breakout", "Breakout-v5", dict(
        total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=8,
        metrics_batch_size=32))
    assert read_json(os.path.join(run, "config.json"))["args"]["cchain_setting"] == "procgen"
    assert "churn/policy" in read_scalars(run)
