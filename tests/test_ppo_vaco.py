"""algos/ppo_vaco.py: V-trace's advantages against a hand computation (a termination, a truncation and auto-reset
steps) and equal to ppo.py's GAE on on-policy data; the total-variation filter against a hand computation (which
samples are kept, the loss and its gradient), the Gaussian one-sample TV against the closed form; the lagged behaviour
snapshots; the behaviour that acts at iteration k is the learner of iteration k - L (spied on in a run); switched off
(and at lag 0 with the alignment on) it is ppo.py exactly, a lag changes the run; the vaco/ logs; end-to-end runs
(MinAtar, Atari, a Gaussian policy) and bad input."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
MINATAR = dict(total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=1, metrics_every=8)


@pytest.fixture(scope="module")
def vaco():
    return load_script("ppo_vaco")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


# ---------------------------------------------------------------------------------------------------------------
# Align: V-trace
# ---------------------------------------------------------------------------------------------------------------


def rollout():
    """6 steps x 3 envs. Env 0: its episode terminates at step 1, step 2 is the auto-reset step. Env 1: truncated at
    step 3 (bootstrap from V(obs_4), the final observation), step 4 is the auto-reset step. Env 2: one episode running
    past the rollout's end (bootstrap from next_value)."""
    rng = np.random.default_rng(0)
    T, N = 6, 3
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    next_value = rng.normal(size=N).astype(np.float32)
    terminated, done = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
    valid = np.ones((T, N), bool)
    terminated[1, 0] = done[1, 0] = 1.0
    valid[2, 0] = False
    done[3, 1] = 1.0
    valid[4, 1] = False
    rewards[~valid] = 0.0
    ratios = rng.uniform(0.3, 2.0, size=(T, N)).astype(np.float32)
    return rewards, values, next_value, terminated, done, valid, ratios


def hand_vtrace(rewards, values, next_value, terminated, done, valid, ratios, gamma, lam, rho_bar, c_bar):
    """IMPALA's sum written out: v_s - V(s) = sum_{t=s}^{end} gamma^(t-s) (prod_{i=s}^{t-1} c_i) rho_t delta_t, where
    `end` is the step that ends s's episode, or the rollout's last step."""
    T, N = rewards.shape
    out = np.zeros((T, N))
    for n in range(N):
        for s in range(T):
            if not valid[s, n]:
                continue
            total, weight = 0.0, 1.0  # weight = gamma^(t-s) prod c_i
            for t in range(s, T):
                v_next = values[t + 1, n] if t + 1 < T else next_value[n]
                delta = rewards[t, n] + gamma * float(v_next) * (1.0 - terminated[t, n]) - values[t, n]
                total += weight * min(rho_bar, ratios[t, n]) * delta
                if done[t, n]:
                    break
                weight *= gamma * lam * min(c_bar, ratios[t, n])
            out[s, n] = total
    return out


def hand_policy_advantages(rewards, values, next_value, terminated, done, valid, corrections, gamma, lam):
    """The policy advantage from the corrections v - V written out: A_s = delta_s + gamma lam (v_{s+1} - V(s_{s+1}))
    inside the episode, no importance weight on a_s."""
    T, N = rewards.shape
    out = np.zeros((T, N))
    for n in range(N):
        for s in range(T):
            if not valid[s, n]:
                continue
            v_next = values[s + 1, n] if s + 1 < T else next_value[n]
            out[s, n] = rewards[s, n] + gamma * float(v_next) * (1.0 - terminated[s, n]) - values[s, n]
            if not done[s, n] and s + 1 < T:
                out[s, n] += gamma * lam * corrections[s + 1, n]
    return out


def test_vtrace_against_a_hand_sum(vaco):
    data = rollout()
    for rho_bar, c_bar in ((1.0, 1.0), (1.5, 0.7), (100.0, 100.0)):
        adv, targets = vaco.vtrace_advantages(*data, 0.9, 0.8, rho_bar, c_bar)
        corrections = hand_vtrace(*data, 0.9, 0.8, rho_bar, c_bar)
        np.testing.assert_allclose(targets, corrections + data[1], rtol=1e-5, atol=1e-6)
        expected = hand_policy_advantages(*data[:6], corrections, 0.9, 0.8)
        np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
        assert adv.dtype == np.float32 and (adv[~data[5]] == 0).all()  # auto-reset steps: nothing to learn
        assert not np.allclose(adv, corrections)  # a_t's own weight is left to the surrogate's ratio
    # the termination stops the bootstrap and the trace; the truncation bootstraps from V(final observation); the
    # policy advantage of an episode's last step is its TD error, unweighted
    rewards, values, next_value, terminated, done, valid, ratios = data
    adv, targets = vaco.vtrace_advantages(*data, 0.9, 0.8, 1.0, 1.0)
    assert adv[1, 0] == pytest.approx(rewards[1, 0] - values[1, 0], rel=1e-6)
    assert targets[1, 0] - values[1, 0] == pytest.approx(min(1.0, ratios[1, 0]) * (rewards[1, 0] - values[1, 0]),
                                                         rel=1e-5)
    assert adv[3, 1] == pytest.approx(rewards[3, 1] + 0.9 * values[4, 1] - values[3, 1], rel=1e-6)


def test_vtrace_is_ppo_gae_on_policy_data(vaco, ppo):
    """Ratios 1 (pi = mu) with rho_bar = 1 and any c_bar >= 1: exactly ppo.py's GAE and returns, bit for bit; any
    ratio != 1 changes them."""
    rewards, values, next_value, terminated, done, valid, ratios = rollout()
    gae, returns = ppo.compute_gae(rewards, values, next_value, terminated, done, valid, 0.99, 0.95)
    ones = np.ones_like(ratios)
    for c_bar in (1.0, 3.0):
        adv, targets = vaco.vtrace_advantages(rewards, values, next_value, terminated, done, valid, ones, 0.99, 0.95,
                                              1.0, c_bar)
        assert np.array_equal(adv, gae) and np.array_equal(targets, returns)
    adv, _ = vaco.vtrace_advantages(rewards, values, next_value, terminated, done, valid, ratios, 0.99, 0.95, 1.0, 1.0)
    assert not np.allclose(adv, gae)


# ---------------------------------------------------------------------------------------------------------------
# Filter: the total-variation mask
# ---------------------------------------------------------------------------------------------------------------


class FakeAgent(torch.nn.Module):
    """A 'network' whose policy logits and values are parameters, one row per sample, so the loss's gradient per sample
    can be read off directly."""

    def __init__(self, vaco, logits, values, continuous=False):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float64))
        self.values = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
        self.continuous, self.vaco = continuous, vaco

    def forward(self, obs, return_hidden=False):
        return self.logits, self.values, None

    def log_prob_entropy(self, policy_out, actions):
        return self.vaco.categorical_log_prob_entropy(policy_out, actions)


def softmax(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("side", ["both", "outward"])
def test_tv_filter_against_a_hand_computation(vaco, ppo, side):
    """Four states, three actions. The per-state TV = 1/2 sum |pi - mu| by hand; with delta 0.15 two states are beyond
    it. --tv-filter both: they give no gradient at all; outward: only the one whose gradient would move pi further from
    mu (A > 0, ratio > 1); state 1 (A < 0, ratio > 1: the gradient lowers its ratio) keeps its. Kept states get
    -A ratio / B (the unclipped surrogate, B = 4 in the mean); the loss's policy term, filtered_frac and tv_mean are the
    hand values."""
    mu = [[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0]]
    pi = [[0.1, 0.0, -0.1], [-1.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
    actions, adv = [0, 2, 1, 1], [1.0, -2.0, 0.5, 3.0]
    tv = [0.5 * sum(abs(p - m) for p, m in zip(softmax(a), softmax(b))) for a, b in zip(pi, mu)]
    assert 0 < tv[0] < 0.15 < tv[1] and tv[2] == 0 and tv[3] > 0.15  # two within delta, two beyond
    ratio = [softmax(p)[a] / softmax(m)[a] for p, m, a in zip(pi, mu, actions)]
    assert ratio[1] > 1 and ratio[3] > 1
    kept = [True, side == "outward", True, False]
    agent = FakeAgent(vaco, pi, [0.0] * 4)
    old_logprobs = torch.tensor([math.log(softmax(m)[a]) for m, a in zip(mu, actions)], dtype=torch.float64)
    args = vaco.Args(trust_region="tv", tv_delta=0.15, tv_filter=side, norm_adv=False, ent_coef=0.0, vf_coef=0.5,
                     clip_coef=0.2)
    zeros, advantages = torch.zeros(4, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    loss, stats = vaco.vaco_loss(agent, None, torch.tensor(actions), old_logprobs, advantages, zeros, zeros,
                                 torch.tensor(mu, dtype=torch.float64), args)
    assert stats["policy_loss"].item() == pytest.approx(-sum(k * r * a for k, r, a in zip(kept, ratio, adv)) / 4)
    assert stats["filtered_frac"].item() == pytest.approx(1 - sum(kept) / 4)
    assert stats["tv_mean"].item() == pytest.approx(sum(tv) / 4)
    loss.backward()
    for i in range(4):  # d/dlogits of -ratio A / B = -(A ratio / B) (onehot(a) - pi)
        expected = [-(adv[i] * ratio[i] / 4) * ((j == actions[i]) - softmax(pi[i])[j]) for j in range(3)] if kept[i] \
            else [0.0] * 3
        assert agent.logits.grad[i].tolist() == pytest.approx(expected, abs=1e-12), i
    # clip: ppo.py's loss itself
    args.trust_region = "clip"
    clip_loss, clip_stats = vaco.vaco_loss(agent, None, torch.tensor(actions), old_logprobs, advantages, zeros, zeros,
                                           None, args)
    ppo_loss = ppo.ppo_loss(agent, None, torch.tensor(actions), old_logprobs, advantages, zeros, zeros, args)[0]
    assert clip_loss.item() == ppo_loss.item() and "filtered_frac" not in clip_stats


class FakeGaussian(FakeAgent):
    def __init__(self, vaco, means):
        super().__init__(vaco, means, [0.0] * len(means), continuous=True)

    def log_prob_entropy(self, policy_out, actions):
        return self.vaco.gaussian_log_prob_entropy(policy_out, torch.zeros_like(policy_out), actions)


def test_gaussian_outward_filter_has_the_clips_gradient(vaco):
    """With Gaussian policies the TV is 1/2 |ratio - 1|, so the outward filter at delta = clip / 2 drops exactly the
    gradients ppo.py's clip drops: the two losses have the same gradient (their values differ by the clipped terms'
    constants). The `both` filter also drops the inward ones."""
    gen = torch.Generator().manual_seed(1)
    means = (0.4 * torch.randn(64, 1, generator=gen, dtype=torch.float64)).tolist()
    actions = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    old_logprobs = vaco.gaussian_log_prob_entropy(torch.zeros(64, 1, dtype=torch.float64),
                                                  torch.zeros(64, 1, dtype=torch.float64), actions)[0]
    adv, zeros = torch.randn(64, generator=gen, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    grads = {}
    for name in ("clip", "outward", "both"):
        agent = FakeGaussian(vaco, means)
        args = vaco.Args(trust_region="clip" if name == "clip" else "tv", tv_filter="outward" if name == "clip" else name,
                         tv_delta=0.1, clip_coef=0.2, norm_adv=True, ent_coef=0.0)
        vaco.vaco_loss(agent, None, actions, old_logprobs, adv, zeros, zeros, None, args)[0].backward()
        grads[name] = agent.logits.grad.clone()
    ratio = (agent.log_prob_entropy(agent.logits, actions)[0] - old_logprobs).exp()
    assert ((ratio - 1).abs() > 0.2).sum() > 10  # many samples beyond the band: not vacuous
    assert torch.allclose(grads["outward"], grads["clip"], atol=1e-15, rtol=0)
    assert not torch.allclose(grads["both"], grads["clip"])


def test_gaussian_one_sample_tv_estimates_the_tv(vaco):
    """For Gaussian policies the filter's TV is 1/2 |ratio - 1| at the sampled action; its mean over actions from mu
    is TV(pi, mu), here two unit-variance normals 0.5 apart, whose TV is erf(0.5 / (2 sqrt 2))."""
    agent = FakeAgent(vaco, [[0.0]], [0.0], continuous=True)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400_000, generator=gen, dtype=torch.float64)  # a ~ mu = N(0, 1)
    ratio = torch.exp(-0.5 * (a - 0.5) ** 2 + 0.5 * a**2)  # pi = N(0.5, 1)
    tv = vaco.vaco_tv(agent, None, None, ratio)
    assert torch.equal(tv, 0.5 * (ratio - 1).abs())
    assert tv.mean().item() == pytest.approx(math.erf(0.5 / (2 * math.sqrt(2))), abs=3e-3)


# ---------------------------------------------------------------------------------------------------------------
# The lag
# ---------------------------------------------------------------------------------------------------------------


def test_behaviour_snapshots(vaco):
    """Lag 2: after pushes at iterations 1..5 the behaviour is iteration 3's snapshot (1's while fewer than 3 exist);
    loading it changes the weights in place and never the observation statistics."""
    agent = vaco.Agent((3,), 2, continuous=False)
    behaviour = vaco.VacoBehaviour(2)
    weights = {}
    params = list(agent.parameters())
    for iteration in range(1, 6):
        with torch.no_grad():
            agent.actor.out.bias.fill_(float(iteration))
        weights[iteration] = agent.actor.out.bias.clone()
        behaviour.push(agent, iteration)
        assert behaviour.lag == min(iteration - 1, 2)
        agent.obs_norm.update(torch.randn(8, 3))
        stats = (agent.obs_norm.mean.clone(), agent.obs_norm.count.clone())
        behaviour.load(agent, 0)
        assert torch.equal(agent.actor.out.bias, weights[max(iteration - 2, 1)])
        assert torch.equal(agent.obs_norm.mean, stats[0]) and torch.equal(agent.obs_norm.count, stats[1])
        behaviour.load(agent, -1)
        assert torch.equal(agent.actor.out.bias, weights[iteration])
    assert all(a is b for a, b in zip(params, agent.parameters()))  # the optimizer's tensors, loaded in place


def test_behaviour_at_iteration_k_is_the_learner_of_iteration_k_minus_lag(vaco, tmp_path, monkeypatch):
    """Spy on the rollout's get_action_and_value and on the minibatch loss: every action of iteration k's rollout comes
    from the weights the learner had at the start of iteration k - L's update (the initial weights for k <= L), and the
    learner's own weights are back for the update; there, the old values are the learner's critic's (aligned) and the
    old log-probabilities and distributions mu's (stale from the second iteration on)."""
    lag, iterations = 2, 6
    acting, updating, aligned, stale = [], [], [], []
    act, loss = vaco.Agent.get_action_and_value, vaco.vaco_loss

    def flat(agent):
        return torch.cat([p.detach().flatten() for p in agent.parameters()]).clone()

    def spy_act(self, *a, **kw):
        acting.append(flat(self))
        return act(self, *a, **kw)

    def spy_loss(agent, obs, actions, old_logprobs, advantages, returns, old_values, mu_out, args):
        updating.append(flat(agent))
        with torch.no_grad():  # aligned: old values are the learner's own critic
            policy_out, values, _ = agent(obs)
            aligned.append(torch.allclose(values, old_values, atol=1e-5))
            stale.append(not torch.allclose(agent.log_prob_entropy(policy_out, actions)[0], old_logprobs, atol=1e-4)
                         and not torch.allclose(torch.log_softmax(policy_out, -1), torch.log_softmax(mu_out, -1)))
        return loss(agent, obs, actions, old_logprobs, advantages, returns, old_values, mu_out, args)

    monkeypatch.setattr(vaco.Agent, "get_action_and_value", spy_act)
    monkeypatch.setattr(vaco, "vaco_loss", spy_loss)
    settings = dict(SMOKE, total_timesteps=64 * 2 * iterations, update_epochs=1, num_minibatches=2, metrics_every=0)
    run_dir = run_in_process(vaco, tmp_path, "lag", "CartPole-v1", settings, policy_lag=lag)
    assert len(acting) == 64 * iterations and len(updating) == 2 * iterations
    rollout_weights = [acting[64 * k: 64 * (k + 1)] for k in range(iterations)]
    update_start = updating[::2]  # the learner at the start of each iteration's update
    for k in range(1, iterations + 1):
        assert all(torch.equal(w, rollout_weights[k - 1][0]) for w in rollout_weights[k - 1])
        assert torch.equal(rollout_weights[k - 1][0], update_start[max(k - lag, 1) - 1]), k
        if k > 1:  # not vacuous: the behaviour is not the learner that is updated
            assert not torch.equal(rollout_weights[k - 1][0], update_start[k - 1])
    lags = [v for _, v in read_scalars(run_dir)["vaco/policy_lag"]]
    assert lags == [0, 1, 2, 2, 2, 2]
    assert aligned[::2] == [True] * iterations  # checked at the start of each update
    assert stale[::2] == [False] + [True] * (iterations - 1)  # mu's log-probabilities and distributions


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_switched_off_is_ppo_py_and_lag_changes_the_run(vaco, ppo, tmp_path):
    """Lag 0 with --no-align --trust-region clip is ppo.py's run (same episodes and losses); at lag 0 the alignment is
    exact GAE, so with the clip it is ppo.py too; the TV filter (where it filters: on CartPole's first updates ppo.py's
    clip never binds and neither does the default delta, so both are the same unclipped surrogate) and a lag change the
    run. The vaco/ logs: no staleness at lag 0, some from the second iteration on at lag 2."""
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(vaco, tmp_path, "off", "CartPole-v1", SMOKE, align=False, trust_region="clip")
    aligned = run_in_process(vaco, tmp_path, "aligned", "CartPole-v1", SMOKE, trust_region="clip")
    assert_same_run(base, off, "ppo_vaco.py --no-align --trust-region clip")
    assert_same_run(base, aligned, "ppo_vaco.py --trust-region clip (lag 0, aligned)")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    assert read_scalars(aligned)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    csv = open(os.path.join(base, "episodes.csv")).read()
    filtered = run_in_process(vaco, tmp_path, "tv", "CartPole-v1", SMOKE, tv_delta=0.005)  # the default never bites
    lagged = run_in_process(vaco, tmp_path, "lagged", "CartPole-v1", SMOKE, policy_lag=2, align=False,
                            trust_region="clip")
    for run_dir in (filtered, lagged):
        assert open(os.path.join(run_dir, "episodes.csv")).read() != csv
    scalars = read_scalars(aligned)
    for key in ("tv_behaviour", "value_shift", "rho_truncated_frac", "c_truncated_frac", "policy_lag"):
        assert all(v == 0 for _, v in scalars[f"vaco/{key}"]), key
    assert all(v == 1 for _, v in scalars["vaco/ratio_mean"]) and "vaco/filtered_frac" not in scalars
    scalars = read_scalars(lagged)
    assert [v for _, v in scalars["vaco/policy_lag"]] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert all(v > 0 for _, v in scalars["vaco/tv_behaviour"][1:]) and scalars["vaco/tv_behaviour"][0][1] == 0
    assert all(v > 0 for _, v in scalars["vaco/value_shift"][1:])
    assert max(v for _, v in read_scalars(filtered)["vaco/filtered_frac"]) > 0
    assert all(v > 0 for _, v in read_scalars(filtered)["vaco/tv_mean"])


def test_minatar_run_with_lag(vaco, tmp_path):
    run = run_in_process(vaco, tmp_path, "breakout", "MinAtar/Breakout", MINATAR, policy_lag=2)
    scalars = read_scalars(run)
    assert {"vaco/filtered_frac", "vaco/tv_mean", "vaco/tv_behaviour", "vaco/rho_truncated_frac"} <= scalars.keys()
    assert all(0 <= v <= 1 for _, v in scalars["vaco/filtered_frac"] + scalars["vaco/tv_behaviour"])
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_atari_smoke_with_lag(vaco, tmp_path):
    run = run_in_process(vaco, tmp_path, "breakout", "Breakout-v5", dict(
        total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=8,
        metrics_batch_size=32), policy_lag=1)
    scalars = read_scalars(run)
    assert [v for _, v in scalars["vaco/policy_lag"]] == [0, 1, 1, 1]
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_gaussian_policy_run_with_lag(vaco, tmp_path):
    """Continuous actions: the filter's one-sample TV and V-trace's ratios of a Gaussian policy, end to end."""
    run = run_in_process(vaco, tmp_path, "pendulum", "Pendulum-v1", dict(
        total_timesteps=256, num_envs=1, num_steps=64, num_minibatches=2, update_epochs=2, eval_episodes=0,
        metrics_every=8), policy_lag=1)
    scalars = read_scalars(run)
    assert scalars["vaco/tv_behaviour"][-1][1] > 0 and "vaco/filtered_frac" in scalars
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


@pytest.mark.parametrize("argv, fragment", [
    (["--policy-lag", "-1"], "--policy-lag"), (["--tv-delta", "0"], "--tv-delta"), (["--tv-delta", "1.5"], "--tv-delta"),
    (["--vtrace-rho-bar", "0"], "--vtrace-rho-bar"), (["--vtrace-c-bar", "-1"], "--vtrace-c-bar"),
])
def test_bad_vaco_flags_are_one_line_errors(vaco, capsys, argv, fragment):
    code, lines = call_main(vaco, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_switched_off_is_ppo_py_on_minatar(vaco, ppo, tmp_path):
    """The equality on MinAtar too (ReLU MLPs, a game's own action set), the family of the vaco-ppo suite."""
    base = run_in_process(ppo, tmp_path, "ppo", "MinAtar/Breakout", MINATAR)
    off = run_in_process(vaco, tmp_path, "off", "MinAtar/Breakout", MINATAR, align=False, trust_region="clip")
    assert_same_run(base, off, "ppo_vaco.py --no-align --trust-region clip on MinAtar/Breakout")
