"""algos/ppo_stable.py: the residual blocks against a hand computation (the global skip g added in every block of the
multi-skip torso, not in the plain residual one), the torsos' layouts on pixels and vectors (LayerNorm after the
convolutions, ppo.py's heads kept, the plain torso at ppo.py's sizes = ppo.py's parameters), Kron (lr / 3 recorded,
a preconditioned and RMS-clipped step, a quadratic's loss decreasing, its state dict loading back), the gradients/
logs against hand values, the method off against ppo.py (same episodes, CartPole and MinAtar), end-to-end runs
(CartPole, MinAtar, Atari; determinism; a checkpoint evaluated) and bad input."""

from __future__ import annotations

import math
from collections import OrderedDict
import os

import pytest
import torch
import torch.nn as nn

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

# Kron's eager step costs ~0.1-0.3 s on the 2-core machine: few updates per smoke run
SMOKE = dict(total_timesteps=512, num_envs=2, num_steps=64, num_minibatches=2, update_epochs=1, eval_episodes=0,
             metrics_every=4, kron_compile=False)
BASE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)  # ppo.py comparisons
MINATAR = dict(total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=0, metrics_every=8)
OFF = dict(mlp_type="plain", layer_norm=False, optimizer="adam")


@pytest.fixture(scope="module")
def stable():
    return load_script("ppo_stable")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def resolved(stable, env_id="CartPole-v1", **changes):
    args = stable.Args(env_id=env_id, **changes)
    stable.resolve_args(args)
    return args


def set_linear(layer: nn.Linear, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------------------------


def hand_residual(x, blocks, skip: bool, norm: bool):
    """g = [LN](x) (fc_in set to the identity), then per block x <- x + F(x) (+ g) with
    F = relu -> W_a . + b_a -> [LN] -> relu -> W_b . + b_b -> [LN], in plain Python."""
    def linear(w, b, v):
        return [sum(wi * vi for wi, vi in zip(row, v)) + bi for row, bi in zip(w, b)]

    def ln(v):
        mean = sum(v) / len(v)
        var = sum((vi - mean) ** 2 for vi in v) / len(v)
        return [(vi - mean) / math.sqrt(var + 1e-5) for vi in v]

    def relu(v):
        return [max(vi, 0.0) for vi in v]

    x = g = ln(x) if norm else x
    for (wa, ba), (wb, bb) in blocks:
        h = linear(wa, ba, relu(x))
        h = ln(h) if norm else h
        h = linear(wb, bb, relu(h))
        h = ln(h) if norm else h
        x = [xi + hi + (gi if skip else 0.0) for xi, hi, gi in zip(x, h, g)]
    return x


@pytest.mark.parametrize("mlp_type", ["multiskip", "residual"])
@pytest.mark.parametrize("norm", [False, True])
def test_blocks_against_a_hand_computation(stable, mlp_type, norm):
    """Two blocks of width 3 with fixed weights: the multi-skip blocks add g (fc_in's output, after its LayerNorm) in
    each block, the residual ones do not; LayerNorm (PyTorch's init: no affine change) after each Linear."""
    torso = stable.StableResidual(3, 3, 2, norm, nn.ReLU, global_skip=mlp_type == "multiskip")
    set_linear(torso.fc_in, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.0, 0.0, 0.0])
    blocks = torso.blocks
    weights = [(([[0.5, -1.0, 0.2], [0.3, 0.4, -0.6], [-0.7, 0.1, 0.9]], [0.1, -0.2, 0.05]),
                ([[1.0, 0.0, -0.5], [0.2, -0.3, 0.8], [0.6, 0.5, 0.4]], [0.0, 0.3, -0.1])),
               (([[-0.4, 0.7, 0.1], [0.9, -0.2, 0.3], [0.05, 0.6, -0.8]], [0.2, 0.0, -0.3]),
                ([[0.3, 0.3, -0.9], [-0.6, 0.2, 0.1], [0.4, -0.7, 0.5]], [-0.05, 0.1, 0.2]))]
    for block, ((wa, ba), (wb, bb)) in zip(blocks, weights):
        set_linear(block.fc_a, wa, ba)
        set_linear(block.fc_b, wb, bb)
    x = [0.8, -0.3, 1.5]
    got = torso(torch.tensor([x])).squeeze(0).tolist()
    want = hand_residual(x, weights, mlp_type == "multiskip", norm)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert [name for name, _ in blocks[0].named_children()] == (
        ["act_a", "fc_a", "norm_a", "act_b", "fc_b", "norm_b"] if norm else ["act_a", "fc_a", "act_b", "fc_b"])


def test_global_skip_reaches_every_block(stable):
    """Four multi-skip blocks: each block's output is its input + F(input) + g exactly, and the output's gradient with
    respect to g through the skip alone (F's paths cut) is the number of blocks: g feeds every block directly."""
    torch.manual_seed(0)
    torso = stable.StableResidual(5, 5, 4, True, nn.ReLU, global_skip=True)
    torso.fc_in, torso.norm_in = nn.Identity(), nn.Identity()  # g = the input
    blocks = torso.blocks
    g = torch.randn(2, 5)
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].detach(), out.detach())))
    out = torso(g)
    inputs = [x for x, _ in seen] + [out.detach()]
    for k, (x, f) in enumerate(seen):
        assert torch.allclose(inputs[k + 1], x + f + g, atol=1e-6), f"block {k} does not add g"
    # cut F's dependence on its input: only the skips carry g, so d out / d g = 1 (the input) + one per block
    for block in blocks:
        block.register_forward_pre_hook(lambda _m, inp: (inp[0].detach(),))
    leaf = g.clone().requires_grad_(True)
    torso(leaf).sum().backward()
    assert torch.allclose(leaf.grad, torch.full_like(g, 1.0 + len(blocks)))
    plain = stable.StableResidual(5, 5, 4, True, nn.ReLU, global_skip=False)
    plain.fc_in, plain.norm_in = nn.Identity(), nn.Identity()
    for block in plain.blocks:
        block.register_forward_pre_hook(lambda _m, inp: (inp[0].detach(),))
    leaf = g.clone().requires_grad_(True)
    plain(leaf).sum().backward()
    assert torch.allclose(leaf.grad, torch.ones_like(g))  # residual: the input's path only


# ---------------------------------------------------------------------------------------------------------------
# The torsos in the agent
# ---------------------------------------------------------------------------------------------------------------


def test_pixel_torso_layout(stable):
    """Atari: LayerNorm over (C, H, W) after each convolution, the torso in place of fc1 (3136 -> H [LN], one block,
    H -> 512, LN, ReLU), ppo.py's heads kept (the same modules)."""
    args = resolved(stable, "Breakout-v5", mlp_width=32)
    torch.manual_seed(0)
    agent = stable.Agent((4, 84, 84), 4, False)
    heads, act4 = (agent.actor.out, agent.critic.out), agent.trunk.act4
    stable.stable_networks(agent, (4, 84, 84), args)
    names = [name for name, _ in agent.trunk.named_children()]
    assert names == ["conv1", "conv1_norm", "act1", "conv2", "conv2_norm", "act2", "conv3", "conv3_norm", "act3",
                     "flatten", "torso", "fc2", "fc2_norm", "act4"]
    assert [tuple(agent.trunk[i].normalized_shape) for i in (1, 4, 7)] == [(32, 20, 20), (64, 9, 9), (64, 7, 7)]
    torso = agent.trunk.torso
    assert (torso.fc_in.in_features, torso.fc_in.out_features, len(torso.blocks)) == (3136, 32, 1)
    assert torso.global_skip
    assert isinstance(torso.norm_in, nn.LayerNorm)
    assert (agent.trunk.fc2.in_features, agent.trunk.fc2.out_features) == (32, 512)
    assert (agent.actor.out, agent.critic.out) == heads and agent.trunk.act4 is act4  # ppo.py's modules
    logits, value, hidden = agent(torch.zeros(3, 4, 84, 84, dtype=torch.uint8), return_hidden=True)
    assert logits.shape == (3, 4) and value.shape == (3,) and [h[0] for h in hidden][-1] == "fc2"


def test_vector_torso_layout_and_plain_at_ppo_sizes_is_ppo_network(stable, ppo):
    """Vectors: each MLP becomes the torso (in -> H [LN], the blocks), fc2 (H -> 64) [LN], act, ppo.py's out; the tanh of
    classic control is kept. A plain torso of depth 2 and width 64 without LN has ppo.py's parameters, name for name,
    and with ppo.py's weights computes ppo.py's outputs."""
    args = resolved(stable, mlp_depth=3, mlp_width=16)
    agent = stable.Agent((4,), 2, False)
    kept = [(seq.act2, seq.out) for seq in (agent.actor, agent.critic)]
    stable.stable_networks(agent, (4,), args)
    for side, (act2, out) in zip((agent.actor, agent.critic), kept):
        assert [n for n, _ in side.named_children()] == ["torso", "fc2", "fc2_norm", "act2", "out"]
        assert side.act2 is act2 and side.out is out
        assert isinstance(side.act2, nn.Tanh) and len(side.torso.blocks) == 3 and side.fc2.out_features == 64
        assert isinstance(side.torso.blocks[0].act_a, nn.Tanh) and side.torso.fc_in.out_features == 16
    plain = resolved(stable, **OFF)
    assert stable.stable_settings(vars(plain), pixel=False) is None  # stable_networks leaves ppo.py's agent as built
    torch.manual_seed(1)
    reference = ppo.Agent((4,), 2, False)
    for side in ("actor", "critic"):
        seq = getattr(reference, side)
        built = nn.Sequential(OrderedDict(stable.stable_torso(4, 64, plain, nn.Tanh, ("act2", seq.act2)) +
                                          [("out", seq.out)]))
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in seq.state_dict().items()}
        built.load_state_dict(seq.state_dict())
        x = torch.randn(5, 4)
        assert torch.equal(built(x), seq(x))
    # pixels: a plain torso of depth 1 is ppo.py's fc1 whatever the width
    assert stable.stable_settings(dict(mlp_type="plain", mlp_depth=1, mlp_width=2560, layer_norm=False), True) is None
    assert stable.stable_settings(dict(mlp_type="plain", mlp_depth=2, mlp_width=64, layer_norm=True), False)


def test_method_off_is_ppo_py(stable, ppo, tmp_path):
    """--mlp-type plain --no-layer-norm --optimizer adam: ppo.py's run byte for byte (CartPole and MinAtar), with the
    gradients/ logs (which only read gradients); the recipe changes the run."""
    for env_id, settings in (("CartPole-v1", BASE), ("MinAtar/Breakout", MINATAR)):
        tag = env_id.split("/")[-1]
        base = run_in_process(ppo, tmp_path, f"ppo_{tag}", env_id, settings)
        off = run_in_process(stable, tmp_path, f"off_{tag}", env_id, settings, **OFF)
        assert_same_run(base, off, f"ppo_stable.py {OFF} on {env_id}")
        scalars = read_scalars(off)
        assert scalars["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
        assert {"gradients/global", "gradients/actor.fc1", "gradients/critic.out"} <= scalars.keys()


# ---------------------------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------------------------


def test_kron_learning_rate_is_a_third_and_the_optimizers(stable):
    kron = resolved(stable, kron_compile=False)
    assert kron.learning_rate == pytest.approx(2.5e-4 / 3)
    assert resolved(stable, optimizer="radam").learning_rate == 2.5e-4
    assert resolved(stable, "MinAtar/Breakout", learning_rate=3e-3).learning_rate == pytest.approx(1e-3)
    agent = stable.Agent((4,), 2, False)
    stable.stable_networks(agent, (4,), kron)
    optimizer = stable.stable_optimizer(agent, kron, None)
    from kron_torch import Kron

    assert isinstance(optimizer, Kron) and type(optimizer).__name__ == "EagerKron"
    assert optimizer.param_groups[0]["lr"] == kron.learning_rate
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in agent.parameters()}
    assert type(stable.stable_optimizer(agent, resolved(stable, kron_compile=True), None)) is Kron
    radam = resolved(stable, optimizer="radam")
    assert isinstance(stable.stable_optimizer(agent, radam, None), torch.optim.RAdam)
    adam = torch.optim.Adam(agent.parameters())
    assert stable.stable_optimizer(agent, resolved(stable, **OFF), adam) is adam  # ppo.py's own Adam
    other = stable.stable_optimizer(agent, resolved(stable, optimizer="adam"), adam)  # a new torso: a new Adam
    assert isinstance(other, torch.optim.Adam) and other is not adam and other.param_groups[0]["eps"] == 1e-5


def test_kron_step_is_preconditioned_and_decreases_a_quadratic(stable):
    """An ill-conditioned quadratic 0.5 * sum_ij c_ij w_ij^2 (curvatures 1 to 100): Kron's update is not along the
    gradient (preconditioned), its RMS is at most 1.1 * lr (kron-torch clips the update's RMS to 1.1), the loss falls
    by more than 100x, and a state dict loads into a fresh Kron with the same preconditioners."""
    torch.manual_seed(0)
    curv = torch.logspace(0, 2, 12).reshape(3, 4)
    w = nn.Parameter(torch.ones(3, 4))
    args = resolved(stable, kron_compile=False, learning_rate=0.3)  # lr 0.1 after the division
    optimizer = stable.stable_optimizer(type("A", (), {"parameters": lambda self: [w], "pixel": False})(), args, None)
    losses = []
    for step in range(200):
        loss = 0.5 * (curv * w**2).sum()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        before, grad = w.detach().clone(), w.grad.clone()
        optimizer.step()
        delta = w.detach() - before
        assert delta.square().mean().sqrt() <= 1.1 * 0.1 + 1e-6
        if step == 5:
            cosine = torch.nn.functional.cosine_similarity(-delta.flatten(), grad.flatten(), dim=0)
            assert cosine < 0.99  # not a (scaled) gradient step
    assert losses[-1] < 1e-2 * losses[0]
    state = optimizer.state_dict()
    fresh = stable.stable_optimizer(type("A", (), {"parameters": lambda self: [w], "pixel": False})(), args, None)
    fresh.load_state_dict(state)
    for q_old, q_new in zip(optimizer.state[w]["Q"], fresh.state[w]["Q"]):
        assert torch.equal(q_old, q_new)


# ---------------------------------------------------------------------------------------------------------------
# The gradient logs
# ---------------------------------------------------------------------------------------------------------------


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars[key] = value


def test_gradient_logs_against_hand_values(stable):
    net = nn.Sequential(OrderedDict(a=nn.Linear(2, 2), b=nn.Linear(2, 1)))
    log = stable.StableGradLog(net)
    grads = [{"a.weight": [[3.0, 0.0], [0.0, 0.0]], "a.bias": [4.0, 0.0], "b.weight": [[0.0, 0.0]], "b.bias": [0.0]},
             {"a.weight": [[0.0, 0.0], [0.0, 0.0]], "a.bias": [0.0, 1.0], "b.weight": [[2.0, 0.0]], "b.bias": [0.0]}]
    for g in grads:
        for name, p in net.named_parameters():
            p.grad = torch.tensor(g[name])
        log.add()
    writer = FakeWriter()
    log.write(writer, 10)
    assert writer.scalars["gradients/a"] == pytest.approx((5.0 + 1.0) / 2)
    assert writer.scalars["gradients/b"] == pytest.approx((0.0 + 2.0) / 2)
    assert writer.scalars["gradients/global"] == pytest.approx((5.0 + math.sqrt(5.0)) / 2)
    writer = FakeWriter()
    log.write(writer, 20)  # nothing added since: nothing written
    assert writer.scalars == {}


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


def test_recipe_runs_deterministically_and_its_checkpoint_evaluates(stable, tmp_path, capsys):
    first = run_in_process(stable, tmp_path, "a", "CartPole-v1", SMOKE, save_model=True)
    second = run_in_process(stable, tmp_path, "b", "CartPole-v1", SMOKE)
    assert_same_run(first, second, "ppo_stable.py twice with one seed", min_lines=5)
    config = read_json(os.path.join(first, "config.json"))["args"]
    assert (config["mlp_type"], config["mlp_depth"], config["mlp_width"], config["optimizer"]) == (
        "multiskip", 2, 64, "kron")
    assert config["learning_rate"] == pytest.approx(2.5e-4 / 3)
    scalars = read_scalars(first)
    assert {"gradients/global", "gradients/actor.torso.blocks.1.fc_b", "gradients/critic.fc2_norm"} <= scalars.keys()
    model = os.path.join(first, "model.pt")
    code, lines = call_main(stable, ["--env-id", "CartPole-v1", "--eval-checkpoint", model, "--eval-episodes", "1",
                                     "--output-dir", str(tmp_path), "--run-name", "eval"], capsys)
    assert code == 0, lines
    code, lines = call_main(stable, ["--env-id", "CartPole-v1", "--eval-checkpoint", model, "--mlp-type", "plain",
                                     "--output-dir", str(tmp_path), "--run-name", "eval2"], capsys)
    assert code == 2 and len(lines) == 1 and "--mlp-type multiskip --mlp-depth 2 --mlp-width 64 --layer-norm" in lines[0]


def test_minatar_and_atari_smoke(stable, tmp_path):
    """MinAtar with the recipe; Atari with the torso and LayerNorm but Adam (Kron's 3136 x 3136 preconditioner of fc1
    costs seconds per step on a CPU)."""
    run = run_in_process(stable, tmp_path, "minatar", "MinAtar/Breakout", dict(MINATAR, update_epochs=1,
                                                                                kron_compile=False))
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"
    assert "gradients/actor.torso.blocks.0.fc_a" in read_scalars(run)
    run = run_in_process(stable, tmp_path, "atari", "Breakout-v5", dict(
        total_timesteps=128, num_envs=2, num_steps=32, update_epochs=1, num_minibatches=2, max_episode_steps=60,
        eval_episodes=1, metrics_every=2, metrics_batch_size=32, mlp_width=64, optimizer="adam"))
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"
    assert {"gradients/trunk.conv1_norm", "gradients/trunk.torso.blocks.0.fc_a", "plasticity/dormant_tau0/fc2"} <= \
        read_scalars(run).keys()


@pytest.mark.parametrize("argv, fragment", [
    (["--mlp-type", "residual", "--mlp-depth", "0"], "--mlp-depth"),
    (["--mlp-width", "0"], "--mlp-width"),
    (["--mlp-type", "densenet"], "mlp-type"),
    (["--optimizer", "shampoo"], "optimizer"),
])
def test_bad_stable_flags(stable, capsys, argv, fragment):
    code, lines = call_main(stable, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and fragment in " ".join(lines), lines
