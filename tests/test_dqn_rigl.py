"""algos/dqn_rigl.py: sparse training with RigL, SET or a static mask. The cosine drop fraction against the formula,
ERK densities against a hand computation, the sparsity-aware rescaling against hand-counted fans, the initial random
masks (counts, their own generator), one RigL update on a hand-set layer (exactly which weights are dropped and
grown, grown weights and their Adam moments zero, counts conserved, the optimizer step skipped), SET's random growth,
the static mask, inactive weights and moments exactly zero over many optimizer steps, `--sparsity 0` against dqn.py
(byte-identical episodes.csv on CartPole and MinAtar), an end-to-end run with its logs, and bad input.

The end-to-end runs call `run()` in this process (tests/helpers.py, `run_in_process`): the scripts' imports cost ~6 s
per process on the 2-core machine. Two bad-input cases go through the command line, the rest through `resolve_args`.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn as nn

import helpers
from helpers import assert_one_line_error, load_script, read_json, read_scalars, run_dqn_smoke, run_script, script_path

RIGL = script_path("dqn_rigl")


@pytest.fixture(scope="module")
def rl():
    return load_script("dqn_rigl")


@pytest.fixture(scope="module")
def dqn():
    return load_script("dqn")


def minatar_net(module, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return module.QNetwork((4, 10, 10), 6, True, **kw)


def make_rigl(rl, net, method="rigl", sparsity=0.9, distribution="erk", alpha=0.3, every=10, end=100, init="mask",
              seed=1):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    return rl.RigLMasks(net, optimizer, method, sparsity, distribution, alpha, every, end, init, seed), optimizer


# ---------------------------------------------------------------------------------------------------------------
# Schedule, ERK, shared pieces
# ---------------------------------------------------------------------------------------------------------------


def test_cosine_drop_fraction_against_the_formula(rl):
    alpha, end = 0.3, 2_000_000  # rigl's Atari configs
    assert rl.cosine_drop_fraction(0, alpha, end) == pytest.approx(0.3)
    assert rl.cosine_drop_fraction(500_000, alpha, end) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))  # 0.2561
    assert rl.cosine_drop_fraction(1_000_000, alpha, end) == pytest.approx(0.15)
    assert rl.cosine_drop_fraction(1_500_000, alpha, end) == pytest.approx(0.15 * (1 - math.cos(math.pi / 4)))
    assert rl.cosine_drop_fraction(end, alpha, end) == pytest.approx(0.0, abs=1e-12)
    assert rl.cosine_drop_fraction(3 * end, alpha, end) == pytest.approx(0.0, abs=1e-12)  # t clipped at T_end
    assert rl.cosine_drop_fraction(0, alpha, 0) == 0.0  # no window: no topology change
    values = [rl.cosine_drop_fraction(t, alpha, end) for t in range(0, end + 1, 5000)]
    assert values == sorted(values, reverse=True)


def test_erk_against_a_hand_computation(rl):
    # the MinAtar network's kernels: conv (16, 4, 3, 3), fc1 (128, 1024), q (6, 128), at sparsity 0.9 (the same
    # numbers as tests/test_dqn_pruning.py). First pass: eps = (58 + 13108 + 77) / (26 + 1152 + 134) = 10.094, q's
    # density eps * 134 / 768 = 1.76 > 1, so q is dense; second pass eps = (58 + 13108 - 691) / (26 + 1152)
    shapes = {"conv1": (16, 4, 3, 3), "fc1": (128, 1024), "q": (6, 128)}
    got = rl.erk_sparsities(shapes, 0.9)
    eps = 12475 / 1178
    assert got["q"] == 0.0
    assert got["conv1"] == pytest.approx(1 - eps * 26 / 576)  # 0.52198
    assert got["fc1"] == pytest.approx(1 - eps * 1152 / 131072)  # 0.90693


def test_shared_pieces_are_dqn_prunings(rl):
    """The encoder, width, ERK, top-k and FLOP pieces are dqn_pruning.py's, character for character, so its tests
    (tests/test_dqn_pruning.py) cover them here too."""
    pruning = load_script("dqn_pruning")
    for name in ("lecun_normal_", "ImpalaStack", "impala_layers", "prunable", "erk_sparsities", "topk_mask",
                 "forward_flops", "QNetwork"):
        assert inspect.getsource(getattr(rl, name)) == inspect.getsource(getattr(pruning, name)), name


def test_sparse_fan_scale_against_hand_counts(rl):
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0],
                         [0.0, 0.0, 1.0, 0.0],
                         [1.0, 1.0, 1.0, 1.0]])  # (out 3, in 4): a_in per row 3, 1, 4; a_out per column 2, 1, 3, 2
    dense = 3 + 4
    expected = torch.tensor([[math.sqrt(dense / (a + b)) for b in (2, 1, 3, 2)] for a in (3, 1, 4)])
    torch.testing.assert_close(rl.sparse_fan_scale(mask), expected)
    conv = torch.zeros(2, 3, 2, 2)  # (out 2, in 3, 2 x 2): dense fans 3 * 4 + 2 * 4 = 20
    conv[0, 0] = 1.0  # 4 weights from input 0 into output 0
    conv[1, :, 0, 0] = 1.0  # 3 weights into output 1, one from each input
    scale = rl.sparse_fan_scale(conv)
    assert scale[0, 0, 1, 1] == pytest.approx(math.sqrt(20 / (4 + 5)))  # a_in(0) = 4, a_out(0) = 4 + 1
    assert scale[1, 2, 0, 0] == pytest.approx(math.sqrt(20 / (3 + 1)))  # a_in(1) = 3, a_out(2) = 1
    assert bool((rl.sparse_fan_scale(torch.ones(5, 7)) == 1).all())  # a dense layer keeps its initial weights


# ---------------------------------------------------------------------------------------------------------------
# Initial masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_initial_masks_are_random_with_exact_counts_and_their_own_generator(rl, distribution):
    net = minatar_net(rl)
    dense = {n: p.clone() for n, p in net.named_parameters()}
    rng_before = torch.get_rng_state()
    rigl, _ = make_rigl(rl, net, distribution=distribution, init="mask")
    assert torch.equal(torch.get_rng_state(), rng_before)  # torch's generator untouched: nothing else changes
    assert list(rigl.masks) == ["net.conv1.weight", "net.fc1.weight", "net.q.weight"]  # every kernel, biases never
    for name, p in rigl.params.items():
        mask, target = rigl.masks[name], rigl.targets[name]
        assert int(mask.sum()) == max(1, round(p.numel() * (1 - target)))  # topk_mask's count
        assert bool((p[mask == 0] == 0).all()) and torch.equal(p[mask == 1], dense[name][mask == 1])
    if distribution == "uniform":
        assert set(rigl.targets.values()) == {0.9}
    else:
        assert rigl.targets["net.q.weight"] == 0.0 and rigl.targets["net.fc1.weight"] > 0.9
    assert all(torch.equal(p, dense[n]) for n, p in net.named_parameters() if n.endswith("bias"))
    # the same seed draws the same masks, another seed others
    again, _ = make_rigl(rl, minatar_net(rl), distribution=distribution)
    other, _ = make_rigl(rl, minatar_net(rl), distribution=distribution, seed=2)
    assert all(torch.equal(again.masks[n], rigl.masks[n]) for n in rigl.masks)
    assert not torch.equal(other.masks["net.fc1.weight"], rigl.masks["net.fc1.weight"])


def test_rescaled_init_multiplies_by_the_sparse_fan_factor(rl):
    net = minatar_net(rl)
    dense = {n: p.clone() for n, p in net.named_parameters()}
    rigl, _ = make_rigl(rl, net, init="rescale")
    for name, p in rigl.params.items():
        mask = rigl.masks[name]
        torch.testing.assert_close(p, dense[name] * rl.sparse_fan_scale(mask) * mask)
    # fc1 keeps ~9% of its weights: the kept ones grow by about sqrt(1 / 0.093)
    ratio = (net.net.fc1.weight[rigl.masks["net.fc1.weight"] == 1] / dense["net.fc1.weight"][
        rigl.masks["net.fc1.weight"] == 1]).mean().item()
    assert 2.8 < ratio < 3.8


def test_sparsity_zero_does_nothing(rl):
    net = minatar_net(rl)
    before = {n: p.clone() for n, p in net.named_parameters()}
    rigl, _ = make_rigl(rl, net, sparsity=0.0, init="rescale", every=1, end=10)
    (net(torch.ones(2, 4, 10, 10)) ** 2).sum().backward()
    assert not rigl.update_masks(0)
    rigl.apply()
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
    assert all(p.grad is not None for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------------
# One topology update on a hand-set layer
# ---------------------------------------------------------------------------------------------------------------

ACTIVE = [0, 1, 2, 3, 4, 5]  # flat positions of the 3 x 4 kernel that start active
WEIGHTS = [0.5, -0.1, 0.3, -0.05, 0.9, 0.2, 0, 0, 0, 0, 0, 0]  # |w|: the smallest active are 3, 1 and 5


def hand_layer(rl, method: str, alpha: float = 0.5):
    """A 4 -> 3 linear layer with a hand-set mask and weights and Adam moments that are nonzero everywhere."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    rigl, optimizer = make_rigl(rl, net, method=method, sparsity=0.5, alpha=alpha, every=10, end=100)
    weight = net[0].weight
    (net(torch.randn(8, 4)) ** 2).sum().backward()
    optimizer.step()  # Adam's moments exist and are nonzero at every position
    with torch.no_grad():
        weight.copy_(torch.tensor(WEIGHTS).view(3, 4))
    mask = torch.zeros(12)
    mask[ACTIVE] = 1.0
    rigl.masks["0.weight"] = mask.view(3, 4)
    grad = torch.full((12,), 0.01)
    grad[[0, 1, 8, 10, 7]] = torch.tensor([100.0, -5.0, 4.0, -3.0, 2.0])  # largest |g| outside the kept: 1, 8, 10
    weight.grad = grad.view(3, 4).clone()
    net[0].bias.grad = torch.ones(3)
    moments = {k: v.clone() for k, v in optimizer.state[weight].items()}
    return net, rigl, optimizer, moments


def test_rigl_drops_the_smallest_and_grows_the_largest_dense_gradients(rl):
    net, rigl, optimizer, moments = hand_layer(rl, "rigl")
    weight = net[0].weight
    assert not rigl.update_masks(5) and not rigl.update_masks(100)  # not a multiple of 10; T_end itself
    assert rigl.update_masks(0)  # f(0) = alpha = 0.5: k = floor(0.5 * 6) = 3
    mask = rigl.masks["0.weight"].flatten()
    # dropped: the three smallest |w| among the active (3, 1, 5); grown: the three largest |g| among the rest, the
    # just-dropped included: 1 (dropped and regrown), 8 and 10; position 0 has the largest |g| but was kept anyway
    assert sorted(torch.nonzero(mask).flatten().tolist()) == [0, 1, 2, 4, 8, 10]
    assert int(mask.sum()) == len(ACTIVE)  # the layer keeps its count of active weights
    assert rigl.last == {"rigl/drop_fraction": pytest.approx(0.5), "rigl/grown": 2}  # 1 was active already
    flat = weight.detach().flatten()
    assert flat[8] == 0 and flat[10] == 0  # new connections start at exactly 0
    assert flat[1] == pytest.approx(-0.1)  # a dropped and regrown weight keeps its value (rigl's new_connections)
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[weight][key].flatten()
        assert state[8] == 0 and state[10] == 0  # and zero Adam moments
        assert state[1] == moments[key].flatten()[1] and state[0] == moments[key].flatten()[0]
    assert all(p.grad is None for p in net.parameters())  # the optimizer skips this step (rigl, jaxpruner)
    step = optimizer.state[weight]["step"].clone()
    optimizer.step()
    rigl.apply()
    assert torch.equal(optimizer.state[weight]["step"], step)
    flat = weight.detach().flatten()
    assert flat[3] == 0 and flat[5] == 0  # the dropped weights are gone, and their moments with them
    assert optimizer.state[weight]["exp_avg"].flatten()[3] == 0
    assert flat[0] == pytest.approx(0.5) and flat[4] == pytest.approx(0.9)


def test_rigl_counts_are_floored_and_ties_keep_the_lower_index(rl):
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    weights = torch.tensor([0.2, 0.2, 0.2, 0.9, 0.8, 0.0, 0.0])
    grow = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    new = rl.drop_and_grow(weights, mask, grow, 0.3)  # k = floor(0.3 * 5) = 1: drop index 2 (tied), grow index 5
    assert new.tolist() == [1, 1, 0, 1, 1, 1, 0]
    assert torch.equal(rl.drop_and_grow(weights, mask, grow, 0.19), mask)  # floor(0.95) = 0: unchanged


def test_set_grows_uniformly_at_random_among_the_rest(rl):
    grown_sets = set()
    for seed in range(6):
        net, rigl, _, _ = hand_layer(rl, "set")
        rigl.generator.manual_seed(seed)
        expected_scores = torch.rand((3, 4), generator=torch.Generator().manual_seed(seed)).flatten()
        assert rigl.update_masks(0)
        mask = rigl.masks["0.weight"].flatten()
        assert int(mask.sum()) == len(ACTIVE)
        assert {0, 2, 4} <= set(torch.nonzero(mask).flatten().tolist())  # the three largest |w| are kept
        candidates = [i for i in range(12) if i not in (0, 2, 4)]
        top = sorted(candidates, key=lambda i: -expected_scores[i].item())[:3]  # the generator's three largest draws
        assert sorted(torch.nonzero(mask).flatten().tolist()) == sorted([0, 2, 4] + top)
        grown_sets.add(tuple(top))
    assert len(grown_sets) > 1  # the growth is random, not the gradient's


def test_static_never_changes_the_mask(rl):
    net, rigl, _, _ = hand_layer(rl, "static")
    before = rigl.masks["0.weight"].clone()
    assert not any(rigl.update_masks(count) for count in range(0, 100, 10))
    assert torch.equal(rigl.masks["0.weight"], before) and net[0].weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# Many steps on the MinAtar network
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_inactive_weights_and_moments_stay_zero_and_grow_by_the_dense_gradient(rl, method):
    net = minatar_net(rl)
    rigl, optimizer = make_rigl(rl, net, method=method, every=20, end=100, init="rescale")
    counts = {n: int(m.sum()) for n, m in rigl.masks.items()}
    first = {n: m.clone() for n, m in rigl.masks.items()}
    obs = (torch.rand(16, 4, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.3).to(torch.uint8)
    updates = []
    for count in range(140):
        loss = (net(obs) ** 2).mean() + net(obs).sum() * 0.01
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in rigl.params.items()}
        before = {n: m.clone() for n, m in rigl.masks.items()}
        updated = rigl.update_masks(count)
        rigl.mask_gradients()
        optimizer.step()
        rigl.apply()
        if updated:
            updates.append(count)
            fc1 = "net.fc1.weight"
            new = (rigl.masks[fc1] == 1) & (before[fc1] == 0)
            assert bool((grads[fc1][before[fc1] == 0] != 0).any())  # the dense gradient reaches inactive weights
            if method == "rigl" and new.any():  # every grown weight beats every inactive one left out
                left_out = (rigl.masks[fc1] == 0) & (before[fc1] == 0)
                assert grads[fc1][new].abs().min() >= grads[fc1][left_out].abs().max()
        for name, p in rigl.params.items():
            off = rigl.masks[name] == 0
            assert bool((p[off] == 0).all()), (count, name)
            state = optimizer.state[p]  # empty after the first count: a mask update, so no step
            assert count == 0 or bool((state["exp_avg"][off] == 0).all() and (state["exp_avg_sq"][off] == 0).all())
            assert int(rigl.masks[name].sum()) == counts[name]
    assert updates == [0, 20, 40, 60, 80]  # T_end = 100 is not an update (drop fraction 0)
    assert int(optimizer.state[net.net.fc1.weight]["step"]) == 140 - len(updates)  # no step at a mask update
    assert not torch.equal(rigl.masks["net.fc1.weight"], first["net.fc1.weight"])  # the topology moved
    assert torch.equal(rigl.masks["net.q.weight"], first["net.q.weight"])  # ERK keeps q dense: nothing to move


def test_metrics_count_parameters_and_flops(rl):
    net = minatar_net(rl)
    rigl, _ = make_rigl(rl, net)
    m = rigl.metrics(net, (4, 10, 10))
    nonzero = {n: int(rigl.masks[n].sum()) for n in rigl.masks}
    assert m["sparsity/flops_dense"] == 576 * 64 + 131072 + 768  # conv at 8 x 8 positions, fc1, q
    assert m["sparsity/flops_sparse"] == nonzero["net.conv1.weight"] * 64 + nonzero["net.fc1.weight"] + 768
    assert m["sparsity/params_dense"] - m["sparsity/params_nonzero"] == 132_416 - sum(nonzero.values())
    assert m["sparsity/total"] == pytest.approx(0.9, abs=1e-3) and m["sparsity/target"] == 0.9


# ---------------------------------------------------------------------------------------------------------------
# Flags and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_flags_resolve_from_the_run(rl):
    args = rl.Args(env_id="MinAtar/Breakout", total_timesteps=200_000, replay_ratio=0.25)
    rl.resolve_args(args)  # (200k - 5000) * 0.25 = 48750 updates, 80% of them: 39000
    assert (args.update_end_step, args.sparse_init, args.sparse_method) == (39000, "rescale", "rigl")
    args = rl.Args(env_id="MinAtar/Breakout", sparse_method="static", update_end_step=7)
    rl.resolve_args(args)
    assert (args.update_end_step, args.sparse_init) == (7, "mask")
    for changes in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"drop_fraction": 1.5}, {"drop_fraction": -0.1},
                    {"update_every": 0}, {"update_end_step": -1}, {"encoder_width": 0}, {"encoder": "impala"},
                    {"env_id": "CartPole-v1", "encoder_width": 2}):
        with pytest.raises(rl.UserError):
            rl.resolve_args(rl.Args(**{"env_id": "MinAtar/Breakout", **changes}))


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "MinAtar/Breakout", "--sparsity", "1"], ("--sparsity must be in [0, 1)",)),
    (["--env-id", "MinAtar/Breakout", "--drop-fraction", "2"], ("--drop-fraction must be in [0, 1]",)),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, fragments):
    proc = run_script(RIGL, [*flags, "--total-timesteps", 1000, "--output-dir", tmp_path, "--device", "cpu"],
                      cwd=str(tmp_path))
    assert_one_line_error(proc, *fragments)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_sparsity_zero_reproduces_dqn(dqn, rl, tmp_path, env_id):
    """Switched off, the script is dqn.py: byte-identical episodes.csv and the same evaluation returns."""
    base = run_dqn_smoke(dqn, tmp_path, "dqn", env_id, seed=3, metrics_every=0)
    ours = run_dqn_smoke(rl, tmp_path, "rigl", env_id, seed=3, metrics_every=0, sparsity=0.0, update_every=10)
    assert read_json(os.path.join(ours, "summary.json"))["status"] == "completed"
    helpers.assert_same_run(base, ours, "dqn_rigl.py --sparsity 0",
                            keys=("status", "num_updates", "num_episodes", "final_train_return", "eval_returns"))


def test_minatar_rigl_run_logs_and_keeps_its_sparsity(rl, tmp_path):
    run_dir = run_dqn_smoke(rl, tmp_path, "rigl", "MinAtar/Breakout", update_every=50, save_model=True,
                             metrics_every=100)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 200
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["update_end_step"], config["sparse_init"], config["exp_name"]) == (160, "rescale", "dqn_rigl")
    assert summary["sparsity"]["total"] == pytest.approx(0.9, abs=1e-3) and summary["sparsity"]["q"] == 0.0
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["rigl/drop_fraction"]] == [201, 251, 301, 351]  # updates 0, 50, 100, 150
    expected = [0.15 * (1 + math.cos(math.pi * t / 160)) for t in (0, 50, 100, 150)]  # T_end = 80% of 200
    assert [v for _, v in scalars["rigl/drop_fraction"]] == pytest.approx(expected)
    assert all(v > 0 for _, v in scalars["rigl/grown"])
    assert scalars["sparsity/total"][0][0] == 0 and len(scalars["sparsity/total"]) == 5  # at start and each update
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]
    nonzero = sum(int((w != 0).sum()) for w in model.values() if w.dim() > 1)
    active = summary["sparsity"]["params_nonzero"] - (16 + 128 + 6)  # the masks' ones: all weights but the biases
    assert 0.9 * active < nonzero <= active  # inactive weights are exactly 0 in the saved network
