"""The plasticity/ diagnostics (dqn.plasticity_metrics, unit_scores, srank) on networks with known dead units and
features of known rank."""

from __future__ import annotations

import os

import pytest
import torch


def kill_units(layer: torch.nn.Module, units: list[int]):
    """Make `units` (rows of a Linear, output channels of a Conv2d) output exactly 0 after the ReLU for every input:
    zero incoming weights and bias -1."""
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = -1.0


def keep_alive(q_network, obs, killed: dict):
    """Raise the bias of every other hidden unit so it is positive on every input of `obs` (random init leaves some
    units silent on a given batch; this makes the killed units the only silent ones)."""
    hidden = set(q_network.hidden_layers())
    x = obs.float() / 255.0 if q_network.pixel else obs.float()
    with torch.no_grad():
        for name, module in q_network.net.named_children():
            if name in hidden:
                pre = module(x)
                low = pre.amin(dim=(0, 2, 3)) if pre.dim() == 4 else pre.amin(dim=0)
                shift = (0.1 - low).clamp_min(0.0)
                shift[killed.get(name, [])] = 0.0
                module.bias += shift
            x = module(x)


def make_batch(obs, n_actions: int, gen: torch.Generator):
    batch_size = obs.shape[0]
    actions = torch.randint(0, n_actions, (batch_size,), generator=gen)
    returns = torch.randn(batch_size, generator=gen)
    discounts = torch.full((batch_size,), 0.99)
    next_obs = obs[torch.randperm(batch_size, generator=gen)]
    return obs, actions, returns, discounts, next_obs


def unit_activity(q_network, obs):
    """Per hidden layer: (mean |ReLU output| per unit, mean |gradient w.r.t. the pre-activation| per unit)."""
    _, hidden = q_network(obs, return_hidden=True)
    return [h.detach().abs().mean(dim=(0, 2, 3) if h.dim() == 4 else 0) for h in hidden]


CASES = {
    # obs shape, n actions, {layer: killed units}, total hidden units
    "mlp": ((4,), 2, {"fc1": [0, 5, 17, 50, 119], "fc2": [3, 4, 80]}, 120 + 84),
    "nature_cnn": ((4, 84, 84), 6, {"conv1": [1, 30], "conv2": [0, 7, 8, 63], "fc1": list(range(0, 512, 32))},
                   32 + 64 + 64 + 512),
}


@pytest.fixture(params=list(CASES))
def killed_network(request, dqn):
    obs_shape, n_actions, killed, total = CASES[request.param]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    q_network, target_network = dqn.QNetwork(obs_shape, n_actions), dqn.QNetwork(obs_shape, n_actions)
    layers = dict(q_network.net.named_children())
    for name, units in killed.items():
        kill_units(layers[name], units)
    if len(obs_shape) == 3:
        obs = ((torch.rand((64, *obs_shape), generator=gen) < 0.05) * 255).to(torch.uint8)
    else:
        obs = 3 * torch.randn((256, *obs_shape), generator=gen)
    keep_alive(q_network, obs, killed)
    batch = make_batch(obs, n_actions, gen)
    return q_network, target_network, batch, killed, total


def test_dormant_and_gradient_inactive_fractions_are_exact(dqn, killed_network):
    q_network, target_network, batch, killed, total = killed_network
    names = q_network.hidden_layers()
    assert set(killed) <= set(names)
    # precondition: exactly the killed units are silent on this batch (so the expected fractions are exact)
    for name, activity in zip(names, unit_activity(q_network, batch[0])):
        silent = sorted((activity == 0).nonzero().flatten().tolist())
        assert silent == sorted(killed.get(name, [])), f"{name}: silent units {silent}"

    metrics = dqn.plasticity_metrics(q_network, target_network, batch, "mse")
    sizes = {name: h.shape[1] for name, h in zip(names, q_network(batch[0], return_hidden=True)[1])}
    assert sum(sizes.values()) == total
    for name in names:
        expected = len(killed.get(name, [])) / sizes[name]
        assert metrics[f"plasticity/dormant_tau0/{name}"] == pytest.approx(expected, abs=1e-6), name
        # a dead unit passes no gradient; every live unit here does
        assert metrics[f"plasticity/grad_inactive_tau0/{name}"] == pytest.approx(expected, abs=1e-6), name
        # tau 0.1 counts at least the tau-0 units
        assert metrics[f"plasticity/dormant_tau0.1/{name}"] >= expected - 1e-6
    overall = sum(len(u) for u in killed.values()) / total
    assert metrics["plasticity/dormant_tau0"] == pytest.approx(overall, abs=1e-6)
    assert metrics["plasticity/grad_inactive_tau0"] == pytest.approx(overall, abs=1e-6)
    for key in ("srank", "feature_norm", "param_norm", "grad_norm"):
        value = metrics[f"plasticity/{key}"]
        assert value == value and value > 0, key  # finite positive (NaN != NaN)


def test_metrics_do_not_change_the_network(dqn, killed_network):
    q_network, target_network, batch, _, _ = killed_network
    before = {k: v.clone() for k, v in q_network.state_dict().items()}
    dqn.plasticity_metrics(q_network, target_network, batch, "mse")
    assert all(p.grad is None for p in q_network.parameters()), "diagnostics leaked gradients into .grad"
    for k, v in q_network.state_dict().items():
        assert torch.equal(v, before[k]), k


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("rank", [1, 3, 10, 40])
def test_srank_of_equal_singular_values(dqn, rank):
    gen = torch.Generator().manual_seed(rank)
    features = 5.0 * orthonormal(256, rank, gen) @ orthonormal(84, rank, gen).T  # rank singular values, all 5
    assert dqn.srank(features.float()) == rank


def test_srank_ignores_the_last_percent(dqn):
    gen = torch.Generator().manual_seed(0)
    u, v = orthonormal(200, 5, gen), orthonormal(50, 5, gen)
    # singular values 10, 10, 10, 10 and 0.1: the top 4 hold 40 / 40.1 > 99% of the sum, the top 3 only 75%
    features = u @ torch.diag(torch.tensor([10.0, 10.0, 10.0, 10.0, 0.1], dtype=torch.float64)) @ v.T
    assert dqn.srank(features.float()) == 4
    # 1% of the sum is the threshold: a fifth value of 1.0 (1 / 41 > 1%) counts
    features = u @ torch.diag(torch.tensor([10.0, 10.0, 10.0, 10.0, 1.0], dtype=torch.float64)) @ v.T
    assert dqn.srank(features.float()) == 5


def test_unit_scores_normalisation(dqn):
    gen = torch.Generator().manual_seed(0)
    dense = torch.relu(torch.randn(128, 30, generator=gen))
    scores = dqn.unit_scores(dense)
    assert scores.shape == (30,)
    assert scores.mean().item() == pytest.approx(1.0, rel=1e-6)
    expected = dense.abs().mean(0) / dense.abs().mean(0).mean()
    assert torch.allclose(scores, expected, rtol=1e-5)

    # conv: one unit per channel, averaged over batch and space; channel c is constant c + 1, channel 0 is dead
    channels = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand(8, 6, 5, 5).clone()
    scores = dqn.unit_scores(channels)
    assert scores.shape == (6,)
    assert scores.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(scores, torch.arange(6.0) / 2.5, rtol=1e-5)  # mean of 0..5 is 2.5


@pytest.mark.parametrize("script", ["dqn.py", "dqn_redo.py", "sac.py", "sac_simplicial.py", "ppo.py", "ppo_gtr.py"])
def test_diagnostics_do_not_change_the_run(tmp_path, script):
    """The plasticity/ diagnostics draw their batches from their own generator (and SAC's keep torch's RNG state),
    so turning them on or changing their period leaves a run's episodes bit-identical."""
    from helpers import run_script, script_path
    from script_budgets import TINY_ARGS

    args = [a for a in TINY_ARGS[script]]
    i = args.index("--metrics-every")
    del args[i:i + 2]
    outputs = {}
    for every in ("0", "3"):
        proc = run_script(script_path(script), [*args, "--metrics-every", every, "--eval-episodes", "0",
                                                "--output-dir", str(tmp_path), "--run-name", every], cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[every] = open(os.path.join(str(tmp_path), every, "episodes.csv")).read()
    assert outputs["0"].count("\n") > 5
    assert outputs["0"] == outputs["3"]
