"""Unit tests of algos/sac.py's mechanics: the squashed Gaussian and its log-prob correction, log-std bounds, the
Polyak update, the target entropy, DMC Dict flattening, the replay memory on real EnvPool streams (no auto-reset
pseudo-transitions, terminal flag only on termination) and the soft TD target through truncations."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from helpers import load_script, read_json

GAMMA = 0.9  # far from 1, so a wrong number of discount factors changes the result visibly


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


# ---------------------------------------------------------------------------------------------------------------
# The policy: squashing, log-prob correction, log-std bounds
# ---------------------------------------------------------------------------------------------------------------


def test_log_prob_matches_change_of_variables(sac):
    """log pi(a) of the tanh-squashed, affinely rescaled Gaussian equals log N(u) - sum log |da/du| (computed by
    autograd) and torch's TransformedDistribution(Normal, [Tanh, Affine]) up to the 1e-6 stabiliser."""
    gen = torch.Generator().manual_seed(0)
    batch, dims = 64, 3
    mean = torch.rand(batch, dims, generator=gen, dtype=torch.float64) - 0.5
    log_std = -torch.rand(batch, dims, generator=gen, dtype=torch.float64)
    noise = torch.randn(batch, dims, generator=gen, dtype=torch.float64).clamp(-2, 2)
    scale = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)  # Pendulum-like, narrow and unit bounds
    bias = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    action, log_prob = sac.squashed_gaussian(mean, log_std, noise, scale, bias)
    assert action.shape == (batch, dims) and log_prob.shape == (batch,)

    u = (mean + log_std.exp() * noise).requires_grad_(True)
    squashed = torch.tanh(u) * scale + bias
    (jacobian_diag,) = torch.autograd.grad(squashed.sum(), u)  # elementwise map: the Jacobian is diagonal
    reference = (Normal(mean, log_std.exp()).log_prob(u) - jacobian_diag.abs().log()).sum(1).detach()
    torch.testing.assert_close(action, squashed.detach())
    torch.testing.assert_close(log_prob, reference, atol=2e-4, rtol=0)  # the 1e-6 stabiliser costs < 1e-4 here

    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(bias, scale)])
    torch.testing.assert_close(log_prob, dist.log_prob(action).sum(1), atol=2e-4, rtol=0)


def test_log_prob_stays_finite_when_saturated(sac):
    """At |u| = 30, tanh(u) is exactly +-1 in float32: the 1e-6 stabiliser keeps the log-prob finite."""
    mean = torch.tensor([[30.0, -30.0]])
    log_std = torch.full((1, 2), -5.0)
    action, log_prob = sac.squashed_gaussian(mean, log_std, torch.zeros(1, 2), torch.ones(2), torch.zeros(2))
    assert torch.equal(action, torch.tensor([[1.0, -1.0]]))
    assert torch.isfinite(log_prob).all()
    # -log(1e-6) per dimension is what the correction adds at saturation
    expected = Normal(mean, log_std.exp()).log_prob(mean).sum() - 2 * math.log(1e-6)
    torch.testing.assert_close(log_prob, expected.reshape(1), rtol=1e-4, atol=1e-3)


def test_log_std_is_bounded_by_tanh_rescaling(sac):
    raw = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    log_std = sac.bounded_log_std(raw)
    assert log_std[0].item() == sac.LOG_STD_MIN == -5.0 and log_std[-1].item() == sac.LOG_STD_MAX == 2.0
    torch.testing.assert_close(log_std[2], torch.tensor(-1.5))  # the midpoint of [-5, 2]
    torch.testing.assert_close(log_std, -5.0 + 3.5 * (torch.tanh(raw) + 1))
    assert (log_std.diff() > 0).all()
    # the actor's log-std head stays in the bounds even with absurd weights
    actor = sac.Actor(5, -np.ones(2), np.ones(2))
    with torch.no_grad():
        actor.fc_logstd.weight.fill_(1e3)
    _, log_std = actor(torch.randn(16, 5))
    assert (log_std >= -5.0).all() and (log_std <= 2.0).all()


def test_actor_rescales_to_the_action_bounds(sac):
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    actor = sac.Actor(4, low, high)
    torch.testing.assert_close(actor.action_scale, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(actor.action_bias, torch.tensor([0.0, 0.5]))
    torch.manual_seed(0)
    obs = torch.randn(512, 4) * 10
    action, log_prob, deterministic = actor.get_action(obs)
    for a in (action, deterministic, actor.mean_action(obs)):
        assert (a >= torch.tensor(low, dtype=torch.float32)).all() and (a <= torch.tensor(high)).all()
    mean, _ = actor(obs)
    torch.testing.assert_close(deterministic, torch.tanh(mean) * actor.action_scale + actor.action_bias)
    torch.testing.assert_close(actor.mean_action(obs), deterministic)
    assert log_prob.shape == (512,) and torch.isfinite(log_prob).all()
    # the log-prob is differentiable through the reparameterised sample (SAC's actor loss needs it)
    log_prob.mean().backward()
    assert actor.fc_mean.weight.grad is not None and actor.fc_logstd.weight.grad.abs().sum() > 0


def test_networks_match_cleanrl_shapes(sac):
    actor, qf = sac.Actor(17, -np.ones(6), np.ones(6)), sac.SoftQNetwork(17, 6)
    assert [m.out_features for m in actor.trunk if isinstance(m, torch.nn.Linear)] == [256, 256]
    assert actor.fc_mean.out_features == actor.fc_logstd.out_features == 6
    assert [(m.in_features, m.out_features) for m in qf.net if isinstance(m, torch.nn.Linear)] == [
        (23, 256), (256, 256), (256, 1)]
    assert actor.hidden_layers() == qf.hidden_layers() == ["fc1", "fc2"]
    q, hidden = qf(torch.randn(8, 17), torch.randn(8, 6), return_hidden=True)
    assert q.shape == (8,) and [h.shape for h in hidden] == [(8, 256), (8, 256)]


# ---------------------------------------------------------------------------------------------------------------
# Target networks, target entropy, soft TD target
# ---------------------------------------------------------------------------------------------------------------


def test_soft_update_is_polyak_averaging(sac):
    torch.manual_seed(0)
    source, target = sac.SoftQNetwork(3, 2), sac.SoftQNetwork(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    sac.soft_update(target, source, 0.005)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        torch.testing.assert_close(t, 0.005 * s + 0.995 * b)
        assert not t.requires_grad or t.grad is None
    two = [p.detach().clone() for p in target.parameters()]
    sac.soft_update(target, source, 0.005)  # twice: the gap to the source shrinks by (1 - tau) each time
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        torch.testing.assert_close(t - s, 0.995**2 * (b - s), atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(two, target.parameters()))
    sac.soft_update(target, source, 1.0)  # tau = 1 is a hard copy
    for t, s in zip(target.parameters(), source.parameters()):
        torch.testing.assert_close(t, s)


def test_target_entropy_is_minus_action_dimension(sac):
    assert sac.target_entropy((6,)) == -6.0  # HalfCheetah, CheetahRun
    assert sac.target_entropy((3,)) == -3.0  # Hopper
    assert sac.target_entropy((17,)) == -17.0  # Humanoid


class _StubActor:
    def __init__(self, actions, log_prob):
        self.actions, self.log_prob = actions, log_prob

    def get_action(self, obs):
        return self.actions, self.log_prob, self.actions


def test_soft_q_target_bootstraps_unless_terminated(sac):
    """target = r + gamma (1 - terminated) (min(Q1', Q2') - alpha log pi): a truncated transition is stored with
    terminated = 0, so it bootstraps; only a termination zeroes the bootstrap."""
    next_obs = torch.zeros(3, 2)
    actor = _StubActor(torch.zeros(3, 1), torch.tensor([-1.0, 0.5, 2.0]))
    q1 = lambda obs, a: torch.tensor([3.0, 1.0, -2.0])  # noqa: E731
    q2 = lambda obs, a: torch.tensor([2.0, 4.0, -1.0])  # noqa: E731
    rewards, terminated, alpha = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]), 0.2
    target = sac.soft_q_target(actor, q1, q2, rewards, terminated, next_obs, alpha, GAMMA)
    expected = torch.tensor([1.0 + GAMMA * (2.0 + 0.2), 2.0, 3.0 + GAMMA * (-2.0 - 0.4)])
    torch.testing.assert_close(target, expected)


# ---------------------------------------------------------------------------------------------------------------
# Observations: DMC Dict flattening
# ---------------------------------------------------------------------------------------------------------------


def test_flatten_dict_in_space_key_order(sac):
    obs = {"velocity": np.array([[7.0, 8.0], [9.0, 10.0]]), "height": np.array([5.0, 6.0]),
           "orientations": np.array([[1.0, 2.0], [3.0, 4.0]])}
    flat = sac.flatten_obs(obs, ["orientations", "height", "velocity"])  # the space's order, not the dict's
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [[1, 2, 5, 7, 8], [3, 4, 6, 9, 10]])
    box = sac.flatten_obs(np.ones((2, 3), dtype=np.float64))  # MuJoCo: a float64 Box, cast
    assert box.dtype == np.float32 and box.shape == (2, 3)


def test_flatten_real_dmc_observation(sac):
    args = sac.Args(env_id="WalkerStand-v1")
    envs = sac.make_env("WalkerStand-v1", 2, sac.env_seeds(0, 0, 0, 2), args)
    keys = sac.obs_keys(envs.observation_space)
    assert keys == ["orientations", "height", "velocity"]
    obs, _ = envs.reset()
    assert obs["height"].shape == (2,)  # a scalar () entry per env
    flat = sac.flatten_obs(obs, keys)
    assert flat.shape == (2, 14 + 1 + 9) == (2, sac.space_size(envs.observation_space, "WalkerStand-v1"))
    np.testing.assert_array_equal(flat[:, :14], obs["orientations"].astype(np.float32))
    np.testing.assert_array_equal(flat[:, 14], obs["height"].astype(np.float32))
    np.testing.assert_array_equal(flat[:, 15:], obs["velocity"].astype(np.float32))
    envs.close()


def test_pixel_and_discrete_spaces_are_rejected(sac):
    for env_id, fragment in (("CarRacing-v2", "vector observations"), ("CartPole-v1", "continuous (Box) action"),
                             ("Pong-v5", "continuous (Box) action")):
        with pytest.raises(sac.UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            sac.resolve_args(sac.Args(env_id=env_id))


def test_flag_checks(sac):
    cases = [
        (dict(env_id="Hoper-v4"), "did you mean: Hopper-v4"),
        (dict(env_ids=("WalkerStand-v1", "WalkerWalk-v1")), "--steps-per-task"),
        (dict(env_ids=("HalfCheetah-v4", "Hopper-v4"), steps_per_task=10), "share the observation space"),
        (dict(env_ids=("CheetahRun-v1", "HalfCheetah-v4"), steps_per_task=10), "share the observation space"),
        (dict(env_id="Hopper-v4", policy_frequency=0), "--policy-frequency"),
        (dict(env_id="Hopper-v4", tau=0.0), "tau"),
        (dict(env_id="Hopper-v4", replay_ratio=-1.0), "--replay-ratio"),
        (dict(env_id="Hopper-v4", num_envs=8, buffer_size=4), "--buffer-size"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(sac.UserError) as err:
            sac.resolve_args(sac.Args(**kwargs))
        assert fragment in str(err.value), (kwargs, str(err.value))
    args = sac.Args(env_ids=("WalkerStand-v1", "WalkerWalk-v1", "WalkerRun-v1"), steps_per_task=100)
    assert sac.resolve_args(args) == (["WalkerStand-v1", "WalkerWalk-v1", "WalkerRun-v1"], "dmc")
    assert args.total_timesteps == 300
    args = sac.Args(env_id="HalfCheetah-v4")
    assert sac.resolve_args(args) == (["HalfCheetah-v4"], "mujoco") and args.total_timesteps == 1_000_000


# ---------------------------------------------------------------------------------------------------------------
# Replay memory on real EnvPool streams
# ---------------------------------------------------------------------------------------------------------------


def collect(sac, rb, env_id: str, num_envs: int, steps: int, max_episode_steps: int, seed: int = 0):
    """Feed `rb` exactly as sac.run's collection loop does (same validity rule, copied from run()) with uniformly
    random actions; returns a log of every vector step."""
    args = sac.Args(env_id=env_id, max_episode_steps=max_episode_steps)
    envs = sac.make_env(env_id, num_envs, sac.env_seeds(seed, 0, 0, num_envs), args)
    keys = sac.obs_keys(envs.observation_space)
    low, high = envs.action_space.low.astype(np.float32), envs.action_space.high.astype(np.float32)
    rng = np.random.default_rng(seed)
    obs = sac.flatten_obs(envs.reset()[0], keys)
    prev_done = np.zeros(num_envs, dtype=bool)
    log = []
    for _ in range(steps):
        actions = rng.uniform(low, high, (num_envs, len(low))).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = envs.step(actions)
        next_obs = sac.flatten_obs(next_obs, keys)
        valid = ~prev_done
        rb.add(obs[valid], next_obs[valid], actions[valid], reward[valid], terminated[valid])
        log.append(dict(obs=obs, next_obs=next_obs, actions=actions, reward=reward, terminated=terminated,
                        truncated=truncated, valid=valid))
        prev_done = terminated | truncated
        obs = next_obs
    envs.close()
    return log


def transition_key(obs, next_obs) -> bytes:
    return np.asarray(obs, dtype=np.float32).tobytes() + np.asarray(next_obs, dtype=np.float32).tobytes()


@pytest.fixture(scope="module")
def hopper_stream(sac):
    """Hopper-v4 under random actions terminates (falls) after ~10-40 steps; a 25-step cap adds truncations."""
    rb = sac.ReplayBuffer(100_000, 11, 3)
    log = collect(sac, rb, "Hopper-v4", num_envs=3, steps=400, max_episode_steps=25)
    return rb, log


def test_replay_holds_exactly_the_real_transitions(sac, hopper_stream):
    rb, log = hopper_stream
    real = {k: np.concatenate([step[k][step["valid"]] for step in log]) for k in
            ("obs", "next_obs", "actions", "reward", "terminated")}
    pseudo = sum(int((~step["valid"]).sum()) for step in log)
    assert pseudo > 20, "the stream should contain many auto-reset steps"
    assert len(rb) == len(real["obs"]) == 3 * len(log) - pseudo
    n = len(rb)
    np.testing.assert_array_equal(rb.obs[:n], real["obs"])
    np.testing.assert_array_equal(rb.next_obs[:n], real["next_obs"])
    np.testing.assert_array_equal(rb.actions[:n], real["actions"])
    np.testing.assert_array_equal(rb.rewards[:n], real["reward"].astype(np.float32))
    np.testing.assert_array_equal(rb.terminated[:n], real["terminated"].astype(np.float32))


def test_replay_never_contains_auto_reset_pseudo_transitions(sac, hopper_stream):
    rb, log = hopper_stream
    pseudo = {transition_key(step["obs"][i], step["next_obs"][i]) for step in log
              for i in np.flatnonzero(~step["valid"])}
    real = {transition_key(step["obs"][i], step["next_obs"][i]) for step in log for i in np.flatnonzero(step["valid"])}
    assert pseudo and not pseudo & real
    stored = {transition_key(o, n) for o, n in zip(rb.obs[: len(rb)], rb.next_obs[: len(rb)])}
    assert stored == real
    # an auto-reset step really is a jump: its "next" observation is the first one of a new episode, not a physics step
    obs, _, _, _, next_obs = rb.sample(4000, np.random.default_rng(1))
    sampled = {transition_key(o, n) for o, n in zip(obs, next_obs)}
    assert sampled <= real and not sampled & pseudo
    assert len(sampled) > 0.5 * len(real)  # uniform over the memory: most transitions appear in 4000 draws


def test_terminal_flag_only_on_termination(sac, hopper_stream):
    rb, log = hopper_stream
    flags = [(bool(step["terminated"][i]), bool(step["truncated"][i]), step["next_obs"][i]) for step in log
             for i in np.flatnonzero(step["valid"])]
    n_term = sum(term for term, _, _ in flags)
    n_trunc = sum(trunc and not term for term, trunc, _ in flags)
    assert n_term >= 5 and n_trunc >= 5, (n_term, n_trunc)  # both kinds of episode end happen
    stored_terminal = rb.terminated[: len(rb)].astype(bool)
    assert stored_terminal.sum() == n_term
    truncated_rows = np.array([trunc and not term for term, trunc, _ in flags])
    assert not stored_terminal[truncated_rows].any()  # truncations bootstrap ...
    # ... from the true final observation (EnvPool returns it with the done step), not from a reset observation
    np.testing.assert_array_equal(rb.next_obs[: len(rb)][truncated_rows],
                                  np.stack([o for (_, _, o), t in zip(flags, truncated_rows) if t]))


def test_replay_ring_keeps_the_newest_transitions(sac):
    capacity = 50
    rb = sac.ReplayBuffer(capacity, 11, 3)
    full = sac.ReplayBuffer(10_000, 11, 3)
    for step in collect(sac, sac.ReplayBuffer(10_000, 11, 3), "Hopper-v4", 2, 120, 25):
        for buffer in (rb, full):
            v = step["valid"]
            buffer.add(step["obs"][v], step["next_obs"][v], step["actions"][v], step["reward"][v],
                       step["terminated"][v])
    assert len(rb) == capacity and len(full) > 3 * capacity
    newest = {transition_key(o, n) for o, n in zip(full.obs[len(full) - capacity: len(full)],
                                                     full.next_obs[len(full) - capacity: len(full)])}
    assert {transition_key(o, n) for o, n in zip(rb.obs, rb.next_obs)} == newest


def test_dmc_episodes_end_by_truncation_and_bootstrap(sac):
    """DMC never terminates: every episode ends with truncated=True at the cap, stored with terminated=0."""
    rb = sac.ReplayBuffer(10_000, 17, 6)
    log = collect(sac, rb, "CheetahRun-v1", num_envs=2, steps=65, max_episode_steps=20)
    assert sum(int(step["truncated"].sum()) for step in log) == 6  # 3 episodes per env: 20 steps + the reset step
    assert not any(step["terminated"].any() for step in log)
    assert len(rb) == 2 * 65 - 2 * 3 and not rb.terminated[: len(rb)].any()


# ---------------------------------------------------------------------------------------------------------------
# Divergence, in process
# ---------------------------------------------------------------------------------------------------------------


def test_nan_loss_in_process_raises_diverged(sac, monkeypatch, tmp_path):
    """run() itself: a NaN critic target raises Diverged before the update and writes status "diverged"."""
    real_target = sac.soft_q_target
    calls = []

    def nan_target(*args, **kwargs):
        calls.append(1)
        return real_target(*args, **kwargs) * math.nan

    monkeypatch.setattr(sac, "soft_q_target", nan_target)
    args = sac.Args(env_id="Hopper-v4", total_timesteps=200, learning_starts=100, buffer_size=500, batch_size=16,
                    eval_episodes=0, metrics_every=0, device="cpu", output_dir=str(tmp_path), run_name="nan")
    with pytest.raises(sac.Diverged):
        sac.run(args)
    assert len(calls) == 1, "the run went on after a NaN loss"
    summary = read_json(os.path.join(str(tmp_path), "nan", "summary.json"))
    assert summary["status"] == "diverged" and "nan" in summary["error"]
    assert summary["num_updates"] == 0 and summary["global_step"] == 101


def test_critics_frozen_only_during_the_actor_update(sac, monkeypatch, tmp_path):
    """run() itself: the critics' parameters stop requiring gradients while the actor loss is built and
    back-propagated (their weight gradients are never used there; docs/sac.md, detail 6), and require them again
    afterwards, so the critics keep learning after the first actor update."""
    critics, states, snapshots = [], [], []
    real_soft_update, real_get_action = sac.soft_update, sac.Actor.get_action

    def soft_update(target, source, tau):
        if len(critics) < 2:
            critics.append(source)
        if source is critics[0]:
            snapshots.append([p.detach().clone() for p in source.parameters()])
            assert all(p.requires_grad for c in critics for p in c.parameters()), "critics left frozen"
        return real_soft_update(target, source, tau)

    def get_action(self, obs, return_hidden=False):
        if critics:  # (do the critics require gradients, are gradients enabled) at this call
            flags = {p.requires_grad for c in critics for p in c.parameters()}
            assert len(flags) == 1, "critics partly frozen"
            states.append((flags.pop(), torch.is_grad_enabled()))
        return real_get_action(self, obs, return_hidden)

    monkeypatch.setattr(sac, "soft_update", soft_update)
    monkeypatch.setattr(sac.Actor, "get_action", get_action)
    args = sac.Args(env_id="Hopper-v4", total_timesteps=140, learning_starts=100, buffer_size=500, batch_size=16,
                    eval_episodes=0, metrics_every=0, device="cpu", output_dir=str(tmp_path), run_name="frozen")
    assert sac.run(args)["status"] == "completed"
    # The actor loss's sample (the only one with gradients) always meets frozen critics; the samples without
    # gradients (targets, alpha, acting) meet trainable critics except alpha's, which follows the actor update
    assert {trainable for trainable, grad in states if grad} == {False}
    assert {trainable for trainable, grad in states if not grad} == {True, False}
    assert len(snapshots) == 40
    for before, after in zip(snapshots[-3:], snapshots[-2:]):  # late critic updates still change every tensor
        assert all(not torch.equal(a, b) for a, b in zip(before, after))
