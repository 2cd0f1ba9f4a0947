"""algos/sac_simplicial.py: the SEM block (every group a point of the simplex, the exact Linear -> LayerNorm -> group
softmax computation, temperature, gradients into the projection, the softmax-logit gradient of the diagnostics),
which networks each --sem-placement changes, `--sem-placement none` against sac.py (same networks, same run), the
C51 critic head (the projection by hand and against a floor/ceil reference, the expected Q, the entropy-shifted
target, the clipped double-Q rule, the cross-entropy, its defaults per placement and family, the ceiling of a scalar
head after SEM that it lifts), and end-to-end runs (outputs, determinism, bad input)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (
    assert_one_line_error, assert_same_run, assert_seed_determinism, describe, load_script, read_csv, read_json,
    read_scalars, run_script, script_path,
)

SEM_SCRIPT, SAC_SCRIPT = script_path("sac_simplicial"), script_path("sac")
TINY = ["--learning-starts", 100, "--buffer-size", 1000, "--batch-size", 32, "--device", "cpu", "--log-every", 10]


@pytest.fixture(scope="module")
def sem():
    return load_script("sac_simplicial")


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


def group_softmax_reference(z: torch.Tensor, groups: int, vertices: int, temperature: float) -> torch.Tensor:
    """Softmax written out per group with exp / sum, group g being features [g * V, (g + 1) * V)."""
    out = torch.empty_like(z)
    for g in range(groups):
        block = z[:, g * vertices:(g + 1) * vertices] / temperature
        e = torch.exp(block - block.max(dim=1, keepdim=True).values)
        out[:, g * vertices:(g + 1) * vertices] = e / e.sum(dim=1, keepdim=True)
    return out


def group_entropy(h: torch.Tensor, groups: int, vertices: int) -> torch.Tensor:
    p = h.reshape(len(h), groups, vertices)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------------
# The SEM block
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, vertices, temperature", [(8, 64, 1.0), (3, 5, 0.5), (1, 2, 4.0), (16, 4, 0.1)])
def test_every_group_is_a_point_of_the_simplex(sem, groups, vertices, temperature):
    gen = torch.Generator().manual_seed(groups * vertices)
    z = 10 * torch.randn(33, groups * vertices, generator=gen)
    h = sem.SimplexSoftmax(groups, vertices, temperature)(z)
    assert h.shape == z.shape
    assert (h >= 0).all()
    torch.testing.assert_close(h.reshape(33, groups, vertices).sum(-1), torch.ones(33, groups))
    # consecutive blocks of V features are the groups, each softmax(z / tau)
    torch.testing.assert_close(h, group_softmax_reference(z, groups, vertices, temperature))


def test_sem_block_is_linear_layernorm_group_softmax(sem):
    """The actor's SEM features equal softmax(LayerNorm(W relu(fc1(x)) + b) / tau) per group, the LayerNorm with its
    learnable affine (made non-trivial here), and both heads read the L * V features."""
    groups, vertices, temperature = 3, 5, 0.5
    torch.manual_seed(0)
    actor = sem.Actor(7, -np.ones(2), np.ones(2), sem=(groups, vertices, temperature))
    with torch.no_grad():
        actor.trunk.sem_norm.weight.uniform_(0.5, 2.0)
        actor.trunk.sem_norm.bias.uniform_(-1.0, 1.0)
    assert actor.fc_mean.in_features == actor.fc_logstd.in_features == groups * vertices == 15
    assert actor.hidden_layers() == ["fc1", "sem"]
    x = torch.randn(9, 7)
    mean, log_std, hidden = actor(x, return_hidden=True)
    t = actor.trunk
    z = F.layer_norm(t.sem(torch.relu(t.fc1(x))), (15,), t.sem_norm.weight, t.sem_norm.bias)
    features = group_softmax_reference(z, groups, vertices, temperature)
    assert [h.shape for h in hidden] == [(9, 256), (9, 15)]
    torch.testing.assert_close(hidden[-1], features)
    torch.testing.assert_close(mean, actor.fc_mean(features))
    torch.testing.assert_close(log_std, sem.bounded_log_std(actor.fc_logstd(features)))


def test_lower_temperature_sharpens_every_group(sem):
    groups, vertices = 8, 64
    z = torch.randn(64, groups * vertices, generator=torch.Generator().manual_seed(1))
    temperatures = [100.0, 4.0, 1.0, 0.25, 0.01]
    outs = [sem.SimplexSoftmax(groups, vertices, t)(z) for t in temperatures]
    entropies = [group_entropy(h, groups, vertices).item() for h in outs]
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[0] > 0.99 * math.log(vertices)  # hot: nearly uniform on every simplex
    peak = outs[-1].reshape(64, groups, vertices)
    assert peak.max(-1).values.mean() > 0.95  # cold: nearly one-hot (but for near-ties), on the largest logit
    assert torch.equal(peak.argmax(-1), z.reshape(64, groups, vertices).argmax(-1))


@pytest.mark.parametrize("network", ["actor", "critic"])
def test_gradients_reach_the_projection(sem, network):
    torch.manual_seed(0)
    settings = (8, 64, 1.0)
    obs, actions = torch.randn(32, 11), torch.rand(32, 3) * 2 - 1
    if network == "actor":
        net = sem.Actor(11, -np.ones(3), np.ones(3), sem=settings)
        _, log_prob, _ = net.get_action(obs)
        loss = (net(obs)[0] ** 2).sum() - log_prob.mean()
        layers = net.trunk
    else:
        net = sem.SoftQNetwork(11, 3, sem=settings)
        loss = ((net(obs, actions) - 1.0) ** 2).mean()
        layers = net.net
    loss.backward()
    for param in (layers.sem.weight, layers.sem.bias, layers.sem_norm.weight, layers.sem_norm.bias,
                  layers.fc1.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def test_logit_grad_is_the_softmax_jacobian(sem):
    """The diagnostics' gradient w.r.t. SEM's logits, computed from the output and its gradient, equals autograd's."""
    act = sem.SimplexSoftmax(4, 6, 0.3)
    z = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 24, dtype=torch.float64)
    h = act(z)
    (h * w).sum().backward()  # dL/dh = w
    torch.testing.assert_close(act.logit_grad(h.detach(), w), z.grad)


def test_diagnostics_score_sem_units_by_their_logit_gradient(sem):
    """A vertex that never gets probability mass is dormant and gradient-inactive (its logit gradient is ~0),
    although the gradient w.r.t. its output is not small: the SEM layer is keyed `sem`, srank uses its features."""
    torch.manual_seed(0)
    groups, vertices = 4, 8
    actor = sem.Actor(11, -np.ones(3), np.ones(3), sem=(groups, vertices, 1.0))
    qf1, qf2 = sem.SoftQNetwork(11, 3), sem.SoftQNetwork(11, 3)
    with torch.no_grad():
        actor.trunk.sem_norm.bias[0::vertices] = -50.0  # vertex 0 of every group: mass ~ exp(-50)
    batch = [torch.randn(64, 11), torch.rand(64, 3) * 2 - 1, torch.randn(64), torch.zeros(64), torch.randn(64, 11)]
    metrics = sem.plasticity_metrics(actor, qf1, qf2, qf1, qf2, batch, 0.2, 0.99)
    assert metrics["plasticity/actor/dormant_tau0.1/sem"] >= groups / (groups * vertices)
    assert metrics["plasticity/actor/grad_inactive_tau0.1/sem"] >= groups / (groups * vertices)
    assert "plasticity/actor/dormant_tau0/fc2" not in metrics and "plasticity/qf1/dormant_tau0/fc2" in metrics
    assert 1 <= metrics["plasticity/actor/srank"] <= groups * vertices
    # the output gradient of those vertices is not small: scoring it instead would not flag them
    mean, _, hidden = actor(batch[0], return_hidden=True)
    (g,) = torch.autograd.grad(mean.sum(), hidden[-1])
    out_scores = sem.unit_scores(g)
    assert out_scores[0::vertices].min() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Placement and SEM off
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_official_codes(sem):
    args = sem.Args()
    assert (args.sem_placement, args.sem_groups, args.sem_vertices, args.sem_temperature) == ("actor", 8, 64, 1.0)
    assert (args.critic_head, args.num_atoms, args.v_min, args.v_max) == (None, 101, None, None)  # resolve_args fills


@pytest.mark.parametrize("placement, actor_has, critic_has", [
    ("actor", True, False), ("critic", False, True), ("both", True, True), ("none", False, False)])
def test_placement_decides_which_networks_get_sem(sem, placement, actor_has, critic_has):
    actor_sem, critic_sem = sem.sem_settings(sem.Args(sem_placement=placement, sem_groups=3, sem_vertices=5,
                                                      sem_temperature=0.5))
    assert (actor_sem is not None, critic_sem is not None) == (actor_has, critic_has)
    for settings in (actor_sem, critic_sem):
        assert settings in (None, (3, 5, 0.5))
    actor, qf = sem.Actor(11, -np.ones(3), np.ones(3), actor_sem), sem.SoftQNetwork(11, 3, critic_sem)
    assert any(isinstance(m, sem.SimplexSoftmax) for m in actor.modules()) == actor_has
    assert any(isinstance(m, sem.SimplexSoftmax) for m in qf.modules()) == critic_has
    assert actor.fc_mean.in_features == (15 if actor_has else 256)
    assert qf.net.q.in_features == (15 if critic_has else 256)


@pytest.mark.parametrize("seed", [0, 7])
def test_sem_off_builds_sac_py_networks_exactly(sem, sac, seed):
    """--sem-placement none: the same modules, parameters, outputs and random-number consumption as sac.py."""
    actor_sem, critic_sem = sem.sem_settings(sem.Args(sem_placement="none"))
    low, high = np.array([-1.0, -0.4]), np.array([1.0, 0.4])
    built = {}
    for name, module, kwargs in (("sac", sac, {}), ("sem", sem, {"actor": actor_sem, "critic": critic_sem})):
        torch.manual_seed(seed)
        actor = module.Actor(17, low, high, kwargs["actor"]) if kwargs else module.Actor(17, low, high)
        qf = module.SoftQNetwork(17, 2, kwargs["critic"]) if kwargs else module.SoftQNetwork(17, 2)
        built[name] = (actor, qf, torch.get_rng_state())
    (a0, q0, rng0), (a1, q1, rng1) = built["sac"], built["sem"]
    assert torch.equal(rng0, rng1)
    assert repr(a0) == repr(a1) and repr(q0) == repr(q1)
    for n0, n1 in ((a0, a1), (q0, q1)):
        s0, s1 = n0.state_dict(), n1.state_dict()
        assert list(s0) == list(s1)
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    obs, actions = torch.randn(20, 17), torch.rand(20, 2) - 0.5
    for t0, t1 in zip(a0(obs, return_hidden=True), a1(obs, return_hidden=True)):
        if isinstance(t0, list):
            assert all(torch.equal(x, y) for x, y in zip(t0, t1))
        else:
            assert torch.equal(t0, t1)
    assert torch.equal(q0(obs, actions), q1(obs, actions))
    assert a1.hidden_layers() == a0.hidden_layers() == ["fc1", "fc2"]


def run_sem(tmp_path, run_name: str, *flags, script=SEM_SCRIPT):
    return run_script(script, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name], cwd=str(tmp_path))


def test_sem_off_run_is_a_sac_py_run(tmp_path):
    """Same seed and flags: sac_simplicial.py --sem-placement none writes sac.py's episodes.csv and losses; with SEM
    on (the default) the run differs."""
    flags = ["--env-id", "Hopper-v4", "--total-timesteps", 300, *TINY, "--eval-episodes", 0, "--metrics-every", 100,
             "--seed", 4]
    runs = {"sac": run_sem(tmp_path, "sac", *flags, script=SAC_SCRIPT),
            "off": run_sem(tmp_path, "off", *flags, "--sem-placement", "none"),
            "on": run_sem(tmp_path, "on", *flags)}
    for proc in runs.values():
        assert proc.returncode == 0, describe(proc)
    dirs = {k: os.path.join(str(tmp_path), k) for k in runs}
    assert_same_run(dirs["sac"], dirs["off"], "sac_simplicial.py --sem-placement none", min_lines=5)
    assert read_csv(os.path.join(dirs["on"], "episodes.csv")) != read_csv(os.path.join(dirs["sac"], "episodes.csv"))
    losses = {k: read_scalars(dirs[k]) for k in runs}
    for key in ("losses/qf_loss", "losses/actor_loss", "plasticity/actor/srank"):
        assert losses["off"][key] == losses["sac"][key], key
    assert losses["on"]["losses/qf_loss"] != losses["sac"]["losses/qf_loss"]


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def actor_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sem_actor")
    proc = run_sem(tmp, "hopper", "--env-id", "Hopper-v4", "--total-timesteps", 400, "--num-envs", 2, *TINY,
                   "--save-model", "--eval-episodes", 2, "--metrics-every", 50, "--metrics-batch-size", 64,
                   "--seed", 3)
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(tmp), "hopper")


def test_default_run_writes_every_output_with_sem_on_the_actor(actor_run):
    config = read_json(os.path.join(actor_run, "config.json"))
    args = config["args"]
    assert args["exp_name"] == "sac_simplicial"
    assert (args["sem_placement"], args["sem_groups"], args["sem_vertices"], args["sem_temperature"]) == (
        "actor", 8, 64, 1.0)
    header, rows = read_csv(os.path.join(actor_run, "episodes.csv"))
    assert header == ["global_step", "episodic_return", "episodic_length", "task"] and len(rows) >= 5
    summary = read_json(os.path.join(actor_run, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] > 0 and len(summary["eval_returns"]) == 2
    scalars = read_scalars(actor_run)
    for key in ("charts/episodic_return", "losses/qf_loss", "losses/actor_loss", "eval/episodic_return",
                "plasticity/actor/dormant_tau0/sem", "plasticity/actor/grad_inactive_tau0.1/sem",
                "plasticity/actor/srank", "plasticity/qf1/dormant_tau0/fc2"):
        assert key in scalars, key
    assert "plasticity/qf1/dormant_tau0/sem" not in scalars and "plasticity/actor/dormant_tau0/fc2" not in scalars
    model = torch.load(os.path.join(actor_run, "model.pt"), weights_only=True)
    assert model["model"]["trunk.sem.weight"].shape == (512, 256)
    assert model["model"]["trunk.sem_norm.weight"].shape == (512,) and model["model"]["fc_mean.weight"].shape[1] == 512
    assert "trunk.fc2.weight" not in model["model"] and "net.fc2.weight" in model["qf1"]


def test_checkpoint_evaluates_only_with_its_sem_flags(actor_run, tmp_path):
    checkpoint = os.path.join(actor_run, "model.pt")
    ok = run_sem(tmp_path, "eval", "--env-id", "Hopper-v4", "--eval-checkpoint", checkpoint, "--eval-episodes", 2,
                 "--device", "cpu")
    assert ok.returncode == 0, describe(ok)
    assert read_json(os.path.join(str(tmp_path), "eval", "summary.json"))["status"] == "completed"
    bad = run_sem(tmp_path, "eval_bad", "--env-id", "Hopper-v4", "--eval-checkpoint", checkpoint, "--eval-episodes",
                  2, "--device", "cpu", "--sem-groups", 4)
    assert_one_line_error(bad, "SEM settings")


def test_critic_placement_on_dmc(tmp_path):
    proc = run_sem(tmp_path, "cheetah", "--env-id", "CheetahRun-v1", "--total-timesteps", 300, *TINY,
                   "--sem-placement", "critic", "--sem-groups", 4, "--sem-vertices", 16, "--sem-temperature", 0.5,
                   "--save-model", "--eval-episodes", 1, "--metrics-every", 50, "--max-episode-steps", 100)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "cheetah")
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    for qf in ("qf1", "qf2"):  # SEM on the critics: the C51 head by default, DMC's support +-250
        assert model[qf]["net.sem.weight"].shape == (64, 256) and model[qf]["net.q.weight"].shape == (101, 64)
        torch.testing.assert_close(model[qf]["support"], torch.linspace(-250.0, 250.0, 101))
    assert "trunk.fc2.weight" in model["model"] and not any("sem" in k for k in model["model"])
    assert read_json(os.path.join(run_dir, "config.json"))["args"]["critic_head"] == "c51"
    scalars = read_scalars(run_dir)
    assert "plasticity/qf2/grad_inactive_tau0/sem" in scalars and "plasticity/actor/dormant_tau0/fc2" in scalars


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    """SEM on the actor and the critics, the critics with the C51 head (600 steps, so that seed 5 finishes more than
    ten episodes)."""
    def run(tmp, name, *flags):
        return run_sem(tmp, name, "--env-id", "Hopper-v4", "--total-timesteps", 600, *TINY, "--eval-episodes", 0,
                       "--metrics-every", 0, "--sem-placement", "both", *flags)

    assert_seed_determinism(run, tmp_path)


@pytest.mark.parametrize("flags", [["--sem-groups", 0], ["--sem-vertices", 1], ["--sem-temperature", -1.0],
                                   ["--sem-temperature", "nan"]])
def test_bad_sem_flags_are_one_line_errors(tmp_path, flags):
    proc = run_sem(tmp_path, "bad", "--env-id", "Hopper-v4", *flags)
    assert_one_line_error(proc, "--sem-groups >= 1", "--sem-vertices >= 2", "--sem-temperature > 0")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # rejected before any work


# ---------------------------------------------------------------------------------------------------------------
# The C51 critic head (docs/sac_simplicial.md, details 9-11)
# ---------------------------------------------------------------------------------------------------------------


def test_projection_by_hand(sem):
    """Support 0, 1, 2, 3, 4: atoms below v_min and above v_max go to the ends, an atom exactly on a support atom
    (v_max included) keeps all its mass there, the others split by distance."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.1, 0.2, 0.2, 0.0]])
    atoms = torch.tensor([[-1.0, 1.0, 2.25, 3.5, 7.0], [4.0, 4.0, 0.0, 0.5, 10.0]])
    expected = torch.tensor([[0.1, 0.2, 0.225, 0.275, 0.2], [0.3, 0.1, 0.0, 0.0, 0.6]])
    torch.testing.assert_close(sem.c51_project(probs, atoms, 0.0, 4.0), expected)
    # atoms 5 apart (support -10, -5, 0, 5, 10): -7.5 halves, 5 exact, 12 and -20 clipped, 1 = 2.2 atom units
    probs = torch.full((1, 5), 0.2)
    atoms = torch.tensor([[-7.5, 5.0, 12.0, -20.0, 1.0]])
    expected = torch.tensor([[0.3, 0.1, 0.16, 0.24, 0.2]])
    torch.testing.assert_close(sem.c51_project(probs, atoms, -10.0, 10.0), expected)


def floor_ceil_projection(probs, atoms, v_min, v_max):
    """Reference: C51's projection written with floor and ceil of the position b and an explicit case for an integer
    b (the whole mass on that atom), one atom at a time."""
    num_atoms = probs.shape[1]
    dz = (v_max - v_min) / (num_atoms - 1)
    out = torch.zeros(probs.shape, dtype=torch.float64)
    for n in range(probs.shape[0]):
        for j in range(num_atoms):
            b = (min(max(float(atoms[n, j]), v_min), v_max) - v_min) / dz
            low, up = math.floor(b), math.ceil(b)
            if low == up:
                out[n, low] += float(probs[n, j])
            else:
                out[n, low] += float(probs[n, j]) * (up - b)
                out[n, up] += float(probs[n, j]) * (b - low)
    return out


def test_projection_matches_a_floor_ceil_reference_and_keeps_mass_and_mean(sem):
    gen = torch.Generator().manual_seed(3)
    num_atoms, v_min, v_max = 11, -5.0, 5.0  # atoms 1 apart
    probs = torch.softmax(torch.randn(64, num_atoms, generator=gen, dtype=torch.float64), dim=1)
    atoms = 4 * torch.randn(64, num_atoms, generator=gen, dtype=torch.float64)
    atoms[::4] = torch.randint(-7, 8, (16, num_atoms), generator=gen).double()  # integer positions, some clipped
    projected = sem.c51_project(probs, atoms, v_min, v_max)
    torch.testing.assert_close(projected, floor_ceil_projection(probs, atoms, v_min, v_max))
    assert (projected >= 0).all()
    torch.testing.assert_close(projected.sum(1), torch.ones(64, dtype=torch.float64))
    support = torch.linspace(v_min, v_max, num_atoms, dtype=torch.float64)
    clipped_mean = (probs * atoms.clamp(v_min, v_max)).sum(1)  # the projection keeps the mean of the clipped atoms
    torch.testing.assert_close((projected * support).sum(1), clipped_mean)


def test_c51_head_gives_the_expected_q(sem):
    torch.manual_seed(0)
    qf = sem.SoftQNetwork(7, 2, (3, 5, 1.0), (5, -2.0, 2.0))
    assert qf.net.q.out_features == 5 and qf.net.q.in_features == 15
    probs = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    with torch.no_grad():
        qf.net.q.weight.zero_()
        qf.net.q.bias.copy_(probs.log() + 1.5)  # logits: softmax is shift-invariant
    obs, actions = torch.randn(6, 7), torch.rand(6, 2)
    expected = -2 * 0.1 - 1 * 0.2 + 0 + 1 * 0.2 + 2 * 0.2
    torch.testing.assert_close(qf(obs, actions), torch.full((6,), expected))
    q, hidden = qf(obs, actions, return_hidden=True)
    logits, hidden_logits = qf.logits(obs, actions, return_hidden=True)
    assert logits.shape == (6, 5) and all(torch.equal(a, b) for a, b in zip(hidden, hidden_logits))
    with torch.no_grad():  # any head: Q is the mean of softmax(logits) over the atoms
        qf.net.q.weight.normal_()
    logits = qf.logits(obs, actions)
    torch.testing.assert_close(qf(obs, actions), (torch.softmax(logits, 1) * torch.linspace(-2, 2, 5)).sum(1))
    torch.testing.assert_close(sem.c51_q_value(logits, qf.support), qf(obs, actions))


class FixedActor:
    """get_action(next_obs) -> fixed (action, log-prob, action)."""

    def __init__(self, actions, log_pi):
        self.actions, self.log_pi = actions, log_pi

    def get_action(self, obs):
        return self.actions, self.log_pi, self.actions


class FixedCritic:
    """A C51 target critic with fixed next-state probabilities per sample."""

    def __init__(self, probs, c51):
        self.probs, self.c51 = probs, c51
        self.support = torch.linspace(c51[1], c51[2], c51[0])

    def logits(self, obs, actions):
        return self.probs.log()


def test_soft_c51_target_by_hand(sem):
    """Support -2..2 (atoms 1 apart), gamma 0.5, alpha 0.5: atoms move to r + gamma (1 - done) (z - alpha log pi),
    each target critic's distribution is projected, and per sample the one with the lower mean is the target."""
    c51 = (5, -2.0, 2.0)
    rewards, terminated = torch.tensor([1.0, 3.0, -0.25]), torch.tensor([0.0, 1.0, 0.0])
    log_pi = torch.tensor([2.0, -1.0, 0.0])
    # sample 0: atoms -0.5, 0, 0.5, 1, 1.5; sample 1: terminal, all at r = 3 -> clipped to 2;
    # sample 2: atoms -1.25, -0.75, -0.25, 0.25, 0.75
    probs1 = torch.tensor([[0.2] * 5, [0.2] * 5, [0.2] * 5])
    probs2 = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    # the projections by hand; means 0.5, 2, -0.25 (critic 1) and 1.5, 2, -1.25 (critic 2)
    m1 = torch.tensor([[0.0, 0.1, 0.4, 0.4, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0], [0.05, 0.35, 0.4, 0.2, 0.0]])
    m2 = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0], [0.25, 0.75, 0.0, 0.0, 0.0]])
    actor = FixedActor(torch.zeros(3, 2), log_pi)
    q1, q2 = FixedCritic(probs1, c51), FixedCritic(probs2, c51)
    target = sem.c51_target(actor, q1, q2, rewards, terminated, torch.zeros(3, 4), alpha=0.5, gamma=0.5)
    torch.testing.assert_close(target, torch.stack([m1[0], m2[1], m2[2]]))
    # where nothing is clipped its mean is SAC's scalar target with min(E Z1, E Z2): r + gamma (min Q - alpha log pi)
    support = torch.linspace(-2.0, 2.0, 5)
    means = [(p * support).sum(1) for p in (probs1, probs2)]
    scalar = rewards + (1 - terminated) * 0.5 * (torch.min(*means) - 0.5 * log_pi)
    torch.testing.assert_close((target * support).sum(1)[[0, 2]], scalar[[0, 2]])


def test_clipped_double_takes_the_lower_mean_per_sample(sem):
    support = torch.tensor([0.0, 1.0, 2.0])
    m1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # means 0, 2, 1
    m2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])  # means 1, 1, 1
    chosen = sem.c51_clipped_double(m1, m2, support)
    torch.testing.assert_close(chosen, torch.stack([m1[0], m2[1], m2[2]]))  # a tie takes the second (FastTD3)


def test_c51_loss_is_the_cross_entropy(sem):
    logits = torch.randn(4, 6, dtype=torch.float64)
    target = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    expected = -sum((target[n] * torch.log_softmax(logits[n], 0)).sum() for n in range(4)) / 4
    torch.testing.assert_close(sem.c51_loss(logits, target), expected)


@pytest.mark.parametrize("placement, head", [("actor", "scalar"), ("none", "scalar"), ("critic", "c51"),
                                             ("both", "c51")])
def test_critic_placements_default_to_c51(sem, placement, head):
    args = sem.Args(env_id="Hopper-v4", sem_placement=placement)
    sem.resolve_args(args)
    assert args.critic_head == head
    assert (args.v_min, args.v_max, args.num_atoms) == (-1500.0, 1500.0, 101)
    critic = sem.SoftQNetwork(11, 3, sem.sem_settings(args)[1], sem.c51_settings(args))
    assert critic.net.q.out_features == (101 if head == "c51" else 1)
    assert ("support" in critic.state_dict()) == (head == "c51")
    for other in ("scalar", "c51"):  # the flag overrides the default either way
        args = sem.Args(env_id="Hopper-v4", sem_placement=placement, critic_head=other)
        sem.resolve_args(args)
        assert args.critic_head == other


def test_support_defaults_by_family(sem):
    for env_id, half in (("Hopper-v4", 1500.0), ("CheetahRun-v1", 250.0), ("Pendulum-v1", 1500.0)):
        args = sem.Args(env_id=env_id, sem_placement="both")
        sem.resolve_args(args)
        assert (args.v_min, args.v_max) == (-half, half), env_id
    args = sem.Args(env_id="CheetahRun-v1", sem_placement="both", v_min=-10.0)
    sem.resolve_args(args)
    assert (args.v_min, args.v_max) == (-10.0, 250.0)
    assert sem.c51_settings(args) == (101, -10.0, 250.0)


def test_c51_gradients_reach_the_sem_projection(sem):
    torch.manual_seed(0)
    qf = sem.SoftQNetwork(11, 3, (8, 64, 1.0), (51, -10.0, 10.0))
    obs, actions = torch.randn(32, 11), torch.rand(32, 3) * 2 - 1
    target = torch.softmax(torch.randn(32, 51), 1)
    sem.c51_loss(qf.logits(obs, actions), target).backward()
    for param in (qf.net.sem.weight, qf.net.sem_norm.weight, qf.net.fc1.weight, qf.net.q.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert qf.support.grad is None and not qf.support.requires_grad


def test_diagnostics_of_c51_critics_use_their_cross_entropy(sem):
    """plasticity/qf*/grad_norm is the gradient norm of the C51 loss (target distribution, cross-entropy)."""
    torch.manual_seed(0)
    c51 = (21, -5.0, 5.0)
    actor = sem.Actor(11, -np.ones(3), np.ones(3))
    qf1, qf2, qt1, qt2 = [sem.SoftQNetwork(11, 3, (4, 8, 1.0), c51) for _ in range(4)]
    batch = [torch.randn(64, 11), torch.rand(64, 3) * 2 - 1, torch.randn(64), torch.zeros(64), torch.randn(64, 11)]
    torch.manual_seed(5)
    metrics = sem.plasticity_metrics(actor, qf1, qf2, qt1, qt2, batch, 0.2, 0.99)
    assert "plasticity/qf1/dormant_tau0/sem" in metrics and "plasticity/actor/srank" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    torch.manual_seed(5)
    target = sem.c51_target(actor, qt1, qt2, batch[2], batch[3], batch[4], 0.2, 0.99)
    grads = torch.autograd.grad(sem.c51_loss(qf1.logits(batch[0], batch[1]), target), list(qf1.parameters()))
    expected = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    assert metrics["plasticity/qf1/grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_c51_head_lifts_the_ceiling_of_a_scalar_head_after_sem(sem):
    """SEM features sum to L, so a scalar head after them moves slowly towards targets of a few hundred; the C51 head
    reaches them by moving probability mass (docs/sac_simplicial.md, "The scalar head after SEM"). 150 Adam steps
    at lr 1e-3 on targets 300 +- 60."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(14, 1, generator=gen)
    means = {}
    for head in ("scalar", "c51"):
        torch.manual_seed(1)
        qf = sem.SoftQNetwork(11, 3, (8, 64, 1.0), (101, -1500.0, 1500.0) if head == "c51" else None)
        opt = torch.optim.Adam(qf.parameters(), lr=1e-3)
        for _ in range(150):
            x = torch.randn(64, 14, generator=gen)
            y = 300.0 + 60.0 * torch.tanh(x @ w / 3).squeeze(1)
            if head == "c51":  # a point mass at y, projected onto the support
                point = torch.zeros(64, 101)
                point[:, 0] = 1.0
                target = sem.c51_project(point, y[:, None].expand(-1, 101), -1500.0, 1500.0)
                loss = sem.c51_loss(qf.logits(x[:, :11], x[:, 11:]), target)
            else:
                loss = ((qf(x[:, :11], x[:, 11:]) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            means[head] = qf(x[:, :11], x[:, 11:]).mean().item()
    assert means["scalar"] < 10 and means["c51"] > 100, means


@pytest.mark.parametrize("flags", [["--num-atoms", 1], ["--v-min", 5.0, "--v-max", 5.0],
                                   ["--v-min", 10.0, "--v-max", -10.0], ["--v-max", "inf"]])
def test_bad_c51_flags_are_one_line_errors(tmp_path, flags):
    proc = run_sem(tmp_path, "bad", "--env-id", "Hopper-v4", "--sem-placement", "both", *flags)
    assert_one_line_error(proc, "--num-atoms >= 2", "--v-min < --v-max")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # rejected before any work


def test_both_placement_smoke_run_with_c51(tmp_path):
    """--sem-placement both: SEM actor, SEM + C51 critics; finite losses, Q-values and diagnostics."""
    proc = run_sem(tmp_path, "both", "--env-id", "Hopper-v4", "--total-timesteps", 400, *TINY, "--sem-placement",
                   "both", "--save-model", "--eval-episodes", 1, "--metrics-every", 50, "--seed", 2)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "both")
    assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "completed"
    args = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (args["critic_head"], args["num_atoms"], args["v_min"], args["v_max"]) == ("c51", 101, -1500.0, 1500.0)
    scalars = read_scalars(run_dir)
    for key in ("losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "plasticity/qf1/grad_inactive_tau0/sem",
                "plasticity/qf2/srank", "plasticity/actor/dormant_tau0/sem"):
        assert key in scalars and all(math.isfinite(v) for _, v in scalars[key]), key
    # cross-entropy to a distribution over 101 atoms: positive, at most log(101) + the target's entropy
    assert all(0 < v < 2 * math.log(101) for _, v in scalars["losses/qf_loss"])
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert model["qf1"]["net.q.weight"].shape == (101, 512) and model["model"]["fc_mean.weight"].shape[1] == 512


def test_c51_without_sem_on_the_critics_is_allowed(tmp_path):
    """--critic-head c51 with SEM only on the actor (FastTD3's sim_actor has C51 critics): plain ReLU critics with
    the C51 head."""
    proc = run_sem(tmp_path, "actor_c51", "--env-id", "Hopper-v4", "--total-timesteps", 300, *TINY,
                   "--critic-head", "c51", "--save-model", "--eval-episodes", 0, "--metrics-every", 50)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "actor_c51")
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert model["qf1"]["net.q.weight"].shape == (101, 256) and "net.fc2.weight" in model["qf1"]
    assert "trunk.sem.weight" in model["model"]
    assert "plasticity/qf1/dormant_tau0/fc2" in read_scalars(run_dir)
