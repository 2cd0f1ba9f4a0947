"""algos/stream_q.py (Stream Q(lambda)): ObGD's step against hand computations (the bound engaged and not, the trace
reset after the update, SGD without the bound), sparse initialisation's per-layer zero counts (the official `ceil`),
the Welford normaliser and the reward scaler against direct computations, the time feature's sequence, the update
(target, trace, the three trace cuts, truncation bootstrapping) on a tiny network by hand, epsilon-greedy's
non-greedy flag, and end-to-end runs (MinAtar, CartPole, Atari, ablation flags, determinism, diagnostics that never
change a run, checkpoints with the normaliser's statistics, bad input)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import call_main, load_script, read_csv, read_json, read_scalars, run_in_process

SMOKE = {
    "MinAtar/Breakout": dict(total_timesteps=400, eval_episodes=1, metrics_every=50, metrics_batch_size=64,
                             log_every=50),
    "CartPole-v1": dict(total_timesteps=600, eval_episodes=2, metrics_every=50, metrics_batch_size=64, log_every=50),
    "Breakout-v5": dict(total_timesteps=200, eval_episodes=1, metrics_every=50, metrics_batch_size=32, log_every=50,
                        max_episode_steps=60),
}


@pytest.fixture(scope="module")
def sq():
    return load_script("stream_q")


def smoke(sq, tmp_path, name, env_id, **changes):
    return run_in_process(sq, tmp_path, name, env_id, SMOKE[env_id], **changes)


# --- ObGD ---------------------------------------------------------------------------------------------------------

def test_obgd_step_with_the_bound_engaged_and_not(sq):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = sq.ObGD([w, b], lr=1.0, gamma=0.9, lamda=0.5, kappa=2.0)
    # step 1: z = g = ([0.5, -0.25], [0.25]); ||z||_1 = 1.0; delta 3 -> M = 1 * 2 * 3 * 1.0 = 6 > 1 -> step 1/6
    step = opt.step([torch.tensor([0.5, -0.25]), torch.tensor([0.25])], delta=3.0)
    assert step == pytest.approx(1 / 6)
    torch.testing.assert_close(w.data, torch.tensor([1.0 + 3 / 6 * 0.5, -2.0 - 3 / 6 * 0.25]))
    torch.testing.assert_close(b.data, torch.tensor([0.5 + 3 / 6 * 0.25]))
    # step 2: z = 0.45 * z + g with g tiny; delta 0.5 -> delta_bar = max(|delta|, 1) = 1
    g = [torch.tensor([0.01, 0.0]), torch.tensor([-0.02])]
    z = [0.45 * 0.5 + 0.01, 0.45 * -0.25, 0.45 * 0.25 - 0.02]
    m = 1.0 * 2.0 * 1.0 * sum(abs(v) for v in z)
    assert m < 1  # the bound is not engaged: the full step lr = 1
    w_before, b_before = w.data.clone(), b.data.clone()
    step = opt.step(g, delta=-0.5, reset=True)
    assert step == 1.0
    torch.testing.assert_close(w.data, w_before - 0.5 * torch.tensor(z[:2]))
    torch.testing.assert_close(b.data, b_before - 0.5 * torch.tensor(z[2:]))
    assert all((t == 0).all() for t in opt.traces)  # reset after the update, which still used the full trace
    # a smaller lr: M = 0.1 * 2 * 2 * 1 = 0.4 <= 1, the full step lr
    opt2 = sq.ObGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, gamma=0.99, lamda=0.8, kappa=2.0)
    assert opt2.step([torch.tensor([0.5, 0.5])], delta=2.0) == pytest.approx(0.1)
    torch.testing.assert_close(opt2.params[0].data, torch.tensor([0.1, 0.1]))
    # kappa scales the bound: kappa 8 -> M = 0.1 * 8 * 2 * 1 = 1.6 -> step 0.1 / 1.6
    opt3 = sq.ObGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, gamma=0.99, lamda=0.8, kappa=8.0)
    assert opt3.step([torch.tensor([0.5, 0.5])], delta=2.0) == pytest.approx(0.1 / 1.6)


def test_sgd_ablation_never_bounds_the_step(sq):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = sq.ObGD([p], lr=1.0, gamma=0.99, lamda=0.8, kappa=2.0, bounded=False)
    assert opt.step([torch.tensor([10.0, -10.0, 10.0])], delta=5.0) == 1.0
    torch.testing.assert_close(p.data, torch.tensor([50.0, -50.0, 50.0]))
    opt.step([torch.zeros(3)], delta=1.0)  # the trace decays by gamma * lambda
    torch.testing.assert_close(p.data, torch.tensor([50.0, -50.0, 50.0]) + 0.792 * torch.tensor([10.0, -10.0, 10.0]))


# --- initialisation, normalisation, time feature ----------------------------------------------------------------

def test_sparse_init_zeroes_ceil_of_the_fan_in_per_unit(sq):
    torch.manual_seed(0)
    net = sq.QNetwork((4, 10, 10), 3, 128)  # MinAtar Breakout: conv fan-in 36, dense 1024, 128, head 128
    counts = {name: (m.weight != 0).view(m.weight.shape[0], -1).sum(1) for name, m in net.net.named_children()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    for name, fan_in in (("conv1", 36), ("fc2", 1024), ("q", 128)):
        expected = fan_in - math.ceil(0.9 * fan_in)
        assert counts[name].tolist() == [expected] * len(counts[name]), name
        m = getattr(net.net, name)
        assert m.weight.abs().max() <= 1 / math.sqrt(fan_in) and (m.bias == 0).all()
    # CartPole + the time feature: fan-in 5, ceil(4.5) = 5, the first layer is entirely zero (the official code too)
    vector = sq.QNetwork((5,), 2, 32)
    assert (vector.net.fc1.weight == 0).all() and (vector.net.fc2.weight != 0).sum(1).tolist() == [3] * 32
    dense = sq.QNetwork((5,), 2, 32, sparse_init=False)
    assert (dense.net.fc1.weight != 0).all() and (dense.net.fc1.bias != 0).any()  # PyTorch's default init


def test_layer_norm_is_per_sample_and_parameter_free(sq):
    net = sq.QNetwork((4, 10, 10), 3, 16)
    assert not any("norm" in name for name, _ in net.named_parameters())
    x = torch.randn(3, 4, 10, 10)
    torch.testing.assert_close(net(x), torch.cat([net(x[i : i + 1]) for i in range(3)]))  # batching changes nothing
    conv_out = net.net.norm1(net.net.conv1(x[:1]))  # one sample's whole C x H x W map normalised jointly
    assert conv_out.mean().abs() < 1e-5 and conv_out.var(unbiased=False).sub(1).abs() < 1e-3
    assert conv_out[0, 0].mean().abs() > 1e-3  # not per channel


def test_welford_normaliser_and_reward_scaler_against_direct_computations(sq):
    rng = np.random.default_rng(0)
    xs = rng.normal(3.0, 2.0, (50, 4))
    norm = sq.ObservationNormalizer((4,))
    first = norm(xs[0])
    np.testing.assert_allclose(first, (xs[0] - xs[0]) / np.sqrt(1 + 1e-8), atol=1e-7)  # var is 1 until 2 samples
    for k in range(1, 50):
        out = norm(xs[k])  # statistics updated with x before normalising it
        seen = xs[: k + 1]
        np.testing.assert_allclose(out, (xs[k] - seen.mean(0)) / np.sqrt(seen.var(0, ddof=1) + 1e-8), rtol=1e-5)
    frozen = norm(xs[:3], update=False)
    assert norm.stats.count == 50 and frozen.shape == (3, 4)
    scaler = sq.RewardScaler(gamma=0.9)
    rewards, dones = [1.0, 0.0, 2.0, 1.0, -1.0, 3.0], [False, False, True, False, False, True]
    trace, traces = 0.0, []
    for r, d in zip(rewards, dones):
        trace = trace * 0.9 * (1 - d) + r  # the episode's end restarts the trace at that step's reward
        traces.append(trace)
        got = scaler(r, d)
        var = np.var(traces, ddof=1) if len(traces) > 1 else 1.0
        assert got == pytest.approx(r / math.sqrt(var + 1e-8))
    assert sq.RewardScaler(0.9, enabled=False)(2.5, False) == 2.5


def test_time_feature_matches_the_official_wrapper(sq):
    # AddTimeInfo appends -0.5 at reset and after the first step, then increments by 1 / T after each step
    assert [sq.time_feature(k, 4) for k in range(6)] == [-0.5, -0.5, -0.25, 0.0, 0.25, 0.5]


# --- the update -------------------------------------------------------------------------------------------------

def tiny(sq):
    torch.manual_seed(3)
    net = sq.QNetwork((3,), 2, 4, sparse_init=False)
    return net, sq.ObGD(net.parameters(), lr=1.0, gamma=0.9, lamda=0.5, kappa=2.0)


def test_update_against_a_hand_computation(sq):
    net, opt = tiny(sq)
    s, s2 = torch.tensor([[0.3, -1.0, 0.5]]), torch.tensor([[1.0, 0.2, -0.4]])
    before = [p.detach().clone() for p in net.parameters()]
    q = net(s)[0]
    with torch.no_grad():
        target = 0.7 + 0.9 * net(s2)[0].max().item()
    expected_delta = target - q[1].item()
    grads = torch.autograd.grad(net(s)[0][1], list(net.parameters()))
    delta, step = sq.stream_q_update(net, opt, q, 1, 0.7, 1.0, s2, 0.9, False, False, "official")
    assert delta == pytest.approx(expected_delta, rel=1e-6)
    l1 = sum(g.abs().sum().item() for g in grads)
    bound = 1.0 * 2.0 * max(abs(expected_delta), 1.0) * l1
    assert step == pytest.approx(1.0 / bound if bound > 1 else 1.0, rel=1e-5)
    for p, p0, g, z in zip(net.parameters(), before, grads, opt.traces):
        torch.testing.assert_close(z, g)  # the gradient of the output Q(s, a), not of a loss
        torch.testing.assert_close(p.detach(), p0 + step * expected_delta * g)
    # no bootstrap: the target is the reward alone
    q = net(s)[0]
    delta, _ = sq.stream_q_update(net, opt, q, 0, 0.7, 0.0, s2, 0.9, True, False, "official")
    assert delta == pytest.approx(0.7 - q[0].item(), rel=1e-6)
    assert all((z == 0).all() for z in opt.traces)  # episode end: trace emptied after the update


@pytest.mark.parametrize("cut", ["official", "textbook", "none"])
def test_trace_cuts_on_exploratory_actions(sq, cut):
    net, opt = tiny(sq)
    s, s2 = torch.tensor([[0.3, -1.0, 0.5]]), torch.tensor([[1.0, 0.2, -0.4]])
    sq.stream_q_update(net, opt, net(s)[0], 0, 1.0, 1.0, s2, 0.9, False, False, cut)  # greedy: trace kept
    old = [z.clone() for z in opt.traces]
    assert any((z != 0).any() for z in old)
    grads = torch.autograd.grad(net(s2)[0][1], list(net.parameters()))
    before = [p.detach().clone() for p in net.parameters()]
    delta, step = sq.stream_q_update(net, opt, net(s2)[0], 1, 0.0, 1.0, s, 0.9, False, True, cut)
    used = [g if cut == "textbook" else 0.45 * z + g for z, g in zip(old, grads)]  # the trace the step moved along
    for p, p0, u in zip(net.parameters(), before, used):
        torch.testing.assert_close(p.detach(), p0 + step * delta * u)
    for z, u in zip(opt.traces, used):
        torch.testing.assert_close(z, torch.zeros_like(z) if cut == "official" else u)


def test_epsilon_greedy_flags_only_real_exploration(sq):
    assert sq.epsilon_greedy(2, 4, 0.5, [0.9, 0.1]) == (2, False)  # greedy
    assert sq.epsilon_greedy(2, 4, 0.5, [0.1, 0.1]) == (0, True)  # random, not the greedy action
    assert sq.epsilon_greedy(2, 4, 0.5, [0.1, 0.6]) == (2, False)  # random draw of the greedy action: greedy
    args = sq.Args(total_timesteps=1000, exploration_fraction=0.2)
    assert [sq.epsilon_at(args, t) for t in (0, 100, 200, 900)] == pytest.approx([1.0, 0.505, 0.01, 0.01])


# --- end to end -------------------------------------------------------------------------------------------------

def test_minatar_run_writes_every_output(sq, tmp_path):
    run_dir = smoke(sq, tmp_path, "m", "MinAtar/Breakout", save_model=True)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == 400
    assert summary["num_updates"] == 400 - summary["num_episodes"]  # every step but the auto-reset steps learns
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["family"] == "minatar" and config["args"]["hidden_size"] == 128
    assert config["args"]["exploration_fraction"] == 0.2 and config["args"]["time_feature"] is False
    scalars = read_scalars(run_dir)
    for key in ("losses/td_error", "stream/step_size", "stream/bound_active", "charts/epsilon",
                "plasticity/dormant_tau0", "plasticity/grad_inactive_tau0.1", "plasticity/srank", "eval/episodic_return"):
        assert key in scalars, key
    assert all(0 < v <= 1.0 for _, v in scalars["stream/step_size"])
    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["obs_stats"]["count"] == 400 + 1  # every observation the env returned, the first one included
    # the checkpoint evaluates to the run's own final evaluation: same network, same frozen statistics, same seed
    again = run_in_process(sq, tmp_path, "e", "MinAtar/Breakout", SMOKE["MinAtar/Breakout"],
                           eval_checkpoint=os.path.join(run_dir, "model.pt"))
    assert read_json(os.path.join(again, "summary.json"))["eval_returns"] == summary["eval_returns"]


def test_cartpole_runs_are_deterministic_and_diagnostics_change_nothing(sq, tmp_path):
    a = smoke(sq, tmp_path, "a", "CartPole-v1", max_episode_steps=30)
    b = smoke(sq, tmp_path, "b", "CartPole-v1", max_episode_steps=30)
    c = smoke(sq, tmp_path, "c", "CartPole-v1", max_episode_steps=30, metrics_every=0, log_every=7)
    rows = read_csv(os.path.join(a, "episodes.csv"))[1]
    assert len(rows) > 10
    assert rows == read_csv(os.path.join(b, "episodes.csv"))[1] == read_csv(os.path.join(c, "episodes.csv"))[1]
    assert read_json(os.path.join(a, "config.json"))["args"]["time_feature"] is True


def test_truncation_bootstraps_unless_told_not_to(sq, tmp_path):
    # CartPole capped at 5 steps: every episode is truncated; bootstrapping or not changes what is learned
    on = smoke(sq, tmp_path, "on", "CartPole-v1", max_episode_steps=5, metrics_every=0)
    off = smoke(sq, tmp_path, "off", "CartPole-v1", max_episode_steps=5, metrics_every=0, truncation_bootstraps=False)
    q_on, q_off = (dict(read_scalars(d)["losses/q_values"]) for d in (on, off))
    assert q_on != q_off
    lengths = [int(row["episodic_length"]) for row in read_csv(os.path.join(on, "episodes.csv"))[1]]
    assert set(lengths) <= {1, 2, 3, 4, 5} and lengths.count(5) > 10


def test_atari_and_the_ablations_run(sq, tmp_path):
    run_dir = smoke(sq, tmp_path, "atari", "Breakout-v5")
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["args"]["hidden_size"] == 256 and config["args"]["sticky_action_prob"] == 0.0
    assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "completed"
    ablated = smoke(sq, tmp_path, "abl", "MinAtar/Breakout", optimizer="sgd", learning_rate=1e-3, layer_norm=False,
                    sparse_init=False, normalize_observations=False, scale_rewards=False, trace_cut="textbook")
    assert dict(read_scalars(ablated)["stream/step_size"]) and all(
        v == pytest.approx(1e-3) for _, v in read_scalars(ablated)["stream/step_size"])


def test_task_sequence(sq, tmp_path):
    run_dir = run_in_process(sq, tmp_path, "seq", "MinAtar/Breakout", dict(eval_episodes=1, metrics_every=0),
                             env_ids=("MinAtar/Breakout", "MinAtar/SpaceInvaders"), steps_per_task=200)
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["args"]["full_action_space"] is True
    assert {row["task"] for row in read_csv(os.path.join(run_dir, "episodes.csv"))[1]} <= set(config["tasks"])
    assert read_json(os.path.join(run_dir, "summary.json"))["global_step"] == 400


@pytest.mark.parametrize("argv, fragment", [
    (["--num-envs", "2"], "--num-envs must be 1"),
    (["--env-id", "Pendulum-v1"], "discrete"),
    (["--time-feature", "True"], "--time-feature"),
    (["--sparsity", "1.0"], "--sparsity"),
    (["--trace-lambda", "1.5"], "--trace-lambda"),
    (["--kappa", "0"], "--kappa"),
])
def test_bad_input_is_one_line(sq, tmp_path, capsys, argv, fragment):
    code, lines = call_main(sq, [*argv, "--output-dir", str(tmp_path), "--total-timesteps", "10"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
