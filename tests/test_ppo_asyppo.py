"""algos/ppo_asyppo.py: the env -> critic shards (disjoint, covering, re-drawn per rollout), each critic's parameters
reached only by its own shard's returns (vectors and pixel heads), the quantile masks and the masked policy and
entropy terms against hand computations, the critics against a hand-written forward pass, the ensemble-mean value
in GAE and its bootstrap and the disagreement from the same values, per-critic value clipping by hand, the ties of
the mask and the filter, the new networks drawn as ppo.py draws its layers without touching the global random stream,
one critic with masking off = ppo.py exactly (CartPole and MinAtar), a wide-actor MinAtar run (with its checkpoint),
an Atari run with value heads on the shared trunk, bad input and the checkpoint errors."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
MINATAR = dict(total_timesteps=512, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=0, metrics_every=8)
OFF = dict(num_critics=1, critic_width=64, adv_mask_quantile=0.0, ent_filter_quantile=0.0)


@pytest.fixture(scope="module")
def asy():
    return load_script("ppo_asyppo")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def vector_agent(asy, obs_dim=7, n_actions=3, minatar=True, **flags):
    """ppo.py's agent made AsyPPO's by asyppo_networks, with the flags' networks (Args' resolved values)."""
    args = asy.Args(**{"num_critics": 2, "actor_width": 64, "critic_width": 8, "clip_coef": 0.2, "ent_coef": 0.01,
                       **flags})
    return asy.asyppo_networks(asy.Agent((obs_dim,), n_actions, False, minatar), args), args


def critic_blocks(agent, m: int, width: int) -> dict[str, torch.Tensor]:
    """Critic m's own parameters in the packed critic: its rows of fc1, its diagonal block of fc2, its head."""
    rows = slice(m * width, (m + 1) * width)
    c = agent.critic
    return {"fc1.weight": c.fc1.weight[rows], "fc1.bias": c.fc1.bias[rows], "fc2.weight": c.fc2.weight[rows, rows],
            "fc2.bias": c.fc2.bias[rows], "heads.weight": c.heads.weight[m, rows], "heads.bias": c.heads.bias[m]}


# ---------------------------------------------------------------------------------------------------------------
# Shards and masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_envs, num_critics", [(2, 2), (7, 3), (64, 2), (5, 1), (9, 4)])
def test_shards_are_disjoint_balanced_and_cover_every_env(asy, num_envs, num_critics):
    rng = np.random.default_rng(3)
    draws = [asy.asyppo_shards(num_envs, num_critics, rng) for _ in range(6)]
    for owner in draws:
        assert owner.shape == (num_envs,) and set(owner.tolist()) == set(range(num_critics))  # every env one critic
        sizes = np.bincount(owner, minlength=num_critics)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == num_envs
    if num_critics > 1 and num_envs > 2:  # re-drawn every rollout, reproducibly from the generator's seed
        assert any(not np.array_equal(draws[0], other) for other in draws[1:])
    again = np.random.default_rng(3)
    assert all(np.array_equal(d, asy.asyppo_shards(num_envs, num_critics, again)) for d in draws)


def test_masks_against_a_hand_computation(asy):
    """Ten samples, sample 5 an auto-reset step (never ranked, never masked): 9 valid. adv 0.25 -> floor(2.25) = 2
    lowest: samples 1 and 3 (sigma 0.1 each); ent 0.34 -> floor(3.06) = 3 highest valid: 2 (0.9), 7 (0.8), 9 (0.6)
    (not 5, 0.7, invalid). A tie at the threshold goes to the lower index: adv 0.12 -> floor(1.08) = 1 -> sample 1."""
    sigma = np.array([0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    valid = np.ones(10, dtype=bool)
    valid[5] = False
    adv_keep, ent_keep = asy.asyppo_masks(sigma, valid, 0.25, 0.34)
    assert np.flatnonzero(adv_keep == 0).tolist() == [1, 3]
    assert np.flatnonzero(ent_keep == 0).tolist() == [2, 7, 9]
    assert set(np.unique(adv_keep).tolist()) == {0.0, 1.0} and adv_keep.dtype == np.float32
    adv_keep, ent_keep = asy.asyppo_masks(sigma, valid, 0.12, 0.0)
    assert np.flatnonzero(adv_keep == 0).tolist() == [1] and ent_keep is None
    assert asy.asyppo_masks(sigma, valid, 0.0, 0.0) == (None, None)
    # floor(q n) without float trouble: 0.29 * 100 = 28.999999999999996 in floating point
    many = np.arange(100, dtype=np.float64)
    adv_keep, ent_keep = asy.asyppo_masks(many, np.ones(100, dtype=bool), 0.29, 0.07)
    assert np.flatnonzero(adv_keep == 0).tolist() == list(range(29))
    assert np.flatnonzero(ent_keep == 0).tolist() == list(range(93, 100))


def test_mask_and_filter_break_ties_from_opposite_ends(asy):
    """One ascending stable sort: the advantage mask takes its front (among equal sigmas the lower index first), the
    entropy filter its back (the higher index first). All equal: 6 samples, floor(0.34 * 6) = 2 each. A tie at the
    filter's threshold: sample 0 (0.9) is the highest, then of the three 0.5s the highest index, 3."""
    adv_keep, ent_keep = asy.asyppo_masks(np.full(6, 0.5), np.ones(6, dtype=bool), 0.34, 0.34)
    assert np.flatnonzero(adv_keep == 0).tolist() == [0, 1]
    assert np.flatnonzero(ent_keep == 0).tolist() == [4, 5]
    sigma = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    adv_keep, ent_keep = asy.asyppo_masks(sigma, np.ones(5, dtype=bool), 0.4, 0.4)
    assert np.flatnonzero(ent_keep == 0).tolist() == [0, 3]
    assert np.flatnonzero(adv_keep == 0).tolist() == [1, 4]  # 0.1, then the lowest index of the 0.5s


def test_masked_policy_and_entropy_terms_against_numpy(asy):
    """With old log-probabilities equal to the new ones (ratio 1), pg_loss = mean over all B samples of
    -normalised_advantage * keep (masked samples count in the denominator), and the entropy bonus = mean over B of
    entropy * keep; the logged entropy stays the policy's unfiltered mean."""
    torch.manual_seed(0)
    agent, args = vector_agent(asy)
    args.norm_adv, args.ent_coef = True, 0.01
    b = 8
    obs, actions = torch.randn(b, 7), torch.randint(0, 3, (b,))
    with torch.no_grad():
        logits = agent(obs)[0]
        old_logprobs = agent.log_prob_entropy(logits, actions)[0]
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.0, 2.0, -0.5])
    adv_keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    ent_keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    extra = dict(old_values=torch.zeros(b, 2), shard=torch.tensor([0, 1] * 4), adv_keep=adv_keep, ent_keep=ent_keep)
    _, stats, _ = asy.ppo_loss(agent, obs, actions, old_logprobs, advantages, torch.zeros(b), torch.zeros(b), args,
                               asyppo=extra)
    a = advantages.numpy().astype(np.float64)
    a = (a - a.mean()) / (a.std(ddof=1) + 1e-8)
    assert stats["policy_loss"].item() == pytest.approx(float(np.mean(-a * adv_keep.numpy())), abs=1e-6)
    z = logits.numpy().astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    assert stats["entropy_bonus"].item() == pytest.approx(float(np.mean(entropy * ent_keep.numpy())), rel=1e-5)
    assert stats["entropy"].item() == pytest.approx(float(entropy.mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The networks and the critics' losses
# ---------------------------------------------------------------------------------------------------------------


def test_critics_against_a_hand_written_forward_pass(asy):
    """Critic m is a tanh MLP of its own blocks; the agent's value is the mean of the M values, which `critic.out`
    keeps (and a deep copy of the agent leaves behind); the blocks outside the diagonal are zero."""
    torch.manual_seed(1)
    agent, _ = vector_agent(asy, minatar=False, num_critics=3, critic_width=5)
    x = torch.randn(4, 7)
    _, value, _ = agent(x)
    members = agent.critic.out.members
    assert members.shape == (4, 3) and torch.allclose(value, members.mean(-1), atol=1e-6)
    xs = x.double().numpy()
    for m in range(3):
        w = {k: v.detach().double().numpy() for k, v in critic_blocks(agent, m, 5).items()}
        h = np.tanh(xs @ w["fc1.weight"].T + w["fc1.bias"])
        h = np.tanh(h @ w["fc2.weight"].T + w["fc2.bias"])
        assert np.allclose(h @ w["heads.weight"] + w["heads.bias"], members[:, m].detach().numpy(), atol=1e-5)
    mask = torch.block_diag(*[torch.ones(5, 5)] * 3).bool()
    assert torch.all(agent.critic.fc2.weight[~mask] == 0)
    assert agent.critic.heads.weight.shape == (3, 15) and torch.all(agent.critic.heads.weight[~torch.block_diag(
        *[torch.ones(1, 5)] * 3).bool()] == 0)
    assert copy.deepcopy(agent).critic.out.members is None  # a copy after a pass with gradients (C-CHAIN's lagged)


@pytest.mark.parametrize("pixels", [False, True])
def test_each_critic_learns_only_from_its_shard(asy, pixels):
    """Perturbing the returns of shard 1's samples changes the gradient of critic 1's parameters and of nothing that
    belongs to critic 0 (vectors: its blocks; pixels: its head row); the policy's gradient does not see returns."""
    torch.manual_seed(2)
    if pixels:
        args = asy.Args(num_critics=2, clip_coef=0.1, ent_coef=0.01)
        agent = asy.asyppo_networks(asy.Agent((4, 84, 84), 4, False), args)
        obs = torch.randint(0, 255, (6, 4, 84, 84), dtype=torch.uint8)
    else:
        agent, args = vector_agent(asy, num_critics=3, critic_width=6)
        obs = torch.randn(6, 7)
    shard = torch.tensor([0, 1, 2, 0, 1, 2]) % args.num_critics
    actions = torch.randint(0, 3, (6,))
    with torch.no_grad():
        old_logprobs = agent.log_prob_entropy(agent(obs)[0], actions)[0]
        old = agent.critic.out.members.clone()

    advantages = torch.randn(6)

    def grads(returns):
        extra = dict(old_values=old, shard=shard, adv_keep=None, ent_keep=None)
        loss = asy.ppo_loss(agent, obs, actions, old_logprobs, advantages, returns, old.mean(-1), args,
                            asyppo=extra)[0]
        agent.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in agent.named_parameters() if p.grad is not None}

    returns = torch.randn(6)
    before = grads(returns)
    after = grads(torch.where(shard == 1, returns + 5.0, returns))
    if pixels:
        for key in ("critic.heads.weight", "critic.heads.bias"):  # head m: row m
            assert torch.equal(before[key][0], after[key][0]) and not torch.equal(before[key][1], after[key][1])
        assert not torch.equal(before["trunk.fc1.weight"], after["trunk.fc1.weight"])  # the shared trunk: every shard
    else:
        for m, changed in ((0, False), (1, True), (2, False)):
            for name in critic_blocks(agent, m, 6):
                g0 = critic_blocks_of(before, m, 6)[name]
                g1 = critic_blocks_of(after, m, 6)[name]
                assert torch.equal(g0, g1) != changed, (m, name)
        mask = torch.block_diag(*[torch.ones(6, 6)] * 3).bool()
        assert torch.all(after["critic.fc2.weight"][~mask] == 0)  # no gradient across critics
    for name in before:
        if name.startswith("actor"):
            assert torch.equal(before[name], after[name]), name


def critic_blocks_of(grads: dict, m: int, width: int) -> dict[str, torch.Tensor]:
    rows = slice(m * width, (m + 1) * width)
    return {"fc1.weight": grads["critic.fc1.weight"][rows], "fc1.bias": grads["critic.fc1.bias"][rows],
            "fc2.weight": grads["critic.fc2.weight"][rows, rows], "fc2.bias": grads["critic.fc2.bias"][rows],
            "heads.weight": grads["critic.heads.weight"][m, rows], "heads.bias": grads["critic.heads.bias"][m]}


def test_critic_losses_average_each_shard_and_skip_an_empty_one(asy):
    elementwise = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    got = asy.asyppo_critic_losses(elementwise, dict(shard=torch.tensor([0, 1, 0, 0])))
    assert got.tolist() == pytest.approx([(1 + 3 + 4) / 3, 20.0])
    assert asy.asyppo_critic_losses(elementwise, dict(shard=torch.tensor([0, 0, 0, 0]))).tolist() == [2.5, 0.0]
    assert asy.asyppo_critic_losses(elementwise, None).tolist() == [2.5, 25.0]  # the diagnostics: every sample


def test_value_clipping_is_per_critic_around_its_own_old_value(asy):
    """ppo.py's clipped value loss, per critic: critic m's value is clipped to within clip_coef of ITS collection-time
    value, 1/2 max((V_m - R)^2, (V_m^clip - R)^2) averaged over its shard. The old values are the new ones shifted by
    +-0.5 in opposite directions for the two critics, so the clip (0.2) binds on every sample and the ensemble-mean
    old value (shifts cancelling) would give other losses; the returns put the clipped branch above on some samples
    and below on others."""
    torch.manual_seed(5)
    agent, args = vector_agent(asy, clip_coef=0.2)
    assert args.clip_vloss
    b = 8
    obs, actions = torch.randn(b, 7), torch.randint(0, 3, (b,))
    with torch.no_grad():
        old_logprobs = agent.log_prob_entropy(agent(obs)[0], actions)[0]
        new = agent.critic.out.members.double().numpy()
    shift = np.array([0.5, -0.3, 0.7, -0.5, 0.4, -0.6, 0.5, -0.9])
    old = new + np.stack([shift, -shift], 1)
    returns = new.mean(1) + np.array([1.0, -1.0, 0.3, -0.2, -1.5, 2.0, 0.1, -0.05])
    shard = np.array([0, 1, 1, 0, 0, 1, 0, 1])
    extra = dict(old_values=torch.tensor(old, dtype=torch.float32), shard=torch.from_numpy(shard), adv_keep=None,
                 ent_keep=None)
    _, stats, _ = asy.ppo_loss(agent, obs, actions, old_logprobs, torch.randn(b),
                               torch.tensor(returns, dtype=torch.float32),
                               torch.tensor(old.mean(1), dtype=torch.float32), args, asyppo=extra)

    def hand(old_values):
        clipped = old_values + np.clip(new - old_values, -0.2, 0.2)
        per_sample = np.maximum((new - returns[:, None]) ** 2, (clipped - returns[:, None]) ** 2)
        return np.array([0.5 * per_sample[shard == m, m].mean() for m in range(2)])

    expected = hand(old)
    assert stats["critic_losses"].numpy() == pytest.approx(expected, rel=1e-5)
    assert stats["value_loss"].item() == pytest.approx(expected.sum(), rel=1e-5)
    mean_old = hand(np.repeat(old.mean(1, keepdims=True), 2, 1))  # what the ensemble-mean old value would give
    assert np.all(np.abs(mean_old - expected) > 1e-2 * expected), (mean_old, expected)
    unclipped = np.array([0.5 * ((new - returns[:, None]) ** 2)[shard == m, m].mean() for m in range(2)])
    assert np.all(np.abs(unclipped - expected) > 1e-2 * expected), (unclipped, expected)  # the clip binds


def test_new_layers_are_ppo_py_draws_and_leave_the_global_stream(asy, ppo):
    """ppo.py's sizes are kept parameter for parameter; a new critic is the MLP ppo.py would draw next (nn.Linear,
    then layer_init, fc1 -> fc2 -> out); the global generator is where ppo.py's agent left it."""
    torch.manual_seed(4)
    reference = ppo.Agent((7,), 3, False, True)
    torch.manual_seed(4)
    base = asy.Agent((7,), 3, False, True)
    state = torch.random.get_rng_state()
    agent = asy.asyppo_networks(base, asy.Args(num_critics=2, actor_width=64, critic_width=64))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, p in reference.actor.named_parameters():
        assert torch.equal(p, dict(agent.actor.named_parameters())[name])
    blocks0 = critic_blocks(agent, 0, 64)
    assert torch.equal(blocks0["fc1.weight"], reference.critic.fc1.weight)
    assert torch.equal(blocks0["heads.weight"], reference.critic.out.weight[0])
    torch.random.set_rng_state(state)
    fresh = [ppo.layer_init(torch.nn.Linear(7, 64)), ppo.layer_init(torch.nn.Linear(64, 64)),
             ppo.layer_init(torch.nn.Linear(64, 1), std=1.0)]
    blocks1 = critic_blocks(agent, 1, 64)
    assert torch.equal(blocks1["fc1.weight"], fresh[0].weight) and torch.equal(blocks1["fc2.weight"], fresh[1].weight)
    assert torch.equal(blocks1["heads.weight"], fresh[2].weight[0])
    wide, _ = vector_agent(asy, actor_width=256, critic_width=32)
    assert wide.actor.fc2.weight.shape == (256, 256) and wide.critic.fc2.weight.shape == (64, 64)
    assert isinstance(wide.actor.act1, torch.nn.ReLU) and isinstance(wide.critic.act2, torch.nn.ReLU)  # MinAtar's


def test_networks_refuse_a_layout_other_than_ppo_py(asy):
    """Layouts of ppo_decoupled.py (composed): a policy head on a shared vector trunk, or a pixel critic with its own
    CNN, are one UserError, not a crash or a silently dropped network."""
    agent = asy.Agent((7,), 3, False)
    agent.actor = torch.nn.Sequential(OrderedDict([("out", torch.nn.Linear(64, 3))]))
    with pytest.raises(asy.UserError, match="ppo.py's networks"):
        asy.asyppo_networks(agent, asy.Args(actor_width=64, critic_width=32))
    agent = asy.Agent((4, 84, 84), 4, False)
    agent.critic = torch.nn.Sequential(OrderedDict([("fc1", torch.nn.Linear(512, 512)), ("out", agent.critic.out)]))
    with pytest.raises(asy.UserError, match="ppo.py's networks"):
        asy.asyppo_networks(agent, asy.Args())


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_one_critic_without_masking_is_ppo_py_and_the_default_is_not(asy, ppo, tmp_path):
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(asy, tmp_path, "off", "CartPole-v1", SMOKE, **OFF)
    assert_same_run(base, off, "ppo_asyppo.py with one 64-wide critic and no masking")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    assert read_scalars(off)["asyppo/value_std"][0][1] == 0.0
    # the default keeps ppo.py's policy network and random stream (detail 1), so a short run can play the same
    # episodes; its losses are AsyPPO's
    on = read_scalars(run_in_process(asy, tmp_path, "on", "CartPole-v1", SMOKE))
    assert on["losses/policy_loss"] != read_scalars(base)["losses/policy_loss"]
    assert all(value > 0 for _, value in on["asyppo/value_std"] + on["asyppo/adv_masked_frac"])


def test_one_critic_without_masking_is_ppo_py_on_minatar(asy, ppo, tmp_path):
    """The same on MinAtar/Breakout (ReLU MLPs on 400 inputs, PureJaxRL's defaults but a tiny budget)."""
    base = run_in_process(ppo, tmp_path, "ppo", "MinAtar/Breakout", MINATAR)
    off = run_in_process(asy, tmp_path, "off", "MinAtar/Breakout", MINATAR, **OFF)
    assert_same_run(base, off, "ppo_asyppo.py with one 64-wide critic and no masking on MinAtar/Breakout")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]


def test_run_uses_the_ensemble_mean_and_disjoint_shards(asy, tmp_path, monkeypatch):
    """In a run: GAE gets the mean of the critics' collection-time values, sigma is their population std, and every
    valid sample is in the shard of the critic its env belongs to in that rollout."""
    seen = {"gae": [], "bootstrap": [], "masks": [], "slices": [], "owners": [], "agent": []}
    gae, masks, slicer, shards = asy.compute_gae, asy.asyppo_masks, asy.asyppo_slice, asy.asyppo_shards
    networks = asy.asyppo_networks
    monkeypatch.setattr(asy, "asyppo_networks", lambda *a: seen["agent"].append(networks(*a)) or seen["agent"][-1])

    def gae_spy(*a):  # the last forward pass before GAE is the bootstrap's: its members are the critics' V(s_T)
        seen["gae"].append(a[1].copy())
        seen["bootstrap"].append((a[2].copy(), seen["agent"][0].critic.out.members.numpy().copy()))
        return gae(*a)

    monkeypatch.setattr(asy, "compute_gae", gae_spy)
    monkeypatch.setattr(asy, "asyppo_masks", lambda *a: seen["masks"].append((a[0].copy(), a[1].copy())) or masks(*a))
    monkeypatch.setattr(asy, "asyppo_shards", lambda *a: seen["owners"].append(shards(*a)) or seen["owners"][-1])

    def slice_spy(rollout, index):  # a copy of each rollout's tensors (they share memory with the rollout buffers)
        if not seen["slices"] or seen["slices"][-1][0] is not rollout:
            seen["slices"].append((rollout, {k: None if v is None else v.clone() for k, v in rollout.items()}))
        return slicer(rollout, index)

    monkeypatch.setattr(asy, "asyppo_slice", slice_spy)
    run_in_process(asy, tmp_path, "spy", "CartPole-v1", dict(SMOKE, total_timesteps=768, num_envs=3, num_steps=32),
                   num_critics=3, critic_width=16)
    assert len(seen["gae"]) == len(seen["owners"]) == len(seen["bootstrap"]) == 8
    assert len(seen["slices"]) == 8
    for values, (next_value, next_members), (sigma, valid), owner, (_, full) in zip(
            seen["gae"], seen["bootstrap"], seen["masks"], seen["owners"], seen["slices"]):
        members = full["old_values"].numpy()
        assert np.allclose(values.reshape(-1), members.mean(-1), atol=1e-6)
        assert next_members.shape == (3, 3) and np.allclose(next_value, next_members.mean(-1), atol=1e-6)
        assert np.ptp(next_members, axis=-1).max() > 0  # three different critics, so the mean is not any one of them
        assert np.allclose(sigma, members.std(-1), atol=1e-7)
        per_env = full["shard"].numpy().reshape(32, 3)  # (num_steps, num_envs): column e is env e's samples
        for env in range(3):
            assert np.all(per_env[:, env] == owner[env]), env  # every step of env e is in its owner's shard
        assert sorted(set(full["shard"].numpy()[valid].tolist())) == [0, 1, 2]
    assert len({tuple(o) for o in seen["owners"]}) > 1  # re-drawn


def test_wide_actor_minatar_run_and_its_checkpoint(asy, tmp_path, capsys):
    settings = dict(total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=0,
                    metrics_every=8, save_model=True)
    run = run_in_process(asy, tmp_path, "wide", "MinAtar/Breakout", settings, actor_width=256)
    scalars = read_scalars(run)
    for key, target in (("asyppo/adv_masked_frac", 0.1), ("asyppo/ent_filtered_frac", 0.2)):
        assert all(target - 0.01 < value <= target for _, value in scalars[key]), scalars[key]
    assert all(value > 0 for _, value in scalars["asyppo/value_std"])
    assert {"asyppo/value_std_rel", "asyppo/value_loss/critic1", "asyppo/explained_variance/critic0",
            "plasticity/srank/critic"} <= scalars.keys()
    model = torch.load(os.path.join(run, "model.pt"), weights_only=True)["model"]
    shapes = {key: tuple(value.shape) for key, value in model.items()}
    assert shapes["actor.fc1.weight"] == (256, 400) and shapes["critic.fc1.weight"] == (64, 400)
    assert shapes["critic.fc2.weight"] == (64, 64) and shapes["critic.heads.weight"] == (2, 64)
    flags = ["--env-id", "MinAtar/Breakout", "--eval-checkpoint", os.path.join(run, "model.pt"), "--eval-episodes", 1,
             "--torch-threads", 1, "--output-dir", str(tmp_path / "eval")]
    code, lines = call_main(asy, [*flags, "--actor-width", 256, "--run-name", "same"], capsys)
    assert code == 0, lines
    code, lines = call_main(asy, [*flags, "--run-name", "other"], capsys)
    assert code == 2 and len(lines) == 1 and "--actor-width 256" in lines[0], lines


def test_atari_value_heads_on_the_shared_trunk(asy, tmp_path):
    run = run_in_process(asy, tmp_path, "breakout", "Breakout-v5", dict(
        total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=8,
        metrics_batch_size=32, save_model=True))
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"
    assert {"asyppo/value_std", "asyppo/adv_masked_frac", "asyppo/value_loss/critic1"} <= read_scalars(run).keys()
    model = torch.load(os.path.join(run, "model.pt"), weights_only=True)["model"]
    assert tuple(model["critic.heads.weight"].shape) == (2, 512) and "trunk.fc1.weight" in model


@pytest.mark.parametrize("argv, fragment", [
    (["--num-critics", "0"], "--num-critics"),
    (["--adv-mask-quantile", "1.0"], "--adv-mask-quantile"),
    (["--ent-filter-quantile", "-0.1"], "--ent-filter-quantile"),
    (["--num-critics", "1"], "--num-critics >= 2"),
    (["--num-critics", "1", "--adv-mask-quantile", "0", "--ent-filter-quantile", "0.3"], "--num-critics >= 2"),
    (["--critic-width", "0"], "--critic-width"), (["--actor-width", "0"], "--actor-width"),
    (["--env-id", "Breakout-v5", "--actor-width", "256"], "pixels"),
    (["--num-critics", "3", "--num-envs", "2"], "--num-envs"),
    (["--env-id", "Hopper-v4"], "MuJoCo/DMC default to 1 env: pass --num-envs 2 (and the same to ppo.py"),
    (["--env-id", "CheetahRun-v1", "--num-critics", "3", "--num-envs", "2"], "pass --num-envs 3"),
])
def test_bad_asyppo_flags_are_one_line_errors(asy, capsys, argv, fragment):
    code, lines = call_main(asy, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_checkpoint_errors_say_what_to_do(asy, ppo, tmp_path, capsys):
    """Another PPO script's checkpoint (no AsyPPO settings in its args) is one line saying it cannot be loaded here,
    whatever the flags, not the settings' line and then load_weights'; AsyPPO's own checkpoint with one critic names
    every flag its network needs, the quantiles included (M = 1 refuses them), and those flags evaluate it."""
    tiny = dict(SMOKE, total_timesteps=128, metrics_every=0, save_model=True)
    theirs = os.path.join(run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", tiny), "model.pt")
    ours = os.path.join(run_in_process(asy, tmp_path, "one", "CartPole-v1", tiny, **OFF), "model.pt")
    flags = ["--env-id", "CartPole-v1", "--eval-episodes", 1, "--torch-threads", 1, "--output-dir", tmp_path / "eval"]
    needed = "--num-critics 1 --actor-width 64 --critic-width 64 --adv-mask-quantile 0 --ent-filter-quantile 0"
    for k, extra in enumerate(([], needed.split())):
        code, lines = call_main(asy, [*flags, "--eval-checkpoint", theirs, "--run-name", f"ppo{k}", *extra], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
        assert "written by ppo.py" in lines[0] and "cannot be loaded into ppo_asyppo.py" in lines[0], lines
        assert "evaluate it with the script that wrote it" in lines[0], lines
    code, lines = call_main(asy, [*flags, "--eval-checkpoint", ours, "--run-name", "defaults"], capsys)
    assert code == 2 and len(lines) == 1 and f"trained with {needed}: evaluate" in lines[0], lines
    code, lines = call_main(asy, [*flags, "--eval-checkpoint", ours, "--run-name", "same", *needed.split()], capsys)
    assert code == 0, lines
    summary = read_json(os.path.join(tmp_path, "eval", "defaults", "summary.json"))
    assert summary["status"] == "failed" and needed in summary["error"]


@pytest.mark.parametrize("num_critics, needed", [
    (1, "--num-critics 1 --adv-mask-quantile 0 --ent-filter-quantile 0"), (3, "--num-critics 3")])
def test_pixel_checkpoint_error_names_no_widths(asy, tmp_path, capsys, num_critics, needed):
    """On pixels the widths are None in the args (and refused as flags): the line names only what can be passed. The
    settings are checked before any weight is read, so a checkpoint with an empty model shows the line."""
    path = tmp_path / "model.pt"
    torch.save({"script": "ppo_asyppo.py", "model": {}, "obs_shape": [4, 84, 84], "n_actions": 4, "continuous": False,
                "args": {"env_id": "Breakout-v5", "num_critics": num_critics, "actor_width": None,
                         "critic_width": None}}, path)
    code, lines = call_main(asy, ["--env-id", "Breakout-v5", "--num-envs", 2, "--num-critics", 2, "--eval-checkpoint",
                                  path, "--eval-episodes", 1, "--output-dir", tmp_path / "eval"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert f"trained with {needed}: evaluate it with those flags" in lines[0], lines
    assert "None" not in lines[0] and "width" not in lines[0], lines
