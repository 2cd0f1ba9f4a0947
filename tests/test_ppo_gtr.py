"""algos/ppo_gtr.py (GTR, a reconstruction): the Gaussian-kernel penalty (bounded by beta, its force rising then
falling with the divergence), the divergences against torch.distributions, the reduction to ppo.py's loss with
--objective clip (and with beta = 0 on the clipped surrogate), the GTR and KL-PPO losses against direct
computations, the anchor window's bookkeeping (K snapshots, newest first, frozen, oldest dropped, weights summing
to 1), KL-PPO's adaptive coefficient, the mixture-KL identity of docs/ppo_gtr.md ("Method"), the fresher anchors
(--anchor-refresh epoch|minibatch and the EMA anchor, against hand computations inside real runs; the default path
unchanged), and end-to-end runs (gtr/ logs, ppo.py's episodes with --objective clip, the window across iterations
and a task switch, determinism, bad input)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from helpers import (
    assert_one_line_error, assert_seed_determinism, describe, load_script, read_json, read_scalars, run_in_process,
    run_script, script_path,
)

GTR = script_path("ppo_gtr")
PPO = script_path("ppo")
GTR_KEYS = ("divergence", "update_divergence", "beyond_sigma", "penalty", "kl_to_anchor", "displacement", "travelled",
            "efficiency", "anchors", "anchor_staleness")


@pytest.fixture(scope="module")
def gtr():
    return load_script("ppo_gtr")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, tmp_path, name, *flags):
    return run_script(script, [*flags, "--output-dir", str(tmp_path), "--run-name", name, "--device", "cpu"],
                      cwd=str(tmp_path), env=quiet_env())


def run_ok(script, tmp_path, name, *flags) -> str:
    proc = run(script, tmp_path, name, *flags)
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(tmp_path), name)


def values(scalars, key) -> list[float]:
    return [v for _, v in scalars[key]]


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


def test_penalty_is_bounded_by_beta(gtr):
    """0 where every D_k is 0 (with K > 1 not at any one anchor: next lines), below beta everywhere, beta far from
    every anchor; the quadratic ablation is unbounded."""
    torch.manual_seed(0)
    beta, sigma = 0.3, 0.2
    weights = torch.softmax(torch.randn(4), 0)
    d2 = torch.cat([torch.zeros(1, 4), torch.rand(500, 4) * torch.logspace(-4, 6, 500).unsqueeze(1)])
    penalty = gtr.gtr_penalty(d2, weights, beta, sigma)
    assert penalty[0].item() == 0.0
    assert (penalty >= 0).all() and (penalty <= beta).all()
    assert penalty[-1].item() == pytest.approx(beta, rel=1e-6)
    quadratic = gtr.gtr_penalty(d2, weights, beta, sigma, kernel="quadratic")
    assert quadratic.max().item() > 100 * beta
    # the mixture: a sample at one anchor and far from the others pays beta times the others' weight
    far = torch.tensor([[0.0, 1e6, 1e6, 1e6]])
    assert gtr.gtr_penalty(far, weights, beta, sigma).item() == pytest.approx(beta * (1 - weights[0].item()), rel=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.5])
def test_penalty_force_rises_then_falls(gtr, sigma):
    """d penalty / dD on a grid of D: increasing up to D = sigma, decreasing after, vanishing far away, equal to
    beta D / sigma^2 exp(-D^2 / (2 sigma^2)); the quadratic ablation's force keeps growing."""
    beta = 0.3
    grid = torch.linspace(0, 8 * sigma, 801, dtype=torch.float64, requires_grad=True)
    penalty = gtr.gtr_penalty((grid**2).unsqueeze(1), torch.ones(1, dtype=torch.float64), beta, sigma)
    (force,) = torch.autograd.grad(penalty.sum(), grid)
    force = force.detach().numpy()
    d = grid.detach().numpy()
    np.testing.assert_allclose(force, beta * d / sigma**2 * np.exp(-(d**2) / (2 * sigma**2)), rtol=1e-9, atol=1e-12)
    peak = int(np.argmax(force))
    assert abs(d[peak] - sigma) <= d[1] - d[0]
    assert (np.diff(force[: peak + 1]) > 0).all() and (np.diff(force[peak:]) < 0).all()
    assert force[-1] < 1e-6 * force[peak]
    quadratic = gtr.gtr_penalty((grid**2).unsqueeze(1), torch.ones(1, dtype=torch.float64), beta, sigma, "quadratic")
    (q_force,) = torch.autograd.grad(quadratic.sum(), grid)
    assert (np.diff(q_force.numpy()) > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Divergences and losses
# ---------------------------------------------------------------------------------------------------------------


def make_batch(module, continuous: bool, n: int = 64, seed: int = 0):
    """An agent, a batch sampled from it, and an anchor window of 3 perturbed copies (as after 3 iterations)."""
    torch.manual_seed(seed)
    obs_dim, action_dim = 6, 3
    agent = module.Agent((obs_dim,), action_dim, continuous)
    obs = torch.randn(n, obs_dim)
    with torch.no_grad():
        actions, logprobs, _, vals = agent.get_action_and_value(obs)
    return agent, (obs, actions, logprobs, torch.randn(n), torch.randn(n), vals)


def perturbed_window(gtr, agent, k: int, scale: float = 0.3, **kw):
    window = gtr.AnchorWindow(k, **kw)
    original = {name: p.detach().clone() for name, p in agent.named_parameters()}
    for it in range(1, k + 1):
        with torch.no_grad():
            for name, p in agent.named_parameters():
                p.copy_(original[name] + scale * torch.randn_like(p))
        window.push(agent, it)
    with torch.no_grad():
        for name, p in agent.named_parameters():
            p.copy_(original[name] + 0.1 * torch.randn_like(p))  # the current policy differs from every anchor
    return window


def torch_policy(agent, policy_out):
    if agent.continuous:
        return Independent(Normal(policy_out, agent.actor_logstd.exp().expand_as(policy_out)), 1)
    return Categorical(logits=policy_out)


@pytest.mark.parametrize("continuous", [False, True])
def test_divergences_against_torch_distributions(gtr, continuous):
    agent, (obs, actions, *_) = make_batch(gtr, continuous)
    window = perturbed_window(gtr, agent, 3)
    anchor_out, anchor_logstd = window.outputs(obs)
    with torch.no_grad():
        policy_out = agent(obs)[0]
        logprobs = agent.log_prob_entropy(policy_out, actions)[0]
        current = torch_policy(agent, policy_out)
        expected_kl, expected_lr2 = [], []
        for k, (_, snapshot) in enumerate(window.snapshots):
            anchor = torch_policy(snapshot, snapshot(obs)[0])
            expected_kl.append(kl_divergence(anchor, current))
            expected_lr2.append((current.log_prob(actions) - anchor.log_prob(actions)) ** 2)
        expected_kl, expected_lr2 = torch.stack(expected_kl, 1), torch.stack(expected_lr2, 1)
        for divergence, expected in (("kl-distance", 2 * expected_kl), ("kl", expected_kl**2),
                                     ("log-ratio", expected_lr2)):
            d2, kl = gtr.anchor_divergences(agent, policy_out, logprobs, actions, anchor_out, anchor_logstd, divergence)
            assert d2.shape == kl.shape == (len(obs), 3)
            torch.testing.assert_close(kl, expected_kl, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(d2, expected, rtol=1e-4, atol=1e-6)
        assert expected_kl.min() > 1e-4  # the anchors really differ from the current policy
        # against itself: zero divergence
        own_out, own_logstd = gtr.AnchorWindow(1), None
        own_out.push(agent, 9)
        own_out, own_logstd = own_out.outputs(obs)
        d2, kl = gtr.anchor_divergences(agent, policy_out, logprobs, actions, own_out, own_logstd, "kl-distance")
        assert kl.abs().max() < 1e-6


def loss_args(module, **kw):
    """Args as resolve_args leaves them (the default KL coefficient is GTR's curvature at the anchor)."""
    if hasattr(module, "AnchorWindow"):
        kw.setdefault("kl_coef", 0.3 / 0.2**2)
        kw.setdefault("anchor_snapshots", 3)
    return module.Args(clip_coef=0.2, ent_coef=0.01, **kw)


@pytest.mark.parametrize("continuous", [False, True])
def test_clip_objective_is_ppo_loss(gtr, ppo, continuous):
    """--objective clip is ppo.py's loss bit for bit (value, statistics and gradients) on the same batch and
    network; so is --objective gtr with beta = 0 on the clipped surrogate (and KL-PPO with coefficient 0, up to
    the order of a gradient sum). The default GTR loss is not."""
    agent, batch = make_batch(ppo, continuous)
    obs = batch[0]
    with torch.no_grad():  # move the policy away from the one that sampled the batch, so clipping is active
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gtr_agent = gtr.Agent((6,), 3, continuous)
    gtr_agent.load_state_dict(agent.state_dict())
    window = gtr.AnchorWindow(3)
    window.push(gtr_agent, 1)
    out, logstd = window.outputs(obs)
    anchor = dict(out=out, logstd=logstd, weights=window.weights(), kl_coef=1.0)

    def loss_and_grads(module, net, args, **kw):
        net.zero_grad()
        loss, stats, _ = module.ppo_loss(net, *batch, args, **kw)
        loss.backward()
        return loss, stats, [p.grad.clone() for p in net.parameters()]

    ref_loss, ref_stats, ref_grads = loss_and_grads(ppo, agent, loss_args(ppo))
    assert ref_stats["clipfrac"].item() > 0.05
    for args in (loss_args(gtr, objective="clip"), loss_args(gtr, gtr_beta=0.0, gtr_surrogate="clipped"),
                 loss_args(gtr, objective="kl", kl_coef=0.0, gtr_surrogate="clipped")):
        loss, stats, grads = loss_and_grads(gtr, gtr_agent, args, anchor=anchor)
        assert torch.equal(loss, ref_loss), (args.objective, loss.item(), ref_loss.item())
        for key in ref_stats:
            assert torch.equal(stats[key], ref_stats[key]), key
        for g, ref in zip(grads, ref_grads):  # KL's zero-weighted paths reorder the log-std's gradient sum
            torch.testing.assert_close(g, ref, rtol=0, atol=0 if args.objective != "kl" else 1e-6)
    loss = loss_and_grads(gtr, gtr_agent, loss_args(gtr), anchor=anchor)[0]
    assert abs(loss.item() - ref_loss.item()) > 1e-4


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("objective", ["gtr", "kl"])
def test_penalised_losses_against_direct_computation(gtr, continuous, objective):
    """GTR: -mean(r A) + beta mean_s sum_k w_k (1 - exp(-KL_k / sigma^2)) (D = sqrt(2 KL)); KL-PPO:
    -mean(r A) + c mean_s sum_k w_k KL_k; both plus ppo.py's entropy and value terms, KL from torch.distributions."""
    agent, batch = make_batch(gtr, continuous)
    obs, actions, logprobs, advantages, returns, vals = batch
    window = perturbed_window(gtr, agent, 3, weighting="geometric", decay=0.6)
    weights = window.weights()
    torch.testing.assert_close(weights, torch.tensor([1, 0.6, 0.36]) / 1.96)
    out, logstd = window.outputs(obs)
    args = loss_args(gtr, objective=objective, gtr_beta=0.7, gtr_sigma=0.3)
    loss, stats, _ = gtr.ppo_loss(agent, *batch, args, anchor=dict(out=out, logstd=logstd, weights=weights,
                                                                   kl_coef=2.5))
    with torch.no_grad():
        policy_out, new_values, _ = agent(obs)
        current = torch_policy(agent, policy_out)
        kl = torch.stack([kl_divergence(torch_policy(s, s(obs)[0]), current) for _, s in window.snapshots], 1)
        adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        surrogate = (-adv * (current.log_prob(actions) - logprobs).exp()).mean()
        if objective == "gtr":
            penalty = 0.7 * ((1 - torch.exp(-2 * kl / (2 * 0.3**2))) * weights).sum(1).mean()
        else:
            penalty = 2.5 * (kl * weights).sum(1).mean()
        v_clipped = vals + (new_values - vals).clamp(-0.2, 0.2)
        v_loss = 0.5 * torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2).mean()
        expected = surrogate - 0.01 * current.entropy().mean() + 0.5 * v_loss + penalty
    assert penalty.item() > 1e-3
    assert stats["penalty"].item() == pytest.approx(penalty.item(), rel=1e-4)
    assert stats["policy_loss"].item() == pytest.approx(surrogate.item(), rel=1e-4, abs=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_adaptive_kl_coefficient(gtr):
    """The PPO paper's rule: halve below d_targ / 1.5, double above 1.5 d_targ, keep in between; None: fixed."""
    assert gtr.adapt_kl_coef(1.0, 0.001, 0.01) == 0.5
    assert gtr.adapt_kl_coef(1.0, 0.02, 0.01) == 2.0
    assert gtr.adapt_kl_coef(1.0, 0.01, 0.01) == 1.0
    assert gtr.adapt_kl_coef(1.0, 0.0067, 0.01) == 1.0
    assert gtr.adapt_kl_coef(1.0, 5.0, None) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The anchor window
# ---------------------------------------------------------------------------------------------------------------


def tagged_agent(gtr, agent, tag: float):
    with torch.no_grad():
        agent.actor.out.bias.fill_(tag)  # the logits' offset identifies the snapshot
    return agent


def test_anchor_window_keeps_the_last_k_frozen_snapshots(gtr):
    """Pushes 1..6 into a window of 4: newest first, the oldest dropped, each a frozen copy of the pushed policy
    (later updates of the agent do not reach it), evaluated on new states; weights sum to 1 at every fill level."""
    torch.manual_seed(0)
    agent = gtr.Agent((5,), 4, continuous=False)
    with torch.no_grad():
        agent.actor.out.weight.zero_()  # logits = bias: the tag
    window = gtr.AnchorWindow(4)
    obs = torch.randn(7, 5)
    for it in range(1, 7):
        window.push(tagged_agent(gtr, agent, float(it)), it)
        n = min(it, 4)
        assert len(window) == n
        assert window.iterations() == list(range(it, it - n, -1))
        w = window.weights()
        assert w.shape == (n,) and w.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w, torch.full((n,), 1.0 / n))
    tagged_agent(gtr, agent, 100.0)  # the live agent moves on; the snapshots must not
    assert all(not p.requires_grad for _, s in window.snapshots for p in s.parameters())
    out, logstd = window.outputs(obs)
    assert out.shape == (7, 4, 4) and logstd is None
    # logits = tag for every action: log-softmax is -log 4 whatever the tag, so read the tags from the snapshots
    tags = [s.actor.out.bias[0].item() for _, s in window.snapshots]
    assert tags == [6.0, 5.0, 4.0, 3.0]
    torch.testing.assert_close(out, torch.full((7, 4, 4), -math.log(4)))
    window.clear()
    assert len(window) == 0


def test_anchor_window_outputs_follow_each_snapshot(gtr):
    """Gaussian policies: means and log-stds of each snapshot, in window order."""
    torch.manual_seed(1)
    agent = gtr.Agent((5,), 2, continuous=True)
    window = gtr.AnchorWindow(3)
    obs = torch.randn(9, 5)
    expected = []
    for it in range(1, 5):
        with torch.no_grad():
            agent.actor_logstd.fill_(-0.1 * it)
            agent.actor.out.bias.fill_(float(it))
            expected.insert(0, (agent(obs)[0].clone(), agent.actor_logstd[0].clone()))
        window.push(agent, it)
    out, logstd = window.outputs(obs)
    assert out.shape == (9, 3, 2) and logstd.shape == (3, 2)
    for k in range(3):
        torch.testing.assert_close(out[:, k], expected[k][0])
        torch.testing.assert_close(logstd[k], expected[k][1])


def test_anchor_weights(gtr):
    """Geometric weights decay by `decay` from the newest and sum to 1; a single anchor is the oldest snapshot."""
    agent = gtr.Agent((3,), 2, continuous=False)
    geometric, single = gtr.AnchorWindow(4, weighting="geometric", decay=0.5), gtr.AnchorWindow(4, kind="single")
    for it in range(1, 7):
        geometric.push(agent, it)
        single.push(agent, it)
        n = min(it, 4)
        w = geometric.weights()
        assert w.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w[1:] / w[:-1], torch.full((n - 1,), 0.5))
        s = single.weights()
        assert s.sum().item() == 1.0 and s[-1].item() == 1.0
    assert single.iterations()[-1] == 3  # the single anchor is 3 iterations older than the rollout policy


def test_mixture_kl_is_kl_to_the_mixture_plus_a_constant(gtr):
    """docs/ppo_gtr.md, "Method": sum_k w_k KL(pi_k || pi) = KL(pi_bar || pi) + C, pi_bar = sum_k w_k pi_k, C the
    anchors' generalised Jensen-Shannon divergence, the same for every current policy pi; so near the anchors
    GTR's penalty is (beta / sigma^2) (KL(pi_bar || pi) + C)."""
    agent, (obs, actions, *_) = make_batch(gtr, False)
    window = perturbed_window(gtr, agent, 4)
    anchor_out, _ = window.outputs(obs)
    weights = window.weights()
    mixture = (anchor_out.exp() * weights.view(1, -1, 1)).sum(1)  # pi_bar, (B, A)
    entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    constant = entropy(mixture) - (entropy(anchor_out.exp()) * weights).sum(1)
    assert constant.min() > 1e-3  # the anchors disagree: the constant is not 0
    for scale in (0.0, 0.02, 1.0):  # three current policies, the last far from every anchor
        with torch.no_grad():
            policy_out = agent(obs)[0] + scale * torch.randn(len(obs), 3)
            log_pi = torch.log_softmax(policy_out, -1)
            logprobs = log_pi.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            _, kl = gtr.anchor_divergences(agent, policy_out, logprobs, actions, anchor_out, None, "kl-distance")
            kl_to_mixture = (mixture * (mixture.log() - log_pi)).sum(-1)
        torch.testing.assert_close((kl * weights).sum(1), kl_to_mixture + constant, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Fresher anchors: --anchor-refresh epoch|minibatch, --anchor-type ema (docs/ppo_gtr.md, detail 6)
# ---------------------------------------------------------------------------------------------------------------

FRESH = dict(num_envs=2, num_steps=64, total_timesteps=384, num_minibatches=4, update_epochs=3, eval_episodes=0,
             metrics_every=0)  # 3 iterations of 3 epochs x 4 minibatches (every minibatch non-empty)


def recorded_run(gtr, monkeypatch, tmp_path, env_id: str, **changes) -> list[dict]:
    """Run in this process and record every minibatch loss: its states, the anchor it saw, and the agent's
    parameters at that moment (before the step)."""
    calls, ppo_loss = [], gtr.ppo_loss

    def recording(agent, obs, *rest, anchor=None, **kw):
        calls.append(dict(obs=obs.clone(), out=anchor["out"].clone(), weights=anchor["weights"].clone(),
                          logstd=None if anchor["logstd"] is None else anchor["logstd"].clone(),
                          params={k: v.detach().clone() for k, v in agent.state_dict().items()},
                          agent=agent))
        return ppo_loss(agent, obs, *rest, anchor=anchor, **kw)

    monkeypatch.setattr(gtr, "ppo_loss", recording)
    run_in_process(gtr, tmp_path, "rec", env_id, FRESH, **changes)
    assert len(calls) == 3 * 3 * 4
    return calls


def outputs_with(gtr, agent, params: dict, obs):
    """`policy_outputs` of a copy of `agent` holding `params`."""
    net = copy.deepcopy(agent)
    net.load_state_dict(params)
    return gtr.policy_outputs(net, obs)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("refresh", ["epoch", "minibatch"])
def test_anchor_refresh_takes_the_current_policy(gtr, monkeypatch, tmp_path, env_id, refresh):
    """Inside a run (K = 3; categorical and Gaussian policies), at every minibatch loss: the newest anchor's outputs
    (and log-std) are the policy's at the refresh point, the start of this epoch or this very step; the older
    anchors are the rollout policies (pi_old) of the previous iterations, untouched by the refreshes."""
    calls = recorded_run(gtr, monkeypatch, tmp_path, env_id, anchor_snapshots=3, anchor_refresh=refresh)
    per_epoch, per_iteration = 4, 12
    moved = 0
    for i, call in enumerate(calls):
        refresh_point = i if refresh == "minibatch" else i - i % per_epoch
        expected, expected_logstd = outputs_with(gtr, call["agent"], calls[refresh_point]["params"], call["obs"])
        torch.testing.assert_close(call["out"][:, :1], expected, rtol=1e-5, atol=1e-6)
        if expected_logstd is not None:
            torch.testing.assert_close(call["logstd"][:1], expected_logstd, rtol=0, atol=0)
        current = outputs_with(gtr, call["agent"], call["params"], call["obs"])[0]
        moved += not torch.allclose(call["out"][:, :1], current, rtol=1e-5, atol=1e-6)
        iteration = i // per_iteration
        assert call["out"].shape[1] == min(iteration + 1, 3)
        for k in range(1, call["out"].shape[1]):  # pi_old of iteration - k: the parameters at its first loss
            old = outputs_with(gtr, call["agent"], calls[(iteration - k) * per_iteration]["params"], call["obs"])
            torch.testing.assert_close(call["out"][:, k:k + 1], old[0], rtol=1e-5, atol=1e-6)
            if old[1] is not None:
                torch.testing.assert_close(call["logstd"][k:k + 1], old[1], rtol=0, atol=0)
    # epoch: every loss but the epoch's first sees a policy that has moved on; minibatch: none
    assert moved == (0 if refresh == "minibatch" else len(calls) - len(calls) // per_epoch)


def test_ema_update_by_hand(gtr):
    """ema <- (1 - rate) ema + rate theta, parameter by parameter, on a tiny network; EmaAnchor starts as a copy of
    the first policy pushed, keeps it over later pushes, follows `update`, and tracks its mean age in steps."""
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    gtr.ema_update(ema, net, 0.25)
    for e, e0, p in zip(ema.parameters(), before, net.parameters()):
        torch.testing.assert_close(e, 0.75 * e0 + 0.25 * p, rtol=0, atol=1e-7)
    rate = 0.1
    agent = gtr.Agent((5,), 2, continuous=True)
    start = {k: v.clone() for k, v in agent.state_dict().items()}
    anchor = gtr.EmaAnchor(rate, steps_per_iteration=4)
    assert len(anchor) == 0
    anchor.push(agent, 1)
    assert len(anchor) == 1 and anchor.weights().tolist() == [1.0] and anchor.iterations() == [1.0]
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(1.0)  # a constant target: after n steps ema = theta + (1 - rate)^n (ema_0 - theta)
    for n in range(1, 4):
        anchor.update(agent)
        for key, value in anchor.net.named_parameters():
            target = agent.state_dict()[key]
            torch.testing.assert_close(value, target + (1 - rate) ** n * (start[key] - target), rtol=0, atol=1e-6)
    assert anchor.age == pytest.approx(0.9 + 0.9**2 + 0.9**3)  # (1 - r)(age + 1) from 0, three times
    anchor.push(agent, 2)  # a later push keeps the average
    assert anchor.iterations() == [pytest.approx(2 - anchor.age / 4)]
    torch.testing.assert_close(anchor.net.actor_logstd, agent.actor_logstd - 0.9**3, rtol=0, atol=1e-6)
    out, logstd = anchor.outputs(torch.randn(6, 5))
    assert out.shape == (6, 1, 2) and logstd.shape == (1, 2)
    anchor.clear()
    anchor.push(agent, 3)  # restarts from the current policy
    assert all(torch.equal(a, b) for a, b in zip(anchor.net.parameters(), agent.parameters()))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_ema_anchor_inside_a_run(gtr, monkeypatch, tmp_path, env_id):
    """--anchor-type ema: one anchor (K = 1 by default) whose outputs at every minibatch loss are those of the EMA
    computed by hand from the agent's parameters at each loss: E_0 = theta_0, E_i = (1 - r) E_(i-1) + r theta_i."""
    rate = 0.3
    calls = recorded_run(gtr, monkeypatch, tmp_path, env_id, anchor_type="ema", anchor_ema_rate=rate)
    params = [name for name, _ in calls[0]["agent"].named_parameters()]
    ema = dict(calls[0]["params"])
    for i, call in enumerate(calls):
        if i:
            ema.update({k: (1 - rate) * ema[k] + rate * call["params"][k] for k in params})
        expected, expected_logstd = outputs_with(gtr, call["agent"], ema, call["obs"])
        assert call["out"].shape[1] == 1 and call["weights"].tolist() == [1.0]
        torch.testing.assert_close(call["out"], expected, rtol=1e-4, atol=1e-5)
        if expected_logstd is not None:
            torch.testing.assert_close(call["logstd"], expected_logstd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(calls[-1]["out"], outputs_with(gtr, calls[-1]["agent"], calls[-1]["params"],
                                                             calls[-1]["obs"])[0])  # it lags the policy
    config = read_json(os.path.join(str(tmp_path), "rec", "config.json"))["args"]
    assert config["anchor_snapshots"] == 1 and config["anchor_ema_rate"] == rate
    scalars = read_scalars(os.path.join(str(tmp_path), "rec"))
    assert values(scalars, "gtr/anchors") == [1, 1, 1]
    staleness = values(scalars, "gtr/anchor_staleness")  # the EMA's age at each update's start, in iterations
    ages = [0.0]
    for _ in range(24):
        ages.append((1 - rate) * (ages[-1] + 1))
    assert staleness == pytest.approx([ages[0] / 12, ages[12] / 12, ages[24] / 12], rel=1e-5)


def test_step_anchor_default_is_the_window(gtr):
    """--anchor-refresh rollout (the default): every minibatch sees the window's outputs taken after the rollout,
    the very tensors of the code before the fresher anchors existed (dict(anchor, out=anchor_out[mb]))."""
    for continuous in (False, True):
        agent, (obs, *_) = make_batch(gtr, continuous)
        window = perturbed_window(gtr, agent, 3)
        out, logstd = window.outputs(obs)
        anchor = dict(out=out, logstd=logstd, weights=window.weights(), kl_coef=1.0)
        index = torch.tensor([5, 0, 17, 3])
        got = gtr.step_anchor(anchor, window, agent, obs, index, None, loss_args(gtr))
        assert torch.equal(got["out"], out[index]) and got["logstd"] is logstd
        assert got["weights"] is anchor["weights"] and got["kl_coef"] == 1.0


def test_default_anchor_is_unchanged(tmp_path):
    """The default run writes the same episodes.csv and gtr/ logs as one with the default spelled out
    (--anchor-refresh rollout; the unused --anchor-ema-rate changed too), and differs from --anchor-refresh epoch."""
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", "1536", *TINY, "--seed", "3"]
    default = run_ok(GTR, tmp_path, "default", *flags)
    explicit = run_ok(GTR, tmp_path, "explicit", *flags, "--anchor-refresh", "rollout", "--anchor-ema-rate", "0.5")
    epoch = run_ok(GTR, tmp_path, "epoch", *flags, "--anchor-refresh", "epoch")
    read = lambda d: open(os.path.join(d, "episodes.csv")).read()  # noqa: E731
    assert read(default).count("\n") > 20 and read(default) == read(explicit)
    a, b, c = read_scalars(default), read_scalars(explicit), read_scalars(epoch)
    for key in a:
        if key.startswith(("gtr/", "losses/")):
            assert values(a, key) == values(b, key), key
    assert values(a, "gtr/penalty_loss") != values(c, "gtr/penalty_loss")


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

TINY = ["--num-envs", "2", "--num-steps", "64", "--eval-episodes", "2", "--metrics-every", "8"]


def test_gtr_run_logs_gtr_keys(tmp_path):
    """A CartPole run (7 iterations, K = 4): every gtr/ key finite each iteration, the window filling up to K and
    staying there, the travelled divergence the running sum of the updates' divergences, one gtr_tasks entry."""
    run_dir = run_ok(GTR, tmp_path, "g", "--env-id", "CartPole-v1", "--total-timesteps", "896", *TINY)
    scalars = read_scalars(run_dir)
    for key in (*GTR_KEYS, "penalty_loss"):
        assert len(scalars[f"gtr/{key}"]) == 7, key
        assert all(math.isfinite(v) for v in values(scalars, f"gtr/{key}")), key
    assert "gtr/kl_coef" not in scalars
    assert values(scalars, "gtr/anchors") == [1, 2, 3, 4, 4, 4, 4]
    assert values(scalars, "gtr/anchor_staleness") == pytest.approx([0, 0.5, 1, 1.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(values(scalars, "gtr/travelled"), np.cumsum(values(scalars, "gtr/update_divergence")),
                               rtol=1e-5)
    args = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert args["gtr_sigma"] == 0.2 and args["gtr_beta"] == 0.3
    assert all(0 < v <= args["gtr_beta"] for v in values(scalars, "gtr/penalty"))  # bounded by beta
    assert all(0 <= v <= 1 for v in values(scalars, "gtr/beyond_sigma"))
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed"
    (task,) = summary["gtr_tasks"]
    assert task["task"] == "CartPole-v1"
    assert task["travelled"] == pytest.approx(values(scalars, "gtr/travelled")[-1], rel=1e-5)
    assert task["displacement"] == pytest.approx(values(scalars, "gtr/displacement")[-1], rel=1e-5)


def test_clip_objective_reproduces_ppo_episodes(tmp_path):
    """--objective clip is ppo.py: the same seed writes the same episodes.csv (the anchors and diagnostics consume
    no randomness and leave the network alone)."""
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", "1536", *TINY, "--seed", "3"]
    ppo_dir = run_ok(PPO, tmp_path, "ppo", *flags)
    clip_dir = run_ok(GTR, tmp_path, "clip", *flags, "--objective", "clip")
    gtr_dir = run_ok(GTR, tmp_path, "gtr", *flags)
    read = lambda d: open(os.path.join(d, "episodes.csv")).read()  # noqa: E731
    assert read(ppo_dir).count("\n") > 20
    assert read(clip_dir) == read(ppo_dir)
    assert read(gtr_dir) != read(ppo_dir)
    assert "gtr/penalty_loss" not in read_scalars(clip_dir) and "gtr/divergence" in read_scalars(clip_dir)


@pytest.mark.parametrize("reset", [False, True])
def test_task_switch(tmp_path, reset):
    """A two-task MiniGrid sequence, 3 iterations per task, K = 2: the window carries the old task's snapshots over
    the switch (or is cleared with --anchor-reset-on-switch), the travelled divergence restarts, and gtr_tasks
    holds one entry per task."""
    flags = ["--env-ids", "MiniGrid-Empty-5x5-v0", "MiniGrid-DoorKey-5x5-v0", "--steps-per-task", "384", *TINY,
             "--anchor-snapshots", "2"] + (["--anchor-reset-on-switch"] if reset else [])
    run_dir = run_ok(GTR, tmp_path, "seq", *flags)
    scalars = read_scalars(run_dir)
    assert values(scalars, "gtr/anchors") == ([1, 2, 2, 1, 2, 2] if reset else [1, 2, 2, 2, 2, 2])
    travelled, steps = values(scalars, "gtr/travelled"), values(scalars, "gtr/update_divergence")
    assert travelled[3] == pytest.approx(steps[3], rel=1e-6)  # restarted at the switch
    assert travelled[2] == pytest.approx(sum(steps[:3]), rel=1e-5)
    assert values(scalars, "charts/task_index") == [1]
    tasks = read_json(os.path.join(run_dir, "summary.json"))["gtr_tasks"]
    assert [t["task"] for t in tasks] == ["MiniGrid-Empty-5x5-v0", "MiniGrid-DoorKey-5x5-v0"]
    assert tasks[0]["travelled"] == pytest.approx(travelled[2], rel=1e-5)
    assert tasks[1]["travelled"] == pytest.approx(travelled[5], rel=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_kl_objective_run(tmp_path, adaptive):
    """KL-PPO: one anchor (pi_old) by default; the coefficient fixed at GTR's curvature at the anchor
    (beta / sigma^2), or adapted by factors of 2 with --kl-target."""
    flags = ["--kl-target", "0.01", "--kl-coef", "1.0"] if adaptive else []
    run_dir = run_ok(GTR, tmp_path, "kl", "--env-id", "CartPole-v1", "--total-timesteps", "768", *TINY,
                     "--objective", "kl", *flags)
    scalars = read_scalars(run_dir)
    assert values(scalars, "gtr/anchors") == [1] * 6
    assert "gtr/penalty_loss" in scalars
    coefs = values(scalars, "gtr/kl_coef")
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert config["anchor_snapshots"] == 1 and config["objective"] == "kl"
    if adaptive:
        assert coefs[0] == 1.0 and len(coefs) == 6 and len(set(coefs)) > 1
        assert all(math.log2(c) == round(math.log2(c)) for c in coefs)
    else:
        assert config["kl_coef"] == pytest.approx(0.3 / 0.2**2)
        assert coefs == pytest.approx([0.3 / 0.2**2] * 6)


def test_gtr_seed_determinism(tmp_path):
    assert_seed_determinism(lambda tmp, name, *flags: run(GTR, tmp, name, *flags), tmp_path, "--env-id",
                            "CartPole-v1", "--total-timesteps", "1024", *TINY)


BAD_FLAGS = [
    (["--gtr-sigma", "0"], "--gtr-sigma"),
    (["--gtr-beta", "-1"], "--gtr-beta"),
    (["--anchor-snapshots", "0"], "--anchor-snapshots"),
    (["--anchor-decay", "0"], "--anchor-decay"),
    (["--kl-target", "0"], "--kl-target"),
    (["--kl-coef", "-0.5"], "--kl-coef"),
    (["--objective", "kl", "--gtr-divergence", "kl"], "--kl-coef"),  # the default coefficient would not match GTR
    (["--anchor-ema-rate", "0"], "--anchor-ema-rate"),
    (["--anchor-ema-rate", "1.5"], "--anchor-ema-rate"),
    (["--anchor-type", "ema", "--anchor-snapshots", "3"], "--anchor-snapshots"),
    (["--anchor-type", "ema", "--anchor-refresh", "epoch"], "--anchor-refresh"),
    (["--objective", "clip", "--anchor-refresh", "epoch"], "--objective clip"),
    (["--anchor-type", "single", "--anchor-refresh", "epoch"], "single"),
    (["--objective", "kl", "--anchor-refresh", "minibatch"], "--anchor-snapshots 1"),  # K = 1: an inert penalty
]


@pytest.mark.parametrize("flags, fragment", BAD_FLAGS)
def test_bad_flags_are_refused(gtr, flags, fragment):
    import tyro

    args = tyro.cli(gtr.Args, args=["--env-id", "CartPole-v1", *flags])
    with pytest.raises(gtr.UserError, match=fragment):
        gtr.resolve_args(args)


@pytest.mark.parametrize("flags, resolved", [
    (["--objective", "kl", "--gtr-divergence", "kl", "--kl-coef", "2"], dict(kl_coef=2.0, anchor_snapshots=1)),
    (["--objective", "kl", "--gtr-divergence", "log-ratio"], dict(kl_coef=pytest.approx(7.5))),
    (["--gtr-divergence", "kl"], dict(objective="gtr", anchor_snapshots=4)),  # GTR itself does not use --kl-coef
    (["--anchor-type", "ema"], dict(anchor_snapshots=1, anchor_refresh="rollout")),
    (["--anchor-type", "single", "--anchor-snapshots", "1", "--anchor-refresh", "epoch"], dict(anchor_snapshots=1)),
    (["--objective", "kl", "--anchor-snapshots", "2", "--anchor-refresh", "minibatch"], dict(anchor_snapshots=2)),
])
def test_good_anchor_flags_resolve(gtr, flags, resolved):
    """The legitimate neighbours of the refused combinations resolve, with these values."""
    import tyro

    args = tyro.cli(gtr.Args, args=["--env-id", "CartPole-v1", *flags])
    gtr.resolve_args(args)
    for key, value in resolved.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("flags, fragment", [BAD_FLAGS[0], BAD_FLAGS[2]])
def test_bad_flags_fail_with_one_line(tmp_path, flags, fragment):
    """From the command line: one `error:` line, exit status 2, no run directory."""
    proc = run(GTR, tmp_path, "bad", "--env-id", "CartPole-v1", *flags)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
