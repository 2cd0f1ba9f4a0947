"""algos/dqn_pruning.py: gradual magnitude pruning. The cubic schedule at given steps against the formula, ERK
densities against a hand computation, jaxpruner's top-k mask (ties, rounding), the pruner's mask updates (which
weights go, per-layer counts, the window, the global ranking), pruned weights and their Adam moments exactly zero
after many optimizer steps, the width multiplier and the Impala encoder, `--sparsity 0` against dqn.py (byte-identical
episodes.csv on CartPole and MinAtar), an end-to-end run with its sparsity/ logs and checkpoint, and bad input.

The end-to-end runs call `run()` in this process (tests/helpers.py, `run_in_process`): the scripts' imports cost ~6 s
per process on the 2-core machine. The bad-input tests go through the command line."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

import helpers
from helpers import assert_one_line_error, load_script, read_json, read_scalars, run_script, script_path

PRUNING = script_path("dqn_pruning")


@pytest.fixture(scope="module")
def pr():
    return load_script("dqn_pruning")


@pytest.fixture(scope="module")
def dqn():
    return load_script("dqn")


def minatar_net(module, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return module.QNetwork((4, 10, 10), 6, True, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Schedule, ERK, top-k
# ---------------------------------------------------------------------------------------------------------------


def test_cubic_schedule_against_the_formula(pr):
    start, end, final = 100, 500, 0.95
    # progress = clip(step + 1 - start, 0, end - start) / (end - start); s = final * (1 - (1 - progress)^3)
    assert pr.gmp_sparsity(0, final, start, end) == 0.0
    assert pr.gmp_sparsity(98, final, start, end) == 0.0
    assert pr.gmp_sparsity(99, final, start, end) == 0.0  # progress 0 at step start - 1
    assert pr.gmp_sparsity(100, final, start, end) == pytest.approx(0.95 * (1 - (399 / 400) ** 3))
    assert pr.gmp_sparsity(199, final, start, end) == pytest.approx(0.95 * (1 - 0.75**3))  # 0.54921875
    assert pr.gmp_sparsity(299, final, start, end) == pytest.approx(0.95 * 0.875)
    assert pr.gmp_sparsity(499, final, start, end) == pytest.approx(0.95)
    assert pr.gmp_sparsity(10**6, final, start, end) == pytest.approx(0.95)
    assert pr.gmp_sparsity(5, 0.9, 7, 7) == pytest.approx(0.9)  # start == end: one-shot, progress 1
    values = [pr.gmp_sparsity(t, final, start, end) for t in range(0, 700, 7)]
    assert values == sorted(values)  # monotone


def test_erk_against_a_hand_computation(pr):
    # the MinAtar network's kernels: conv (16, 4, 3, 3), fc1 (128, 1024), q (6, 128), at sparsity 0.9
    shapes = {"conv1": (16, 4, 3, 3), "fc1": (128, 1024), "q": (6, 128)}
    got = pr.erk_sparsities(shapes, 0.9)
    # first pass: eps = sum(n - floor(0.9 n)) / sum(sum(shape)) = (58 + 13108 + 77) / (26 + 1152 + 134) = 10.094;
    # q's density eps * 134 / 768 = 1.76 > 1: q is made dense. Second pass: the other two keep 58 + 13108 weights,
    # minus the 691 zeros that q would have had: eps = 12475 / (26 + 1152)
    eps = 12475 / 1178
    assert got["q"] == 0.0
    assert got["conv1"] == pytest.approx(1 - eps * 26 / 576)  # 0.52198
    assert got["fc1"] == pytest.approx(1 - eps * 1152 / 131072)  # 0.90693
    kept = sum(math.prod(s) * (1 - got[k]) for k, s in shapes.items())
    assert kept == pytest.approx(sum(math.prod(s) - math.floor(0.9 * math.prod(s)) for s in shapes.values()))
    # no layer made dense: densities eps * sum / prod with eps = (50 + 50) / (20 + 25)
    two = pr.erk_sparsities({"a": (10, 10), "b": (20, 5)}, 0.5)
    assert two["a"] == pytest.approx(1 - 100 / 45 * 20 / 100) and two["b"] == pytest.approx(1 - 100 / 45 * 25 / 100)


def test_topk_mask_keeps_the_largest_with_jaxpruners_ties(pr):
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert pr.topk_mask(scores, 0.4).tolist() == [0, 1, 1, 0, 1]  # keep round(5 * 0.6) = 3
    assert pr.topk_mask(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 0.6).tolist() == [0, 1, 1, 0, 0]  # ties: lower index
    assert pr.topk_mask(scores, 0.5).sum() == 2  # round(2.5) = 2, half to even as jnp.round
    assert pr.topk_mask(scores, 0.99).tolist() == [0, 1, 0, 0, 0]  # at least one kept
    assert pr.topk_mask(scores, 0.0).tolist() == [1] * 5
    assert pr.topk_mask(torch.arange(12.0).view(3, 4), 0.5).view(-1).tolist() == [0] * 6 + [1] * 6


# ---------------------------------------------------------------------------------------------------------------
# The pruner
# ---------------------------------------------------------------------------------------------------------------


def make_pruner(pr, net, distribution="erk", sparsity=0.9, start=10, end=50, every=10):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    return pr.MagnitudePruner(net, optimizer, sparsity, distribution, start, end, every), optimizer


def test_prunable_weights_are_kernels_only(pr):
    net = minatar_net(pr)
    assert list(pr.prunable(net)) == ["net.conv1.weight", "net.fc1.weight", "net.q.weight"]


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_mask_updates_follow_the_window_and_keep_the_largest(pr, distribution):
    net = minatar_net(pr)
    pruner, _ = make_pruner(pr, net, distribution)
    for count in (0, 9, 11, 55, 60):  # outside [10, 50] or not a multiple of 10
        assert not pruner.update_masks(count)
    assert all(bool((m == 1).all()) for m in pruner.masks.values())
    assert pruner.update_masks(30)
    for name, p in pruner.params.items():
        target = pr.gmp_sparsity(30, pruner.targets[name], 10, 50)
        mask = pruner.masks[name]
        assert int(mask.sum()) == max(1, round(p.numel() * (1 - target)))
        kept, dropped = p.abs()[mask == 1], p.abs()[mask == 0]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()  # exactly the largest magnitudes are kept
    assert pruner.target == pytest.approx(pr.gmp_sparsity(30, 0.9, 10, 50))
    if distribution == "uniform":
        assert set(pruner.targets.values()) == {0.9}


def test_global_ranking_uses_l2_normalised_scores(pr):
    net = minatar_net(pr)
    pruner, _ = make_pruner(pr, net, "global")
    assert pruner.update_masks(50)  # the end of the ramp: 90% of all kernels
    names = sorted(pruner.params)
    normalised = torch.cat([(pruner.params[n].abs() / pruner.params[n].norm()).flatten() for n in names])
    mask = torch.cat([pruner.masks[n].flatten() for n in names])
    assert int(mask.sum()) == round(normalised.numel() * 0.1)
    assert normalised[mask == 1].min() >= normalised[mask == 0].max()


def test_pruned_weights_and_moments_stay_zero(pr):
    net = minatar_net(pr)
    pruner, optimizer = make_pruner(pr, net, start=0, end=40, every=20, sparsity=0.95)
    obs = (torch.rand(16, 4, 10, 10) < 0.3).to(torch.uint8)
    history = []
    for count in range(120):
        loss = (net(obs) ** 2).mean() + net(obs).sum() * 0.01
        optimizer.zero_grad()
        loss.backward()
        updated = pruner.update_masks(count)
        pruner.mask_gradients()
        optimizer.step()
        pruner.apply()
        if updated:
            history.append({n: m.clone() for n, m in pruner.masks.items()})
        for name, p in pruner.params.items():
            off = pruner.masks[name] == 0
            assert bool((p[off] == 0).all()), (count, name)
            state = optimizer.state[p]
            assert bool((state["exp_avg"][off] == 0).all()) and bool((state["exp_avg_sq"][off] == 0).all())
    assert len(history) == 3  # counts 0, 20, 40
    for before, after in zip(history, history[1:]):  # no regrowth: every later mask is inside the earlier one
        for name in before:
            assert bool((after[name] <= before[name]).all())
    total = sum(int((m == 0).sum()) for m in pruner.masks.values()) / sum(m.numel() for m in pruner.masks.values())
    assert total == pytest.approx(0.95, abs=2e-3)
    # biases were never masked
    assert all(bool((b != 0).any()) for n, b in net.named_parameters() if n.endswith("bias") and "q" not in n)


def test_sparsity_zero_pruner_does_nothing(pr):
    net = minatar_net(pr)
    before = {n: p.clone() for n, p in net.named_parameters()}
    pruner, _ = make_pruner(pr, net, sparsity=0.0, start=0, end=0, every=1)
    assert not pruner.update_masks(0)
    pruner.apply()
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())


def test_metrics_count_parameters_and_flops(pr):
    net = minatar_net(pr)
    pruner, _ = make_pruner(pr, net, start=0, end=0, every=1, sparsity=0.9)
    pruner.update_masks(0)
    pruner.apply()
    m = pruner.metrics(net, (4, 10, 10))
    # dense: conv 16*4*9 weights at 8*8 positions, fc1 1024*128, q 128*6 (multiply-adds per example)
    assert m["sparsity/flops_dense"] == 576 * 64 + 131072 + 768
    nonzero = {n: int(pruner.masks[n].sum()) for n in pruner.masks}
    assert m["sparsity/flops_sparse"] == nonzero["net.conv1.weight"] * 64 + nonzero["net.fc1.weight"] + nonzero[
        "net.q.weight"]
    assert m["sparsity/params_dense"] == sum(p.numel() for p in net.parameters())
    assert m["sparsity/params_dense"] - m["sparsity/params_nonzero"] == sum(
        int((mask == 0).sum()) for mask in pruner.masks.values())
    assert m["sparsity/conv1"] == pytest.approx(1 - nonzero["net.conv1.weight"] / 576)
    assert m["sparsity/total"] == pytest.approx(0.9, abs=1e-3) and m["sparsity/target"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------------------------
# Width and encoders
# ---------------------------------------------------------------------------------------------------------------


def test_width_scales_conv_channels_only(pr, dqn):
    wide = minatar_net(pr, width=3)
    assert wide.net.conv1.out_channels == 48 and wide.net.fc1.in_features == 48 * 64 and wide.net.fc1.out_features == 128
    torch.manual_seed(0)
    atari = pr.QNetwork((4, 84, 84), 6, False, width=3)
    assert [getattr(atari.net, f"conv{i}").out_channels for i in (1, 2, 3)] == [96, 192, 192]
    assert atari.net.fc1.out_features == 512
    # width 1 with the Nature encoder is dqn.py's network, parameter for parameter
    ours, base = minatar_net(pr, seed=4), minatar_net(dqn, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("width", [1, 2])
def test_impala_encoder_channels(pr, width):
    torch.manual_seed(0)
    net = pr.QNetwork((4, 84, 84), 6, False, width=width, encoder="impala")
    convs = [m for m in net.net.impala.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 15  # 3 stacks x (1 + 2 blocks x 2 convs)
    assert [c.out_channels for c in convs[::5]] == [16 * width, 32 * width, 32 * width]
    assert net.net.fc1.in_features == 32 * width * 11 * 11 and net.net.fc1.out_features == 512
    assert net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 6)
    assert len(pr.prunable(net)) == 15 + 2


# ---------------------------------------------------------------------------------------------------------------
# Flags and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_steps_resolve_from_the_run(pr):
    args = pr.Args(env_id="MinAtar/Breakout", total_timesteps=200_000, replay_ratio=0.25)
    pr.resolve_args(args)  # (200k - 5000) * 0.25 = 48750 updates: 9750 and 39000, down to multiples of 1000
    assert (args.prune_start_step, args.prune_end_step) == (9000, 39000)
    args = pr.Args(env_id="MinAtar/Breakout", total_timesteps=200_000, prune_start_step=5, prune_end_step=5)
    pr.resolve_args(args)
    assert (args.prune_start_step, args.prune_end_step) == (5, 5)
    for changes in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"prune_every": 0}, {"encoder_width": 0},
                    {"encoder": "impala"}, {"prune_start_step": 10, "prune_end_step": 5},
                    {"env_id": "CartPole-v1", "encoder_width": 2}):
        with pytest.raises(pr.UserError):
            pr.resolve_args(pr.Args(**{"env_id": "MinAtar/Breakout", **changes}))


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "MinAtar/Breakout", "--sparsity", "1"], ("--sparsity must be in [0, 1)",)),
    (["--env-id", "CartPole-v1", "--encoder-width", "3"], ("CartPole-v1", "no conv encoder", "--encoder-width 1")),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, fragments):
    proc = run_script(PRUNING, [*flags, "--total-timesteps", 1000, "--output-dir", tmp_path, "--device", "cpu"],
                      cwd=str(tmp_path))
    assert_one_line_error(proc, *fragments)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process)
# ---------------------------------------------------------------------------------------------------------------

run_in_process = helpers.run_dqn_smoke  # the DQN smoke settings (tests/helpers.py, DQN_SMOKE)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_sparsity_zero_reproduces_dqn(dqn, pr, tmp_path, env_id):
    base = run_in_process(dqn, tmp_path, "dqn", env_id, seed=3, metrics_every=0)
    ours = run_in_process(pr, tmp_path, "off", env_id, seed=3, metrics_every=0, sparsity=0.0)
    helpers.assert_same_run(base, ours, "dqn_pruning.py --sparsity 0")


def test_minatar_run_prunes_and_checkpoints(pr, tmp_path):
    run_dir = run_in_process(pr, tmp_path, "pruned", "MinAtar/Breakout", sparsity=0.9, prune_start_step=20,
                             prune_end_step=100, prune_every=20, encoder_width=2, save_model=True)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 200
    assert summary["sparsity"]["total"] == pytest.approx(0.9, abs=1e-3)
    scalars = read_scalars(run_dir)
    assert len(scalars["sparsity/total"]) == 5  # mask updates at 20, 40, 60, 80, 100
    totals = [v for _, v in scalars["sparsity/total"]]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(0.9, abs=1e-3)
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]
    kernels = [t for t in model.values() if t.dim() > 1]
    zeros = sum(int((t == 0).sum()) for t in kernels) / sum(t.numel() for t in kernels)
    assert zeros >= 0.9 - 1e-3  # the saved network is the sparse one
    model_path = os.path.join(run_dir, "model.pt")
    evaluated = run_in_process(pr, tmp_path, "eval", "MinAtar/Breakout", encoder_width=2, eval_checkpoint=model_path)
    assert read_json(os.path.join(evaluated, "summary.json"))["eval_returns"] == summary["eval_returns"]
    with pytest.raises(pr.UserError, match="--encoder-width 2"):
        run_in_process(pr, tmp_path, "mismatch", "MinAtar/Breakout", eval_checkpoint=model_path)
