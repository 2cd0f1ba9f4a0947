"""algos/sac_optimistic.py: the twin reduction of the critic's target (min, mean, max, mix) against hand computations,
the actor loss's min (counted in a run), the actor and critic widths (shapes, parameter counts in config.json),
the value estimation bias (the Monte-Carlo returns, the time-limit cut and the Q statistics by hand; no random
draws; the recorded evaluation returns evaluate's), defaults = sac.py exactly, and bad input."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import (SAC_FLAGS, assert_same_run, call_main, load_script, read_json, read_scalars,
                     run_sac_in_process)

OBS_DIM, LOW, HIGH = 5, np.array([-1.0, -0.5, -2.0]), np.array([1.0, 0.5, 2.0])
ACTION_DIM = len(LOW)
HOPPER_OBS, HOPPER_ACT = 11, 3


@pytest.fixture(scope="module")
def mod():
    return load_script("sac_optimistic")


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


def test_defaults_are_sac_py(mod):
    args = mod.Args()
    assert (args.actor_width, args.critic_width, args.q_target, args.q_target_beta) == (256, 256, "min", 0.5)


# ---------------------------------------------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------------------------------------------


def test_reduce_twins_by_hand(mod):
    q1, q2 = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, -4.0, 3.0, -1.5])
    expected = {"min": [1.0, -4.0, 3.0, -1.5], "mean": [1.5, -3.0, 3.0, -0.5], "max": [2.0, -2.0, 3.0, 0.5],
                "mix": [0.25 * 1 + 0.75 * 1.5, 0.25 * -4 + 0.75 * -3, 3.0, 0.25 * -1.5 + 0.75 * -0.5]}
    for kind, values in expected.items():
        torch.testing.assert_close(mod.reduce_twins(q1, q2, kind, 0.25), torch.tensor(values), rtol=0, atol=1e-7)
    assert torch.equal(mod.reduce_twins(q1, q2, "mix", 1.0), torch.min(q1, q2))  # beta 1: the min
    assert torch.equal(mod.reduce_twins(q1, q2, "mix", 0.0), (q1 + q2) / 2)  # beta 0: the mean
    assert torch.equal(mod.reduce_twins(q2, q1, "mean", 0.5), mod.reduce_twins(q1, q2, "mean", 0.5))


class FixedActor:
    """get_action(next_obs) -> fixed (a', log pi(a'|s'), deterministic)."""

    def __init__(self, actions, log_pi):
        self.actions, self.log_pi = actions, log_pi

    def get_action(self, obs):
        return self.actions, self.log_pi, self.actions


class FixedQ:
    """Q'(s', a') = a fixed vector; checks it is called on the actor's a'."""

    def __init__(self, values, actions):
        self.values, self.actions = values, actions

    def __call__(self, obs, actions):
        assert torch.equal(actions, self.actions)
        return self.values


@pytest.mark.parametrize("kind,beta,qbar", [
    ("min", 0.5, [1.0, -4.0, 3.0]), ("mean", 0.5, [1.5, -3.0, 3.5]), ("max", 0.5, [2.0, -2.0, 4.0]),
    ("mix", 0.5, [1.25, -3.5, 3.25]), ("mix", 0.2, [1.4, -3.2, 3.4]), ("mix", 1.0, [1.0, -4.0, 3.0]),
    ("mix", 0.0, [1.5, -3.0, 3.5])])
def test_target_by_hand(mod, sac, kind, beta, qbar):
    """y = r + gamma * (1 - terminated) * (Qbar' - alpha * log pi(a'|s')) with Qbar' the chosen reduction, computed
    by hand; the default (min) is sac.py's soft_q_target."""
    actions = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0.5], [0.3, 0.3, 0.3]])
    log_pi = torch.tensor([-1.0, 0.5, 2.0])
    q1, q2 = FixedQ(torch.tensor([1.0, -2.0, 3.0]), actions), FixedQ(torch.tensor([2.0, -4.0, 4.0]), actions)
    rewards, terminated = torch.tensor([0.5, 1.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    alpha, gamma = 0.2, 0.9
    target = mod.soft_q_target(FixedActor(actions, log_pi), q1, q2, rewards, terminated, torch.zeros(3, OBS_DIM),
                               alpha, gamma, kind, beta)
    hand = [0.5 + 0.9 * (qbar[0] - 0.2 * -1.0), 1.0 + 0.9 * (qbar[1] - 0.2 * 0.5), -1.0]  # the last one terminated
    torch.testing.assert_close(target, torch.tensor(hand), rtol=0, atol=1e-6)
    default = mod.soft_q_target(FixedActor(actions, log_pi), q1, q2, rewards, terminated, torch.zeros(3, OBS_DIM),
                                alpha, gamma)
    assert torch.equal(default, sac.soft_q_target(FixedActor(actions, log_pi), q1, q2, rewards, terminated,
                                                  torch.zeros(3, OBS_DIM), alpha, gamma))


@pytest.mark.parametrize("q_target", ["max", "min"])
def test_actor_loss_keeps_the_min(mod, tmp_path, monkeypatch, q_target):
    """The only torch.min calls of a run without diagnostics: the actor loss's min(Q1(s, pi), Q2(s, pi)) at every actor
    update (with gradients to the actor), plus the target's with --q-target min. With --q-target max the actor loss
    still takes the min."""
    calls = []
    real_min = torch.min

    def counting_min(*args, **kwargs):
        calls.append(any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
        return real_min(*args, **kwargs)

    monkeypatch.setattr(mod.torch, "min", counting_min)
    _, _, summary = run_sac_in_process(mod, tmp_path, q_target, q_target=q_target, metrics_every=0)
    actor_updates = summary["num_updates"] // 2 * 2  # every 2nd critic update, twice (--policy-frequency 2)
    assert summary["num_updates"] == 200
    assert sum(calls) == actor_updates  # the actor loss: differentiable Q values
    assert len(calls) - sum(calls) == (summary["num_updates"] if q_target == "min" else 0)  # the target's (no grad)


# ---------------------------------------------------------------------------------------------------------------
# Widths and parameter counts
# ---------------------------------------------------------------------------------------------------------------


def test_width_shapes_and_counts(mod):
    actor, qf = mod.Actor(OBS_DIM, LOW, HIGH, 16), mod.SoftQNetwork(OBS_DIM, ACTION_DIM, 64)
    assert {k: tuple(p.shape) for k, p in actor.named_parameters()} == {
        "trunk.fc1.weight": (16, OBS_DIM), "trunk.fc1.bias": (16,), "trunk.fc2.weight": (16, 16),
        "trunk.fc2.bias": (16,), "fc_mean.weight": (ACTION_DIM, 16), "fc_mean.bias": (ACTION_DIM,),
        "fc_logstd.weight": (ACTION_DIM, 16), "fc_logstd.bias": (ACTION_DIM,)}
    assert {k: tuple(p.shape) for k, p in qf.named_parameters()} == {
        "net.fc1.weight": (64, OBS_DIM + ACTION_DIM), "net.fc1.bias": (64,), "net.fc2.weight": (64, 64),
        "net.fc2.bias": (64,), "net.q.weight": (1, 64), "net.q.bias": (1,)}
    for width in (1, 8, 16, 256):
        actor, qf = mod.Actor(OBS_DIM, LOW, HIGH, width), mod.SoftQNetwork(OBS_DIM, ACTION_DIM, width)
        assert mod.actor_param_count(OBS_DIM, ACTION_DIM, width) == sum(p.numel() for p in actor.parameters())
        assert mod.critic_param_count(OBS_DIM, ACTION_DIM, width) == sum(p.numel() for p in qf.parameters())
    # the default networks are sac.py's: same names, shapes and (same RNG state) values
    torch.manual_seed(0)
    ours = list(mod.Actor(OBS_DIM, LOW, HIGH).state_dict().items()) + list(
        mod.SoftQNetwork(OBS_DIM, ACTION_DIM).state_dict().items())
    torch.manual_seed(0)
    theirs = list(load_script("sac").Actor(OBS_DIM, LOW, HIGH).state_dict().items()) + list(
        load_script("sac").SoftQNetwork(OBS_DIM, ACTION_DIM).state_dict().items())
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))


@pytest.fixture(scope="module")
def narrow_run(mod, tmp_path_factory):
    """Hopper-v4 (11-dim observations, 3-dim actions), --actor-width 16 --critic-width 64 --q-target mean, periodic
    evaluations every 150 steps and a final one, --save-model."""
    out = tmp_path_factory.mktemp("narrow")
    torch_threads = torch.get_num_threads()
    _, run_dir, summary = run_sac_in_process(mod, out, "narrow", actor_width=16, critic_width=64, q_target="mean",
                                             eval_episodes=2, eval_every=150, metrics_every=50, save_model=True)
    torch.set_num_threads(torch_threads)
    return run_dir, summary


def test_param_counts_in_config_by_hand(narrow_run):
    run_dir, _ = narrow_run
    config = read_json(os.path.join(run_dir, "config.json"))
    actor = (11 + 1) * 16 + (16 + 1) * 16 + 2 * (16 + 1) * 3  # fc1, fc2, mean and log-std heads
    critic = (11 + 3 + 1) * 64 + (64 + 1) * 64 + (64 + 1)  # fc1 on (obs, action), fc2, q
    base = (11 + 1) * 256 + (256 + 1) * 256 + 2 * (256 + 1) * 3
    assert (config["actor_params"], config["critic_params"], config["base_actor_params"]) == (566, 5185, 70406)
    assert (actor, critic, base) == (566, 5185, 70406)
    assert config["actor_to_critic_param_ratio"] == pytest.approx(566 / 5185)
    assert config["actor_fraction_of_base"] == pytest.approx(566 / 70406)
    assert config["args"]["actor_width"] == 16 and config["family"] == "mujoco" and "git_commit" in config  # kept
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert tuple(model["model"]["trunk.fc2.weight"].shape) == (16, 16)
    assert tuple(model["qf1"]["net.fc1.weight"].shape) == (64, 14)


def test_value_keys_logged_and_summarised(narrow_run):
    run_dir, summary = narrow_run
    scalars = read_scalars(run_dir)
    keys = ("q_min", "q_mean_twins", "mc_return", "bias", "bias_mean_twins", "normalized_bias", "num_states")
    for key in keys:  # the periodic evaluations at 150 and 300, then the final one at 300
        assert [step for step, _ in scalars[f"value/{key}"]] == [150, 300, 300], key
    bias = summary["value_bias"]
    assert bias["num_states"] > 0
    assert bias["bias"] == pytest.approx(bias["q_min"] - bias["mc_return"])
    assert bias["bias_mean_twins"] == pytest.approx(bias["q_mean_twins"] - bias["mc_return"])
    assert bias["q_mean_twins"] >= bias["q_min"]
    assert bias["normalized_bias"] == pytest.approx(bias["bias"] / abs(bias["mc_return"]))
    assert scalars["value/bias"][-1][1] == pytest.approx(bias["bias"], rel=1e-6)
    assert read_json(os.path.join(run_dir, "summary.json"))["value_bias"] == bias


def test_checkpoint_of_another_width_is_one_line(mod, narrow_run, tmp_path, capsys):
    run_dir, _ = narrow_run
    code, lines = call_main(mod, ["--env-id", "Hopper-v4", "--eval-checkpoint", os.path.join(run_dir, "model.pt"),
                                  "--eval-episodes", 1, "--output-dir", tmp_path, "--run-name", "eval"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --eval-checkpoint") and "--actor-width 16" in lines[0], lines


# ---------------------------------------------------------------------------------------------------------------
# Value estimation bias
# ---------------------------------------------------------------------------------------------------------------


def tiny_record():
    """Two envs, gamma 0.1 (horizon 2). Env 0 terminates at its third step (rewards 1, 2, 3), then auto-resets and
    starts a second episode (ignored). Env 1 is cut by the time limit at its fourth step (rewards 1, 1, 1, 1).
    obs = [env, t], actions = [10 * env + t]."""
    rows = []
    rewards = [[1, 1], [2, 1], [3, 1], [0, 1], [5, 7]]
    terminated = [[0, 0], [0, 0], [1, 0], [0, 0], [0, 0]]
    truncated = [[0, 0], [0, 0], [0, 0], [0, 1], [0, 0]]
    prev_done = np.zeros(2, dtype=bool)
    for t in range(5):
        term, trunc = np.array(terminated[t], bool), np.array(truncated[t], bool)
        rows.append((np.array([[0, t], [1, t]], np.float32), np.array([[t], [10 + t]], np.float32),
                     np.array(rewards[t], np.float32), term, trunc, ~prev_done))
        prev_done = term | trunc
    return rows


def test_value_bias_states_by_hand(mod):
    assert mod.bias_horizon(0.1) == 2 and mod.bias_horizon(0.99) == 459 and mod.bias_horizon(0.5) == 7
    assert mod.bias_horizon(0.0) == 1 and mod.bias_horizon(1.0) == math.inf
    assert 0.99 ** 459 <= 0.01 < 0.99 ** 458
    obs, actions, returns, soft = mod.value_bias_states(tiny_record(), 0.1)
    assert soft is None  # no bonus given
    # env 0 (terminated): every step; env 1 (truncated, T = 4): t with T - t >= 2 rewards, i.e. t = 0, 1, 2 (t = 3
    # has one reward: its missing tail would weigh 0.1 > 1%)
    assert obs.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert actions.ravel().tolist() == [0, 1, 2, 10, 11, 12]
    np.testing.assert_allclose(returns, [1 + 0.1 * 2 + 0.01 * 3, 2 + 0.1 * 3, 3, 1.111, 1.11, 1.1], rtol=1e-6)
    _, _, returns, _ = mod.value_bias_states(tiny_record(), 1.0)  # gamma 1: no truncated step is complete enough
    np.testing.assert_allclose(returns, [6, 5, 3])
    _, actions, returns, _ = mod.value_bias_states(tiny_record(), 0.0)  # gamma 0: G_t = r_t, every step
    np.testing.assert_allclose(returns, [1, 2, 3, 1, 1, 1, 1])
    assert actions.ravel().tolist() == [0, 1, 2, 10, 11, 12, 13]
    record = tiny_record()
    record[2] = record[2][:4] + (np.array([True, False]),) + record[2][5:]  # env 0 also truncated: still exact
    assert mod.value_bias_states(record, 0.1)[1].ravel().tolist() == [0, 1, 2, 10, 11, 12]


def test_soft_returns_add_the_entropy_bonuses_by_hand(mod):
    # bonus b[t][env]: env 0 terminates after 3 steps, env 1 is truncated after 4 (gamma 0.1 keeps t = 0, 1, 2)
    bonus = [np.array([0.5, 1.0]), np.array([0.25, 2.0]), np.array([0.125, 3.0]), np.array([9.0, 4.0]),
             np.array([9.0, 9.0])]
    _, _, returns, soft = mod.value_bias_states(tiny_record(), 0.1, bonus)
    g0 = [3.0]  # env 0 backwards: G^soft_2 = 3, G^soft_1 = 2 + 0.1 (0.125 + 3), G^soft_0 = 1 + 0.1 (0.25 + G^soft_1)
    g0.insert(0, 2 + 0.1 * (0.125 + g0[0]))
    g0.insert(0, 1 + 0.1 * (0.25 + g0[0]))
    g1 = [1.0]  # env 1 (rewards 1): the last step has no bonus after it inside the episode
    for b in (4.0, 3.0, 2.0):
        g1.insert(0, 1 + 0.1 * (b + g1[0]))
    np.testing.assert_allclose(soft, g0 + g1[:3], rtol=1e-9)
    np.testing.assert_allclose(mod.value_bias_states(tiny_record(), 0.1, [b * 0 for b in bonus])[3], returns)


def test_soft_bias_uses_a_private_generator(mod):
    torch.manual_seed(0)
    actor = mod.Actor(2, np.array([-1.0]), np.array([1.0]), hidden=8)
    record = tiny_record()
    state = torch.get_rng_state()
    bonus = mod.entropy_bonus(actor, record, 0.5, "cpu", samples=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert [len(b) for b in bonus] == [2] * len(record)
    # by hand at one observation: the mean of -log pi over the same 4 noise draws, times alpha
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean, log_std = actor(torch.from_numpy(np.asarray(record[0][0], np.float32)))
        noise = torch.randn((4, *mean.shape), generator=generator)
        logs = [mod.squashed_gaussian(mean, log_std, noise[k], actor.action_scale, actor.action_bias)[1]
                for k in range(4)]
    np.testing.assert_allclose(bonus[0], (-0.5 * torch.stack(logs).mean(0)).double().numpy(), rtol=1e-5)
    out = mod.value_bias(SumQ(0.1, 0.0), SumQ(0.0, 1.0), record, 0.1, "cpu", actor, 0.5)
    assert {"alpha", "soft_return", "soft_bias", "soft_bias_mean_twins", "normalized_soft_bias"} <= set(out)
    assert out["soft_return"] != out["mc_return"] and out["alpha"] == 0.5
    assert torch.equal(torch.get_rng_state(), state)


class SumQ(torch.nn.Module):
    """Q(s, a) = sum(s) + a * scale + shift: known values at the recorded states."""

    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, obs, actions):
        return obs.sum(1) + self.scale * actions[:, 0] + self.shift


def test_value_bias_by_hand(mod):
    qf1, qf2 = SumQ(0.1, 0.0), SumQ(0.0, 1.0)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    out = mod.value_bias(qf1, qf2, tiny_record(), 0.1, "cpu")
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    states = [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 10), (1, 1, 11), (1, 2, 12)]  # (env, t, action)
    q1 = np.array([e + t + 0.1 * a for e, t, a in states])
    q2 = np.array([e + t + 1.0 for e, t, a in states])
    g = np.array([1.23, 2.3, 3.0, 1.111, 1.11, 1.1])
    q_min, q_mean = np.minimum(q1, q2), (q1 + q2) / 2
    hand = {"q_min": q_min.mean(), "q_mean_twins": q_mean.mean(), "mc_return": g.mean(),
            "bias": (q_min - g).mean(), "bias_mean_twins": (q_mean - g).mean(),
            "normalized_bias": (q_min - g).mean() / abs(g.mean()),
            "normalized_bias_std": ((q_min - g) / abs(g.mean())).std(), "num_states": 6}
    assert set(out) == set(hand)
    for key, value in hand.items():
        assert out[key] == pytest.approx(value, rel=1e-6), key
    assert mod.value_bias(qf1, qf2, tiny_record()[:2], 0.1, "cpu") == {"num_states": 0}  # no episode ended


def test_evaluate_recorded_is_evaluate(mod):
    """Same returns as evaluate, no random numbers drawn, and the record's first-episode rewards sum to them."""
    args = mod.Args(env_id="Hopper-v4")
    torch.manual_seed(1)
    actor = mod.Actor(HOPPER_OBS, -np.ones(HOPPER_ACT), np.ones(HOPPER_ACT), 16)
    state = torch.get_rng_state()
    returns, record = mod.evaluate_recorded(actor, "Hopper-v4", args, 3, 7, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert returns == mod.evaluate(actor, "Hopper-v4", args, 3, 7, "cpu")
    for i in range(3):  # each env's first episode: the valid steps up to its first done
        total = 0.0
        for _, _, reward, terminated, truncated, valid in record:
            assert valid[i]
            total += float(reward[i])
            if terminated[i] or truncated[i]:
                break
        assert total == pytest.approx(returns[i], rel=1e-5)
    assert len(record) == max(1 + int(np.argmax([r[3][i] | r[4][i] for r in record])) for i in range(3))


# ---------------------------------------------------------------------------------------------------------------
# End to end and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_sac_py_exactly(mod, sac, tmp_path):
    """Defaults: sac.py's episodes.csv, summary (evaluation returns included) and logged losses, diagnostics and
    evaluations byte for byte; --q-target mean changes the run."""
    flags = dict(total_timesteps=400, eval_episodes=2, eval_every=200, metrics_every=50)
    _, base_dir, _ = run_sac_in_process(sac, tmp_path, "sac", **flags)
    _, ours_dir, _ = run_sac_in_process(mod, tmp_path, "ours", **flags)
    assert_same_run(base_dir, ours_dir, "sac_optimistic.py with its defaults")
    base_scalars, ours_scalars = read_scalars(base_dir), read_scalars(ours_dir)
    for key in ("losses/qf_loss", "losses/actor_loss", "losses/alpha", "plasticity/qf1/srank", "eval/episodic_return"):
        assert ours_scalars[key] == base_scalars[key], key
    assert set(ours_scalars) - set(base_scalars) == {k for k in ours_scalars if k.startswith("value/")}
    # the same flags with the mean target: the critics learn other values (the losses differ from the first update)
    _, mean_dir, _ = run_sac_in_process(mod, tmp_path, "mean", q_target="mean", **flags)
    mean_scalars = read_scalars(mean_dir)
    assert mean_scalars["losses/qf_loss"] != ours_scalars["losses/qf_loss"]
    assert mean_scalars["value/q_mean_twins"] != ours_scalars["value/q_mean_twins"]


def test_value_bias_gets_the_online_critics_and_the_states_before_each_step(mod, tmp_path, monkeypatch):
    seen = []
    value_bias = mod.value_bias

    def spy(qf1, qf2, record, gamma, device, actor=None, alpha=0.0):
        seen.append((qf1, qf2, record, actor))
        return value_bias(qf1, qf2, record, gamma, device, actor, alpha)
    monkeypatch.setattr(mod, "value_bias", spy)
    made = []
    soft_q = mod.SoftQNetwork

    def tracking(*args, **kwargs):
        made.append(soft_q(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(mod, "SoftQNetwork", tracking)
    run_sac_in_process(mod, tmp_path, "spy", eval_episodes=2)
    assert len(seen) == 1 and seen[0][0] is made[0] and seen[0][1] is made[1]  # qf1, qf2 (built before the targets)
    qf1, _, record, actor = seen[0]
    assert isinstance(actor, mod.Actor)
    # the first recorded observations are the evaluation envs' first observations, and every recorded action is the
    # deterministic action at the recorded observation (the state before the step, not after)
    envs = mod.make_env("Hopper-v4", 2, mod.env_seeds(SAC_FLAGS["seed"], 0, 1, 2), mod.Args(env_id="Hopper-v4"))
    first = mod.flatten_obs(envs.reset()[0])
    envs.close()
    np.testing.assert_array_equal(record[0][0], first)
    with torch.no_grad():
        for step in record[:20]:
            np.testing.assert_allclose(step[1], actor.mean_action(torch.from_numpy(step[0])).numpy(), rtol=1e-6)


@pytest.mark.parametrize("flags", [dict(q_target_beta=1.5), dict(q_target_beta=-0.1), dict(q_target_beta=float("nan")),
                                   dict(actor_width=0), dict(critic_width=0)])
def test_bad_flags_are_user_errors(mod, flags):
    with pytest.raises(mod.UserError, match="need --actor-width >= 1, --critic-width >= 1 and 0 <= --q-target-beta"):
        mod.resolve_args(mod.Args(env_id="Hopper-v4", **flags))


@pytest.mark.parametrize("argv,fragment", [(["--q-target-beta", "2"], "got 256, 256 and 2.0"),
                                           (["--actor-width", "0"], "got 0, 256 and 0.5")])
def test_bad_flag_is_one_line_error(mod, tmp_path, capsys, argv, fragment):
    code, lines = call_main(mod, ["--env-id", "Hopper-v4", *argv, "--output-dir", tmp_path, "--run-name", "bad"],
                            capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: need --actor-width >= 1"), lines
    assert fragment in lines[0], lines
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # rejected before any work
