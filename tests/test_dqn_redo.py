"""algos/dqn_redo.py: the ReDo recycle on networks with known dormant units (what is redrawn, zeroed and left
alone, in the weights and in Adam's state), the tau = 0 invariance of the Q-values, the conv -> dense outgoing mask
against a brute-force construction, the initializer, and end-to-end runs (period in gradient updates, redo/ logs,
Atari, determinism, bad input)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import (
    assert_one_line_error, assert_seed_determinism, describe, load_script, read_json, read_scalars, run_script,
    script_path,
)

REDO = script_path("dqn_redo")

# family: obs shape, n actions, {layer: units killed (silent on every input)}, {layer: units made weak (a small
# constant activation, score ~0.03: dormant at tau 0.1, not at tau 0)}
CASES = {
    "mlp": ((4,), 2, {"fc1": [0, 5, 17, 50, 119], "fc2": [3, 4, 80]}, {"fc1": [7, 60], "fc2": [10]}),
    "nature_cnn": ((4, 84, 84), 6, {"conv1": [1, 30], "conv2": [0, 7, 8, 63], "conv3": [2, 5, 40],
                                    "fc1": list(range(0, 512, 32))},
                   {"conv2": [20], "conv3": [9, 63], "fc1": [5, 100]}),
}


@pytest.fixture(scope="module")
def redo():
    return load_script("dqn_redo")


def weighted_layers(q_network) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in q_network.net.named_children() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def prepare_units(q_network, obs, killed: dict, weak: dict):
    """Layer by layer: kill the `killed` units (zero incoming weights, bias -1), raise every other unit's bias so it
    is positive on every input of `obs` (so only the killed units are silent), then make the `weak` units output a
    small constant (zero incoming weights, bias 3% of the layer's mean activity)."""
    hidden = set(q_network.hidden_layers())
    x = obs.float() / 255.0 if q_network.pixel else obs.float()
    with torch.no_grad():
        for name, module in q_network.net.named_children():
            if name in hidden:
                dead, small = killed.get(name, []), weak.get(name, [])
                module.weight[dead + small] = 0.0
                module.bias[dead] = -1.0
                pre = module(x)
                low = pre.amin(dim=(0, 2, 3)) if pre.dim() == 4 else pre.amin(dim=0)
                shift = (0.1 - low).clamp_min(0.0)
                shift[dead + small] = 0.0
                module.bias += shift
                post = torch.relu(module(x))
                activity = post.mean(dim=(0, 2, 3)) if post.dim() == 4 else post.mean(dim=0)
                module.bias[small] = 0.03 * activity.mean()
            x = module(x)


def brute_force_scores(q_network, obs) -> dict[str, torch.Tensor]:
    """ReDo's score written out again: mean |ReLU output| per unit over batch (and space) over the layer's mean."""
    _, hidden = q_network(obs, return_hidden=True)
    out = {}
    for name, h in zip(q_network.hidden_layers(), hidden):
        per_unit = torch.stack([h[:, i].abs().mean() for i in range(h.shape[1])])
        out[name] = per_unit / per_unit.mean()
    return out


def brute_force_columns(q_network, obs, prev_name: str, dormant: torch.Tensor, next_layer) -> torch.Tensor:
    """Which inputs of `next_layer` read the units of `prev_name` in `dormant`, found by pushing a tensor whose every
    element holds its own unit's index through the modules between the two layers (ReLU, padding, flatten)."""
    if isinstance(next_layer, torch.nn.Conv2d) or prev_name.startswith("fc"):
        return dormant.clone()  # conv -> conv reads channels on dim 1; dense -> dense reads features
    names = list(dict(q_network.net.named_children()))
    modules = dict(q_network.net.named_children())
    _, hidden = q_network(obs, return_hidden=True)
    shape = hidden[q_network.hidden_layers().index(prev_name)].shape[1:]
    x = torch.arange(shape[0], dtype=torch.float32).view(1, -1, 1, 1).expand(1, *shape).contiguous()
    start = names.index(prev_name) + 1
    for name in names[start:]:
        if modules[name] is next_layer:
            break
        x = modules[name](x)
    unit_of_column = x.flatten().long()
    assert unit_of_column.numel() == next_layer.weight.shape[1]
    return torch.isin(unit_of_column, dormant.nonzero().flatten())


def build(redo, family: str, seed: int = 0):
    """A Q-network with known killed and weak units, a scoring batch, and a fused Adam whose moments are non-zero
    everywhere (so zeroing is visible)."""
    obs_shape, n_actions, killed, weak = CASES[family]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q_network = redo.QNetwork(obs_shape, n_actions)
    if len(obs_shape) == 3:
        obs = ((torch.rand((64, *obs_shape), generator=gen) < 0.05) * 255).to(torch.uint8)
    else:
        obs = 3 * torch.randn((64, *obs_shape), generator=gen)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        optimizer.zero_grad()
        q_network(obs).pow(2).mean().backward()
        optimizer.step()
    prepare_units(q_network, obs, killed, weak)
    with torch.no_grad():
        for state in optimizer.state.values():
            state["exp_avg"].copy_(torch.randn(state["exp_avg"].shape, generator=gen))
            state["exp_avg_sq"].copy_(torch.rand(state["exp_avg_sq"].shape, generator=gen) + 0.1)
    return q_network, optimizer, obs, killed, weak


def snapshot(q_network, optimizer):
    params = {n: p.detach().clone() for n, p in q_network.named_parameters()}
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in q_network.named_parameters()}
    return params, state


def as_index(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------------------
# The recycle on known units
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 0.1])
@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("reset_adam_step", [False, True])
def test_recycle_resets_exactly_the_dormant_units(redo, family, tau, reset_adam_step):
    q_network, optimizer, obs, killed, weak = build(redo, family)
    scores = brute_force_scores(q_network, obs)
    dormant = {name: s <= tau for name, s in scores.items()}
    # preconditions: the killed units are exactly the silent ones; the weak ones are dormant only at tau 0.1
    for name, s in scores.items():
        assert as_index(s == 0) == sorted(killed.get(name, [])), name
        for unit in weak.get(name, []):
            assert 0 < s[unit] < 0.1, (name, unit, s[unit])
    if tau == 0.0:
        assert {n: as_index(m) for n, m in dormant.items()} == {n: sorted(killed.get(n, [])) for n in dormant}
    else:
        for name, units in {**killed, **weak}.items():
            assert dormant[name][units].all(), name
    assert any(m.any() for m in dormant.values()) and not all(m.all() for m in dormant.values())

    params, state = snapshot(q_network, optimizer)
    result = redo.redo_recycle(q_network, optimizer, obs, tau, reset_adam_step=reset_adam_step)
    assert result == {name: (int(m.sum()), m.numel()) for name, m in dormant.items()}

    layers = weighted_layers(q_network)
    names = list(layers)
    assert names[-1] == "q" and "q" not in dormant  # the output layer is never recycled as a unit
    for i, name in enumerate(names):
        layer = layers[name]
        w_old, b_old = params[f"net.{name}.weight"], params[f"net.{name}.bias"]
        w_new, b_new = layer.weight.detach(), layer.bias.detach()
        rows = dormant.get(name, torch.zeros(w_old.shape[0], dtype=torch.bool))
        prev = names[i - 1] if i > 0 else None
        cols = (brute_force_columns(q_network, obs, prev, dormant[prev], layer) if prev
                else torch.zeros(w_old.shape[1], dtype=torch.bool))
        row_mask = rows.view(-1, *[1] * (w_old.dim() - 1)).expand_as(w_old)
        col_mask = cols.view(1, -1, *[1] * (w_old.dim() - 2)).expand_as(w_old)
        touched = row_mask | col_mask
        # outgoing weights of recycled units: zero; everything else not in a recycled row: unchanged
        assert (w_new[col_mask] == 0).all(), name
        assert torch.equal(w_new[~touched], w_old[~touched]), name
        # incoming weights of recycled units: a fresh draw (every entry differs) within the initializer's bound
        fresh = row_mask & ~col_mask
        assert (w_new[fresh] != w_old[fresh]).all(), name
        if fresh.any():
            fan_in, fan_out = w_old[0].numel(), w_old.shape[0] * w_old[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out)) if q_network.pixel else 1 / math.sqrt(fan_in)
            assert w_new[fresh].abs().max() <= bound + 1e-6, name
        # biases of recycled units: zero; others unchanged
        assert (b_new[rows] == 0).all() and torch.equal(b_new[~rows], b_old[~rows]), name
        # Adam: both moments zero exactly on the reset entries, untouched elsewhere
        for key in ("exp_avg", "exp_avg_sq"):
            now, before = optimizer.state[layer.weight][key], state[f"net.{name}.weight"][key]
            assert (now[touched] == 0).all() and torch.equal(now[~touched], before[~touched]), (name, key)
            now, before = optimizer.state[layer.bias][key], state[f"net.{name}.bias"][key]
            assert (now[rows] == 0).all() and torch.equal(now[~rows], before[~rows]), (name, key)
        # the step count: kept by default (optax keeps one global count); restarted per touched tensor on request
        for kind, changed in (("weight", bool(touched.any())), ("bias", bool(rows.any()))):
            step = float(optimizer.state[getattr(layer, kind)]["step"])
            before = float(state[f"net.{name}.{kind}"]["step"])
            assert before == 3.0 and step == (0.0 if reset_adam_step and changed else before), (name, kind)


def test_recycled_network_keeps_training(redo):
    """After a recycle, fused Adam still steps (zeroed moments are valid state) and the recycled rows learn."""
    q_network, optimizer, obs, killed, _ = build(redo, "mlp")
    redo.redo_recycle(q_network, optimizer, obs, 0.0)
    rows = q_network.net.fc1.weight.detach()[killed["fc1"]].clone()
    for _ in range(2):
        optimizer.zero_grad()
        q_network(obs).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in q_network.parameters())
    # a recycled unit is alive again, but its outgoing weights were zero, so its incoming rows get their first
    # gradient only after the outgoing weights moved: the second step changes them
    assert not torch.equal(q_network.net.fc1.weight.detach()[killed["fc1"]], rows)


@pytest.mark.parametrize("family", list(CASES))
def test_fresh_weight_uses_the_networks_own_initializer(redo, family):
    """fresh_weight draws from QNetwork's initializer for every layer: the same uniform bound (xavier_uniform for
    the Nature CNN, kaiming_uniform(a=sqrt(5)) for the MLP) reached by construction and by fresh draws alike."""
    obs_shape, n_actions, _, _ = CASES[family]
    torch.manual_seed(3)
    networks = [redo.QNetwork(obs_shape, n_actions) for _ in range(4 if family == "nature_cnn" else 40)]
    for name, layer in weighted_layers(networks[0]).items():
        built = torch.cat([weighted_layers(n)[name].weight.detach().flatten() for n in networks])
        drawn = torch.cat([redo.fresh_weight(layer, networks[0].pixel).flatten() for _ in networks])
        bound = built.abs().max().item()
        for sample in (built, drawn):
            assert bound * 0.99 <= sample.abs().max().item() <= bound * 1.01, name
            assert sample.abs().mean().item() == pytest.approx(bound / 2, rel=0.05), name  # uniform on [-b, b]


# ---------------------------------------------------------------------------------------------------------------
# tau = 0 leaves the Q-values on the scoring batch unchanged; the conv -> dense mask
# ---------------------------------------------------------------------------------------------------------------


def tiled_columns(dormant, next_layer):
    """The wrong mask for NCHW: the channel mask tiled (right for channels-last flattening)."""
    return dormant.repeat(next_layer.weight.shape[1] // dormant.numel())


def no_columns(dormant, next_layer):
    return torch.zeros(next_layer.weight.shape[1], dtype=torch.bool)


@pytest.mark.parametrize("family", list(CASES))
def test_tau_zero_recycle_leaves_q_values_unchanged(redo, family):
    q_network, optimizer, obs, killed, _ = build(redo, family)
    with torch.no_grad():
        before = q_network(obs).clone()
    params = {n: p.detach().clone() for n, p in q_network.named_parameters()}
    result = redo.redo_recycle(q_network, optimizer, obs, 0.0)
    assert sum(count for count, _ in result.values()) == sum(len(u) for u in killed.values())
    assert any(not torch.equal(p, params[n]) for n, p in q_network.named_parameters())
    with torch.no_grad():
        after = q_network(obs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # most recycled units are alive again on this batch (a fresh draw can still be silent on every input)
    scores = brute_force_scores(q_network, obs)
    alive = torch.cat([scores[name][units] > 0 for name, units in killed.items()])
    assert alive.float().mean() > 0.5


@pytest.mark.parametrize("family, wrong", [("mlp", no_columns), ("nature_cnn", no_columns),
                                           ("nature_cnn", tiled_columns)])
def test_tau_zero_invariance_fails_with_a_wrong_outgoing_mask(redo, family, wrong, monkeypatch):
    """The invariance test above can fail: without zeroed outgoing weights, or with the conv -> dense mask tiled
    instead of repeated element-wise, the Q-values on the scoring batch change."""
    q_network, optimizer, obs, _, _ = build(redo, family)
    with torch.no_grad():
        before = q_network(obs).clone()
    monkeypatch.setattr(redo, "outgoing_columns", wrong)
    redo.redo_recycle(q_network, optimizer, obs, 0.0)
    with torch.no_grad():
        assert (q_network(obs) - before).abs().max() > 1e-3


def test_conv_to_dense_mask_matches_brute_force(redo):
    q_network, _, obs, _, _ = build(redo, "nature_cnn")
    fc1 = q_network.net.fc1
    gen = torch.Generator().manual_seed(7)
    for trial in range(5):
        dormant = torch.rand(64, generator=gen) < 0.2
        dormant[trial] = True  # never empty
        expected = brute_force_columns(q_network, obs, "conv3", dormant, fc1)
        assert expected.sum() == dormant.sum() * 11 * 11  # a channel is read at all 121 positions of its map
        got = redo.outgoing_columns(dormant, fc1)
        assert torch.equal(got, expected)
        assert not torch.equal(tiled_columns(dormant, fc1), expected)  # the channels-last mask would be wrong here
    # conv -> conv and dense -> dense: the mask is the unit mask itself
    dormant = torch.rand(64, generator=gen) < 0.3
    assert torch.equal(redo.outgoing_columns(dormant, q_network.net.conv3), dormant)
    dormant = torch.rand(512, generator=gen) < 0.3
    assert torch.equal(redo.outgoing_columns(dormant, q_network.net.q), dormant)


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


def run_redo(tmp_path, run_name: str, *flags):
    return run_script(REDO, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name, "--device", "cpu"],
                      cwd=str(tmp_path))


def test_cartpole_period_counts_gradient_updates_and_logs_redo(tmp_path):
    # replay ratio 2: update n happens at env step learning_starts + ceil(n / 2), so a period counted in gradient
    # updates (300) recycles at env steps 500 + 150 k; one counted in env steps would recycle every 300 env steps
    proc = run_redo(tmp_path, "rr2", "--env-id", "CartPole-v1", "--total-timesteps", 1500, "--learning-starts", 500,
                    "--buffer-size", 1500, "--batch-size", 32, "--replay-ratio", 2, "--redo-period", 300,
                    "--metrics-every", 300, "--log-every", 100, "--eval-episodes", 2, "--seed", 1)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "rr2")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 2000
    scalars = read_scalars(run_dir)
    expected_steps = [500 + 150 * k for k in range(1, 2000 // 300 + 1)]
    for key in ("redo/recycled_units", "redo/recycled_fraction", "redo/recycled_units/fc1",
                "redo/recycled_units/fc2", "redo/recycled_fraction/fc1", "redo/recycled_fraction/fc2"):
        assert [step for step, _ in scalars[key]] == expected_steps, key
    units = [v for _, v in scalars["redo/recycled_units"]]
    per_layer = [a + b for (_, a), (_, b) in zip(scalars["redo/recycled_units/fc1"], scalars["redo/recycled_units/fc2"])]
    assert units == per_layer and all(v == int(v) and 0 <= v <= 120 + 84 for v in units)
    assert [v / 204 for v in units] == pytest.approx([v for _, v in scalars["redo/recycled_fraction"]])
    assert sum(units) > 0  # at tau 0.1 a fresh CartPole MLP has dormant units
    # the plasticity/ diagnostics are still there, computed at the same updates (before each recycle)
    assert [s for s, _ in scalars["plasticity/dormant_tau0.1"]] == expected_steps
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["redo_tau"], config["redo_period"], config["redo_batch_size"]) == (0.1, 300, 64)
    assert config["redo_reset_adam_step"] is False and config["exp_name"] == "dqn_redo"


def test_atari_smoke_recycles_conv_and_dense_layers(tmp_path):
    proc = run_redo(tmp_path, "atari", "--env-id", "Breakout-v5", "--total-timesteps", 400, "--num-envs", 2,
                    "--learning-starts", 200, "--buffer-size", 2000, "--max-episode-steps", 100,
                    "--eval-episodes", 1, "--metrics-every", 10, "--metrics-batch-size", 64,
                    "--redo-period", 10, "--redo-tau", 0.5)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "atari")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 50
    scalars = read_scalars(run_dir)
    for layer in ("conv1", "conv2", "conv3", "fc1"):
        assert len(scalars[f"redo/recycled_units/{layer}"]) == 5, layer
    assert "redo/recycled_units/q" not in scalars
    # tau 0.5 recycles units of a freshly initialised Nature CNN
    assert sum(v for _, v in scalars["redo/recycled_units"]) > 0


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    assert_seed_determinism(run_redo, tmp_path, "--env-id", "CartPole-v1", "--total-timesteps", 1500,
                            "--learning-starts", 300, "--buffer-size", 1500, "--batch-size", 32, "--replay-ratio", 0.5,
                            "--redo-period", 50, "--eval-episodes", 0, "--metrics-every", 0)


@pytest.mark.parametrize("flags, fragment", [
    (["--redo-tau", "-0.1"], "--redo-tau"),
    (["--redo-tau", "1.5"], "--redo-tau"),
    (["--redo-period", "0"], "--redo-period"),
    (["--redo-batch-size", "0"], "--redo-batch-size"),
])
def test_bad_redo_flags_are_one_line_errors(tmp_path, flags, fragment):
    proc = run_redo(tmp_path, "bad", "--env-id", "CartPole-v1", "--total-timesteps", 1000, *flags)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(os.path.join(str(tmp_path), "bad", "summary.json"))
