"""algos/ppo_moe.py: the pixel Soft MoE layer against a hand-written reference (both softmax axes), permutation
equivariance, Top-1 capacity and token dropping, the tokenisations (dqn_softmoe.py's tests, ported); the one-token MoE
of an MLP layer (one expert and one slot = the expert's Linear exactly; Soft MoE, Top-1 and task routing by hand; the
weight layout other methods' row/column rules rely on); `big`'s packed expert MLPs by hand; the networks each
placement builds; `--moe-type none` against ppo.py (byte-identical episodes.csv on CartPole and MinAtar); the moe/
logs, which never change a run; the checkpoint check; task routing and --multi-task end to end; an Atari smoke run;
determinism; bad input.

End-to-end runs call `run()` in this process (tests/helpers.py, run_in_process); the bad-input tests call `main()`."""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=512, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
MINATAR = dict(total_timesteps=512, num_envs=4, num_steps=32, num_minibatches=4, eval_episodes=1, metrics_every=8)
NATURE_OBS = (4, 84, 84)


@pytest.fixture(scope="module")
def moe():
    return load_script("ppo_moe")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def settings(moe, **changes) -> dict:
    """MOE_SETTINGS as moe_configure records them for Args(**changes)."""
    args = moe.Args(**changes)
    args.expert_hidden = args.expert_hidden or 64
    args.patch_embedding = args.patch_embedding or 64
    return {**{key: getattr(args, key) for key in moe.MOE_NETWORK_FLAGS}, "seed": args.seed}


def agent(moe, obs_shape=(4,), actions=2, minatar=False, **changes):
    moe.MOE_SETTINGS.clear()
    moe.MOE_SETTINGS.update(settings(moe, **changes))
    try:
        torch.manual_seed(0)
        return moe.Agent(obs_shape, actions, False, minatar)
    finally:
        moe.MOE_SETTINGS.clear()
        moe.MOE_SETTINGS.update(moe_type="none")


def layer(module, moe_type: str, d: int = 3, experts: int = 2, m: int = 5, hidden: int = 4, seed: int = 0,
          capacity: float = 1.0):
    """The pixel MoE alone (router, experts, combine) for m tokens of size d (as tests/test_dqn_softmoe.py)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(OrderedDict([("conv1", torch.nn.Conv2d(d, d, 1)), ("act1", torch.nn.ReLU()),
                                           ("flatten", torch.nn.Flatten()), ("fc1", torch.nn.Linear(1, 1)),
                                           ("act4", torch.nn.ReLU())]))
    full = module.softmoe_layers(net, (d, 1, m), True, moe_type, experts, "per-conv", hidden, capacity, False, 3, 4)
    return torch.nn.Sequential(*[full._modules[n] for n in ["router", "experts_fc1", "experts_act", "experts_fc2",
                                                            "combine"]])


def expert_weights(moe_layer, e: int, experts: int):
    """Expert e's two dense layers out of MoEExpertsIn/Out as float64 numpy (W1 (h, d), b1, W2 (d, h), b2)."""
    fc1, fc2 = moe_layer[1], moe_layer[3]
    h, d = fc1.out_features // experts, fc1.in_features
    w1, b1 = fc1.weight[e * h:(e + 1) * h], fc1.bias[e * h:(e + 1) * h]
    w2, b2 = fc2.weight[:, e * h:(e + 1) * h], fc2.bias[e * d:(e + 1) * d]
    return [t.detach().double().numpy() for t in (w1, b1, w2, b2)]


# ---------------------------------------------------------------------------------------------------------------
# The pixel MoE (dqn_softmoe.py's layer)
# ---------------------------------------------------------------------------------------------------------------


def test_softmoe_matches_a_hand_written_reference(moe):
    d, experts, m, hidden = 3, 2, 5, 4
    slots = math.ceil(m / experts)
    soft = layer(moe, "softmoe", d, experts, m, hidden)
    phi = soft[0].phi.detach().double().numpy()
    x = torch.randn(2, m, d, generator=torch.Generator().manual_seed(4))
    X = x.double().numpy()
    expected = np.zeros((2, m, d))
    for b in range(2):
        logits = np.einsum("td,dep->tep", X[b], phi)
        dispatch = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)  # over tokens, per slot
        combine = np.exp(logits) / np.exp(logits).sum(axis=(1, 2), keepdims=True)  # over all slots, per token
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
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_permuting_tokens_permutes_outputs(moe):
    soft = layer(moe, "softmoe", m=6)
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(5))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(soft(x[:, perm]), soft(x)[:, perm])


def test_top1_capacity_keeps_the_first_tokens_and_drops_the_rest(moe):
    d, experts, m = 3, 2, 5
    top = layer(moe, "top1", d, experts, m)
    with torch.no_grad():
        top[0].router.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
    x = torch.rand(1, m, d, generator=torch.Generator().manual_seed(2)) + 0.1  # expert 0 wins every token
    with torch.no_grad():
        dispatch, _, probs = top[0].weights(x)
        out = top(x)
    assert dispatch[0, :, 0].argmax(dim=-1)[:3].tolist() == [0, 1, 2] and dispatch[0, 3:].sum() == 0
    torch.testing.assert_close(out[0, 3:], torch.zeros(2, d))
    w1, b1, w2, b2 = expert_weights(top, 0, experts)
    for t in range(3):
        expected = probs[0, t, 0].item() * (w2 @ np.maximum(w1 @ x[0, t].double().numpy() + b1, 0.0) + b2)
        np.testing.assert_allclose(out[0, t].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pixel_trunk_tokens_and_heads(moe):
    """Nature CNN map 64 x 7 x 7: per-conv 49 tokens of 64, per-feature-map 64 of 49, per-sample 1 of 3136,
    per-patch (3x3, stride 3) 4 of 64; the heads read the m * d flattened output tokens; no Linear of the trunk is
    ppo.py's fc1 any more."""
    for tokenize, (m, d) in {"per-conv": (49, 64), "per-feature-map": (64, 49), "per-sample": (1, 3136),
                             "per-patch": (4, 64)}.items():
        net = agent(moe, NATURE_OBS, 6, tokenize=tokenize, expert_hidden=8)
        names = list(net.trunk._modules)
        tokens = net.trunk[: names.index("tokens") + 1](torch.zeros(2, *NATURE_OBS))
        assert tuple(tokens.shape) == (2, m, d), tokenize
        assert tuple(net.trunk.router.phi.shape) == (d, 4, math.ceil(m / 4))
        assert net.actor.out.in_features == net.critic.out.in_features == m * d
        assert "fc1" not in names
    routed = agent(moe, NATURE_OBS, 6, router="task", expert_hidden=8)  # builds without task ids (no router pass)
    assert routed.actor.out.in_features == 49 * 64
    moe.moe_set_task(routed, torch.tensor([1, 0]))
    with torch.no_grad():
        assert tuple(routed(torch.zeros(2, *NATURE_OBS, dtype=torch.uint8))[0].shape) == (2, 6)
    final = agent(moe, NATURE_OBS, 6, moe_placement="final", moe_networks="actor")
    assert isinstance(final.actor.out, moe.MoELinear) and type(final.critic.out) is torch.nn.Linear
    assert final.trunk.fc1.out_features == 512


# ---------------------------------------------------------------------------------------------------------------
# The one-token MoE of an MLP layer (MoELinear)
# ---------------------------------------------------------------------------------------------------------------


def expert_linear(module, e: int):
    """Expert e of a MoELinear as (W (out, in), b (out,))."""
    w = module.weight.detach().view(module.out_features, module.in_features, module.experts)[:, :, e]
    return w, module.bias.detach()[:, e]


@pytest.mark.parametrize("moe_type", ["softmoe", "top1"])
def test_one_expert_one_slot_is_the_experts_linear(moe, moe_type):
    torch.manual_seed(0)
    mix = moe.MoELinear(5, 3, np.sqrt(2), moe_type, 1, 1.0, False, "learned")
    with torch.no_grad():
        mix.bias.normal_()
    w, b = expert_linear(mix, 0)
    dense = torch.nn.Linear(5, 3)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(b)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mix(x), dense(x))  # the routing weight is softmax over one slot = 1
    assert isinstance(mix, torch.nn.Linear) and (mix.in_features, mix.out_features) == (5, 3)


def test_softmoe_mlp_layer_is_a_softmax_gated_mixture(moe):
    """One token: dispatch is 1, so each expert sees x; output = sum_e softmax(x Phi)_e (W_e x + b_e), by hand."""
    torch.manual_seed(0)
    mix = moe.MoELinear(4, 3, np.sqrt(2), "softmoe", 3, 1.0, False, "learned")
    with torch.no_grad():
        mix.bias.normal_()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    phi = mix.router.phi.detach()[:, :, 0]  # (d, experts): one slot each
    gates = torch.softmax(x @ phi, dim=1)
    expected = sum(gates[:, e:e + 1] * (x @ expert_linear(mix, e)[0].T + expert_linear(mix, e)[1]) for e in range(3))
    with torch.no_grad():
        torch.testing.assert_close(mix(x), expected)
    # capacity 2: two slots per expert, both holding x; the combine weights of an expert's slots add up
    wide = moe.MoELinear(4, 3, np.sqrt(2), "softmoe", 3, 6.0, False, "learned")
    assert wide.router.phi.shape == (4, 3, 2)
    gates = torch.softmax((x @ wide.router.phi.detach().flatten(1)), dim=1).view(5, 3, 2).sum(dim=2)
    expected = sum(gates[:, e:e + 1] * (x @ expert_linear(wide, e)[0].T + expert_linear(wide, e)[1]) for e in range(3))
    with torch.no_grad():
        torch.testing.assert_close(wide(x), expected)


def test_top1_mlp_layer_uses_the_argmax_expert_times_its_gate(moe):
    torch.manual_seed(0)
    mix = moe.MoELinear(4, 3, np.sqrt(2), "top1", 3, 1.0, False, "learned")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(x @ mix.router.router.weight.detach().T, dim=1)
    gate, k = probs.max(dim=1)
    with torch.no_grad():
        out = mix(x)
    for i in range(6):
        w, b = expert_linear(mix, k[i].item())
        torch.testing.assert_close(out[i], gate[i] * (w @ x[i] + b))
    assert len(set(k.tolist())) > 1  # not vacuous: several experts are used


def test_task_router_sends_task_k_to_expert_k(moe):
    torch.manual_seed(0)
    mix = moe.MoELinear(4, 3, np.sqrt(2), "softmoe", 3, 1.0, False, "task")
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    mix.router.task_ids = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out = mix(x)
    for i, k in enumerate([0, 2, 1, 2]):
        w, b = expert_linear(mix, k)
        torch.testing.assert_close(out[i], w @ x[i] + b)


def test_weight_layout_rows_are_units_and_adjacent_columns_are_one_input(moe):
    """Row i holds unit i's incoming weights in every expert; input j's outgoing weights are the `experts` columns
    j*E .. j*E+E-1 (ReGraMa's reader rule `mask.repeat_interleave(weight.shape[1] // units)`): zeroing them removes
    input j from every expert, zeroing row i silences unit i's weights in every expert."""
    torch.manual_seed(0)
    mix = moe.MoELinear(4, 3, np.sqrt(2), "softmoe", 2, 1.0, False, "learned")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([False, True, False, False])
    with torch.no_grad():
        mix.weight[:, mask.repeat_interleave(mix.weight.shape[1] // mask.numel())] = 0.0
        changed = x.clone()
        changed[:, 1] += 10.0  # input 1 no longer reaches the experts (the router still reads it)
        _, _, y, = mix.expert_outputs(x)
        _, _, y2 = mix.expert_outputs(changed)
        torch.testing.assert_close(y, y2)
        mix.weight[1] = 0.0
        mix.bias[1] = 0.0
        torch.testing.assert_close(mix(x)[:, 1], torch.zeros(5))


# ---------------------------------------------------------------------------------------------------------------
# big: each whole MLP as one MoE of expert MLPs
# ---------------------------------------------------------------------------------------------------------------


def test_big_is_a_gated_sum_of_expert_mlps(moe):
    net = agent(moe, (4,), 3, moe_placement="big", expert_hidden=8)
    actor = net.actor
    assert list(actor._modules) == ["router", "fc1", "act1", "fc2", "act2", "out"]
    assert (actor.fc2.in_features, actor.fc2.out_features, actor.out.out_features) == (32, 32, 3)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    gates = torch.softmax(x @ actor.router.route.phi.detach()[:, :, 0], dim=1)
    expected = torch.zeros(5, 3)
    for e in range(4):
        h = slice(8 * e, 8 * (e + 1))
        a1 = torch.tanh(x @ actor.fc1.weight[h].T + actor.fc1.bias[h])
        a2 = torch.tanh(a1 @ actor.fc2.weight[h, h].T + actor.fc2.bias[h])
        out = a2 @ actor.out.weight[3 * e:3 * (e + 1), h].T + actor.out.bias[3 * e:3 * (e + 1)]
        expected += gates[:, e:e + 1] * out
    with torch.no_grad():
        torch.testing.assert_close(actor(x), expected.detach())
    loss = actor(x).sum()  # weights outside the experts' blocks get no gradient
    loss.backward()
    assert (actor.fc2.weight.grad * (1 - actor.fc2.mask)).abs().sum() == 0
    assert (actor.fc2.weight.grad * actor.fc2.mask).abs().sum() > 0


def test_placements_and_networks(moe):
    def kinds(seq):
        return {name: type(m).__name__ for name, m in seq.named_children() if "fc" in name or name == "out"}
    middle = agent(moe, (4,), 2)
    assert kinds(middle.actor) == kinds(middle.critic) == {"fc1": "Linear", "fc2": "MoELinear", "out": "Linear"}
    final = agent(moe, (4,), 2, moe_placement="final", moe_networks="critic")
    assert kinds(final.actor) == {"fc1": "Linear", "fc2": "Linear", "out": "Linear"}
    assert kinds(final.critic) == {"fc1": "Linear", "fc2": "Linear", "out": "MoELinear"}
    every = agent(moe, (4,), 2, moe_placement="all", moe_type="top1", moe_networks="actor")
    assert set(kinds(every.actor).values()) == {"MoELinear"} and set(kinds(every.critic).values()) == {"Linear"}
    # the MoE layers keep ppo.py's in/out features and output shape, so _walk's hidden layers are ppo.py's names
    _, _, hidden = middle(torch.randn(3, 4), return_hidden=True)
    assert [(n, tuple(z.shape)) for n, z, _ in hidden] == [(f"{s}.fc{i}", (3, 64)) for s in ("actor", "critic")
                                                          for i in (1, 2)]
    none = agent(moe, (4,), 2, moe_type="none")
    torch.manual_seed(0)
    base = load_script("ppo").Agent((4,), 2, False)
    assert {k: v.shape for k, v in none.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(none.state_dict().values(), base.state_dict().values()))


def test_moe_draws_leave_the_global_rng_alone(moe):
    """The MoE's parameters come from a generator of their own: building the MoE agent leaves torch's global stream
    where ppo.py's agent leaves it, and ppo.py's own layers (fc1) keep ppo.py's draws."""
    agent(moe, (4,), 2, moe_type="none")
    after_base = torch.rand(3)
    net = agent(moe, (4,), 2)
    after_moe = torch.rand(3)
    assert torch.equal(after_base, after_moe)
    base = agent(moe, (4,), 2, moe_type="none")
    assert torch.equal(net.actor.fc1.weight, base.actor.fc1.weight)


def test_moe_draws_do_not_reseed_cuda(moe, monkeypatch):
    """fork_rng(devices=[]) restores the CPU generator only, so the MoE seeds the CPU generator alone:
    torch.manual_seed would also reseed CUDA's and change a GPU run's action sampling."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    moe.MOE_SETTINGS.clear()
    moe.MOE_SETTINGS.update(settings(moe))
    try:
        moe.Agent((4,), 2, False)
    finally:
        moe.MOE_SETTINGS.clear()
        moe.MOE_SETTINGS.update(moe_type="none")
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id, flags", [("CartPole-v1", SMOKE), ("MinAtar/Breakout", MINATAR)])
def test_none_is_ppo_py_and_the_default_is_not(moe, ppo, tmp_path, env_id, flags):
    base = run_in_process(ppo, tmp_path, "ppo", env_id, flags, metrics_every=0)
    off = run_in_process(moe, tmp_path, "off", env_id, flags, moe_type="none")
    assert_same_run(base, off, "ppo_moe.py --moe-type none", min_lines=5)
    assert not any(key.startswith("moe/") for key in read_scalars(off))
    if env_id == "CartPole-v1":  # the default MoE changes the critic from the first update on
        on = run_in_process(moe, tmp_path, "on", env_id, flags, metrics_every=0)
        assert read_scalars(on)["losses/value_loss"] != read_scalars(base)["losses/value_loss"]


def test_minatar_run_logs_moe_keys_diagnostics_change_nothing_and_checkpoint(moe, tmp_path):
    run = run_in_process(moe, tmp_path, "on", "MinAtar/Breakout", MINATAR, save_model=True)
    quiet = run_in_process(moe, tmp_path, "quiet", "MinAtar/Breakout", MINATAR, metrics_every=0)
    assert_same_run(quiet, run, "ppo_moe.py with the moe/ diagnostics", min_lines=5)  # diagnostics change nothing
    scalars = read_scalars(run)
    for key in ("moe/load/actor.fc2/expert3", "moe/dormant_tau0.1/critic.fc2/expert0", "moe/combine_entropy/actor.fc2",
                "plasticity/dormant_tau0.1/actor.fc2"):
        assert key in scalars, key
    for layer in ("actor.fc2", "critic.fc2"):  # loads are combine weights: they sum to 1 over the experts
        assert sum(scalars[f"moe/load/{layer}/expert{k}"][-1][1] for k in range(4)) == pytest.approx(1.0, abs=1e-5)
    summary = read_json(os.path.join(run, "summary.json"))
    model = os.path.join(run, "model.pt")
    evaluated = run_in_process(moe, tmp_path, "eval", "MinAtar/Breakout", MINATAR, eval_checkpoint=model)
    assert read_json(os.path.join(evaluated, "summary.json"))["eval_returns"] == summary["eval_returns"]
    with pytest.raises(moe.UserError, match="--moe-type softmoe --num-experts 4 --moe-placement middle"):
        run_in_process(moe, tmp_path, "mismatch", "MinAtar/Breakout", MINATAR, moe_type="top1", eval_checkpoint=model)


def test_task_routing_in_multi_task_minatar(moe, tmp_path):
    """Three games at once, 6 envs (2 per game), big MoEs routed by game: episodes.csv names each episode's game,
    and expert k's load is game k's share of the sample (about 1/3; expert 3 gets nothing)."""
    games = ("MinAtar/SpaceInvaders", "MinAtar/Breakout", "MinAtar/Asterix")
    run = run_in_process(moe, tmp_path, "mt", games[0], dict(
        env_ids=games, multi_task=True, steps_per_task=384, num_envs=6, num_steps=32, num_minibatches=4,
        eval_episodes=3, metrics_every=8), router="task", moe_placement="big")
    assert read_json(os.path.join(run, "summary.json"))["global_step"] == 3 * 384
    with open(os.path.join(run, "episodes.csv")) as f:
        played = {row["task"] for row in csv.DictReader(f)}
    assert set(games) >= played and len(played) >= 2
    scalars = read_scalars(run)
    loads = [scalars[f"moe/load/actor.big/expert{k}"][-1][1] for k in range(4)]
    assert loads[3] == 0.0 and all(0.15 < load < 0.55 for load in loads[:3]) and sum(loads) == pytest.approx(1.0)


def test_task_routing_in_a_sequence_and_determinism(moe, tmp_path):
    games = ("MinAtar/Breakout", "MinAtar/SpaceInvaders")
    flags = dict(env_ids=games, steps_per_task=256, num_envs=4, num_steps=32, num_minibatches=4, eval_episodes=0,
                 metrics_every=8, router="task")
    a = run_in_process(moe, tmp_path, "a", games[0], flags)
    b = run_in_process(moe, tmp_path, "b", games[0], flags)
    assert_same_run(a, b, "ppo_moe.py twice with one seed", min_lines=3)
    scalars = read_scalars(a)
    expert0 = [value for _, value in scalars["moe/load/critic.fc2/expert0"]]
    expert1 = [value for _, value in scalars["moe/load/critic.fc2/expert1"]]
    assert expert0[0] == 1.0 and expert0[-1] == 0.0 and expert1[-1] == 1.0  # task 0 -> expert 0, task 1 -> expert 1


def test_atari_smoke(moe, tmp_path):
    run = run_in_process(moe, tmp_path, "atari", "Breakout-v5", dict(
        total_timesteps=128, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=4,
        metrics_batch_size=32), moe_placement="all", moe_type="top1")
    scalars = read_scalars(run)
    for key in ("moe/load/trunk/expert0", "moe/dormant_tau0.1/trunk/expert3", "moe/load/actor.out/expert1",
                "moe/dropped_fraction/trunk", "plasticity/dormant_tau0.1/experts_fc1"):
        assert key in scalars, key


@pytest.mark.parametrize("argv, fragment", [
    (["--env-id", "Breakout-v5", "--moe-placement", "big"], "--moe-placement big wraps an MLP"),
    (["--env-id", "Breakout-v5", "--moe-networks", "actor"], "shared trunk"),
    (["--tokenize", "per-feature-map"], "one token"),
    (["--expert-hidden", "32"], "--expert-hidden applies to pixels"),
    (["--router", "task"], "--router task"),
    (["--env-ids", "MinAtar/Breakout", "MinAtar/Breakout", "--steps-per-task", "8192", "--multi-task"],
     "--multi-task"),
    (["--env-ids", "MinAtar/Breakout", "MinAtar/Asterix", "--steps-per-task", "384", "--multi-task",
      "--num-envs", "3"], "--num-envs 3"),
    (["--num-experts", "0"], "--num-experts must be >= 1"),
    (["--capacity-factor", "0"], "--capacity-factor"),
])
def test_bad_moe_flags_are_one_line_errors(moe, capsys, argv, fragment):
    code, lines = call_main(moe, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and lines[0].startswith("error:"), lines
