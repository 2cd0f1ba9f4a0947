"""algos/ppo_simplicial.py: the SEM block (every group a point of the simplex, the exact Linear -> LayerNorm -> group
softmax computation, temperature, gradients into the projection, the logit gradient of the diagnostics), where each
--sem-placement puts it (policy MLP, value MLP, the shared Nature CNN trunk), `--sem-placement none` against ppo.py
(same network, same run), and end-to-end runs (CartPole, Atari, MuJoCo; outputs, determinism, bad input)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    assert_one_line_error, assert_same_run, assert_seed_determinism, describe, load_script, read_csv, read_json,
    read_scalars, run_script, script_path,
)

SEM_SCRIPT, PPO_SCRIPT = script_path("ppo_simplicial"), script_path("ppo")
SETTINGS = (8, 64, 1.0)


@pytest.fixture(scope="module")
def sem():
    return load_script("ppo_simplicial")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def group_softmax_reference(z: torch.Tensor, groups: int, vertices: int, temperature: float) -> torch.Tensor:
    """Softmax written out per group with exp / sum, group g being features [g * V, (g + 1) * V)."""
    out = torch.empty_like(z)
    for g in range(groups):
        block = z[:, g * vertices:(g + 1) * vertices] / temperature
        e = torch.exp(block - block.max(dim=1, keepdim=True).values)
        out[:, g * vertices:(g + 1) * vertices] = e / e.sum(dim=1, keepdim=True)
    return out


def sem_modules(net) -> list:
    return [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]


# ---------------------------------------------------------------------------------------------------------------
# The SEM block
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, vertices, temperature", [(8, 64, 1.0), (3, 5, 0.5), (1, 2, 4.0), (16, 4, 0.1)])
def test_every_group_is_a_point_of_the_simplex(sem, groups, vertices, temperature):
    z = 10 * torch.randn(33, groups * vertices, generator=torch.Generator().manual_seed(groups * vertices))
    h = sem.SimplexSoftmax(groups, vertices, temperature)(z)
    assert h.shape == z.shape and (h >= 0).all()
    torch.testing.assert_close(h.reshape(33, groups, vertices).sum(-1), torch.ones(33, groups))
    torch.testing.assert_close(h, group_softmax_reference(z, groups, vertices, temperature))


def test_lower_temperature_sharpens_every_group(sem):
    groups, vertices = 8, 64
    z = torch.randn(64, groups * vertices, generator=torch.Generator().manual_seed(1))
    entropies = []
    for t in (100.0, 4.0, 1.0, 0.25, 0.01):
        p = sem.SimplexSoftmax(groups, vertices, t)(z).reshape(64, groups, vertices)
        entropies.append(-(p * p.clamp_min(1e-30).log()).sum(-1).mean().item())
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[0] > 0.99 * math.log(vertices) and entropies[-1] < 0.1


@pytest.mark.parametrize("obs_shape, continuous", [((6,), False), ((6,), True)])
def test_vector_sem_is_linear_layernorm_group_softmax(sem, obs_shape, continuous):
    """The policy's SEM features equal softmax(LayerNorm(W tanh(fc1(x)) + b) / tau) per group (non-trivial
    LayerNorm affine), the policy head reads them, and a Gaussian policy's log-std stays a free parameter."""
    groups, vertices, temperature = 3, 5, 0.5
    torch.manual_seed(0)
    agent = sem.Agent(obs_shape, 2, continuous, (groups, vertices, temperature), None)
    with torch.no_grad():
        agent.actor.sem_norm.weight.uniform_(0.5, 2.0)
        agent.actor.sem_norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(9, *obs_shape)
    policy_out, value, hidden = agent(x, return_hidden=True)
    a = agent.actor
    z = F.layer_norm(a.sem(torch.tanh(a.fc1(x))), (15,), a.sem_norm.weight, a.sem_norm.bias)
    features = group_softmax_reference(z, groups, vertices, temperature)
    names = [name for name, _, _ in hidden]
    assert names == ["actor.fc1", "actor.sem", "critic.fc1", "critic.fc2"]
    _, pre, post = hidden[1]
    torch.testing.assert_close(pre, z)  # the diagnostics' pre-activation of SEM: the softmax logits
    torch.testing.assert_close(post, features)
    torch.testing.assert_close(policy_out, a.out(features))
    assert a.out.in_features == 15 and agent.critic.out.in_features == 64
    if continuous:
        assert agent.actor_logstd.shape == (1, 2)  # state-independent, not read from the SEM features


def test_atari_sem_replaces_the_shared_fc1(sem):
    torch.manual_seed(0)
    agent = sem.Agent((4, 84, 84), 6, False, SETTINGS, SETTINGS)
    names = [n for n, _ in agent.trunk.named_children()]
    assert names == ["conv1", "act1", "conv2", "act2", "conv3", "act3", "flatten", "sem", "sem_norm", "sem_act"]
    assert agent.trunk.sem.in_features == 3136 and agent.trunk.sem.out_features == 512
    assert agent.actor.out.in_features == agent.critic.out.in_features == 512
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    _, _, hidden = agent(obs, return_hidden=True)
    assert [n for n, _, _ in hidden] == ["conv1", "conv2", "conv3", "sem"]
    torch.testing.assert_close(hidden[-1][2].reshape(5, 8, 64).sum(-1), torch.ones(5, 8))


@pytest.mark.parametrize("obs_shape, continuous", [((6,), False), ((6,), True), ((4, 84, 84), False)])
def test_gradients_reach_the_projection(sem, obs_shape, continuous):
    torch.manual_seed(0)
    agent = sem.Agent(obs_shape, 3, continuous, SETTINGS, SETTINGS)
    obs = torch.randint(0, 256, (16, *obs_shape), dtype=torch.uint8) if len(obs_shape) == 3 else torch.randn(16, 6)
    with torch.no_grad():
        actions = agent.get_action_and_value(obs)[0]  # stored actions, as in a rollout
    _, log_prob, entropy, value = agent.get_action_and_value(obs, actions)
    loss = -(log_prob * torch.randn(16)).mean() - 0.01 * entropy.mean() + ((value - 1.0) ** 2).mean()
    loss.backward()
    nets = [agent.trunk] if len(obs_shape) == 3 else [agent.actor, agent.critic]
    for net in nets:
        for param in (net.sem.weight, net.sem.bias, net.sem_norm.weight, net.sem_norm.bias):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_diagnostics_score_sem_units_by_their_logit_gradient(sem):
    """A vertex that never gets mass is dormant and gradient-inactive (its logit gradient is ~0); the SEM layers
    are keyed actor.sem / critic.sem, srank uses their features."""
    torch.manual_seed(0)
    groups, vertices = 4, 8
    agent = sem.Agent((6,), 3, False, (groups, vertices, 1.0), (groups, vertices, 1.0))
    with torch.no_grad():
        agent.actor.sem_norm.bias[0::vertices] = -50.0  # vertex 0 of every group: mass ~ exp(-50)
    args = sem.Args(clip_coef=0.2, ent_coef=0.01)
    obs = torch.randn(64, 6)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    batch = (obs, actions, logprobs, torch.randn(64), torch.randn(64), values)
    metrics = sem.plasticity_metrics(agent, batch, args)
    assert metrics["plasticity/dormant_tau0.1/actor.sem"] >= groups / (groups * vertices)
    assert metrics["plasticity/grad_inactive_tau0.1/actor.sem"] >= groups / (groups * vertices)
    assert "plasticity/dormant_tau0/critic.sem" in metrics and "plasticity/dormant_tau0/actor.fc2" not in metrics
    assert 1 <= metrics["plasticity/srank"] <= groups * vertices and "plasticity/srank/critic" in metrics


# ---------------------------------------------------------------------------------------------------------------
# Placement and SEM off
# ---------------------------------------------------------------------------------------------------------------


def test_defaults(sem):
    args = sem.Args()
    assert (args.sem_placement, args.sem_groups, args.sem_vertices, args.sem_temperature) == ("both", 8, 64, 1.0)


@pytest.mark.parametrize("placement, actor_has, critic_has", [
    ("actor", True, False), ("critic", False, True), ("both", True, True), ("none", False, False)])
def test_placement_decides_which_networks_get_sem(sem, placement, actor_has, critic_has):
    settings = sem.sem_settings(sem.Args(sem_placement=placement, sem_groups=3, sem_vertices=5, sem_temperature=0.5))
    assert settings == ((3, 5, 0.5) if actor_has else None, (3, 5, 0.5) if critic_has else None)
    agent = sem.Agent((6,), 2, True, *settings)
    assert (len(sem_modules(agent.actor)), len(sem_modules(agent.critic))) == (int(actor_has), int(critic_has))
    assert agent.actor.out.in_features == (15 if actor_has else 64)
    assert agent.critic.out.in_features == (15 if critic_has else 64)


@pytest.mark.parametrize("obs_shape, continuous", [((4,), False), ((17,), True), ((4, 84, 84), False)])
def test_sem_off_builds_ppo_py_network_exactly(sem, ppo, obs_shape, continuous):
    """--sem-placement none: the same modules, parameters, outputs and random-number consumption as ppo.py."""
    settings = sem.sem_settings(sem.Args(sem_placement="none"))
    torch.manual_seed(3)
    a0 = ppo.Agent(obs_shape, 3, continuous)
    rng0 = torch.get_rng_state()
    torch.manual_seed(3)
    a1 = sem.Agent(obs_shape, 3, continuous, *settings)
    assert torch.equal(rng0, torch.get_rng_state())
    assert repr(a0) == repr(a1)
    s0, s1 = a0.state_dict(), a1.state_dict()
    assert list(s0) == list(s1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    obs = torch.randint(0, 256, (7, *obs_shape), dtype=torch.uint8) if len(obs_shape) == 3 else torch.randn(7, *obs_shape)
    out0, out1 = a0(obs, return_hidden=True), a1(obs, return_hidden=True)
    assert torch.equal(out0[0], out1[0]) and torch.equal(out0[1], out1[1])
    assert [(n, p.shape) for n, p, _ in out0[2]] == [(n, p.shape) for n, p, _ in out1[2]]
    assert all(torch.equal(h0, h1) for (_, _, h0), (_, _, h1) in zip(out0[2], out1[2]))


def run_sem(tmp_path, run_name: str, *flags, script=SEM_SCRIPT):
    return run_script(script, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name, "--device", "cpu"],
                      cwd=str(tmp_path), env=quiet_env())


def test_sem_off_run_is_a_ppo_py_run(tmp_path):
    """Same seed and flags: ppo_simplicial.py --sem-placement none writes ppo.py's episodes.csv and losses; with SEM
    on (the default) the run differs."""
    flags = ["--env-id", "CartPole-v1", "--total-timesteps", 1024, "--num-envs", 2, "--num-steps", 64,
             "--eval-episodes", 0, "--metrics-every", 8, "--seed", 4]
    runs = {"ppo": run_sem(tmp_path, "ppo", *flags, script=PPO_SCRIPT),
            "off": run_sem(tmp_path, "off", *flags, "--sem-placement", "none"),
            "on": run_sem(tmp_path, "on", *flags)}
    for proc in runs.values():
        assert proc.returncode == 0, describe(proc)
    dirs = {k: os.path.join(str(tmp_path), k) for k in runs}
    assert_same_run(dirs["ppo"], dirs["off"], "ppo_simplicial.py --sem-placement none", min_lines=10)
    assert read_csv(os.path.join(dirs["on"], "episodes.csv")) != read_csv(os.path.join(dirs["ppo"], "episodes.csv"))
    scalars = {k: read_scalars(dirs[k]) for k in runs}
    for key in ("losses/policy_loss", "losses/value_loss", "plasticity/srank"):
        assert scalars["off"][key] == scalars["ppo"][key], key
    assert scalars["on"]["losses/value_loss"] != scalars["ppo"]["losses/value_loss"]


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo_sem_cartpole")
    proc = run_sem(tmp, "cartpole", "--env-id", "CartPole-v1", "--total-timesteps", 1024, "--num-envs", 2,
                   "--num-steps", 128, "--save-model", "--eval-episodes", 2, "--metrics-every", 8, "--seed", 3)
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(tmp), "cartpole")


def test_cartpole_run_writes_every_output(cartpole_run):
    args = read_json(os.path.join(cartpole_run, "config.json"))["args"]
    assert args["exp_name"] == "ppo_simplicial"
    assert (args["sem_placement"], args["sem_groups"], args["sem_vertices"], args["sem_temperature"]) == (
        "both", 8, 64, 1.0)
    header, rows = read_csv(os.path.join(cartpole_run, "episodes.csv"))
    assert header == ["global_step", "episodic_return", "episodic_length", "task"] and len(rows) >= 5
    summary = read_json(os.path.join(cartpole_run, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] > 0 and len(summary["eval_returns"]) == 2
    scalars = read_scalars(cartpole_run)
    for key in ("charts/episodic_return", "losses/policy_loss", "losses/value_loss", "eval/episodic_return",
                "plasticity/dormant_tau0/actor.sem", "plasticity/grad_inactive_tau0.1/critic.sem",
                "plasticity/srank", "plasticity/srank/critic"):
        assert key in scalars, key
    state = torch.load(os.path.join(cartpole_run, "model.pt"), weights_only=True)["model"]
    assert state["actor.sem.weight"].shape == (512, 64) and state["critic.sem_norm.weight"].shape == (512,)
    assert state["actor.out.weight"].shape == (2, 512) and "actor.fc2.weight" not in state


def test_checkpoint_evaluates_only_with_its_sem_flags(cartpole_run, tmp_path):
    checkpoint = os.path.join(cartpole_run, "model.pt")
    ok = run_sem(tmp_path, "eval", "--env-id", "CartPole-v1", "--eval-checkpoint", checkpoint, "--eval-episodes", 2)
    assert ok.returncode == 0, describe(ok)
    bad = run_sem(tmp_path, "eval_bad", "--env-id", "CartPole-v1", "--eval-checkpoint", checkpoint,
                  "--eval-episodes", 2, "--sem-placement", "actor")
    assert_one_line_error(bad, "SEM settings")


def test_atari_smoke(tmp_path):
    proc = run_sem(tmp_path, "breakout", "--env-id", "Breakout-v5", "--total-timesteps", 256, "--num-envs", 2,
                   "--num-steps", 32, "--max-episode-steps", 60, "--eval-episodes", 1, "--metrics-every", 8,
                   "--metrics-batch-size", 32, "--sem-groups", 4, "--sem-vertices", 32)
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "breakout")
    assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "completed"
    scalars = read_scalars(run_dir)
    assert "plasticity/grad_inactive_tau0/sem" in scalars and "plasticity/dormant_tau0/fc1" not in scalars


def test_mujoco_actor_placement(tmp_path):
    proc = run_sem(tmp_path, "hopper", "--env-id", "Hopper-v4", "--total-timesteps", 256, "--num-envs", 2,
                   "--num-steps", 64, "--num-minibatches", 4, "--update-epochs", 2, "--max-episode-steps", 40,
                   "--eval-episodes", 1, "--metrics-every", 4, "--sem-placement", "actor", "--sem-temperature", 0.5,
                   "--save-model")
    assert proc.returncode == 0, describe(proc)
    run_dir = os.path.join(str(tmp_path), "hopper")
    state = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]
    assert state["actor.sem.weight"].shape == (512, 64) and "critic.fc2.weight" in state
    assert state["actor_logstd"].shape == (1, 3)
    scalars = read_scalars(run_dir)
    assert "plasticity/dormant_tau0/actor.sem" in scalars and "plasticity/dormant_tau0/critic.fc2" in scalars


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    def run(tmp, name, *flags):
        return run_sem(tmp, name, "--env-id", "CartPole-v1", "--total-timesteps", 768, "--num-envs", 2,
                       "--num-steps", 64, "--eval-episodes", 0, "--metrics-every", 0, *flags)

    assert_seed_determinism(run, tmp_path)


@pytest.mark.parametrize("flags, fragments", [
    (["--sem-groups", 0], ["--sem-groups >= 1"]), (["--sem-vertices", 1], ["--sem-vertices >= 2"]),
    (["--sem-temperature", 0], ["--sem-temperature > 0"]), (["--sem-temperature", "nan"], ["--sem-temperature > 0"]),
    (["--env-id", "Breakout-v5", "--sem-placement", "actor"], ["shared", "--sem-placement both"])])
def test_bad_sem_flags_are_one_line_errors(tmp_path, flags, fragments):
    env = [] if "--env-id" in flags else ["--env-id", "CartPole-v1"]
    proc = run_sem(tmp_path, "bad", *env, *flags)
    assert_one_line_error(proc, *fragments)
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
