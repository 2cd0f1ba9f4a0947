"""algos/dqn_softmoe.py: the Soft MoE layer against a hand-written reference (both softmax axes), permutation and
batch properties, Top-1 capacity and token dropping, the tokenisations' shapes, the experts' one-column-per-unit
layout, the Impala encoder (SAME max-pool windows, residual blocks), parameter counts of every arm against hand
counts, `--moe-type none` against dqn.py (the same network, byte-identical episodes.csv on CartPole and MinAtar),
MinAtar smoke runs of softmoe and top1 that log the moe/ keys, and bad input.

End-to-end runs call `run()` in this process (see tests/test_dqn_gap.py); only the bad-input tests start the
script, so that tyro parses the flags and the error reaches stderr as one line."""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import tyro

import helpers
from helpers import assert_one_line_error, load_script, read_json, read_scalars, run_script, script_path

SOFTMOE = script_path("dqn_softmoe")
MINATAR_OBS, NATURE_OBS = (4, 10, 10), (4, 84, 84)  # MinAtar/Breakout has 4 channels


@pytest.fixture(scope="module")
def moe():
    return load_script("dqn_softmoe")


@pytest.fixture(scope="module")
def dqn():
    return load_script("dqn")


def layer(module, moe_type: str, d: int = 3, experts: int = 2, m: int = 5, hidden: int = 4, seed: int = 0,
          capacity: float = 1.0):
    """The MoE part of the network alone (router, experts, combine) for m tokens of size d."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(d, d, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1, 1),
                              torch.nn.ReLU(), torch.nn.Linear(1, 2))
    net = torch.nn.Sequential(OrderedDict(zip(["conv1", "act1", "flatten", "fc1", "act2", "q"], net)))
    full = module.softmoe_layers(net, (d, 1, m), False, moe_type, experts, "per-conv", hidden, capacity, False, 3, 4)
    names = ["router", "experts_fc1", "experts_act", "experts_fc2", "combine"]
    return torch.nn.Sequential(*[full._modules[n] for n in names])


def expert_weights(moe_layer, e: int, experts: int):
    """Expert e's two dense layers out of MoEExpertsIn/Out, as float64 numpy (W1 (h, d), b1, W2 (d, h), b2): rows of
    the first layer's weight, columns of the second's."""
    fc1, fc2 = moe_layer[1], moe_layer[3]
    h, d = fc1.out_features // experts, fc1.in_features
    w1, b1 = fc1.weight[e * h:(e + 1) * h], fc1.bias[e * h:(e + 1) * h]
    w2, b2 = fc2.weight[:, e * h:(e + 1) * h], fc2.bias[e * d:(e + 1) * d]
    return [t.detach().double().numpy() for t in (w1, b1, w2, b2)]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------


def test_softmoe_matches_a_hand_written_reference(moe):
    d, experts, m, hidden = 3, 2, 5, 4
    slots = math.ceil(m / experts)  # 3
    soft = layer(moe, "softmoe", d, experts, m, hidden)
    phi = soft[0].phi.detach().double().numpy()
    assert phi.shape == (d, experts, slots)
    x = torch.randn(2, m, d, generator=torch.Generator().manual_seed(4))
    X = x.double().numpy()
    expected = np.zeros((2, m, d))
    for b in range(2):  # explicit loops, float64
        logits = np.zeros((m, experts, slots))
        for t in range(m):
            for i in range(experts):
                for j in range(slots):
                    logits[t, i, j] = sum(X[b, t, k] * phi[k, i, j] for k in range(d))
        dispatch = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)  # over tokens, per slot
        combine = np.exp(logits) / np.exp(logits).sum(axis=(1, 2), keepdims=True)  # over all slots, per token
        np.testing.assert_allclose(dispatch.sum(axis=0), 1.0)
        np.testing.assert_allclose(combine.sum(axis=(1, 2)), 1.0)
        outputs = np.zeros((experts, slots, d))
        for i in range(experts):
            w1, b1, w2, b2 = expert_weights(soft, i, experts)
            for j in range(slots):
                slot_in = sum(dispatch[t, i, j] * X[b, t] for t in range(m))
                outputs[i, j] = w2 @ np.maximum(w1 @ slot_in + b1, 0.0) + b2
        for t in range(m):
            expected[b, t] = sum(combine[t, i, j] * outputs[i, j] for i in range(experts) for j in range(slots))
    with torch.no_grad():
        got = soft(x)
        dispatch, combine, _ = soft[0].weights(x)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, experts, slots))  # columns: over the tokens
    torch.testing.assert_close(combine.sum(dim=(2, 3)), torch.ones(2, m))  # rows: over all slots


def test_permuting_tokens_permutes_outputs_and_leaves_slots_alone(moe):
    """Dispatch sums over tokens, so the slots do not see the token order; combine is per token, so the output
    tokens permute with the input tokens (equivariance). The Q head reads the flattened tokens by position, so the
    Q-values are not invariant; with one token (per-sample) there is nothing to permute."""
    soft = layer(moe, "softmoe", m=6)
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(5))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        slots, slots_perm = soft[0](x), soft[0](x[:, perm])
        soft[0].shared.clear()
        torch.testing.assert_close(slots_perm, slots)
        torch.testing.assert_close(soft(x[:, perm]), soft(x)[:, perm])


@pytest.mark.parametrize("moe_type", ["softmoe", "top1"])
def test_no_mixing_across_the_batch(moe, moe_type):
    """Tokens are routed within one example: changing the other examples changes nothing in example 0's Q-values."""
    torch.manual_seed(0)
    q = moe.QNetwork(MINATAR_OBS, 6, True, moe_type=moe_type, num_experts=4, expert_hidden=8)
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand((5, *MINATAR_OBS), generator=gen) < 0.3).to(torch.uint8)
    b = a.clone()
    b[1:] = (torch.rand((4, *MINATAR_OBS), generator=gen) < 0.3).to(torch.uint8)
    with torch.no_grad():
        qa, qb, alone = q(a), q(b), q(a[:1])
    assert not torch.allclose(qa[1:], qb[1:])
    torch.testing.assert_close(qb[0], qa[0])
    torch.testing.assert_close(alone[0], qa[0])


def test_top1_capacity_keeps_the_first_tokens_and_drops_the_rest(moe):
    """Every token prefers expert 0: capacity ceil(5 / 2) = 3, so tokens 0-2 go to its 3 slots in token order and
    tokens 3-4 are dropped (output 0); the kept outputs are the expert's output times the token's gate."""
    d, experts, m = 3, 2, 5
    top = layer(moe, "top1", d, experts, m)
    with torch.no_grad():
        top[0].router.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
    x = torch.rand(1, m, d, generator=torch.Generator().manual_seed(2)) + 0.1  # positive: expert 0 wins
    with torch.no_grad():
        dispatch, combine, probs = top[0].weights(x)
        out = top(x)
    assert dispatch.shape == (1, m, experts, 3)
    assert dispatch[0, :, 0].argmax(dim=-1)[:3].tolist() == [0, 1, 2] and dispatch[0, 3:].sum() == 0
    assert dispatch[0, :, 1].sum() == 0  # expert 1's slots stay empty (zero inputs, outputs unused)
    torch.testing.assert_close(out[0, 3:], torch.zeros(2, d))
    w1, b1, w2, b2 = expert_weights(top, 0, experts)
    X, gate = x[0].double().numpy(), probs[0, :, 0].double().numpy()
    for t in range(3):
        expected = gate[t] * (w2 @ np.maximum(w1 @ X[t] + b1, 0.0) + b2)
        np.testing.assert_allclose(out[0, t].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # a larger capacity keeps every token; a token whose rank reaches the capacity is dropped, not moved
    wide = layer(moe, "top1", d, experts, m, capacity=2.0)
    with torch.no_grad():
        wide[0].router.weight.copy_(top[0].router.weight)
        assert wide[0].weights(x)[0].sum() == m


def test_tokenisations_and_slot_counts(moe):
    """Token counts and sizes as the code defines them, slots = ceil(capacity * m / experts)."""
    expected = {"per-conv": (64, 16), "per-feature-map": (16, 64), "per-sample": (1, 1024), "per-patch": (4, 16)}
    for tokenize, (m, d) in expected.items():
        torch.manual_seed(0)
        q = moe.QNetwork(MINATAR_OBS, 6, True, moe_type="softmoe", num_experts=8, tokenize=tokenize, expert_hidden=8)
        names = list(q.net._modules)
        tokens = q.net[: names.index("tokens") + 1](torch.zeros(2, *MINATAR_OBS))
        assert tuple(tokens.shape) == (2, m, d)
        assert tuple(q.net.router.phi.shape) == (d, 8, math.ceil(m / 8))
        assert q.net.q.in_features == m * d  # the head reads the flattened output tokens (networks.py)
    x = torch.arange(2 * 16 * 8 * 8, dtype=torch.float32).view(2, 16, 8, 8)
    per_conv = moe.MoETokens("per-conv")(x)
    assert torch.equal(per_conv[1, 8 * 2 + 5], x[1, :, 2, 5])  # token = position (row-major), features = channels
    assert torch.equal(moe.MoETokens("per-feature-map")(x)[1, 7], x[1, 7].flatten())


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [1, 4, 8])
def test_parameter_counts_by_hand(moe, experts):
    # MinAtar/Breakout: conv 4 -> 16 (3x3), 64 tokens of 16, 6 actions; expert width 128
    conv, h, d, m, a = 4 * 9 * 16 + 16, 128, 16, 64, 6
    build = lambda **kw: moe.QNetwork(MINATAR_OBS, a, True, num_experts=experts, expert_hidden=h, **kw)  # noqa: E731
    slots = math.ceil(m / experts)
    experts_params = experts * (d * h + h + h * d + d)
    assert n_params(build(moe_type="none")) == conv + 1024 * h + h + h * a + a
    assert n_params(build(moe_type="none", scaled_baseline=True)) == conv + 1024 * h * experts + h * experts + (
        h * experts * a + a)
    assert n_params(build(moe_type="softmoe")) == conv + d * experts * slots + experts_params + m * d * a + a
    assert n_params(build(moe_type="top1")) == conv + d * experts + experts_params + m * d * a + a
    # Nature CNN (Atari): 11 x 11 = 121 tokens of 64, expert width 512 (dqn.gin: 8 experts)
    nature = 4 * 64 * 32 + 32 + 32 * 16 * 64 + 64 + 64 * 9 * 64 + 64
    q = moe.QNetwork(NATURE_OBS, a, False, moe_type="softmoe", num_experts=experts, expert_hidden=512)
    assert n_params(q) == nature + 64 * experts * math.ceil(121 / experts) + experts * (
        64 * 512 + 512 + 512 * 64 + 64) + 121 * 64 * a + a


@pytest.mark.parametrize("obs_shape, minatar", [((4,), False), (MINATAR_OBS, True), (NATURE_OBS, False)])
def test_none_is_dqns_network(moe, dqn, obs_shape, minatar):
    torch.manual_seed(3)
    base = dqn.QNetwork(obs_shape, 6, minatar)
    torch.manual_seed(3)
    ours = moe.QNetwork(obs_shape, 6, minatar, moe_type="none", num_experts=4)
    assert [(n, type(m).__name__) for n, m in ours.net.named_children()] == [
        (n, type(m).__name__) for n, m in base.net.named_children()]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), base.state_dict().values()))
    assert torch.equal(torch.randn(3), (torch.manual_seed(3), dqn.QNetwork(obs_shape, 6, minatar), torch.randn(3))[2])


def test_initialisers(moe):
    """Phi: lecun_normal with flax's fans for a (d, experts, slots) kernel (fan_in = experts * d), truncated at two
    std; experts: xavier_uniform per expert (bound sqrt(6 / (d + h))), zero biases."""
    torch.manual_seed(0)
    q = moe.QNetwork(NATURE_OBS, 6, False, moe_type="softmoe", num_experts=8, expert_hidden=512)
    phi = q.net.router.phi.detach()
    std = math.sqrt(1 / (8 * 64))
    assert abs(phi.std().item() - std) < 0.05 * std and phi.abs().max() <= 2 * std / 0.8796 + 1e-6
    w1 = q.net.experts_fc1.weight.detach()
    bound = math.sqrt(6 / (64 + 512))
    assert w1.abs().max() <= bound and w1.abs().max() > 0.95 * bound and q.net.experts_fc1.bias.abs().sum() == 0


def test_diagnostics_and_moe_metrics_on_the_moe_network(moe):
    torch.manual_seed(0)
    q, target = (moe.QNetwork(MINATAR_OBS, 6, True, moe_type="softmoe", num_experts=4, expert_hidden=16)
                 for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    obs, next_obs = ((torch.rand((32, *MINATAR_OBS), generator=gen) < 0.2).to(torch.uint8) for _ in range(2))
    batch = [obs, torch.randint(0, 6, (32,)), torch.rand(32), torch.full((32,), 0.99), next_obs]
    metrics = moe.plasticity_metrics(q, target, batch, "huber")
    assert {"plasticity/dormant_tau0.1/conv1", "plasticity/dormant_tau0.1/experts_fc1"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    state = torch.get_rng_state()
    soft = moe.moe_metrics(q, obs)
    assert torch.equal(torch.get_rng_state(), state)
    assert sum(soft[f"moe/combine_mass/expert{i}"] for i in range(4)) == pytest.approx(1.0)
    assert 0 < soft["moe/dispatch_entropy"] <= 1 and 0 < soft["moe/combine_entropy"] <= 1
    assert {f"moe/dormant_tau0.1/expert{i}" for i in range(4)} <= set(soft)
    top = moe.moe_metrics(moe.QNetwork(MINATAR_OBS, 6, True, moe_type="top1", num_experts=4, expert_hidden=16), obs)
    assert sum(top[f"moe/load/expert{i}"] for i in range(4)) == pytest.approx(1.0)
    assert 0 <= top["moe/dropped_fraction"] < 1 and "moe/router_entropy" in top
    assert moe.moe_metrics(moe.QNetwork(MINATAR_OBS, 6, True), obs) == {}


def test_expert_layers_hold_one_column_per_hidden_unit(moe):
    """MoEExpertsIn/Out lay the experts out as one layer of experts * hidden units (rows of the first weight, columns
    of the second), as ReDo and the diagnostics read a layer: zeroing column e*h + j of experts_fc2 gives exactly the
    output of the network with expert e's hidden unit j forced to 0, and changes nothing else."""
    d, experts, m, hidden = 3, 2, 5, 4
    soft = layer(moe, "softmoe", d, experts, m, hidden)
    x = torch.randn(3, m, d)
    unit = 1 * hidden + 2  # expert 1, unit 2
    with torch.no_grad():
        soft[1].bias.fill_(0.1)  # every hidden unit active somewhere, so the masked unit matters
        original = soft(x)
        masked = soft[:3](x)
        masked[:, unit] = 0.0
        expected = soft[4](soft[3](masked))
        assert not torch.allclose(original, expected)
        soft[3].weight[:, unit] = 0.0
        torch.testing.assert_close(soft(x), expected)
    assert tuple(soft[1].weight.shape) == (experts * hidden, d) and tuple(soft[3].weight.shape) == (d, experts * hidden)
    assert tuple(soft[3].bias.shape) == (experts * d,)  # one output bias per expert


def test_impala_encoder(moe):
    """Dopamine's ImpalaEncoder: 84 -> 42 -> 21 -> 11 with TF 'SAME' max-pools (the extra -inf row and column after:
    the first window covers rows 0-2, not -1..1 as PyTorch's padding=1), x + conv(relu(conv(relu(x)))) blocks, a
    final ReLU; 121 per-conv tokens of 32; hand parameter counts."""
    stack = moe.ImpalaStack(1, 1, 84)
    x = torch.randn(1, 1, 84, 84)
    pooled = stack.pool(x)
    assert tuple(pooled.shape) == (1, 1, 42, 42)
    assert pooled[0, 0, 0, 0] == x[0, 0, :3, :3].max() and pooled[0, 0, 41, 41] == x[0, 0, 82:, 82:].max()
    with torch.no_grad():  # with the blocks' second convs at zero, each block adds nothing: pool(conv(x))
        for block in stack.blocks:
            block[3].weight.zero_()
        torch.testing.assert_close(stack(x), stack.pool(stack.conv(x)))
    torch.manual_seed(0)
    q = moe.QNetwork(NATURE_OBS, 6, False, moe_type="softmoe", num_experts=8, expert_hidden=512, encoder="impala")
    names = list(q.net._modules)
    assert names[0] == "impala" and q.hidden_layers() == ["experts_fc1"]
    tokens = q.net[: names.index("tokens") + 1](torch.zeros(2, *NATURE_OBS))
    assert tuple(tokens.shape) == (2, 121, 32) and tuple(q.net.router.phi.shape) == (32, 8, math.ceil(121 / 8))
    conv = lambda c_in, c_out: c_in * c_out * 9 + c_out  # noqa: E731
    encoder = sum(conv(a, b) + 4 * conv(b, b) for a, b in ((4, 16), (16, 32), (32, 32)))
    assert n_params(q.net.impala) == encoder
    dense = moe.QNetwork(NATURE_OBS, 6, False, moe_type="none", encoder="impala")
    assert n_params(dense) == encoder + (121 * 32 * 512 + 512) + (512 * 6 + 6)  # Dopamine's ImpalaDQNNetwork


# ---------------------------------------------------------------------------------------------------------------
# Flags and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_flags_parse_and_are_checked(moe):
    args = tyro.cli(moe.Args, args=["--moe-type", "top1", "--num-experts", "2", "--tokenize", "per-feature-map"])
    assert (args.moe_type, args.num_experts, args.tokenize) == ("top1", 2, "per-feature-map")
    args = moe.Args(env_id="MinAtar/Breakout")
    moe.resolve_args(args)
    assert (args.expert_hidden, args.patch_embedding) == (128, 16)
    moe.resolve_args(moe.Args(env_id="CartPole-v1", moe_type="none"))
    for changes in ({"moe_type": "softmoe", "scaled_baseline": True}, {"num_experts": 0}, {"capacity_factor": 0.0},
                    {"divide_expert_width": True, "num_experts": 3}, {"tokenize": "per-patch", "patch_size": 9},
                    {"env_id": "CartPole-v1", "moe_type": "none", "scaled_baseline": True}, {"encoder": "impala"}):
        with pytest.raises(moe.UserError):
            moe.resolve_args(moe.Args(**{"env_id": "MinAtar/Breakout", **changes}))


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "MinAtar/Breakout", "--num-experts", "0"], ("--num-experts must be >= 1",)),
    (["--env-id", "CartPole-v1"], ("CartPole-v1", "no conv feature map", "--moe-type none")),
    (["--env-id", "MinAtar/Breakout", "--encoder", "impala"], ("--encoder impala is for Atari", "MinAtar/Breakout")),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, fragments):
    proc = run_script(SOFTMOE, [*flags, "--total-timesteps", 1000, "--output-dir", tmp_path, "--device", "cpu"],
                      cwd=str(tmp_path))
    assert_one_line_error(proc, *fragments)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process)
# ---------------------------------------------------------------------------------------------------------------

run_in_process = helpers.run_dqn_smoke  # the DQN smoke settings (tests/helpers.py, DQN_SMOKE)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_none_reproduces_dqn(dqn, moe, tmp_path, env_id):
    base = run_in_process(dqn, tmp_path, "dqn", env_id, seed=3, metrics_every=0)
    ours = run_in_process(moe, tmp_path, "none", env_id, seed=3, metrics_every=0, moe_type="none")
    helpers.assert_same_run(base, ours, "dqn_softmoe.py --moe-type none")


@pytest.mark.parametrize("moe_type", ["softmoe", "top1"])
def test_minatar_moe_run_logs_moe_keys(moe, tmp_path, moe_type):
    run_dir = run_in_process(moe, tmp_path, moe_type, "MinAtar/Breakout", moe_type=moe_type, num_experts=4,
                             metrics_every=50, save_model=moe_type == "softmoe")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 200
    scalars = read_scalars(run_dir)
    assert scalars["moe/params"] == [(0, summary["params"])]
    keys = ["moe/dormant_tau0/expert3", "plasticity/dormant_tau0.1/experts_fc1", "plasticity/srank"]
    keys += ["moe/combine_entropy", "moe/combine_mass/expert0"] if moe_type == "softmoe" else [
        "moe/dropped_fraction", "moe/load/expert0"]
    for key in keys:
        assert len(scalars[key]) == 4, key
    if moe_type == "softmoe":  # the checkpoint: same flags evaluate it, other network flags are refused
        model = os.path.join(run_dir, "model.pt")
        evaluated = run_in_process(moe, tmp_path, "eval", "MinAtar/Breakout", num_experts=4, eval_checkpoint=model)
        assert read_json(os.path.join(evaluated, "summary.json"))["eval_returns"] == summary["eval_returns"]
        with pytest.raises(moe.UserError, match="--num-experts 4"):
            run_in_process(moe, tmp_path, "mismatch", "MinAtar/Breakout", num_experts=2, eval_checkpoint=model)
