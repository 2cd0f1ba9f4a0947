"""algos/dqn_gap.py: the GAP bottleneck (its parameter count against hand-counted values, the pooled features and
Q-values against a hand computation), the encoder width multiplier (conv channels scale, dense widths do not),
`--bottleneck flatten --encoder-width 1` against dqn.py (the same network, byte-identical episodes.csv on CartPole
and MinAtar), end-to-end runs on MinAtar and Atari, the checkpoint round trip, and bad input.

The end-to-end runs call `run()` in this process (as tests/test_cli.py does) rather than starting a subprocess per
run: the scripts' imports cost ~6 s per process on the 2-core machine. The bad-input tests go through the command
line, so the two flags are also parsed by tyro there."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro

import helpers
from helpers import assert_one_line_error, load_script, read_json, read_scalars, run_script, script_path

GAP = script_path("dqn_gap")

# family: (obs shape, minatar?, encoder output channels at width 1, its H x W, dense width)
NETWORKS = {
    "nature_cnn": ((4, 84, 84), False, 64, 11 * 11, 512),  # 84 -> 21 -> 11 -> 11 with SAME padding
    "minatar": ((4, 10, 10), True, 16, 8 * 8, 128),  # MinAtar/Breakout: 4 channels; 10 -> 8 with a VALID 3x3 conv
}


@pytest.fixture(scope="module")
def gap():
    return load_script("dqn_gap")


@pytest.fixture(scope="module")
def dqn():
    return load_script("dqn")


def build(module, family: str, seed: int = 0, **kw):
    obs_shape, minatar, *_ = NETWORKS[family]
    torch.manual_seed(seed)
    return module.QNetwork(obs_shape, 6, minatar, **kw)


def sample_obs(family: str, n: int = 5, seed: int = 1) -> torch.Tensor:
    obs_shape, minatar, *_ = NETWORKS[family]
    gen = torch.Generator().manual_seed(seed)
    if minatar:
        return (torch.rand((n, *obs_shape), generator=gen) < 0.2).to(torch.uint8)
    return torch.randint(0, 256, (n, *obs_shape), generator=gen, dtype=torch.uint8)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("family", list(NETWORKS))
def test_bottleneck_parameter_count(gap, family, width):
    """Under gap the bottleneck (fc1) has C x dim weights + dim biases, under flatten H x W x C x dim + dim, with
    C the widened channel count; every other layer is the same in both networks."""
    _, _, channels, positions, dim = NETWORKS[family]
    c = channels * width
    pooled = build(gap, family, bottleneck="gap", width=width)
    flat = build(gap, family, bottleneck="flatten", width=width)
    assert n_params(pooled.net.fc1) == c * dim + dim
    assert n_params(flat.net.fc1) == positions * c * dim + dim
    assert tuple(pooled.net.fc1.weight.shape) == (dim, c)
    assert n_params(flat) - n_params(pooled) == (positions - 1) * c * dim  # nothing else differs
    others = {n: p.shape for n, p in pooled.named_parameters() if not n.startswith("net.fc1.")}
    assert others == {n: p.shape for n, p in flat.named_parameters() if not n.startswith("net.fc1.")}


def encoder_by_hand(q_network, obs: torch.Tensor, minatar: bool) -> torch.Tensor:
    """The conv stack written out with torch.nn.functional and the network's own weights: (N, C, H, W) after the
    last ReLU (Nature CNN: TensorFlow SAME padding, extra pixel after; MinAtar: VALID)."""
    x = obs.float() if minatar else obs.float() / 255.0
    convs = [m for m in q_network.net if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        if not minatar:
            size, k, s = x.shape[-1], conv.kernel_size[0], conv.stride[0]
            total = max((-(-size // s) - 1) * s + k - size, 0)
            x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
        x = torch.relu(F.conv2d(x, conv.weight, conv.bias, stride=conv.stride))
    return x


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("family", list(NETWORKS))
def test_pooled_features_and_q_values_match_a_hand_computation(gap, family, width):
    _, minatar, channels, positions, _ = NETWORKS[family]
    q_network = build(gap, family, bottleneck="gap", width=width)
    names = list(dict(q_network.net.named_children()))
    last_act = "act1" if minatar else "act3"
    assert names[names.index(last_act) + 1] == "pool" and "flatten" not in names  # pooled after the last conv ReLU
    obs = sample_obs(family)
    with torch.no_grad():
        encoded = encoder_by_hand(q_network, obs, minatar)
        assert encoded.shape[1:] == (channels * width, *(2 * [int(positions**0.5)]))
        # the mean over H and W, summed position by position in float64 NumPy
        maps = encoded.double().numpy()
        pooled = np.zeros(maps.shape[:2])
        for i in range(maps.shape[2]):
            for j in range(maps.shape[3]):
                pooled += maps[:, :, i, j]
        pooled /= maps.shape[2] * maps.shape[3]
        assert (pooled > 0).any()  # not a trivially zero encoder output
        np.testing.assert_allclose(q_network.net.pool(encoded).double().numpy(), pooled, rtol=1e-5, atol=1e-7)
        # the dense head applied to the pooled features
        fc1, q = q_network.net.fc1, q_network.net.q
        hidden = np.maximum(pooled @ fc1.weight.double().numpy().T + fc1.bias.double().numpy(), 0.0)
        expected = hidden @ q.weight.double().numpy().T + q.bias.double().numpy()
        q_values, activations = q_network(obs, return_hidden=True)
    np.testing.assert_allclose(q_values.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    # forward(return_hidden=True) still returns every ReLU output: the encoder's maps, then fc1's units
    assert len(activations) == len(q_network.hidden_layers())
    np.testing.assert_allclose(activations[-2].numpy(), encoded.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(activations[-1].double().numpy(), hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bottleneck", ["gap", "flatten"])
def test_width_scales_conv_channels_not_dense_layers(gap, bottleneck):
    for width in (1, 2, 3):
        nature = build(gap, "nature_cnn", bottleneck=bottleneck, width=width)
        assert [(m.in_channels, m.out_channels) for m in nature.net if isinstance(m, torch.nn.Conv2d)] == [
            (4, 32 * width), (32 * width, 64 * width), (64 * width, 64 * width)]
        assert nature.net.fc1.out_features == 512 and nature.net.q.in_features == 512
        minatar = build(gap, "minatar", bottleneck=bottleneck, width=width)
        assert (minatar.net.conv1.in_channels, minatar.net.conv1.out_channels) == (4, 16 * width)
        assert minatar.net.fc1.out_features == 128 and minatar.net.q.in_features == 128
        for q_network, layers in ((nature, ["conv1", "conv2", "conv3", "fc1"]), (minatar, ["conv1", "fc1"])):
            assert q_network.hidden_layers() == layers  # what the diagnostics walk is unchanged


@pytest.mark.parametrize("family", list(NETWORKS) + ["mlp"])
def test_flatten_width_one_is_dqns_network(gap, dqn, family):
    """The defaults and `flatten`, width 1 build dqn.py's QNetwork: same modules, same initial weights per seed."""
    obs_shape, minatar = ((4,), False) if family == "mlp" else NETWORKS[family][:2]
    torch.manual_seed(3)
    base = dqn.QNetwork(obs_shape, 6, minatar)
    for kw in ({}, {"bottleneck": "flatten", "width": 1}):
        torch.manual_seed(3)
        ours = gap.QNetwork(obs_shape, 6, minatar, **kw)
        assert [(n, type(m).__name__) for n, m in ours.net.named_children()] == [
            (n, type(m).__name__) for n, m in base.net.named_children()]
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), base.state_dict().values()))


def test_diagnostics_run_on_the_gap_network(gap):
    """plasticity_metrics walks the pooled network: per-layer keys for every conv layer and fc1, finite values."""
    q_network = build(gap, "minatar", bottleneck="gap", width=2)
    target = build(gap, "minatar", seed=1, bottleneck="gap", width=2)
    obs, next_obs = sample_obs("minatar", 32, 1), sample_obs("minatar", 32, 2)
    batch = [obs, torch.randint(0, 6, (32,)), torch.rand(32), torch.full((32,), 0.99), next_obs]
    metrics = gap.plasticity_metrics(q_network, target, batch, "huber")
    for layer in ("conv1", "fc1"):
        assert 0.0 <= metrics[f"plasticity/dormant_tau0.1/{layer}"] <= 1.0
    assert all(np.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def test_flags_parse_and_are_checked(gap):
    args = tyro.cli(gap.Args, args=["--bottleneck", "flatten", "--encoder-width", "3"])
    assert (args.bottleneck, args.encoder_width) == ("flatten", 3)
    assert (gap.Args().bottleneck, gap.Args().encoder_width) == ("gap", 1)
    gap.resolve_args(gap.Args(env_id="CartPole-v1", bottleneck="flatten"))  # a vector task runs as dqn.py
    gap.resolve_args(gap.Args(env_id="MinAtar/Breakout", encoder_width=4))
    for changes in ({"env_id": "CartPole-v1", "bottleneck": "flatten", "encoder_width": 2},
                    {"env_id": "MinAtar/Breakout", "encoder_width": -1}):
        with pytest.raises(gap.UserError):
            gap.resolve_args(gap.Args(**changes))


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "CartPole-v1", "--bottleneck", "gap"], ("CartPole-v1", "no conv encoder", "--bottleneck flatten")),
    (["--env-id", "MinAtar/Breakout", "--encoder-width", "0"], ("--encoder-width must be >= 1",)),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, fragments):
    proc = run_script(GAP, [*flags, "--total-timesteps", 1000, "--output-dir", tmp_path, "--device", "cpu"],
                      cwd=str(tmp_path))
    assert_one_line_error(proc, *fragments)
    assert not any(tmp_path.iterdir())  # it failed before any work


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process)
# ---------------------------------------------------------------------------------------------------------------

run_in_process = helpers.run_dqn_smoke  # the DQN smoke settings (tests/helpers.py, DQN_SMOKE)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_flatten_width_one_reproduces_dqn(dqn, gap, tmp_path, env_id):
    """Switched off, the script is dqn.py: byte-identical episodes.csv and the same evaluation returns."""
    # the diagnostics never change a run (docs/conventions.md, section 6): off, to save time
    base = run_in_process(dqn, tmp_path, "dqn", env_id, seed=3, metrics_every=0)
    ours = run_in_process(gap, tmp_path, "gap", env_id, seed=3, metrics_every=0, bottleneck="flatten", encoder_width=1)
    assert read_json(os.path.join(ours, "summary.json"))["status"] == "completed"
    helpers.assert_same_run(base, ours, "dqn_gap.py --bottleneck flatten --encoder-width 1",
                            keys=("status", "num_updates", "num_episodes", "final_train_return", "eval_returns"))


def test_minatar_gap_run_logs_counts_and_round_trips_its_checkpoint(gap, tmp_path):
    run_dir = run_in_process(gap, tmp_path, "train", "MinAtar/Breakout", encoder_width=2, save_model=True,
                             metrics_every=50)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 200
    c, dim = 16 * 2, 128
    assert summary["bottleneck_params"] == c * dim + dim
    assert summary["params"] == (4 * 9 * c + c) + (c * dim + dim) + (dim * 6 + 6)  # Breakout: 4 channels, 6 actions
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["bottleneck"], config["encoder_width"], config["exp_name"]) == ("gap", 2, "dqn_gap")
    scalars = read_scalars(run_dir)
    assert scalars["gap/params"] == [(0, summary["params"])]
    assert scalars["gap/bottleneck_params"] == [(0, summary["bottleneck_params"])]
    assert "plasticity/dormant_tau0.1/conv1" in scalars and "plasticity/srank" in scalars

    model = os.path.join(run_dir, "model.pt")
    checkpoint = torch.load(model, weights_only=True)
    assert (checkpoint["args"]["bottleneck"], checkpoint["args"]["encoder_width"]) == ("gap", 2)
    assert tuple(checkpoint["model"]["net.fc1.weight"].shape) == (dim, c)
    # evaluated with the same flags, it is the network the run evaluated: the same returns for the same seed
    evaluated = run_in_process(gap, tmp_path, "eval", "MinAtar/Breakout", encoder_width=2, eval_checkpoint=model)
    eval_summary = read_json(os.path.join(evaluated, "summary.json"))
    assert eval_summary["status"] == "completed" and eval_summary["num_updates"] == 0
    assert eval_summary["eval_returns"] == summary["eval_returns"]
    # another bottleneck or width would not hold these weights: refused with the checkpoint's flags in the message
    for changes in ({"encoder_width": 1}, {"encoder_width": 2, "bottleneck": "flatten"}):
        with pytest.raises(gap.UserError, match="--bottleneck gap --encoder-width 2"):
            run_in_process(gap, tmp_path, "mismatch", "MinAtar/Breakout", eval_checkpoint=model, **changes)


def test_atari_gap_smoke(gap, tmp_path):
    run_dir = run_in_process(gap, tmp_path, "atari", "Breakout-v5")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 50
    assert summary["bottleneck_params"] == 64 * 512 + 512
