"""algos/dqn_reset.py: what a reset changes (exactly the last k weighted layers, to a fresh draw of the network's own
initializer; the others bit-identical or shrunk-and-perturbed by hand computation; Adam state dropped exactly where
specified), the schedule in gradient updates, and end-to-end runs (switched off it is dqn.py; reset counts and
reset/ logs; determinism; bad input)."""

from __future__ import annotations

import math
import os

import pytest
import torch

import helpers
from helpers import (
    assert_one_line_error, describe, load_script, read_json, read_scalars, run_script, script_path,
)

RESET = script_path("dqn_reset")

# family: obs shape, n actions, QNetwork settings, weighted layers input to output
FAMILIES = {
    "mlp": ((4,), 2, {}, ["fc1", "fc2", "q"]),
    "minatar": ((4, 10, 10), 3, {"minatar": True}, ["conv1", "fc1", "q"]),
    "nature_cnn": ((4, 84, 84), 6, {}, ["conv1", "conv2", "conv3", "fc1", "q"]),
}


@pytest.fixture(scope="module")
def reset_module():
    return load_script("dqn_reset")


def trained_network(module, family: str, seed: int = 0):
    """A Q-network after three Adam steps on random data (so every parameter has Adam state), its optimizer and
    copies of both."""
    obs_shape, n_actions, settings, _ = FAMILIES[family]
    torch.manual_seed(seed)
    q_network = module.QNetwork(obs_shape, n_actions, **settings)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3)
    dtype = torch.uint8 if family == "nature_cnn" else torch.float32
    for _ in range(3):
        obs = torch.randint(0, 255, (8, *obs_shape)).to(dtype) if family == "nature_cnn" else torch.rand(8, *obs_shape)
        loss = q_network(obs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = {name: p.detach().clone() for name, p in q_network.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in q_network.named_parameters()}
    return q_network, optimizer, params, state


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("num_layers", [1, 2, "all"])
@pytest.mark.parametrize("shrink", [1.0, 0.8, 0.0])
def test_reset_changes_exactly_the_named_layers(reset_module, family, num_layers, shrink):
    obs_shape, n_actions, settings, weighted = FAMILIES[family]
    k = len(weighted) if num_layers == "all" else num_layers
    q_network, optimizer, before, state_before = trained_network(reset_module, family)
    torch.manual_seed(123)
    fresh = reset_module.QNetwork(obs_shape, n_actions, **settings)
    fresh_params = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    reset = reset_module.reset_network(q_network, fresh, optimizer, k, shrink, "reset-layers")
    assert reset == weighted[len(weighted) - k:]
    for name, param in q_network.named_parameters():
        layer = name.split(".")[1]  # net.<layer>.weight
        old, new = before[name], fresh_params[name]
        if layer in reset:  # a fresh draw: the new network's values, and no Adam state (re-created at the next step)
            assert torch.equal(param, new), name
            assert not torch.equal(param, old), name
            assert param not in optimizer.state or len(optimizer.state[param]) == 0, name
        else:
            if shrink == 1.0:  # untouched, bit for bit
                assert torch.equal(param, old), name
            else:  # shrink * theta + (1 - shrink) * theta_fresh, written out by hand
                expected = torch.tensor(shrink) * old + torch.tensor(1.0 - shrink) * new
                torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
                assert not torch.equal(param, old), name
            for key, value in state_before[name].items():  # the kept layers keep their Adam state exactly
                assert torch.equal(optimizer.state[param][key], value), (name, key)


def test_reset_optimizer_all_drops_every_state_and_adam_restarts_at_step_one(reset_module):
    obs_shape, n_actions, settings, _ = FAMILIES["mlp"]
    q_network, optimizer, before, _ = trained_network(reset_module, "mlp")
    fresh = reset_module.QNetwork(obs_shape, n_actions, **settings)
    reset_module.reset_network(q_network, fresh, optimizer, 1, 0.8, "all")
    assert len(optimizer.state) == 0
    loss = q_network(torch.rand(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for param in q_network.parameters():  # the first step of a fresh Adam: moments from this one gradient
        state = optimizer.state[param]
        assert float(state["step"]) == 1.0
        torch.testing.assert_close(state["exp_avg"], 0.1 * param.grad)
        torch.testing.assert_close(state["exp_avg_sq"], 0.001 * param.grad**2)


def test_reset_layers_start_adam_again_while_kept_layers_continue(reset_module):
    obs_shape, n_actions, settings, _ = FAMILIES["minatar"]
    q_network, optimizer, _, _ = trained_network(reset_module, "minatar")
    fresh = reset_module.QNetwork(obs_shape, n_actions, **settings)
    reset_module.reset_network(q_network, fresh, optimizer, 2, 1.0, "reset-layers")
    loss = q_network(torch.rand(8, *obs_shape)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    steps = {name: float(optimizer.state[p]["step"]) for name, p in q_network.named_parameters()}
    assert steps == {"net.conv1.weight": 4.0, "net.conv1.bias": 4.0, "net.fc1.weight": 1.0, "net.fc1.bias": 1.0,
                     "net.q.weight": 1.0, "net.q.bias": 1.0}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reset_draws_from_the_networks_own_initializer(reset_module, family):
    """The reset layers are QNetwork's initialisation: xavier_uniform with zero bias for the Nature CNN (Dopamine),
    PyTorch's default (weights and biases within 1/sqrt(fan_in)) for the MLP and the MinAtar network."""
    obs_shape, n_actions, settings, weighted = FAMILIES[family]
    q_network, optimizer, _, _ = trained_network(reset_module, family)
    fresh = reset_module.QNetwork(obs_shape, n_actions, **settings)
    reset_module.reset_network(q_network, fresh, optimizer, len(weighted), 1.0, "reset-layers")
    for name, module in q_network.net.named_children():
        if name not in weighted:
            continue
        fan_in = module.weight[0].numel()
        fan_out = module.weight.shape[0] * (module.weight[0, 0].numel() if module.weight.dim() == 4 else 1)
        if family == "nature_cnn":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert torch.all(module.bias == 0), name
        else:
            bound = 1.0 / math.sqrt(fan_in)
            assert module.bias.abs().max() <= bound and module.bias.abs().max() > 0.5 * bound, name
        assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.9 * bound, name


def test_reset_schedule_counts_gradient_updates_and_skips_the_last_period(reset_module):
    due = [u for u in range(1, 101) if reset_module.reset_due(u, 10, 45)]
    assert due == [10, 20, 30]  # 40 would leave 5 updates before the end (planned 45)
    assert [u for u in range(1, 101) if reset_module.reset_due(u, 20, 100)] == [20, 40, 60, 80]
    assert not any(reset_module.reset_due(u, 0, 100) for u in range(1, 101))


SMOKE = {
    "CartPole-v1": dict(total_timesteps=1500, learning_starts=300, buffer_size=1500, batch_size=32, replay_ratio=1.0,
                        eval_episodes=2, log_every=100),
    "MinAtar/Breakout": dict(total_timesteps=700, learning_starts=200, buffer_size=2000, batch_size=32,
                             eval_episodes=1, log_every=100),
}


def run_in_process(module, tmp_path, name: str, env_id: str, **changes) -> str:
    return helpers.run_in_process(module, tmp_path, name, env_id, SMOKE[env_id], **changes)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_reset_period_zero_reproduces_dqn(dqn, reset_module, tmp_path, env_id):
    """Switched off, the script is dqn.py: byte-identical episodes.csv and the same evaluation returns."""
    base = run_in_process(dqn, tmp_path, "dqn", env_id, seed=3, metrics_every=0)
    ours = run_in_process(reset_module, tmp_path, "reset", env_id, seed=3, metrics_every=0, reset_period=0)
    helpers.assert_same_run(base, ours, "dqn_reset.py --reset-period 0")


def test_resets_change_the_run_and_log_counts_and_before_after_diagnostics(dqn, reset_module, tmp_path):
    # replay ratio 1 from env step 300: update u happens at env step 300 + u; 1200 planned updates, period 250:
    # resets after updates 250, 500, 750 (1000 would leave less than a period)
    run_dir = run_in_process(reset_module, tmp_path, "on", "CartPole-v1", seed=3, metrics_every=250, reset_period=250,
                             reset_layers=3)
    base = run_in_process(dqn, tmp_path, "dqn", "CartPole-v1", seed=3, metrics_every=0)
    with open(os.path.join(base, "episodes.csv"), "rb") as a, open(os.path.join(run_dir, "episodes.csv"), "rb") as b:
        assert a.read() != b.read()  # a whole-network reset changes the run
    scalars = read_scalars(run_dir)
    assert scalars["reset/count"] == [(550, 1.0), (800, 2.0), (1050, 3.0)]
    assert read_json(os.path.join(run_dir, "summary.json"))["num_resets"] == 3
    for key in ("plasticity/dormant_tau0.1", "plasticity/param_norm", "plasticity/srank", "plasticity/dormant_tau0/fc1"):
        assert [s for s, _ in scalars[f"reset/before/{key}"]] == [550, 800, 1050], key
        assert [s for s, _ in scalars[f"reset/after/{key}"]] == [550, 800, 1050], key
    # the whole network was redrawn: its parameter norm is the fresh network's, not the trained one's
    before = [v for _, v in scalars["reset/before/plasticity/param_norm"]]
    after = [v for _, v in scalars["reset/after/plasticity/param_norm"]]
    assert all(abs(a - b) > 1e-3 for a, b in zip(after, before))
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["reset_period"], config["reset_layers"], config["reset_shrink"]) == (250, 3, 1.0)
    assert config["reset_target"] is True and config["exp_name"] == "dqn_reset"


def test_minatar_resets_with_shrink_and_perturb_are_deterministic(reset_module, tmp_path):
    flags = dict(seed=4, metrics_every=0, reset_period=100, reset_layers=2, reset_shrink=0.8)
    a = run_in_process(reset_module, tmp_path, "a", "MinAtar/Breakout", **flags)
    b = run_in_process(reset_module, tmp_path, "b", "MinAtar/Breakout", **flags)
    read = lambda d: open(os.path.join(d, "episodes.csv"), "rb").read()  # noqa: E731
    assert read(a) == read(b) and read(a).count(b"\n") > 5
    summaries = [read_json(os.path.join(d, "summary.json")) for d in (a, b)]
    assert summaries[0]["eval_returns"] == summaries[1]["eval_returns"]
    assert all(s["status"] == "completed" and s["num_updates"] == 500 for s in summaries)


@pytest.mark.parametrize("flags, fragment", [
    (["--reset-period", "-1"], "--reset-period"),
    (["--reset-shrink", "1.5"], "--reset-shrink"),
    (["--reset-layers", "4"], "3 weighted layers"),
])
def test_bad_reset_flags_are_one_line_errors(tmp_path, flags, fragment):
    proc = run_script(RESET, ["--env-id", "CartPole-v1", "--total-timesteps", 1000, *flags, "--output-dir",
                              str(tmp_path), "--run-name", "bad", "--device", "cpu"], cwd=str(tmp_path))
    assert_one_line_error(proc, fragment)
