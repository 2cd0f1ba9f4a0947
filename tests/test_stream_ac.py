"""Tests of algos/stream_ac.py: the actor's trace gradient (entropy with sign(delta)), one full Stream AC(lambda)
update (both ObGD steps, one shared delta) against a hand computation, trace resets and truncation bootstrapping,
the log-prob of the unclipped Gaussian sample while the env gets the clipped one, the time feature, sparse init,
determinism, diagnostics that never change a run, smoke runs on every family, checkpoints and bad flags."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

GAMMA, LAMBDA = 0.9, 0.5  # far from the defaults, so a wrong decay or discount changes the result visibly
SMOKE = dict(total_timesteps=300, eval_episodes=1, metrics_every=50, metrics_batch_size=64, log_every=50)


@pytest.fixture(scope="module")
def ac():
    return load_script("stream_ac")


def tiny_agent(m, continuous: bool, seed: int = 0, obs_dim: int = 3, n_actions: int = 2, hidden: int = 4):
    torch.manual_seed(seed)
    agent = m.StreamAC(obs_dim, n_actions, hidden, continuous, layer_norm=True).double()
    m.initialize(agent, sparse=False, sparsity=0.9)  # dense weights: every entry of the gradients matters
    return agent


def optimizers(m, agent, lamda=LAMBDA, kappa_policy=3.0, kappa_value=2.0, lr=1.0, bounded=True):
    return (m.ObGD(list(agent.actor.parameters()), lr, GAMMA, lamda, kappa_policy, bounded),
            m.ObGD(list(agent.critic.parameters()), lr, GAMMA, lamda, kappa_value, bounded))


def reference_dist(actor, obs):
    out = actor(obs)
    return Normal(out[0], out[1]) if actor.continuous else Categorical(logits=out[0])


def one_update(m, agent, opt_pi, opt_v, obs, next_obs, action, reward, bootstrap=True, done=False, coef=0.3):
    """The script's update with the actor forward as run() does it (a given action instead of a sample)."""
    out = agent.actor(obs)
    log_prob, entropy = m.policy_terms(out, action)
    return m.stream_ac_update(list(agent.actor.parameters()), agent.critic, opt_pi, opt_v, log_prob, entropy, obs,
                              next_obs, reward, bootstrap, done, GAMMA, coef)


# ---------------------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("reward", [5.0, -5.0])  # delta > 0 and delta < 0: the entropy term's sign flips
def test_actor_trace_is_grad_of_log_prob_plus_signed_entropy(ac, continuous, reward):
    """With lambda = 0 the trace after one step is the step's gradient: grad [log pi(a|s) + c sign(delta) H], by
    torch.distributions on a copy of the actor; the critic's trace is grad v(s)."""
    agent = tiny_agent(ac, continuous)
    reference = copy.deepcopy(agent)
    opt_pi, opt_v = optimizers(ac, agent, lamda=0.0, kappa_policy=1e9, kappa_value=1e9)  # tiny steps
    gen = torch.Generator().manual_seed(1)
    obs, next_obs = torch.randn(1, 3, generator=gen).double(), torch.randn(1, 3, generator=gen).double()
    action = torch.randn(1, 2, generator=gen).double() * 2 if continuous else torch.tensor([1])
    delta = one_update(ac, agent, opt_pi, opt_v, obs, next_obs, action, reward, coef=0.3)[0]
    assert (delta > 0) == (reward > 0)

    dist = reference_dist(reference.actor, obs)
    log_prob = dist.log_prob(action).sum() if continuous else dist.log_prob(action).sum()
    entropy = dist.entropy().sum()
    expected = torch.autograd.grad(log_prob + 0.3 * math.copysign(1.0, delta) * entropy,
                                   list(reference.actor.parameters()))
    for z, g in zip(opt_pi.traces, expected):
        torch.testing.assert_close(z, g)
    expected_v = torch.autograd.grad(reference.critic(obs).sum(), list(reference.critic.parameters()))
    for z, g in zip(opt_v.traces, expected_v):
        torch.testing.assert_close(z, g)
    # the entropy term really is in there: without it the trace differs
    plain = torch.autograd.grad(reference_dist(reference.actor, obs).log_prob(action).sum(),
                                list(reference.actor.parameters()))
    assert any(not torch.allclose(z, g) for z, g in zip(opt_pi.traces, plain))


def hand_obgd(params, traces, grads, delta, lr, kappa, decay):
    """ObGD by hand (method card): z <- decay z + g; M = lr kappa max(|delta|, 1) ||z||_1; step lr / M if M > 1."""
    traces = [decay * z + g for z, g in zip(traces, grads)]
    m = lr * kappa * max(abs(delta), 1.0) * sum(float(z.abs().sum()) for z in traces)
    step = lr / m if m > 1 else lr
    return [p + step * delta * z for p, z in zip(params, traces)], traces, step


@pytest.mark.parametrize("continuous", [True, False])
def test_two_updates_match_hand_computation(ac, continuous):
    """Two consecutive updates (the second with decayed traces): delta from the pre-update critic with v(s') only
    through the bootstrap, both networks stepped by ObGD with that one delta, the policy's own kappa."""
    agent = tiny_agent(ac, continuous, seed=3)
    actor = [p.detach().clone() for p in agent.actor.parameters()]
    critic = [p.detach().clone() for p in agent.critic.parameters()]
    z_pi, z_v = [torch.zeros_like(p) for p in actor], [torch.zeros_like(p) for p in critic]
    opt_pi, opt_v = optimizers(ac, agent, kappa_policy=3.0, kappa_value=2.0)
    gen = torch.Generator().manual_seed(2)
    coef = 0.05
    for k in range(2):
        obs, next_obs = torch.randn(1, 3, generator=gen).double(), torch.randn(1, 3, generator=gen).double()
        action = torch.randn(1, 2, generator=gen).double() if continuous else torch.tensor([k])
        reward = 1.5 if k == 0 else -0.7
        # by hand, on a fresh network holding the hand parameters
        ref = tiny_agent(ac, continuous, seed=99)
        with torch.no_grad():
            for p, q in zip(ref.actor.parameters(), actor):
                p.copy_(q)
            for p, q in zip(ref.critic.parameters(), critic):
                p.copy_(q)
        v_s = ref.critic(obs).sum()
        with torch.no_grad():
            v_next = ref.critic(next_obs).sum().item()
        delta = reward + GAMMA * v_next - v_s.item()
        g_v = torch.autograd.grad(v_s, list(ref.critic.parameters()))
        dist = reference_dist(ref.actor, obs)
        g_pi = torch.autograd.grad(dist.log_prob(action).sum() + coef * math.copysign(1, delta) * dist.entropy().sum(),
                                   list(ref.actor.parameters()))
        actor, z_pi, step_pi = hand_obgd(actor, z_pi, g_pi, delta, 1.0, 3.0, GAMMA * LAMBDA)
        critic, z_v, step_v = hand_obgd(critic, z_v, g_v, delta, 1.0, 2.0, GAMMA * LAMBDA)

        got = one_update(ac, agent, opt_pi, opt_v, obs, next_obs, action, reward, coef=coef)
        assert got[0] == pytest.approx(delta, rel=1e-12)
        assert got[1] == pytest.approx(v_s.item(), rel=1e-12)
        assert got[2] == pytest.approx(dist.entropy().sum().item(), rel=1e-12)
        assert got[3] == pytest.approx(step_pi, rel=1e-10) and got[4] == pytest.approx(step_v, rel=1e-10)
        assert step_pi < 1.0 and step_v < 1.0  # the bound is active at lr 1, as with the official settings
        for p, q in zip(agent.actor.parameters(), actor):
            torch.testing.assert_close(p.detach(), q)
        for p, q in zip(agent.critic.parameters(), critic):
            torch.testing.assert_close(p.detach(), q)


def test_sgd_takes_the_plain_step(ac):
    """--optimizer sgd: the same traces, the step is always lr (no bound)."""
    agent = tiny_agent(ac, True)
    opt_pi, opt_v = optimizers(ac, agent, lr=0.01, bounded=False)
    before = [p.detach().clone() for p in agent.critic.parameters()]
    obs, next_obs = torch.ones(1, 3).double(), torch.zeros(1, 3).double()
    delta, _, _, step_pi, step_v = one_update(ac, agent, opt_pi, opt_v, obs, next_obs, torch.zeros(1, 2).double(),
                                              3.0)
    assert step_pi == step_v == 0.01
    for p, q, z in zip(agent.critic.parameters(), before, opt_v.traces):
        torch.testing.assert_close(p.detach(), q + 0.01 * delta * z)


def test_episode_flags(ac):
    """A termination never bootstraps; a truncation bootstraps by default, not with --no-truncation-bootstraps
    (official); both reset the traces."""
    assert ac.episode_flags(True, False, True) == (False, True)
    assert ac.episode_flags(False, True, True) == (True, True)
    assert ac.episode_flags(False, True, False) == (False, True)
    assert ac.episode_flags(False, False, True) == (True, False)
    assert ac.episode_flags(False, False, False) == (True, False)


def test_done_resets_traces_after_the_update(ac):
    """The transition that ends an episode is learned with the full trace, then both traces are zero; the
    bootstrap flag decides whether v(s') enters delta."""
    agent = tiny_agent(ac, True)
    opt_pi, opt_v = optimizers(ac, agent)
    obs, next_obs, action = torch.ones(1, 3).double(), -torch.ones(1, 3).double(), torch.zeros(1, 2).double()
    one_update(ac, agent, opt_pi, opt_v, obs, next_obs, action, 1.0)
    decayed = [GAMMA * LAMBDA * z.clone() for z in opt_v.traces]
    before = [p.detach().clone() for p in agent.critic.parameters()]
    with torch.no_grad():
        v_s, v_next = agent.critic(obs).item(), agent.critic(next_obs).item()
    g = torch.autograd.grad(agent.critic(obs).sum(), list(agent.critic.parameters()))
    delta, _, _, _, step_v = one_update(ac, agent, opt_pi, opt_v, obs, next_obs, action, 1.0, bootstrap=False,
                                        done=True)
    assert delta == pytest.approx(1.0 - v_s)  # no bootstrap
    for p, q, z, gi in zip(agent.critic.parameters(), before, decayed, g):  # the full trace was used
        torch.testing.assert_close(p.detach(), q + step_v * delta * (z + gi))
    assert all(not z.any() for z in opt_pi.traces + opt_v.traces)
    opt_pi2, opt_v2 = optimizers(ac, agent)
    with torch.no_grad():
        v_s, v_next = agent.critic(obs).item(), agent.critic(next_obs).item()
    delta = one_update(ac, agent, opt_pi2, opt_v2, obs, next_obs, action, 1.0, bootstrap=True, done=True)[0]
    assert delta == pytest.approx(1.0 + GAMMA * v_next - v_s)


def record_updates(ac, monkeypatch):
    """Wrap stream_ac_update: record (bootstrap, done, traces all zero afterwards) of every call."""
    calls, real = [], ac.stream_ac_update

    def wrapped(actor_params, critic, opt_policy, opt_value, *rest):
        out = real(actor_params, critic, opt_policy, opt_value, *rest)
        bootstrap, done = rest[5], rest[6]
        calls.append((bootstrap, done, all(not z.any() for z in opt_policy.traces + opt_value.traces)))
        return out

    monkeypatch.setattr(ac, "stream_ac_update", wrapped)
    return calls


@pytest.mark.parametrize("bootstraps", [True, False])
def test_truncations_in_a_run(ac, tmp_path, monkeypatch, bootstraps):
    """Pendulum-v1 only truncates (every 20 steps here): every episode's last update resets the traces and, by
    default, still bootstraps; --no-truncation-bootstraps cuts it. The auto-reset step is never learned from."""
    calls = record_updates(ac, monkeypatch)
    run_dir = run_in_process(ac, tmp_path, "run", "Pendulum-v1", dict(SMOKE, metrics_every=0),
                             total_timesteps=105, max_episode_steps=20, truncation_bootstraps=bootstraps)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["num_episodes"] == 5 and summary["num_updates"] == 105 - 5 == len(calls)  # 5 pseudo-steps
    done = [c[1] for c in calls]
    assert done == [(k + 1) % 20 == 0 for k in range(100)]
    assert [c[0] for c in calls] == [bootstraps or not d for d in done]
    assert [c[2] for c in calls] == done  # traces zero exactly after the episodes' last updates


def test_unclipped_log_prob_clipped_env_action(ac, tmp_path, monkeypatch):
    """The actor's log pi is of the sample itself (far outside the bounds here); the env gets it clipped."""
    sampled, scored, stepped = [], [], []
    real_sample, real_terms, real_make = ac.sample_action, ac.policy_terms, ac.make_env

    def sample(out):
        a = real_sample(out) + 5.0 * torch.tensor([1.0, -1.0, 1.0])
        sampled.append(a.clone())
        return a

    def terms(out, actions):
        scored.append(actions.clone())
        return real_terms(out, actions)

    def make(*a, **k):
        env = real_make(*a, **k)
        real_step = env.step

        def step(action):
            stepped.append(np.array(action))
            return real_step(action)

        env.step = step
        return env

    monkeypatch.setattr(ac, "sample_action", sample)
    monkeypatch.setattr(ac, "policy_terms", terms)
    monkeypatch.setattr(ac, "make_env", make)
    run_in_process(ac, tmp_path, "run", "Hopper-v4", dict(SMOKE, metrics_every=0, eval_episodes=0),
                   total_timesteps=20)
    assert len(sampled) >= 10 and len(scored) == len(sampled)
    for a, scored_a in zip(sampled, scored):
        assert torch.equal(a, scored_a)
    learned = [s for s in stepped if np.abs(s).max() > 0]  # auto-reset steps get zeros
    assert len(learned) == len(sampled)
    for a, env_a in zip(sampled, learned):
        assert np.abs(a.numpy()).max() > 1.0
        np.testing.assert_array_equal(env_a, np.clip(a.numpy(), -1.0, 1.0))


def test_time_feature_and_normalisation_in_a_run(ac, tmp_path, monkeypatch):
    """Steps k passed to the time feature: 0 at every first observation, 1, 2, ... within an episode; the
    normaliser sees every observation the env returns exactly once (global_step + 1 with the reset's)."""
    ks, real = [], ac.network_input

    def wrapped(normalizer, obs, steps, limit, add_time, update=True):
        if update:
            ks.append(steps)
            assert limit == 500  # CartPole-v1's EnvPool cap
        return real(normalizer, obs, steps, limit, add_time, update)

    monkeypatch.setattr(ac, "network_input", wrapped)
    run_dir = run_in_process(ac, tmp_path, "run", "CartPole-v1", dict(SMOKE, metrics_every=0, eval_episodes=0),
                             total_timesteps=200, save_model=True)
    lengths = [int(line.split(",")[2]) for line in open(os.path.join(run_dir, "episodes.csv")).read().split()[1:]]
    expected = []
    for n in lengths:
        expected += list(range(n + 1))
    assert ks[: len(expected)] == expected and len(lengths) >= 3
    assert all(k == i for i, k in enumerate(ks[len(expected):]))  # the unfinished episode
    stats = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["obs_stats"]
    assert stats["count"] == 201 == len(ks)


def test_time_feature_values(ac):
    """The official AddTimeInfo: -0.5 at the reset and after the first step, then -0.5 + (k - 1) / T."""
    assert [ac.time_feature(k, 4) for k in range(6)] == [-0.5, -0.5, -0.25, 0.0, 0.25, 0.5]
    norm = ac.ObservationNormalizer((2,), enabled=False)
    x = ac.network_input(norm, np.array([[1.0, 2.0]]), 3, 10, True)
    np.testing.assert_allclose(x, [[1.0, 2.0, -0.3]], rtol=1e-6)
    assert ac.network_input(norm, np.array([[1.0, 2.0]]), 3, 10, False).shape == (1, 2)


def test_sparse_init_counts(ac):
    """Every Linear, heads included: exactly ceil(0.9 fan_in) zeros per output unit, biases 0; --no-sparse-init
    keeps PyTorch's dense init."""
    torch.manual_seed(0)
    agent = ac.StreamAC(18, 6, 128, True, True)
    ac.initialize(agent, True, 0.9)
    linears = [m for m in agent.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7  # actor fc1, fc2, mu, std; critic fc1, fc2, v
    for layer in linears:
        fan_in = layer.weight.shape[1]
        zeros = (layer.weight == 0).sum(dim=1)
        assert (zeros == math.ceil(0.9 * fan_in)).all(), (layer, zeros)
        assert layer.weight.abs().max() <= 1 / math.sqrt(fan_in)
        assert not layer.bias.any()
    torch.manual_seed(0)
    dense = ac.StreamAC(18, 6, 128, True, True)
    ac.initialize(dense, False, 0.9)
    assert all((m.weight != 0).all() and m.bias.any() for m in dense.modules() if isinstance(m, torch.nn.Linear))


def test_layer_norm_is_per_sample(ac):
    """The batched critic forward of s and s' is exact: each row equals its own unbatched forward."""
    torch.manual_seed(0)
    critic = ac.Critic(5, 8, True)
    x = torch.randn(2, 5)
    torch.testing.assert_close(critic(x), torch.cat([critic(x[:1]), critic(x[1:])]))


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_determinism_and_diagnostics_change_nothing(ac, tmp_path):
    """Same seed: identical episodes.csv; another seed: different; the diagnostics (every 20 updates) on or off:
    the same run."""
    settings = dict(SMOKE, total_timesteps=800, eval_episodes=0, metrics_every=20)
    a = run_in_process(ac, tmp_path, "a", "CartPole-v1", settings)
    b = run_in_process(ac, tmp_path, "b", "CartPole-v1", settings)
    off = run_in_process(ac, tmp_path, "off", "CartPole-v1", settings, metrics_every=0)
    other = run_in_process(ac, tmp_path, "other", "CartPole-v1", settings, seed=2)
    assert_same_run(a, b, "stream_ac.py with the same seed")
    assert_same_run(a, off, "stream_ac.py --metrics-every 0")
    assert open(os.path.join(a, "episodes.csv")).read() != open(os.path.join(other, "episodes.csv")).read()
    assert any(k.startswith("plasticity/") for k in read_scalars(a))
    assert not any(k.startswith("plasticity/") for k in read_scalars(off))


KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/td_error", "losses/value",
        "losses/entropy", "stream/step_size_policy", "stream/step_size_value", "stream/bound_active_policy",
        "stream/bound_active_value", "plasticity/actor/dormant_tau0.1", "plasticity/critic/grad_inactive_tau0",
        "plasticity/actor/srank", "plasticity/critic/dormant_tau0/fc2"]


@pytest.mark.parametrize("env_id,family", [("Hopper-v4", "mujoco"), ("CheetahRun-v1", "dmc"),
                                           ("CartPole-v1", "classic"), ("Pendulum-v1", "classic")])
def test_smoke(ac, tmp_path, env_id, family):
    run_dir = run_in_process(ac, tmp_path, "run", env_id, SMOKE, max_episode_steps=100)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    config = read_json(os.path.join(run_dir, "config.json"))
    assert summary["status"] == "completed" and summary["num_episodes"] >= 1 and len(summary["eval_returns"]) == 1
    assert config["family"] == family
    assert config["args"]["hidden_size"] == (32 if env_id == "CartPole-v1" else 128)
    scalars = read_scalars(run_dir)
    missing = [k for k in KEYS if k not in scalars]
    assert not missing, missing
    assert all(0 < v <= 1 for _, v in scalars["stream/step_size_value"])


def test_checkpoint_round_trip(ac, tmp_path, capsys):
    """model.pt (safe loading) holds both networks and the observation statistics; --eval-checkpoint restores them
    and plays the same evaluation episodes as the end of the run."""
    run_dir = run_in_process(ac, tmp_path, "run", "Hopper-v4", SMOKE, eval_episodes=2, save_model=True)
    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["script"] == "stream_ac.py" and checkpoint["obs_shape"] == [11] and checkpoint["n_actions"] == 3
    assert any(k.startswith("actor.") for k in checkpoint["model"]) and "critic.net.v.weight" in checkpoint["model"]
    assert checkpoint["obs_stats"]["count"] == 301
    eval_dir = run_in_process(ac, tmp_path, "eval", "Hopper-v4", SMOKE, eval_episodes=2,
                              eval_checkpoint=os.path.join(run_dir, "model.pt"))
    assert read_json(os.path.join(eval_dir, "summary.json"))["eval_returns"] == \
        read_json(os.path.join(run_dir, "summary.json"))["eval_returns"]
    code, lines = call_main(ac, ["--env-id", "Hopper-v4", "--no-layer-norm", "--eval-checkpoint",
                                  os.path.join(run_dir, "model.pt"), "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and len(lines) == 1 and "--layer-norm" in lines[0], lines
    bad = dict(checkpoint, obs_stats={"mean": torch.zeros(3)})
    torch.save(bad, tmp_path / "bad.pt")
    code, lines = call_main(ac, ["--env-id", "Hopper-v4", "--eval-checkpoint", tmp_path / "bad.pt",
                                  "--output-dir", str(tmp_path / "y")], capsys)
    assert code == 2 and len(lines) == 1 and "obs_stats" in lines[0], lines


@pytest.mark.parametrize("flags,fragments", [
    (["--num-envs", "2"], ("--num-envs", "one stream")),
    (["--learning-rate", "0"], ("--learning-rate",)),
    (["--kappa-policy", "-1"], ("--kappa-policy",)),
    (["--kappa-value", "0"], ("--kappa-value",)),
    (["--trace-lambda", "1.5"], ("--trace-lambda",)),
    (["--gamma", "-0.1"], ("--gamma",)),
    (["--sparsity", "1.0"], ("--sparsity",)),
    (["--entropy-coef", "-1"], ("--entropy-coef",)),
    (["--hidden-size", "0"], ("--hidden-size",)),
    (["--env-id", "MinAtar/Breakout"], ("MinAtar/Breakout", "stream_q.py")),
    (["--env-id", "Breakout-v5"], ("Breakout-v5", "stream_q.py")),
])
def test_bad_flags(ac, tmp_path, capsys, flags, fragments):
    code, lines = call_main(ac, ["--env-id", "Hopper-v4", *flags, "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.listdir(tmp_path)  # checked before anything is written


def test_divergence_exits_3(ac, tmp_path, capsys):
    """A non-finite TD error stops the run: status diverged, exit status 3."""
    code, lines = call_main(ac, ["--env-id", "CartPole-v1", "--optimizer", "sgd", "--learning-rate", "1e30",
                                  "--total-timesteps", "300", "--eval-episodes", "0", "--metrics-every", "0",
                                  "--output-dir", str(tmp_path), "--run-name", "r", "--torch-threads", "1"], capsys)
    assert code == 3 and len(lines) == 1 and "non-finite" in lines[0], lines
    assert read_json(os.path.join(tmp_path, "r", "summary.json"))["status"] == "diverged"


def test_task_sequence(ac, tmp_path, monkeypatch):
    """--env-ids A B: both tasks are played, and both optimizers' traces are reset at the switch."""
    resets, real = [], ac.ObGD.reset

    def reset(self):
        resets.append(True)
        real(self)

    monkeypatch.setattr(ac.ObGD, "reset", reset)
    args = ac.Args(env_ids=("WalkerStand-v1", "WalkerWalk-v1"), steps_per_task=120, max_episode_steps=50,
                   eval_episodes=0, metrics_every=0, device="cpu", torch_threads=1, output_dir=str(tmp_path),
                   run_name="seq")
    ac.run(args)
    tasks = [line.split(",")[3] for line in open(tmp_path / "seq" / "episodes.csv").read().split()[1:]]
    assert tasks == ["WalkerStand-v1"] * 2 + ["WalkerWalk-v1"] * 2
    # two optimizers: one reset each at the 4 episode ends (through step) and at the switch
    assert len(resets) == 2 * 4 + 2
