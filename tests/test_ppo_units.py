"""Unit tests of algos/ppo.py's mechanics: GAE with the truncation bootstrap and auto-reset masking, the rollout's
validity mask in a real run, Dict-observation flattening, the policy heads, observation/reward normalisation, the
networks and the PPO loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import load_script, synthetic_rollout


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


def brute_force_gae(rewards, values, next_value, terminated, done, valid, gamma, lam):
    """Advantages from the lambda-return definition, A_t = sum_n w_n G_t^(n) - V(s_t), where G_t^(n) are n-step
    returns within the episode (bootstrapping from the true next observation, V(final obs) after a truncation,
    nothing after a termination) and the weight of returns past the episode or rollout end goes to the last one."""
    num_steps, num_envs = rewards.shape
    adv = np.zeros_like(rewards, dtype=np.float64)

    def value_after(j, e):  # V of the observation that follows step j
        return values[j + 1, e] if j + 1 < num_steps else next_value[e]

    for e in range(num_envs):
        for t in range(num_steps):
            if not valid[t, e]:
                continue
            horizon = 0
            for k in range(t, num_steps):
                horizon += 1
                if done[k, e]:
                    break
            n_step_returns = []
            for n in range(1, horizon + 1):
                g = sum(gamma**i * rewards[t + i, e] for i in range(n))
                j = t + n - 1
                if not terminated[j, e]:
                    g += gamma**n * value_after(j, e)
                n_step_returns.append(g)
            lam_return = sum((1 - lam) * lam ** (n - 1) * n_step_returns[n - 1] for n in range(1, horizon))
            lam_return += lam ** (horizon - 1) * n_step_returns[-1]
            adv[t, e] = lam_return - values[t, e]
    return adv


@pytest.mark.parametrize("seed,gamma,lam", [(0, 0.99, 0.95), (1, 0.9, 0.0), (2, 0.97, 1.0), (3, 0.8, 0.5)])
def test_gae_matches_brute_force_lambda_returns(ppo, seed, gamma, lam):
    rollout = synthetic_rollout(seed)
    advantages, returns = ppo.compute_gae(*rollout, gamma, lam)
    expected = brute_force_gae(*rollout, gamma, lam)
    np.testing.assert_allclose(advantages, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(returns, advantages + rollout[1], rtol=1e-6)


def test_gae_hand_computed_truncation_and_termination(ppo):
    """One env: step 0 is truncated (its final observation's value is stored at the auto-reset step 1), step 2
    terminates. A_0 = r_0 + gamma * V(final) - V_0; A_1 = 0 (auto-reset); A_2 = r_2 - V_2."""
    rewards = np.array([[1.0], [0.0], [2.0]], dtype=np.float32)
    values = np.array([[0.5], [5.0], [0.3]], dtype=np.float32)
    terminated = np.array([[0], [0], [1]], dtype=np.float32)
    done = np.array([[1], [0], [1]], dtype=np.float32)
    valid = np.array([[True], [False], [True]])
    advantages, _ = ppo.compute_gae(rewards, values, np.array([7.0], np.float32), terminated, done, valid, 0.9, 0.95)
    np.testing.assert_allclose(advantages[:, 0], [1 + 0.9 * 5.0 - 0.5, 0.0, 2.0 - 0.3], rtol=1e-6)
    # the same step 0 as a termination ignores V(final)
    terminated[0] = 1
    advantages, _ = ppo.compute_gae(rewards, values, np.array([7.0], np.float32), terminated, done, valid, 0.9, 0.95)
    assert advantages[0, 0] == pytest.approx(1 - 0.5)


def test_auto_reset_steps_are_masked_out_of_gae(ppo):
    rewards, values, next_value, terminated, done, valid = synthetic_rollout(5)
    advantages, _ = ppo.compute_gae(rewards, values, next_value, terminated, done, valid, 0.99, 0.95)
    assert np.all(advantages[~valid] == 0)
    # the (ignored) reward of an auto-reset step never reaches a real step
    noisy = rewards.copy()
    noisy[~valid] = 100.0
    np.testing.assert_array_equal(ppo.compute_gae(noisy, values, next_value, terminated, done, valid, 0.99, 0.95)[0],
                                  advantages)
    # the value stored at an auto-reset step is V(final obs): it matters after a truncation, never after a termination
    invalid = np.argwhere(~valid & (np.arange(len(valid))[:, None] > 0))
    for t, e in invalid:
        shifted = values.copy()
        shifted[t, e] += 10.0
        changed = ppo.compute_gae(rewards, shifted, next_value, terminated, done, valid, 0.99, 0.95)[0]
        diff = changed[:, e] != advantages[:, e]
        if terminated[t - 1, e]:
            assert not diff.any()
        else:
            assert diff[t - 1] and not diff[t:].any()  # only the truncated episode's steps see V(final)


def test_minibatches_hold_each_valid_step_once(ppo):
    valid = synthetic_rollout(6)[-1]
    batches = ppo.minibatches(valid, 4, np.random.default_rng(0))
    assert len(batches) == 4
    assert max(map(len, batches)) - min(map(len, batches)) <= 1
    used = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(used), np.flatnonzero(valid.reshape(-1)))


def test_rollouts_of_a_real_run_mask_every_auto_reset_step(ppo, monkeypatch, tmp_path):
    """In a CartPole run (1 env, short rollouts, so episodes straddle rollouts): valid[t] is exactly "the previous
    step was not done", auto-reset steps carry no reward, and the minibatches use exactly the valid steps."""
    rollouts, used = [], []
    real_gae, real_minibatches = ppo.compute_gae, ppo.minibatches

    def spy_gae(rewards, values, next_value, terminated, done, valid, *rest):
        rollouts.append((rewards.copy(), done.copy(), valid.copy()))
        return real_gae(rewards, values, next_value, terminated, done, valid, *rest)

    def spy_minibatches(valid, *rest):
        out = real_minibatches(valid, *rest)
        used.append((valid.copy(), np.sort(np.concatenate(out))))
        return out

    monkeypatch.setattr(ppo, "compute_gae", spy_gae)
    monkeypatch.setattr(ppo, "minibatches", spy_minibatches)
    args = ppo.Args(env_id="CartPole-v1", num_envs=1, num_steps=32, total_timesteps=640, num_minibatches=2,
                    update_epochs=1, eval_episodes=0, metrics_every=0, device="cpu", output_dir=str(tmp_path),
                    run_name="mask")
    summary = ppo.run(args)
    rewards = np.concatenate([r for r, _, _ in rollouts])[:, 0]
    done = np.concatenate([d for _, d, _ in rollouts])[:, 0].astype(bool)
    valid = np.concatenate([v for _, _, v in rollouts])[:, 0]
    assert len(valid) == 640 and done.sum() >= 10
    np.testing.assert_array_equal(valid, np.concatenate([[True], ~done[:-1]]))
    assert np.all(rewards[~valid] == 0) and np.all(rewards[valid] == 1)
    assert summary["num_episodes"] == done.sum()
    for mask, indices in used:
        np.testing.assert_array_equal(indices, np.flatnonzero(mask.reshape(-1)))


# ---------------------------------------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------------------------------------


def test_dict_observation_flattening_dmc(ppo):
    import envpool

    space = envpool.make_spec("WalkerWalk-v1").observation_space
    assert list(space.spaces) == ["orientations", "height", "velocity"]  # the space's order, not alphabetical
    obs = {"orientations": np.arange(28, dtype=np.float64).reshape(2, 14),
           "height": np.array([100.0, 200.0]),  # scalar entries come as shape (B,)
           "velocity": -np.arange(18, dtype=np.float64).reshape(2, 9)}
    flat = ppo.flatten_obs(obs, space)
    assert flat.dtype == np.float32 and flat.shape == (2, 24) == (2, *ppo.flat_obs_shape(space))
    np.testing.assert_array_equal(flat[1], np.concatenate([obs["orientations"][1], [200.0], obs["velocity"][1]]))


def test_dict_observation_flattening_minigrid(ppo):
    import envpool

    env = envpool.make("MiniGrid-Empty-5x5-v0", env_type="gymnasium", num_envs=2, seed=[1, 2])
    obs, _ = env.reset()
    space = env.observation_space
    obs["direction"] = np.array([0, 3], dtype=np.int32)
    flat = ppo.flatten_obs(obs, space)
    assert flat.shape == (2, 4 + 7 * 7 * 3) == (2, *ppo.flat_obs_shape(space))  # the 96-byte mission is dropped
    np.testing.assert_array_equal(flat[:, :4], [[1, 0, 0, 0], [0, 0, 0, 1]])  # one-hot direction
    np.testing.assert_array_equal(flat[:, 4:], obs["image"].reshape(2, -1).astype(np.float32))
    env.close()


def test_unsupported_observation_space_is_rejected(ppo):
    from gymnasium import spaces

    assert ppo.flat_obs_shape(spaces.Box(0, 1, (3, 4))) is None
    assert ppo.flat_obs_shape(spaces.Box(0.0, 1.0, (4, 84, 84))) is None  # float images: not stacked frames
    assert ppo.flat_obs_shape(spaces.Dict({"a": spaces.Tuple([spaces.Discrete(2)])})) is None
    assert ppo.flat_obs_shape(spaces.Box(0, 255, (64, 64, 3), np.uint8)) is None  # channel-last (Procgen)
    assert ppo.flat_obs_shape(spaces.Box(0, 255, (4, 84, 84), np.uint8)) == (4, 84, 84)


# ---------------------------------------------------------------------------------------------------------------
# Policy heads and networks
# ---------------------------------------------------------------------------------------------------------------


def test_categorical_head_matches_torch_distributions(ppo):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen) * 3
    actions = torch.randint(0, 5, (64,), generator=gen)
    log_prob, entropy = ppo.categorical_log_prob_entropy(logits, actions)
    reference = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(log_prob, reference.log_prob(actions))
    torch.testing.assert_close(entropy, reference.entropy())


def test_gaussian_head_matches_torch_distributions(ppo):
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 3, generator=gen)
    log_std = torch.randn(1, 3, generator=gen).expand_as(mean)
    actions = torch.randn(64, 3, generator=gen) * 2
    log_prob, entropy = ppo.gaussian_log_prob_entropy(mean, log_std, actions)
    reference = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(log_prob, reference.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, reference.entropy().sum(-1))


def test_sampled_actions_follow_the_policy(ppo):
    torch.manual_seed(0)
    discrete = ppo.Agent((4,), 3, continuous=False)
    with torch.no_grad():
        discrete.actor.out.weight.zero_()
        discrete.actor.out.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.zeros(20_000, 4)
    actions, log_prob, _, _ = discrete.get_action_and_value(x)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    torch.testing.assert_close(torch.bincount(actions, minlength=3) / len(actions), expected, atol=0.015, rtol=0)
    torch.testing.assert_close(log_prob, expected.log()[actions])

    continuous = ppo.Agent((4,), 2, continuous=True)
    with torch.no_grad():
        continuous.actor_logstd.copy_(torch.tensor([[math.log(0.5), math.log(2.0)]]))
    actions, _, _, _ = continuous.get_action_and_value(x)
    mean, _, _ = continuous(x)
    torch.testing.assert_close((actions - mean).std(0), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)


def test_networks(ppo):
    torch.manual_seed(0)
    cnn = ppo.Agent((4, 84, 84), 6, continuous=False)
    assert cnn.trunk.fc1.in_features == 3136  # CleanRL's VALID-padded Nature CNN
    assert sum(p.numel() for p in cnn.trunk.parameters()) > 3136 * 512  # policy and value share the trunk
    logits, value, hidden = cnn(torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8), return_hidden=True)
    assert logits.shape == (2, 6) and value.shape == (2,)
    assert [name for name, _, _ in hidden] == ["conv1", "conv2", "conv3", "fc1"]
    # CPU convolutions run channels-last (docs/ppo.md, detail 15): a memory layout, the same function as NCHW
    assert hidden[0][1].is_contiguous(memory_format=torch.channels_last)
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        nchw = cnn.trunk(frames.float() / 255.0)
        torch.testing.assert_close(cnn(frames)[0], cnn.actor(nchw), rtol=1e-4, atol=1e-5)

    mlp = ppo.Agent((11,), 3, continuous=True)
    _, _, hidden = mlp(torch.randn(5, 11), return_hidden=True)
    assert [name for name, _, _ in hidden] == ["actor.fc1", "actor.fc2", "critic.fc1", "critic.fc2"]
    # orthogonal init (gains sqrt(2) hidden, 0.01 policy output, 1 value output), zero biases, log-std 0
    for layer, gain in ((mlp.actor.fc2, math.sqrt(2)), (mlp.actor.out, 0.01), (mlp.critic.out, 1.0)):
        w = layer.weight.detach()
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(w.shape[0]), atol=1e-5, rtol=1e-4)
        assert torch.all(layer.bias == 0)
    assert torch.all(mlp.actor_logstd == 0) and mlp.actor_logstd.shape == (1, 3)
    assert isinstance(mlp.actor.act1, torch.nn.Tanh)
    assert not list(mlp.trunk.parameters())  # separate actor and critic MLPs, nothing shared


def test_ppo_loss_at_the_rollout_policy(ppo):
    """Before any update the new policy is the old one: ratio 1, no clipping, zero KL, the policy loss is minus the
    mean normalised advantage (0) and the value loss is half the squared error."""
    torch.manual_seed(0)
    agent = ppo.Agent((4,), 2, continuous=False)
    obs = torch.randn(32, 4)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    advantages, returns = torch.randn(32), torch.randn(32)
    args = ppo.Args(clip_coef=0.2, ent_coef=0.01)
    loss, stats, _ = ppo.ppo_loss(agent, obs, actions, logprobs, advantages, returns, values, args)
    assert stats["approx_kl"].item() == pytest.approx(0, abs=1e-7)
    assert stats["clipfrac"].item() == 0
    assert stats["policy_loss"].item() == pytest.approx(0, abs=1e-6)
    assert stats["value_loss"].item() == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(
        stats["policy_loss"].item() - 0.01 * stats["entropy"].item() + 0.5 * stats["value_loss"].item(), rel=1e-5)


def test_ppo_loss_clips_the_value_update(ppo):
    """The value loss takes the larger of the unclipped and clipped errors: a new value that moved past the clip
    range away from the target is penalised at its own error, one that moved past it towards the target at the
    clipped one."""
    agent = ppo.Agent((4,), 2, continuous=False)
    obs = torch.randn(1, 4)
    with torch.no_grad():
        actions, logprobs, _, new_value = agent.get_action_and_value(obs)
    args = ppo.Args(clip_coef=0.2, ent_coef=0.0, norm_adv=False)
    old = new_value - 1.0  # the new value moved +1 from the old one; the clipped value is old + 0.2
    target = new_value + 3.0
    _, stats, _ = ppo.ppo_loss(agent, obs, actions, logprobs, torch.zeros(1), target, old, args)
    assert stats["value_loss"].item() == pytest.approx(0.5 * 3.8**2, rel=1e-5)  # clipped error (3.8) is larger
    target = new_value - 3.0
    _, stats, _ = ppo.ppo_loss(agent, obs, actions, logprobs, torch.zeros(1), target, old, args)
    assert stats["value_loss"].item() == pytest.approx(0.5 * 3.0**2, rel=1e-5)


def test_plasticity_metrics_on_tanh_layers(ppo):
    """A unit with zero weights and bias outputs tanh(0) = 0: dormant at tau 0, but its gradient w.r.t. the
    pre-activation flows (tanh'(0) = 1), so it is not gradient-inactive."""
    torch.manual_seed(0)
    agent = ppo.Agent((6,), 2, continuous=False)
    with torch.no_grad():
        agent.actor.fc1.weight[7] = 0.0
        agent.actor.fc1.bias[7] = 0.0
    obs = torch.randn(128, 6)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    batch = (obs, actions, logprobs, torch.randn(128), torch.randn(128), values)
    metrics = ppo.plasticity_metrics(agent, batch, ppo.Args(clip_coef=0.2, ent_coef=0.01))
    assert metrics["plasticity/dormant_tau0/actor.fc1"] == pytest.approx(1 / 64)
    assert metrics["plasticity/grad_inactive_tau0/actor.fc1"] == 0
    assert metrics["plasticity/dormant_tau0"] == pytest.approx(1 / 256)
    for key in ("srank", "srank/critic", "feature_norm", "feature_norm/critic", "param_norm", "grad_norm",
                "dormant_tau0.1/critic.fc2", "grad_inactive_tau0.1/actor.fc2"):
        assert f"plasticity/{key}" in metrics, key
    assert 1 <= metrics["plasticity/srank"] <= 64


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_running_mean_std_matches_numpy(ppo):
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 5)) for n in (1, 7, 64, 3)]
    rms = ppo.RunningMeanStd((5,))
    for b in batches:
        rms.update(torch.from_numpy(b))
    data = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean.numpy(), data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var.numpy(), data.var(0), rtol=1e-3)
    assert rms.count.item() == pytest.approx(len(data) + 1e-4)
    x = torch.from_numpy(data[:4]).float()
    expected = np.clip((data[:4] - rms.mean.numpy()) / np.sqrt(rms.var.numpy() + 1e-8), -10, 10)
    np.testing.assert_allclose(rms.normalize(x, 10.0).numpy(), expected, rtol=1e-5)
    assert rms.normalize(x * 1000, 10.0).abs().max().item() == 10.0  # clipped
    assert set(dict(ppo.Agent((5,), 2, True).named_buffers())) == {"obs_norm.mean", "obs_norm.var", "obs_norm.count"}


def test_reward_normalizer(ppo):
    """The statistics track the discounted return of the current episode, reset after a done; auto-reset steps are
    skipped; the reward is divided by the running std and clipped."""
    gamma = 0.9
    norm = ppo.RewardNormalizer(2, gamma, clip=10.0)
    rewards = np.array([[1.0, 2.0], [1.0, 0.0], [1.0, 3.0], [0.0, 1.0], [5.0, 1.0]])
    done = np.array([[0, 0], [1, 0], [0, 0], [0, 1], [0, 0]], dtype=bool)
    valid = np.array([[1, 1], [1, 1], [0, 1], [1, 1], [1, 0]], dtype=bool)
    seen, returns = [], np.zeros(2)
    for r, d, v in zip(rewards, done, valid):
        out = norm(r, d, v)
        returns = np.where(v, returns * gamma + r, returns)
        seen += list(returns[v])
        returns[d] = 0
        assert out == pytest.approx(np.clip(r / np.sqrt(np.var(seen) + 1e-8), -10, 10), rel=2e-3)
    assert norm.rms.var.item() == pytest.approx(np.var(seen), rel=1e-3)
    big = norm(np.array([1e6, -1e6]), np.zeros(2, bool), np.zeros(2, bool))  # (no update of the statistics)
    np.testing.assert_array_equal(big, [10.0, -10.0])
