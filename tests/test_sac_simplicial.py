"""algos/sac_simplicial.py: the SEM block (every group a point of the simplex, the exact Linear -> LayerNorm -> group
softmax computation, temperature, gradients into the projection, the softmax-logit gradient of the diagnostics),
which networks each --sem-placement changes, `--sem-placement none` against sac.py (same networks, same run), and
end-to-end runs (outputs, determinism, bad input)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (
    assert_one_line_error, assert_seed_determinism, describe, load_script, read_csv, read_json, read_scalars,
    run_script, script_path,
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
    episodes = {k: open(os.path.join(str(tmp_path), k, "episodes.csv")).read() for k in runs}
    assert episodes["sac"].count("\n") > 5
    assert episodes["off"] == episodes["sac"]
    assert episodes["on"] != episodes["sac"]
    losses = {k: read_scalars(os.path.join(str(tmp_path), k)) for k in runs}
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
    for qf in ("qf1", "qf2"):
        assert model[qf]["net.sem.weight"].shape == (64, 256) and model[qf]["net.q.weight"].shape == (1, 64)
    assert "trunk.fc2.weight" in model["model"] and not any("sem" in k for k in model["model"])
    scalars = read_scalars(run_dir)
    assert "plasticity/qf2/grad_inactive_tau0/sem" in scalars and "plasticity/actor/dormant_tau0/fc2" in scalars


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    def run(tmp, name, *flags):
        return run_sem(tmp, name, "--env-id", "Hopper-v4", "--total-timesteps", 300, *TINY, "--eval-episodes", 0,
                       "--metrics-every", 0, "--sem-placement", "both", *flags)

    assert_seed_determinism(run, tmp_path)


@pytest.mark.parametrize("flags", [["--sem-groups", 0], ["--sem-vertices", 1], ["--sem-temperature", -1.0],
                                   ["--sem-temperature", "nan"]])
def test_bad_sem_flags_are_one_line_errors(tmp_path, flags):
    proc = run_sem(tmp_path, "bad", "--env-id", "Hopper-v4", *flags)
    assert_one_line_error(proc, "--sem-groups >= 1", "--sem-vertices >= 2", "--sem-temperature > 0")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # rejected before any work
