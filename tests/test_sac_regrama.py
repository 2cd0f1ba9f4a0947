"""algos/sac_regrama.py: GraMa and ReDo scores against hand computations (autograd on hand-written forwards of the
MLP and of BroNet), the ReLU-MLP equivalence of GraMa-zero and ReDo-dormant units, a BroNet unit where the two
disagree, the recycle (exactly the flagged entries: incoming rows from the initializer, biases, LayerNorm entries,
outgoing columns, Adam moments), and end-to-end runs (tau < 0 is sac.py's run, recycles logged, BroNet checkpoints
evaluate, determinism, bad input)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SAC_FLAGS, call_main, load_script, read_json, read_scalars, run_sac_in_process

OBS_DIM, LOW, HIGH = 5, np.array([-1.0, -0.5]), np.array([1.0, 0.5])
ACTION_DIM = len(LOW)
ALPHA, GAMMA = 0.2, 0.99


@pytest.fixture(scope="module")
def mod():
    return load_script("sac_regrama")


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


def nets(mod, bro: bool, seed: int = 0):
    """actor, qf1, qf2, qf1_target, qf2_target as run() builds them (small BroNets)."""
    torch.manual_seed(seed)
    if bro:
        actor = mod.BroActor(OBS_DIM, LOW, HIGH, 12, 1)
        critics = [mod.BroQNetwork(OBS_DIM, ACTION_DIM, 16, 2) for _ in range(4)]
    else:
        actor = mod.Actor(OBS_DIM, LOW, HIGH)
        critics = [mod.SoftQNetwork(OBS_DIM, ACTION_DIM) for _ in range(4)]
    return (actor, *critics)


def batch(n: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, OBS_DIM, generator=gen), torch.rand(n, ACTION_DIM, generator=gen) - 0.5,
            torch.randn(n, generator=gen), (torch.rand(n, generator=gen) < 0.2).float(),
            torch.randn(n, OBS_DIM, generator=gen))


def layer_score(per_sample: torch.Tensor) -> torch.Tensor:
    per_unit = per_sample.abs().mean(dim=0)
    return per_unit / (per_unit.mean() + 1e-9)


def mlp_pre(seq, x):
    """Hand forward through sac.py's (Linear, ReLU) pairs: (output, [pre-activations], [activations])."""
    pres, acts = [], []
    z = seq.fc1(x)
    h = F.relu(z)
    pres.append(z), acts.append(h)
    z = seq.fc2(h)
    h = F.relu(z)
    pres.append(z), acts.append(h)
    return h, pres, acts


def bro_pre(trunk, x):
    """Hand forward through a BroNet trunk: (output, [Linear outputs], [unit activations])."""
    z = trunk.fc0(x)
    x = F.relu(F.layer_norm(z, z.shape[-1:], trunk.ln0.weight, trunk.ln0.bias, 1e-6))
    pres, acts = [z], [x]
    for block in trunk.blocks:
        z_a = block.fc_a(x)
        h = F.relu(F.layer_norm(z_a, z_a.shape[-1:], block.ln_a.weight, block.ln_a.bias, 1e-6))
        z_b = block.fc_b(h)
        r = F.layer_norm(z_b, z_b.shape[-1:], block.ln_b.weight, block.ln_b.bias, 1e-6)
        pres += [z_a, z_b]
        acts += [h, r]
        x = x + r
    return x, pres, acts


def hand_scores(mod, bro: bool, networks, data):
    """GraMa and ReDo scores of qf1, qf2 and the actor from hand-written forwards and autograd, drawing the same
    random numbers in the same order as regrama_scores (the target's next actions, then the actor's sample)."""
    actor, qf1, qf2, qf1_target, qf2_target = networks
    obs, actions, rewards, terminated, next_obs = data
    target = mod.soft_q_target(actor, qf1_target, qf2_target, rewards, terminated, next_obs, ALPHA, GAMMA)
    grama, redo = {}, {}
    for name, qf in (("qf1", qf1), ("qf2", qf2)):
        x = torch.cat([obs, actions], dim=1)
        if bro:
            out, pres, acts = bro_pre(qf.trunk, x)
            q = qf.q(out).squeeze(1)
        else:
            out, pres, acts = mlp_pre(qf.net, x)
            q = qf.net.q(out).squeeze(1)
        grads = torch.autograd.grad(((q - target) ** 2).mean(), pres)
        grama[name] = [layer_score(g) for g in grads]
        redo[name] = [layer_score(a.detach()) for a in acts]
    out, pres, acts = bro_pre(actor.trunk, obs) if bro else mlp_pre(actor.trunk, obs)
    mean, log_std = actor.fc_mean(out), mod.bounded_log_std(actor.fc_logstd(out))
    pi, log_pi = mod.squashed_gaussian(mean, log_std, torch.randn_like(mean), actor.action_scale, actor.action_bias)
    loss = (ALPHA * log_pi - torch.min(qf1(obs, pi), qf2(obs, pi))).mean()
    grama["actor"] = [layer_score(g) for g in torch.autograd.grad(loss, pres)]
    redo["actor"] = [layer_score(a.detach()) for a in acts]
    return grama, redo


@pytest.mark.parametrize("bro", [False, True], ids=["mlp", "bro"])
def test_scores_match_hand_computation(mod, bro):
    """GraMa = mean |d loss / d pre-activation| / layer mean (through the ReLU for the MLP, at the Linear output for
    BroNet), each network on its own loss; ReDo = mean |activation| / layer mean; every hidden layer, in order."""
    networks, data = nets(mod, bro), batch()
    torch.manual_seed(7)
    grama, redo = hand_scores(mod, bro, networks, data)
    for score, expected in (("grama", grama), ("redo", redo)):
        torch.manual_seed(7)
        got = mod.regrama_scores(*networks, data, ALPHA, GAMMA, score)
        assert set(got) == {"qf1", "qf2", "actor"}
        for name in got:
            assert len(got[name]) == len(networks[0 if name == "actor" else 1].hidden_layers()) == len(expected[name])
            for a, b in zip(got[name], expected[name]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
                assert a.mean().item() == pytest.approx(1.0, abs=1e-4)  # layer-normalised


@pytest.mark.parametrize("bro", [False, True], ids=["mlp", "bro"])
def test_weight_gradient_scores_match_hand_computation(mod, bro):
    """--score grama-weight (the official code's proxy): mean |d loss / d W| over each unit's incoming weights,
    divided by the layer's mean, from each network's own loss; the same random draws as regrama_scores."""
    networks, data = nets(mod, bro), batch()
    actor, qf1, qf2, qf1_target, qf2_target = networks
    obs, actions, rewards, terminated, next_obs = data
    torch.manual_seed(7)
    target = mod.soft_q_target(actor, qf1_target, qf2_target, rewards, terminated, next_obs, ALPHA, GAMMA)
    expected = {}
    for name, qf in (("qf1", qf1), ("qf2", qf2)):
        weights = [layer.weight for layer, _, _ in mod.recycle_plan(qf)]
        grads = torch.autograd.grad(((qf(obs, actions) - target) ** 2).mean(), weights)
        expected[name] = [g.abs().mean(dim=1) / (g.abs().mean(dim=1).mean() + 1e-9) for g in grads]
    pi, log_pi, _ = actor.get_action(obs)
    loss = (ALPHA * log_pi - torch.min(qf1(obs, pi), qf2(obs, pi))).mean()
    grads = torch.autograd.grad(loss, [layer.weight for layer, _, _ in mod.recycle_plan(actor)])
    expected["actor"] = [g.abs().mean(dim=1) / (g.abs().mean(dim=1).mean() + 1e-9) for g in grads]
    torch.manual_seed(7)
    got = mod.regrama_scores(*networks, data, ALPHA, GAMMA, "grama-weight")
    for name in ("qf1", "qf2", "actor"):
        assert len(got[name]) == len(expected[name]) == len(networks[0 if name == "actor" else 1].hidden_layers())
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grama_zero_is_redo_dormant_in_a_relu_mlp(mod):
    """For sac.py's ReLU MLPs, the units with GraMa 0 are exactly the ReDo-dormant units (tau 0) on the same batch:
    constructed dead units (large negative biases) in both layers of a critic and of the actor."""
    networks, data = nets(mod, False), batch()
    actor, qf1 = networks[0], networks[1]
    with torch.no_grad():
        for layer, dead in ((qf1.net.fc1, [0, 3, 9]), (qf1.net.fc2, [5, 100]), (actor.trunk.fc1, [1, 2]),
                            (actor.trunk.fc2, [200])):
            layer.bias[dead] = -1e3
    torch.manual_seed(3)
    grama = mod.regrama_scores(*networks, data, ALPHA, GAMMA, "grama")
    redo = mod.regrama_scores(*networks, data, ALPHA, GAMMA, "redo")
    for name, dead in (("qf1", [[0, 3, 9], [5, 100]]), ("actor", [[1, 2], [200]])):
        for g, r, expected in zip(grama[name], redo[name], dead):
            assert torch.equal(g <= 0.0, r <= 0.0), name
            assert set(expected) <= set(torch.nonzero(r <= 0.0).flatten().tolist()), name  # (and any born dead)


def test_grama_and_redo_disagree_in_a_bronet(mod):
    """In a LayerNorm residual block a unit can be ReDo-dormant and still carry gradient: a residual-branch unit
    whose LayerNorm gain and bias are 0 outputs 0 on every state (ReDo score 0), yet its Linear output moves the
    LayerNorm's mean and variance, so its GraMa is > 0. The same coupling keeps a unit whose outgoing weights are all
    0 off GraMa 0 (it still shifts its LayerNorm's statistics), where in an MLP it would score exactly 0."""
    networks, data = nets(mod, True), batch()
    qf1 = networks[1]
    with torch.no_grad():
        qf1.trunk.blocks[0].ln_b.weight[4] = 0.0
        qf1.trunk.blocks[0].ln_b.bias[4] = 0.0
        qf1.trunk.blocks[1].fc_b.weight[:, 6] = 0.0  # block 1's fc_a unit 6 reaches nothing
    torch.manual_seed(3)
    grama = mod.regrama_scores(*networks, data, ALPHA, GAMMA, "grama")["qf1"]
    redo = mod.regrama_scores(*networks, data, ALPHA, GAMMA, "redo")["qf1"]
    names = qf1.hidden_layers()
    b0_fc_b, b1_fc_a = names.index("trunk.blocks.0.fc_b"), names.index("trunk.blocks.1.fc_a")
    assert redo[b0_fc_b][4] == 0.0 and grama[b0_fc_b][4] > 1e-3
    assert grama[b1_fc_a][6] > 1e-3
    assert not torch.equal(grama[b0_fc_b] <= 0.0, redo[b0_fc_b] <= 0.0)


def adam_state(network, seed: int = 0):
    """A fused Adam over `network` after two steps, so every moment is non-zero."""
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        obs, actions = torch.randn(8, OBS_DIM, generator=gen), torch.rand(8, ACTION_DIM, generator=gen)
        out = network(obs, actions) if "QNetwork" in type(network).__name__ else torch.cat(network(obs), dim=1)
        optimizer.zero_grad()
        (out ** 2).sum().backward()
        optimizer.step()
    return optimizer


def snapshot(network, optimizer):
    return ({k: v.detach().clone() for k, v in network.named_parameters()},
            {k: {m: optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")}
             for k, p in network.named_parameters()})


def changed(before: dict, after: dict) -> dict[str, torch.Tensor]:
    """Per parameter, the mask of entries that differ."""
    return {k: before[k] != after[k] for k in before}


def test_mlp_recycle_touches_exactly_the_flagged_entries(mod):
    """Critic: flagged fc1 units get fresh rows (within PyTorch's default kaiming bound), zero bias, and their fc2
    columns zero; flagged fc2 units their q-head columns. Actor: the last hidden layer's outgoing weights are both
    heads'. Adam moments of exactly those entries are zeroed; nothing else changes."""
    _, qf, *_ = nets(mod, False)
    optimizer = adam_state(qf)
    params, moments = snapshot(qf, optimizer)
    scores = [torch.ones(256), torch.ones(256)]
    scores[0][[2, 7]] = 0.0
    scores[1][[11]] = 0.005
    recycled = mod.regrama_recycle(qf, optimizer, scores, 0.01)
    assert recycled == {"fc1": (2, 256), "fc2": (1, 256)}
    new = {k: v.detach() for k, v in qf.named_parameters()}
    diff = changed(params, new)
    rows1, cols2, rows2, cols_q = (torch.zeros(256, dtype=torch.bool) for _ in range(4))
    rows1[[2, 7]], cols2[[2, 7]], rows2[11], cols_q[11] = True, True, True, True
    expected = {"net.fc1.weight": rows1[:, None].expand_as(new["net.fc1.weight"]), "net.fc1.bias": rows1,
                "net.fc2.weight": rows2[:, None] | cols2[None, :], "net.fc2.bias": rows2,
                "net.q.weight": cols_q[None, :], "net.q.bias": torch.zeros(1, dtype=torch.bool)}
    for key, mask in expected.items():
        assert torch.equal(diff[key], mask), key
        for m in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[dict(qf.named_parameters())[key]][m]
            assert (state[mask] == 0).all() and torch.equal(state[~mask], moments[key][m][~mask]), (key, m)
    bound = 1 / math.sqrt(OBS_DIM + ACTION_DIM)
    assert new["net.fc1.weight"][[2, 7]].abs().max() <= bound
    assert (new["net.fc1.bias"][[2, 7]] == 0).all() and (new["net.q.weight"][:, 11] == 0).all()
    assert (new["net.fc2.weight"][:, [2, 7]] == 0).all()

    actor = nets(mod, False)[0]
    optimizer = adam_state(actor)
    params, _ = snapshot(actor, optimizer)
    mod.regrama_recycle(actor, optimizer, [torch.ones(256), torch.tensor([0.0] + [1.0] * 255)], 0.0)
    diff = changed(params, {k: v.detach() for k, v in actor.named_parameters()})
    for head in ("fc_mean.weight", "fc_logstd.weight"):
        assert diff[head][:, 0].all() and not diff[head][:, 1:].any(), head
    assert not diff["trunk.fc1.weight"].any() and diff["trunk.fc2.weight"][0].any()


def test_bronet_recycle_resets_layernorms_and_spares_the_stream_readers(mod):
    """BroNet: a flagged fc_a unit gets a fresh orthogonal row (norm sqrt(2), the init's gain), zero bias, its
    LayerNorm entry back to the identity and its fc_b column zero; a flagged fc_b or fc0 unit joins the residual
    stream, so its LayerNorm gain and bias go to 0 and no reader's column is touched (the stream index also carries
    the other layers' contributions). Adam moments of exactly those entries are zeroed."""
    _, qf, *_ = nets(mod, True)
    optimizer = adam_state(qf)
    params, moments = snapshot(qf, optimizer)
    names = qf.hidden_layers()
    scores = [torch.ones(16) for _ in names]
    scores[names.index("trunk.fc0")][3] = 0.0
    scores[names.index("trunk.blocks.0.fc_a")][[1, 8]] = 0.0
    scores[names.index("trunk.blocks.1.fc_b")][5] = 0.0
    recycled = mod.regrama_recycle(qf, optimizer, scores, 0.0)
    assert recycled["trunk.blocks.0.fc_a"] == (2, 16) and sum(c for c, _ in recycled.values()) == 4
    new = {k: v.detach() for k, v in qf.named_parameters()}
    diff = changed(params, new)
    unit = lambda idx: torch.isin(torch.arange(16), torch.tensor(idx))  # noqa: E731
    b0, b1 = "trunk.blocks.0.", "trunk.blocks.1."
    expected = {
        "trunk.fc0.weight": unit([3])[:, None].expand(16, OBS_DIM + ACTION_DIM), "trunk.fc0.bias": unit([3]),
        "trunk.ln0.weight": unit([3]), "trunk.ln0.bias": unit([3]),  # Adam had moved every entry off its init
        b0 + "fc_a.weight": unit([1, 8])[:, None].expand(16, 16), b0 + "fc_a.bias": unit([1, 8]),
        b0 + "fc_b.weight": unit([1, 8])[None, :].expand(16, 16), b1 + "fc_b.weight": unit([5])[:, None].expand(16, 16),
        b1 + "ln_b.weight": unit([5]), "q.weight": torch.zeros(1, 16, dtype=torch.bool),
        b1 + "fc_a.weight": torch.zeros(16, 16, dtype=torch.bool)}
    for key, mask in expected.items():
        assert torch.equal(diff[key], mask), key
    # LayerNorm parameters had moved under Adam, so resetting them changed them; their moments are zeroed
    assert new[b0 + "ln_a.weight"][[1, 8]].eq(1.0).all() and new[b0 + "ln_a.bias"][[1, 8]].eq(0.0).all()
    assert new["trunk.ln0.weight"][3] == 0 and new[b1 + "ln_b.weight"][5] == 0 and new[b1 + "ln_b.bias"][5] == 0
    torch.testing.assert_close(new[b0 + "fc_a.weight"][[1, 8]].norm(dim=1), torch.full((2,), math.sqrt(2)))
    for key, index in ((b0 + "fc_a.weight", ([1, 8],)), (b0 + "ln_a.weight", ([1, 8],)), ("trunk.ln0.bias", ([3],)),
                       (b0 + "fc_b.weight", (slice(None), [1, 8])), (b1 + "ln_b.bias", ([5],))):
        state = optimizer.state[dict(qf.named_parameters())[key]]
        assert (state["exp_avg"][index] == 0).all() and (state["exp_avg_sq"][index] == 0).all(), key
    untouched = optimizer.state[dict(qf.named_parameters())["q.weight"]]
    assert torch.equal(untouched["exp_avg"], moments["q.weight"]["exp_avg"])


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process, one thread)
# ---------------------------------------------------------------------------------------------------------------


def test_negative_tau_is_a_sac_py_run(mod, sac, tmp_path):
    """--regrama-tau -1 (and the MLP) writes sac.py's episodes.csv, losses and diagnostics byte for byte, and logs
    no regrama/ key; recycling at tau 0.5 changes the run."""
    base, base_dir, _ = run_sac_in_process(sac, tmp_path, "sac", metrics_every=50)
    off, off_dir, _ = run_sac_in_process(mod, tmp_path, "off", metrics_every=50, regrama_tau=-1.0, regrama_period=20)
    on, _, _ = run_sac_in_process(mod, tmp_path, "on", metrics_every=0, regrama_tau=0.5, regrama_period=20)
    assert base.count(b"\n") > 5
    assert off == base and on != base
    base_scalars, off_scalars = read_scalars(base_dir), read_scalars(off_dir)
    for key in ("losses/qf_loss", "losses/actor_loss", "losses/alpha", "plasticity/actor/grad_inactive_tau0.1",
                "plasticity/qf1/dormant_tau0.1/fc2"):
        assert off_scalars[key] == base_scalars[key], key
    assert not any(k.startswith("regrama/") for k in off_scalars)


def test_bronet_run_recycles_logs_saves_and_evaluates(mod, tmp_path):
    """--network bro at tau 0.5 every 20 updates: 10 recycles (200 updates), per-network fractions in (0, 1) at
    least once, BroNet diagnostics keys; the checkpoint evaluates with the same flags; same seed, same episodes."""
    bro = dict(network="bro", bro_critic_width=32, bro_actor_width=16, regrama_tau=0.5, regrama_period=20,
               metrics_every=50)
    episodes, run_dir, summary = run_sac_in_process(mod, tmp_path, "a", save_model=True, **bro)
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["regrama/recycled_fraction"]] == list(range(120, 301, 20))
    for name in ("qf1", "qf2", "actor"):
        fractions = [v for _, v in scalars[f"regrama/{name}/recycled_fraction"]]
        assert any(0 < v < 1 for v in fractions), name
    assert "plasticity/qf1/grad_inactive_tau0.1/trunk.blocks.1.fc_b" in scalars
    assert "regrama/actor/recycled_fraction/trunk.blocks.0.fc_a" in scalars
    assert read_json(os.path.join(run_dir, "config.json"))["args"]["network"] == "bro"
    evaluated = mod.run(mod.Args(**{**SAC_FLAGS, **bro, "eval_checkpoint": summary["model_path"], "eval_episodes": 1,
                                    "output_dir": str(tmp_path), "run_name": "eval"}))
    assert evaluated["status"] == "completed" and len(evaluated["eval_returns"]) == 1
    again, _, _ = run_sac_in_process(mod, tmp_path, "b", **{**bro, "metrics_every": 0})
    assert again == episodes


def test_critics_only_never_touches_the_actor(mod, tmp_path):
    """--regrama-networks critics (the official code's scope) with the weight-gradient score: the critics recycle,
    the actor is neither recycled nor logged."""
    _, run_dir, _ = run_sac_in_process(mod, tmp_path, "c", regrama_tau=0.5, regrama_period=20, metrics_every=0,
                                   regrama_networks="critics", score="grama-weight")
    scalars = read_scalars(run_dir)
    assert any(v > 0 for _, v in scalars["regrama/qf1/recycled_fraction"])
    assert not any(key.startswith("regrama/actor") for key in scalars)


@pytest.mark.parametrize("flags", [dict(regrama_tau=1.0), dict(regrama_tau=float("nan")), dict(regrama_period=0),
                                   dict(bro_critic_width=0)])
def test_bad_regrama_flags_are_user_errors(mod, flags):
    with pytest.raises(mod.UserError, match="--regrama-tau must be < 1|--regrama-period must be >= 1|"
                                            "--bro-critic-width must be >= 1"):
        mod.resolve_args(mod.Args(env_id="Hopper-v4", **flags))


def test_bad_regrama_flag_is_one_line_error(mod, tmp_path, capsys):
    code, lines = call_main(mod, ["--env-id", "Hopper-v4", "--regrama-tau", "2", "--output-dir", tmp_path,
                                  "--run-name", "bad"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --regrama-tau must be < 1"), lines
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
