"""algos/dqn_cchain.py: C-CHAIN's churn penalty and its bookkeeping. The penalty against a hand computation (value
and gradient), the lagged copy one update old (against deep copies taken in the run loop), the penalty off at the
first update, its replay batch drawn apart from the training batches, the adaptive lambda against the official
formula (start, window eviction), the Double DQN target by hand, --no-cchain as dqn.py draw for draw, the churn/ and
cchain/ logs, a MinAtar task sequence, and bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (
    assert_same_run, call_main, load_script, read_csv, read_json, read_scalars, run_dqn_smoke, run_in_process,
)


@pytest.fixture(scope="module")
def cchain():
    return load_script("dqn_cchain")


def params_of(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# A tiny CartPole run with one update per environment step, 60 updates, nothing but the updates and the logs.
TINY = dict(total_timesteps=260, learning_starts=200, buffer_size=1000, batch_size=16, replay_ratio=1.0,
            eval_episodes=0, metrics_every=0, log_every=1)


# ---------------------------------------------------------------------------------------------------------------
# The penalty, the lagged copy and lambda, by hand
# ---------------------------------------------------------------------------------------------------------------


def test_penalty_and_its_gradient_by_hand(cchain):
    """L_reg = MSE over batch and actions against the lagged parameters; its gradient is 2 (Q - Q_ref) / N dQ/dtheta
    (N = batch x actions) and none flows into the lagged copy."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    lagged = {"weight": torch.randn(2, 3, requires_grad=True), "bias": torch.randn(2, requires_grad=True)}
    x = torch.randn(5, 3)
    loss = cchain.cchain_reg_loss(net, lagged, x)
    q = x @ net.weight.detach().T + net.bias.detach()
    q_ref = x @ lagged["weight"].detach().T + lagged["bias"].detach()
    n = q.numel()
    expected = sum(float(q[i, a] - q_ref[i, a]) ** 2 for i in range(5) for a in range(2)) / n
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    residual = 2 * (q - q_ref) / n  # dL/dQ, (B, A); Q = x W^T + b
    torch.testing.assert_close(net.weight.grad, residual.T @ x)
    torch.testing.assert_close(net.bias.grad, residual.sum(dim=0))
    assert lagged["weight"].grad is None and lagged["bias"].grad is None
    # the same network against its own parameters: zero penalty, zero gradient
    net.zero_grad()
    own = {k: v.detach().clone() for k, v in net.named_parameters()}
    zero = cchain.cchain_reg_loss(net, own, x)
    zero.backward()
    assert zero.item() == 0.0 and net.weight.grad.abs().max() == 0


def test_churn_metrics_by_hand(cchain):
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 3)
    lagged = {"weight": net.weight.detach() + 0.3 * torch.randn(3, 4), "bias": net.bias.detach().clone()}
    x = torch.randn(64, 4)
    q, q_ref = net(x).detach(), x @ lagged["weight"].T + lagged["bias"]
    got = cchain.churn_metrics(net, lagged, x)
    assert got["churn/q_abs"] == pytest.approx((q - q_ref).abs().mean().item(), rel=1e-6)
    assert got["churn/q_mse"] == pytest.approx(((q - q_ref) ** 2).mean().item(), rel=1e-6)
    changed = [int(q[i].argmax() != q_ref[i].argmax()) for i in range(64)]
    assert got["churn/greedy_change"] == pytest.approx(sum(changed) / 64)
    assert 0 < sum(changed) < 64  # the check is not vacuous


def official_lambdas(td, reg, init, beta, start, window):
    """The official rule written out with lists (crl_minatar/agents/double_dqn_c_chain.py): after update u (counted
    from 1) append |td| and, when the update had a penalty, reg; from u >= start on, lambda = beta *
    mean|td|[-window:] / (mean reg[-window:] + 1e-8). With start < 2 the official code would average an empty list
    of penalties at update 1 (NaN); lambda is kept there instead (docs/dqn_cchain.md, detail 4)."""
    td_list, reg_list, value, out = [], [], init, []
    for u, (t, r) in enumerate(zip(td, reg), start=1):
        td_list.append(abs(t))
        if r is not None:
            reg_list.append(r)
        if u >= start and reg_list:
            value = beta * np.mean(td_list[-window:]) / (np.mean(reg_list[-window:]) + 1e-8)
        out.append(value)
    return out


@pytest.mark.parametrize("start, window", [(4, 3), (1, 5), (12, 2), (30, 7)])
def test_lambda_follows_the_official_rule(cchain, start, window):
    gen = np.random.default_rng(start)
    td = list(gen.normal(0.0, 2.0, 40))  # signed: the rule averages |td|
    reg = [None] + list(gen.exponential(0.01, 39))  # no penalty at the first update
    coef = cchain.CChainLambda(50.0, 0.01, start, window)
    got = [coef.record(u, t, r) for u, (t, r) in enumerate(zip(td, reg), start=1)]
    assert got == pytest.approx(official_lambdas(td, reg, 50.0, 0.01, start, window), rel=1e-12)
    first = max(start, 2)  # the first update whose lambda is adapted
    assert got[: first - 1] == [50.0] * (first - 1) and all(v != 50.0 for v in got[first - 1:])
    u = first  # by hand, at the first adapted update
    assert got[u - 1] == pytest.approx(0.01 * np.mean(np.abs(td[max(0, u - window):u]))
                                           / (np.mean(reg[max(1, u - window):u]) + 1e-8), rel=1e-12)
    # eviction: the window is the last `window` updates, not all of them
    assert coef.td.mean() == pytest.approx(np.mean(np.abs(td[-window:])), rel=1e-12)
    assert coef.reg.mean() == pytest.approx(np.mean(reg[-window:]), rel=1e-12)
    fixed = cchain.CChainLambda(50.0, 0.01, start, window, adapt=False)
    assert [fixed.record(u, t, r) for u, (t, r) in enumerate(zip(td, reg), start=1)] == [50.0] * 40


def test_window_mean_stays_exact_over_many_values(cchain):
    """The running sum is re-summed every `size` values: after values of very different scales it is still the
    window's mean."""
    window = cchain.WindowMean(100)
    values = np.concatenate([np.full(1000, 1e8), np.random.default_rng(0).random(1050)])
    for v in values:
        window.add(float(v))
    assert len(window.values) == 100
    assert window.mean() == pytest.approx(np.mean(values[-100:]), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["mse", "huber"])
def test_double_q_target_by_hand(cchain, loss_type):
    torch.manual_seed(2)
    online = cchain.QNetwork((3,), 4, double_q=True)
    target = cchain.QNetwork((3,), 4)
    gen = torch.Generator().manual_seed(3)
    obs, next_obs = torch.randn(64, 3, generator=gen), torch.randn(64, 3, generator=gen)
    actions = torch.randint(0, 4, (64,), generator=gen)
    returns, discounts = torch.randn(64, generator=gen), torch.rand(64, generator=gen)
    discounts[:5] = 0.0  # terminal transitions
    loss, q_taken = cchain.td_loss(online, target, obs, actions, returns, discounts, next_obs, loss_type)
    with torch.no_grad():
        q_online_next, q_target_next, q_now = online(next_obs), target(next_obs), online(obs)
    per_sample = []
    for i in range(64):
        best = max(range(4), key=lambda a: q_online_next[i, a].item())  # a' from the online network
        y = returns[i].item() + discounts[i].item() * q_target_next[i, best].item()  # valued by the target network
        d = q_now[i, actions[i]].item() - y
        per_sample.append(d * d if loss_type == "mse" else (0.5 * d * d if abs(d) < 1 else abs(d) - 0.5))
    assert loss.item() == pytest.approx(sum(per_sample) / 64, rel=1e-5)
    torch.testing.assert_close(q_taken, q_now.gather(1, actions[:, None]).squeeze(1))
    # not vacuous: the two networks disagree on a' somewhere, so DQN's max target gives another loss
    assert (q_online_next.argmax(1) != q_target_next.argmax(1)).any()
    online.double_q = False
    dqn_loss, _ = cchain.td_loss(online, target, obs, actions, returns, discounts, next_obs, loss_type)
    y = returns + discounts * q_target_next.max(dim=1).values
    expected = F.mse_loss(q_taken, y) if loss_type == "mse" else F.smooth_l1_loss(q_taken, y)
    assert dqn_loss.item() == pytest.approx(expected.item(), rel=1e-6) and dqn_loss.item() != pytest.approx(loss.item())


# ---------------------------------------------------------------------------------------------------------------
# In the run loop
# ---------------------------------------------------------------------------------------------------------------


def test_reference_is_one_update_old_and_off_at_the_first_update(cchain, tmp_path, monkeypatch):
    """Deep copies of the network taken in the loop: the churn logged after update k compares theta_k with the
    lagged copy, which equals theta_(k-1) (theta_0: the seed's fresh network); the penalty of update k (k >= 2) sees
    the network theta_(k-1) and the reference theta_(k-2); update 1 has no penalty."""
    churn_calls, reg_calls = [], []
    churn, reg = cchain.churn_metrics, cchain.cchain_reg_loss

    def churn_spy(q_network, lagged, obs):
        churn_calls.append((params_of(q_network), {k: v.clone() for k, v in lagged.items()}))
        return churn(q_network, lagged, obs)

    def reg_spy(q_network, lagged, obs):
        reg_calls.append((params_of(q_network), {k: v.clone() for k, v in lagged.items()}))
        return reg(q_network, lagged, obs)

    monkeypatch.setattr(cchain, "churn_metrics", churn_spy)
    monkeypatch.setattr(cchain, "cchain_reg_loss", reg_spy)
    run_dir = run_in_process(cchain, tmp_path, "lag", "CartPole-v1", TINY, seed=4)
    updates = read_json(os.path.join(run_dir, "summary.json"))["num_updates"]
    assert updates == 60 and len(churn_calls) == 60  # log_every 1: a churn log after every update
    assert len(reg_calls) == updates - 1  # no penalty at the first update
    torch.manual_seed(4)
    theta = [params_of(cchain.QNetwork((4,), 2))] + [p for p, _ in churn_calls]  # theta_0 .. theta_60
    assert not same_params(theta[0], theta[1])
    for k, (_, lagged) in enumerate(churn_calls, start=1):
        assert same_params(lagged, theta[k - 1]), k
    for k, (current, lagged) in enumerate(reg_calls, start=2):
        assert same_params(current, theta[k - 1]) and same_params(lagged, theta[k - 2]), k


def test_penalty_batches_are_drawn_apart_from_the_training_batches(cchain, tmp_path, monkeypatch):
    """With every action random (epsilon 1), the replay contents do not depend on the network: turning C-CHAIN on
    leaves every training batch as it was; the penalty's batches come from another generator (a third one draws the
    churn batches) and are not the training batch of their update. The first update (no penalty yet) ends with the
    same network and so the same churn either way; the second does not."""
    draws, sample = {}, cchain.ReplayBuffer.sample

    def recorder(name):
        calls = draws[name] = []

        def spy(self, batch_size, rng, *rest):
            out = sample(self, batch_size, rng, *rest)
            calls.append((id(rng), out[0].copy()))
            return out
        return spy

    runs = {}
    for name, on in (("on", True), ("off", False)):
        monkeypatch.setattr(cchain.ReplayBuffer, "sample", recorder(name))
        runs[name] = run_in_process(cchain, tmp_path, name, "CartPole-v1", TINY, seed=5, start_e=1.0, end_e=1.0,
                                    cchain=on)
    streams = {}
    for name, calls in draws.items():
        order = list(dict.fromkeys(rng for rng, _ in calls))  # generators in order of first use
        streams[name] = [[obs for rng, obs in calls if rng == r] for r in order]
    train_on, reg_on, churn_on = streams["on"][0], streams["on"][2], streams["on"][1]
    train_off, churn_off = streams["off"]
    assert len(streams["on"]) == 3 and len(train_on) == 60 and len(reg_on) == 59 and len(churn_on) == 60
    assert all(np.array_equal(a, b) for a, b in zip(train_on, train_off, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(churn_on, churn_off, strict=True))
    assert not any(np.array_equal(reg, train) for reg, train in zip(reg_on, train_on[1:]))
    churn = {name: [v for _, v in read_scalars(run_dir)["churn/q_abs"]] for name, run_dir in runs.items()}
    assert churn["on"][0] == churn["off"][0] and churn["on"][1] != churn["off"][1]


def test_no_cchain_is_dqn_and_logs_churn(cchain, dqn, tmp_path):
    base = run_dqn_smoke(dqn, tmp_path, "dqn", "CartPole-v1")
    off = run_dqn_smoke(cchain, tmp_path, "off", "CartPole-v1", cchain=False)
    assert_same_run(base, off, "dqn_cchain.py --no-cchain")
    on = run_dqn_smoke(cchain, tmp_path, "on", "CartPole-v1")
    scalars = {name: read_scalars(run_dir) for name, run_dir in (("off", off), ("on", on))}
    for name in ("off", "on"):
        steps = [s for s, _ in scalars[name]["losses/td_loss"]]
        for key in ("churn/q_abs", "churn/q_mse", "churn/greedy_change", "cchain/td_loss", "cchain/td_loss_abs"):
            assert [s for s, _ in scalars[name][key]] == steps, (name, key)
        assert all(0 <= v <= 1 for _, v in scalars[name]["churn/greedy_change"])
        assert all(v > 0 for _, v in scalars[name]["churn/q_abs"])  # the network moves every update
    assert "cchain/lambda" not in scalars["off"] and "cchain/reg_loss" not in scalars["off"]
    assert [v for _, v in scalars["on"]["cchain/lambda"]] == [50.0] * len(scalars["on"]["cchain/lambda"])
    assert all(v > 0 for _, v in scalars["on"]["cchain/reg_loss"])
    config = read_json(os.path.join(on, "config.json"))["args"]
    assert config["exp_name"] == "dqn_cchain" and config["cchain"] and not config["double_q"]


def test_minatar_task_sequence_adapts_lambda(cchain, tmp_path):
    """SpaceInvaders -> Asterix (padded channels, all 6 actions) with Double DQN: lambda stays at its initial value
    until update `--cchain-adapt-start`, then adapts after every update, across the task switch."""
    run_dir = run_dqn_smoke(cchain, tmp_path, "seq", "MinAtar/Breakout", env_ids=("MinAtar/SpaceInvaders",
                            "MinAtar/Asterix"), total_timesteps=None, steps_per_task=250, double_q=True,
                            cchain_adapt_start=50, cchain_window=30, log_every=10, metrics_every=100)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 300
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["charts/task_index"]] == [250]
    lambdas = {int(u): v for (_, u), (_, v) in zip(scalars["charts/num_updates"], scalars["cchain/lambda"])}
    assert [u for u, v in lambdas.items() if v == 50.0] == [10, 20, 30, 40]
    adapted = [v for u, v in lambdas.items() if u >= 50]
    assert len(adapted) == 26 and all(np.isfinite(v) and v > 0 for v in adapted)
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    assert {row["task"] for row in rows} <= {"MinAtar/SpaceInvaders", "MinAtar/Asterix"}
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["args"]["double_q"] and config["family"] == "minatar" and config["args"]["full_action_space"]


@pytest.mark.parametrize("flags, message", [
    (["--cchain-beta", "-0.1"], "--cchain-beta must be >= 0"),
    (["--cchain-beta", "nan"], "--cchain-beta must be >= 0"),
    (["--cchain-lambda-init", "-1"], "--cchain-lambda-init must be >= 0"),
    (["--cchain-window", "0"], "--cchain-window must be >= 1"),
    (["--cchain-window", "-5"], "--cchain-window must be >= 0"),
    (["--cchain-adapt-start", "-1"], "--cchain-adapt-start must be >= 0"),
])
def test_bad_cchain_flags_are_one_line_errors(cchain, tmp_path, capsys, flags, message):
    code, lines = call_main(cchain, ["--env-id", "CartPole-v1", "--total-timesteps", "1000", "--output-dir",
                                     str(tmp_path), "--run-name", "bad", *flags], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
