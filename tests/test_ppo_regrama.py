"""algos/ppo_regrama.py: ReGraMa on PPO (an extension: the paper has no PPO). GraMa scores against a hand computation
with hooks and autograd (tanh and ReLU MLPs, the Nature CNN's channels, BroNet's Linear outputs), GraMa-zero = ReDo-
dormant on a ReLU network with dead units, a layer no gradient reaches left alone, the recycle touching exactly the
flagged entries (incoming rows, biases, outgoing columns through the Flatten, BroNet's LayerNorms, Adam's moments),
--regrama-tau -1 and a recycle that never fires against ppo.py (same episodes), recycles in a short run, a BroNet run
and its checkpoint check, and bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
MINATAR = dict(total_timesteps=512, num_envs=4, num_steps=64, eval_episodes=0, metrics_every=8)


@pytest.fixture(scope="module")
def regrama():
    return load_script("ppo_regrama")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def make_agent(regrama, kind: str, seed: int = 0):
    """A small agent of each kind: tanh MLPs (classic), ReLU MLPs (MinAtar), the Nature CNN (Atari), BroNets."""
    torch.manual_seed(seed)
    if kind == "tanh":
        return regrama.Agent((6,), 3, False)
    if kind == "relu":
        return regrama.Agent((8,), 3, False, minatar=True)
    if kind == "pixel":
        return regrama.Agent((4, 84, 84), 3, False)
    return regrama.BroAgent((6,), 3, False, width=16, blocks=2)


def make_batch(regrama, agent, n: int = 32, seed: int = 1):
    """A training minibatch whose old log-probabilities and values are the agent's own (ratio 1, no value clipping),
    with random actions, advantages and returns."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 4, 84, 84) if agent.pixel else (n, agent.actor[0].in_features)
    obs = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) if agent.pixel else torch.randn(shape, generator=gen)
    actions = torch.randint(0, 3, (n,), generator=gen)
    with torch.no_grad():
        out, values, _ = agent(obs)
        logprobs = agent.log_prob_entropy(out, actions)[0]
    return obs, actions, logprobs, torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 3, values


def args_for(regrama, **changes):
    args = regrama.Args(env_id="CartPole-v1", **changes)
    regrama.resolve_args(args)
    return args


def hidden_linear_outputs(agent) -> dict[str, nn.Module]:
    """Every hidden unit's pre-activation module, by the name return_hidden uses, found independently of the script's
    walk: each Linear/Conv2d of the agent but the two output layers."""
    named = dict(agent.named_modules())
    out = {}
    for name, module in named.items():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith("out"):
            short = name.split(".", 1)[1] if name.startswith("trunk.") else name  # the trunk has no prefix
            out[short] = module
    return out


def hand_grama(regrama, agent, batch, args) -> dict[str, torch.Tensor]:
    """GraMa by hand: capture every hidden Linear/Conv output with a forward hook, backpropagate ppo.py's loss, then
    average |dL/dz| over the batch (and space) unit by unit and divide by the layer's mean (plus ppo.py's 1e-9, which
    matters: PPO's per-unit gradients are small), with Python loops."""
    captured = {}
    handles = []
    for name, module in hidden_linear_outputs(agent).items():
        def hook(_, __, z, name=name):
            z.retain_grad()
            captured[name] = z
        handles.append(module.register_forward_hook(hook))
    loss = regrama.ppo_loss(agent, *batch, args)[0]
    loss.backward()
    for handle in handles:
        handle.remove()
    agent.zero_grad(set_to_none=True)
    scores = {}
    for name, z in captured.items():
        g = z.grad
        per_unit = [g[:, i].abs().mean().item() for i in range(g.shape[1])]
        layer_mean = sum(per_unit) / len(per_unit)
        scores[name] = torch.tensor([u / (layer_mean + 1e-9) for u in per_unit])  # + 1e-9: ppo.py's unit_scores
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tanh", "relu", "pixel", "bro"])
def test_grama_scores_match_a_hand_computation(regrama, kind):
    agent = make_agent(regrama, kind)
    batch = make_batch(regrama, agent, n=8 if kind == "pixel" else 32)
    args = args_for(regrama)
    ours = regrama.regrama_scores(agent, batch, args)
    hand = hand_grama(regrama, agent, batch, args)
    assert sorted(ours) == sorted(hand), (list(ours), list(hand))
    for name in hand:
        assert torch.allclose(ours[name], hand[name], rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for p in agent.parameters())  # scoring leaves the parameters' .grad alone
    if kind == "pixel":
        assert list(ours) == ["conv1", "conv2", "conv3", "fc1"] and ours["conv3"].shape == (64,)
    if kind == "bro":  # BroNet: fc0, then fc_a and fc_b of every block, in the policy and in the value network
        assert list(ours)[:5] == ["actor.fc0", "actor.block0.fc_a", "actor.block0.fc_b", "actor.block1.fc_a",
                                  "actor.block1.fc_b"]


def test_redo_scores_are_mean_absolute_activations(regrama):
    agent = make_agent(regrama, "tanh")
    batch = make_batch(regrama, agent)
    scores = regrama.regrama_scores(agent, batch, args_for(regrama, score="redo"))
    h = torch.tanh(agent.actor.fc1(batch[0]))
    per_unit = h.abs().mean(0)
    assert torch.allclose(scores["actor.fc1"], per_unit / per_unit.mean(), rtol=1e-5)


def kill_units(agent, dead: dict[str, list[int]]):
    """Make the listed ReLU units dead on every input: zero incoming weights, bias -1."""
    modules = {"actor.fc1": agent.actor.fc1, "actor.fc2": agent.actor.fc2, "critic.fc1": agent.critic.fc1,
               "critic.fc2": agent.critic.fc2}
    with torch.no_grad():
        for name, units in dead.items():
            modules[name].weight[units] = 0.0
            modules[name].bias[units] = -1.0


def test_grama_zero_is_redo_dormant_on_a_relu_network(regrama):
    """The paper's equivalence for ReLU MLPs: with tau = 0, GraMa flags exactly ReDo's dormant units (here the dead
    ones), while the live units, read by generic random outgoing weights, all get a positive gradient."""
    agent = make_agent(regrama, "relu")
    dead = {"actor.fc1": [0, 5, 17], "actor.fc2": [3, 40, 63], "critic.fc1": [9], "critic.fc2": [1, 2, 60]}
    kill_units(agent, dead)
    batch = make_batch(regrama, agent, n=64)
    grama = regrama.regrama_scores(agent, batch, args_for(regrama, score="grama"))
    redo = regrama.regrama_scores(agent, batch, args_for(regrama, score="redo"))
    for name in grama:
        grama_zero = torch.nonzero(grama[name] <= 0.0).flatten().tolist()
        redo_dormant = torch.nonzero(redo[name] <= 0.0).flatten().tolist()
        assert grama_zero == redo_dormant == dead[name], name


def test_a_layer_no_gradient_reaches_is_not_scored(regrama):
    """PPO2's value clipping: when every new value has moved past the clip range towards a far return, the value loss
    takes the clipped branch everywhere and the critic gets no gradient. GraMa is 0/0 there: +inf, never recycled."""
    agent = make_agent(regrama, "tanh")
    obs, actions, logprobs, advantages, _, values = make_batch(regrama, agent)
    batch = (obs, actions, logprobs, advantages, values + 100.0, values - 1.0)  # old values 1 below, returns far above
    scores = regrama.regrama_scores(agent, batch, args_for(regrama))
    assert scores["critic.fc1"].isinf().all() and scores["critic.fc2"].isinf().all()
    assert scores["actor.fc1"].isfinite().all()
    optimizer = torch.optim.Adam(agent.parameters())
    recycled = regrama.regrama_recycle(agent, optimizer, scores, 0.5)
    assert recycled["critic.fc1"] == (0, 64) and recycled["critic.fc2"] == (0, 64)


def test_recycle_keeps_the_state_of_an_optimizer_without_adam_moments(regrama):
    """Adam's moments of a recycled entry are zeroed (detail 4); an optimizer whose state has no `exp_avg` (Kron, as
    in a composition with ppo_stable.py; SGD's momentum here) is left as it is, and the weights are still recycled."""
    agent = make_agent(regrama, "tanh")
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.1, momentum=0.9)
    agent(make_batch(regrama, agent)[0])[1].sum().backward()
    optimizer.step()
    momentum = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in agent.named_parameters()
                if p in optimizer.state}
    before = agent.actor.fc1.weight.detach().clone()
    scores = {name: torch.ones(64) for name in ("actor.fc1", "actor.fc2", "critic.fc1", "critic.fc2")}
    scores["actor.fc1"][[0, 7]] = 0.0
    recycled = regrama.regrama_recycle(agent, optimizer, scores, 0.5)
    assert recycled["actor.fc1"] == (2, 64)
    assert not torch.equal(agent.actor.fc1.weight[[0, 7]], before[[0, 7]])
    for name, p in agent.named_parameters():
        if name in momentum:
            assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[name]), name


# ---------------------------------------------------------------------------------------------------------------
# The recycle
# ---------------------------------------------------------------------------------------------------------------

# kind -> {hidden layer: flagged units}
FLAGGED = {
    "tanh": {"actor.fc1": [0, 7, 63], "actor.fc2": [5], "critic.fc2": [10, 11]},
    "pixel": {"conv1": [1, 30], "conv2": [0, 63], "conv3": [2, 40], "fc1": [5, 100]},
    "bro": {"actor.fc0": [2], "actor.block0.fc_a": [3, 4], "actor.block1.fc_b": [0], "critic.block0.fc_b": [15]},
}


def expected_changes(kind: str, flagged: dict) -> list[tuple]:
    """The recycle written out per architecture, as (parameter name, index, value) in the order they apply: incoming
    rows ("fresh": the rows of a fresh draw) and biases (0), BroNet's LayerNorm gain (1 before a reader, fc_a; 0 where
    the unit joins the residual stream) and bias (0), then the readers' input columns (0; conv3's through the Flatten:
    channel c is fc1's columns 49c .. 49c + 48), after every fresh draw."""
    incoming, outgoing = [], []
    for layer, units in flagged.items():
        base = ("trunk." if kind == "pixel" else "") + layer
        units = torch.tensor(units)
        incoming += [(base + ".weight", units, "fresh"), (base + ".bias", units, 0.0)]
        if kind == "pixel":
            readers = {"conv1": ["trunk.conv2"], "conv2": ["trunk.conv3"], "conv3": ["trunk.fc1"],
                       "fc1": ["actor.out", "critic.out"]}[layer]
            cols = torch.cat([torch.arange(49 * u, 49 * u + 49) for u in units]) if layer == "conv3" else units
            outgoing += [(reader + ".weight", (slice(None), cols), 0.0) for reader in readers]
        elif kind == "tanh":
            net, fc = layer.split(".")
            outgoing.append((f"{net}.{'fc2' if fc == 'fc1' else 'out'}.weight", (slice(None), units), 0.0))
        else:
            norm = base.replace("fc0", "ln0").replace("fc_a", "ln_a").replace("fc_b", "ln_b")
            incoming += [(norm + ".weight", units, 1.0 if layer.endswith("fc_a") else 0.0), (norm + ".bias", units, 0.0)]
            if layer.endswith("fc_a"):
                outgoing.append((base.replace("fc_a", "fc_b") + ".weight", (slice(None), units), 0.0))
    return incoming + outgoing


@pytest.mark.parametrize("kind", ["tanh", "pixel", "bro"])
def test_recycle_touches_exactly_the_flagged_entries(regrama, kind):
    agent = make_agent(regrama, kind)
    batch = make_batch(regrama, agent, n=4 if kind == "pixel" else 32)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    loss = regrama.ppo_loss(agent, *batch, args_for(regrama))[0]
    loss.backward()
    optimizer.step()  # real Adam state, then random moments so that a zeroed entry cannot be zero by accident
    gen = torch.Generator().manual_seed(3)
    for p in agent.parameters():
        optimizer.state[p]["exp_avg"].copy_(torch.randn(p.shape, generator=gen))
        optimizer.state[p]["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) + 0.1)
    names = list(regrama.regrama_scores(agent, batch, args_for(regrama)))
    flagged = FLAGGED[kind]
    scores = {}
    for name in names:  # flagged units score 0, the others 1
        score = torch.ones(regrama.recycle_plan(agent)[name][0].weight.shape[0])
        score[flagged.get(name, [])] = 0.0
        scores[name] = score
    params = dict(agent.named_parameters())
    expected = {n: p.detach().clone() for n, p in params.items()}
    moments = {n: {k: optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in params.items()}
    torch.manual_seed(11)
    recycled = regrama.regrama_recycle(agent, optimizer, scores, tau=0.0)
    torch.manual_seed(11)  # the fresh draws, redone: one full orthogonal draw (gain sqrt 2) per layer with flags, in order
    fresh = {}
    for name in names:
        if flagged.get(name):
            prefix = "trunk." if kind == "pixel" else ""
            fresh[prefix + name + ".weight"] = nn.init.orthogonal_(torch.empty_like(params[prefix + name + ".weight"]),
                                                                   2 ** 0.5)
    reset = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for pname, index, value in expected_changes(kind, flagged):
        expected[pname][index] = fresh[pname][index] if value == "fresh" else value
        reset[pname][index] = True
    assert {n: c for n, (c, _) in recycled.items() if c} == {n: len(u) for n, u in flagged.items()}
    for pname, param in params.items():
        assert torch.equal(param.detach(), expected[pname]), f"{pname}: not exactly the expected entries changed"
        for key in ("exp_avg", "exp_avg_sq"):
            state, mask = optimizer.state[param][key], reset[pname]
            assert (state[mask] == 0).all(), f"{pname} {key}: a reset entry kept its moment"
            assert torch.equal(state[~mask], moments[pname][key][~mask]), f"{pname} {key}: another entry changed"
    assert "actor.out" not in recycled and "critic.out" not in recycled  # output layers are never units


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_off_and_a_recycle_that_never_fires_are_ppo_py(regrama, ppo, tmp_path):
    """--regrama-tau -1 (even scored every step) and tau 0 on tanh MLPs (scored every step, nothing ever at exactly 0)
    write ppo.py's episodes: the scoring leaves the run alone. MinAtar too, with tau -1."""
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(regrama, tmp_path, "off", "CartPole-v1", SMOKE, regrama_tau=-1.0, regrama_period=1)
    idle = run_in_process(regrama, tmp_path, "idle", "CartPole-v1", SMOKE, regrama_tau=0.0, regrama_period=1)
    assert_same_run(base, off, "ppo_regrama.py --regrama-tau -1")
    assert_same_run(base, idle, "ppo_regrama.py --regrama-tau 0 --regrama-period 1")
    assert "regrama/recycled_units" not in read_scalars(off)
    idle_scalars = read_scalars(idle)
    assert len(idle_scalars["regrama/recycled_units"]) == read_json(os.path.join(idle, "summary.json"))["num_updates"]
    assert all(v == 0 for _, v in idle_scalars["regrama/recycled_units"])
    base_m = run_in_process(ppo, tmp_path, "ppo_m", "MinAtar/Breakout", MINATAR)
    off_m = run_in_process(regrama, tmp_path, "off_m", "MinAtar/Breakout", MINATAR, regrama_tau=-1.0, regrama_period=1)
    assert_same_run(base_m, off_m, "ppo_regrama.py --regrama-tau -1 on MinAtar", min_lines=1)


def test_recycles_fire_in_a_short_run(regrama, tmp_path):
    run = run_in_process(regrama, tmp_path, "on", "CartPole-v1", SMOKE, total_timesteps=512, regrama_tau=0.5,
                         regrama_period=8)
    scalars = read_scalars(run)
    updates = read_json(os.path.join(run, "summary.json"))["num_updates"]
    assert len(scalars["regrama/recycled_fraction"]) == updates // 8
    assert max(v for _, v in scalars["regrama/recycled_fraction"]) > 0
    for layer in ("actor.fc1", "actor.fc2", "critic.fc1", "critic.fc2"):
        assert f"regrama/recycled_fraction/{layer}" in scalars
    total = sum(v for _, v in scalars["regrama/recycled_units"])
    assert total > 0 and "plasticity/grad_inactive_tau0.1" in scalars  # the base's diagnostics stay


def test_bronet_run_and_its_checkpoint_check(regrama, tmp_path, capsys):
    run = run_in_process(regrama, tmp_path, "bro", "CartPole-v1", SMOKE, total_timesteps=256, network="bro",
                         bro_width=16, regrama_tau=0.5, regrama_period=4, save_model=True)
    scalars = read_scalars(run)
    assert "regrama/recycled_fraction/critic.block0.fc_b" in scalars
    assert "plasticity/grad_inactive_tau0/actor.block0.fc_a" in scalars
    model = os.path.join(run, "model.pt")
    code, lines = call_main(regrama, ["--env-id", "CartPole-v1", "--eval-checkpoint", model, "--eval-episodes", "1",
                                      "--output-dir", str(tmp_path), "--run-name", "mlp_eval"], capsys)
    assert code == 2 and len(lines) == 1 and "--network" in lines[0] and "'bro_width': 16" in lines[0], lines
    code, lines = call_main(regrama, ["--env-id", "CartPole-v1", "--eval-checkpoint", model, "--eval-episodes", "1",
                                      "--network", "bro", "--bro-width", "16", "--output-dir", str(tmp_path),
                                      "--run-name", "bro_eval"], capsys)
    assert code == 0, lines


@pytest.mark.parametrize("argv, fragment", [
    (["--regrama-tau", "1"], "--regrama-tau"), (["--regrama-tau", "2.5"], "--regrama-tau"),
    (["--regrama-period", "0"], "--regrama-period"), (["--regrama-period", "-3"], "--regrama-period"),
    (["--bro-width", "0"], "--bro-width"),
    (["--env-id", "Breakout-v5", "--network", "bro"], "--network bro"),
])
def test_bad_regrama_flags_are_one_line_errors(regrama, capsys, argv, fragment):
    code, lines = call_main(regrama, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
