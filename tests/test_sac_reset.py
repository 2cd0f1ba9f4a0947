"""algos/sac_reset.py: when resets happen (environment steps, several envs, never at the end), what a reset of each
scope changes (every parameter of a new agent / exactly the last layers), the fresh draw (the constructor's, from
torch's global RNG), shrink-and-perturb by hand, the targets, the temperature, the Adam state, the replay memory, the
reset/ logs, and end-to-end runs (reset-every 0 is sac.py's run, reset counts, determinism, bad input)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import (SAC_FLAGS, assert_one_line_error, describe, load_script, read_json, read_scalars,
                     run_sac_in_process, run_script, script_path)

RESET_SCRIPT = script_path("sac_reset")
OBS_DIM, LOW, HIGH = 7, np.array([-1.0, -0.5]), np.array([1.0, 0.5])
ACTION_DIM = len(LOW)


@pytest.fixture(scope="module")
def mod():
    return load_script("sac_reset")


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


class Writer:
    """Stands in for the SummaryWriter: records add_scalar calls."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars.setdefault(key, []).append((step, value))


class Agent:
    """The agent as run() builds it (same constructors, targets, fused Adam optimizers), trained for a few steps so
    that parameters, targets, log alpha and the Adam state are all non-trivial."""

    def __init__(self, mod, seed=0):
        torch.manual_seed(seed)
        self.actor = mod.Actor(OBS_DIM, LOW, HIGH)
        self.qf1, self.qf2 = mod.SoftQNetwork(OBS_DIM, ACTION_DIM), mod.SoftQNetwork(OBS_DIM, ACTION_DIM)
        self.qf1_target, self.qf2_target = mod.SoftQNetwork(OBS_DIM, ACTION_DIM), mod.SoftQNetwork(OBS_DIM, ACTION_DIM)
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        critic_params = list(self.qf1.parameters()) + list(self.qf2.parameters())
        self.q_optimizer = torch.optim.Adam(critic_params, lr=1e-3, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=3e-4, fused=True)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=1e-3)
        gen = np.random.default_rng(seed)
        self.rb = mod.ReplayBuffer(100, OBS_DIM, ACTION_DIM)
        self.rb.add(gen.normal(size=(60, OBS_DIM)), gen.normal(size=(60, OBS_DIM)),
                    gen.uniform(-0.5, 0.5, (60, ACTION_DIM)), gen.normal(size=60), gen.random(60) < 0.1)
        for _ in range(3):
            obs, actions, rewards, terminated, next_obs = mod.to_torch(self.rb.sample(16, gen), "cpu")
            q_loss = ((self.qf1(obs, actions) - rewards) ** 2).mean() + ((self.qf2(obs, actions) - rewards) ** 2).mean()
            self.q_optimizer.zero_grad()
            q_loss.backward()
            self.q_optimizer.step()
            _, log_pi, _ = self.actor.get_action(obs)
            actor_loss = (log_pi - self.qf1(obs, self.actor.get_action(obs)[0])).mean()
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()
            alpha_loss = (-self.log_alpha.exp() * (log_pi.detach() - 2.0)).mean()
            self.a_optimizer.zero_grad()
            alpha_loss.backward()
            self.a_optimizer.step()
            mod.soft_update(self.qf1_target, self.qf1, 0.5)
            mod.soft_update(self.qf2_target, self.qf2, 0.5)
        assert self.log_alpha.item() != 0

    def nets(self):
        return {"actor": self.actor, "qf1": self.qf1, "qf2": self.qf2, "qf1_target": self.qf1_target,
                "qf2_target": self.qf2_target}

    def optimizers(self):
        return self.q_optimizer, self.actor_optimizer, self.a_optimizer

    def snapshot(self):
        params = {f"{net}.{name}": p.detach().clone() for net, module in self.nets().items()
                  for name, p in module.named_parameters()}
        params["log_alpha"] = self.log_alpha.detach().clone()
        return params

    def adam_state(self):
        """{parameter name: {state key: tensor clone}} for every parameter with Adam state."""
        names = {id(p): f"{net}.{name}" for net, module in self.nets().items() for name, p in module.named_parameters()}
        names[id(self.log_alpha)] = "log_alpha"
        return {names[id(p)]: {k: v.clone() for k, v in state.items()} for opt in self.optimizers()
                for p, state in opt.state.items() if state}

    def reset(self, mod, writer=None, **flags):
        args = mod.Args(**{"metrics_every": 1, "metrics_batch_size": 16, **flags})
        return mod.sac_reset(self.actor, self.qf1, self.qf2, self.qf1_target, self.qf2_target, self.log_alpha,
                             self.optimizers(), self.rb, np.random.default_rng(1), 0.3, args, writer or Writer(),
                             1000, 1, torch.device("cpu"))


def fresh_networks(mod, rng_state):
    """What the constructors draw from torch's global RNG in `rng_state`: actor, qf1, qf2, in that order."""
    torch.set_rng_state(rng_state)
    actor = mod.Actor(OBS_DIM, LOW, HIGH)
    qf1, qf2 = mod.SoftQNetwork(OBS_DIM, ACTION_DIM), mod.SoftQNetwork(OBS_DIM, ACTION_DIM)
    params = {}
    for net, module in (("actor", actor), ("qf1", qf1), ("qf2", qf2), ("qf1_target", qf1), ("qf2_target", qf2)):
        params.update({f"{net}.{name}": p.detach().clone() for name, p in module.named_parameters()})
    params["log_alpha"] = torch.zeros(1)  # sac.py's initial log alpha
    return params, torch.get_rng_state()


# ---------------------------------------------------------------------------------------------------------------
# When
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers(mod):
    args = mod.Args()
    assert (args.reset_every, args.reset_scope, args.reset_layers, args.shrink_perturb, args.reset_optimizer) == (
        200_000, "all", 1, 0.0, True)


def test_reset_due_counts_environment_steps(mod):
    one_env = [step for step in range(1, 1001) if mod.reset_due(step, 1, 200, 1000)]
    assert one_env == [200, 400, 600, 800]  # the official i % reset_interval == 0, but not at the last step
    three_envs = [step for step in range(3, 1001, 3) if mod.reset_due(step, 3, 200, 999)]
    assert three_envs == [201, 402, 600, 801]  # the vector step that crosses each multiple of 200
    assert not any(mod.reset_due(step, 1, 0, 1000) for step in range(1, 1001))  # 0: off
    assert mod.reset_due(1000, 1, 200, 1001) and not mod.reset_due(1000, 1, 200, 1000)


# ---------------------------------------------------------------------------------------------------------------
# What: scope all, last layers, shrink-and-perturb, optimizer state
# ---------------------------------------------------------------------------------------------------------------


def test_layer_groups_of_sac_networks(mod):
    actor, qf = mod.Actor(OBS_DIM, LOW, HIGH), mod.SoftQNetwork(OBS_DIM, ACTION_DIM)
    assert mod.reset_layer_groups(actor) == [["trunk.fc1"], ["trunk.fc2"], ["fc_mean", "fc_logstd"]]
    assert mod.reset_layer_groups(qf) == [["net.fc1"], ["net.fc2"], ["net.q"]]
    assert mod.reset_parameter_names(actor, "last-layers", 1) == [
        "fc_mean.weight", "fc_mean.bias", "fc_logstd.weight", "fc_logstd.bias"]
    assert mod.reset_parameter_names(qf, "last-layers", 2) == ["net.fc2.weight", "net.fc2.bias", "net.q.weight",
                                                               "net.q.bias"]
    for net in (actor, qf):
        every = [name for name, _ in net.named_parameters()]
        assert mod.reset_parameter_names(net, "last-layers", 3) == mod.reset_parameter_names(net, "all", 1) == every


@pytest.mark.parametrize("metrics_every", [1, 0])
def test_scope_all_is_a_new_agent(mod, metrics_every):
    """Every parameter of actor, critics, targets and log alpha changes and equals a new construction from the same
    RNG state (targets: copies of the new critics); exactly those draws are consumed (diagnostics or not); the Adam
    state is gone and is re-created with step 1 by the next step; the replay memory is untouched."""
    agent = Agent(mod)
    before, adam_before = agent.snapshot(), agent.adam_state()
    assert {"qf1.net.q.weight", "actor.fc_mean.weight", "log_alpha"} <= set(adam_before)
    memory = {k: getattr(agent.rb, k).copy() for k in ("obs", "next_obs", "actions", "rewards", "terminated")}
    memory_pos = (agent.rb.pos, agent.rb.size)
    rng_state = torch.get_rng_state()
    writer = Writer()
    alpha = agent.reset(mod, writer, metrics_every=metrics_every)
    after, rng_after = agent.snapshot(), torch.get_rng_state()
    expected, rng_expected = fresh_networks(mod, rng_state)
    assert set(after) == set(before) == set(expected)
    for name in after:
        assert not torch.equal(after[name], before[name]), name
        assert torch.equal(after[name], expected[name]), name
    assert torch.equal(rng_after, rng_expected)
    assert alpha == 1.0  # exp(0): the temperature is back at its initial value
    assert all(not state for opt in agent.optimizers() for state in opt.state.values())
    for k, v in memory.items():
        assert np.array_equal(getattr(agent.rb, k), v), k
    assert (agent.rb.pos, agent.rb.size) == memory_pos
    assert writer.scalars["reset/count"] == [(1000, 1)]
    before_keys = {k[len("reset/before/"):] for k in writer.scalars if k.startswith("reset/before/")}
    after_keys = {k[len("reset/after/"):] for k in writer.scalars if k.startswith("reset/after/")}
    if metrics_every:
        assert before_keys == after_keys and "plasticity/qf1/dormant_tau0.1/fc2" in before_keys
        assert "plasticity/actor/srank" in before_keys
        # the after-metrics see the new agent: the parameter norm of a fresh draw, not the trained one
        norm = torch.sqrt(sum((p ** 2).sum() for p in agent.actor.parameters())).item()
        assert writer.scalars["reset/after/plasticity/actor/param_norm"][0][1] == pytest.approx(norm, rel=1e-5)
        assert writer.scalars["reset/before/plasticity/actor/param_norm"][0][1] != pytest.approx(norm, rel=1e-3)
    else:
        assert not before_keys and not after_keys
    # the optimizers work on: a step re-creates the state from step 0
    obs, actions = torch.randn(4, OBS_DIM), torch.rand(4, ACTION_DIM) - 0.5
    agent.q_optimizer.zero_grad()
    (agent.qf1(obs, actions) ** 2).mean().backward()
    agent.q_optimizer.step()
    assert agent.q_optimizer.state[agent.qf1.net.q.weight]["step"].item() == 1


@pytest.mark.parametrize("layers", [1, 2])
def test_last_layers_reset_exactly_those_layers(mod, layers):
    """Exactly the last `layers` linear layers of the actor (both heads as one) and of each critic change, to the
    fresh draw's values (targets: the new critic values); everything else is bit-identical, and so is the Adam
    state of the kept parameters, while the reset ones (and log alpha's) are re-initialised."""
    reset = {1: {"actor": ("fc_mean.", "fc_logstd."), "qf": ("net.q.",)},
             2: {"actor": ("trunk.fc2.", "fc_mean.", "fc_logstd."), "qf": ("net.fc2.", "net.q.")}}[layers]
    agent = Agent(mod)
    before, adam_before = agent.snapshot(), agent.adam_state()
    rng_state = torch.get_rng_state()
    agent.reset(mod, reset_scope="last-layers", reset_layers=layers)
    after, adam_after = agent.snapshot(), agent.adam_state()
    fresh, _ = fresh_networks(mod, rng_state)
    changed = set()
    for name in after:
        net, _, param = name.partition(".")
        selected = name == "log_alpha" or param.startswith(reset["actor" if net == "actor" else "qf"])
        if selected:
            changed.add(name)
            assert not torch.equal(after[name], before[name]), name
            assert torch.equal(after[name], fresh[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
            if name in adam_before:
                assert set(adam_after[name]) == set(adam_before[name])
                assert all(torch.equal(adam_after[name][k], adam_before[name][k]) for k in adam_before[name]), name
    assert changed and set(adam_after) == set(adam_before) - changed
    expected = {"actor.fc_mean.weight", "actor.fc_logstd.bias", "qf1.net.q.weight", "qf2_target.net.q.bias",
                "log_alpha"}
    assert expected <= changed
    assert ("qf1.net.fc2.weight" in changed) == (layers == 2)
    assert not any(".fc1." in name for name in changed)


@pytest.mark.parametrize("scope", ["all", "last-layers"])
def test_shrink_and_perturb_by_hand(mod, scope):
    """lambda = 0.8: every selected parameter is 0.8 * old + 0.2 * fresh, the fresh draw being the constructors'
    from the same RNG state; log alpha 0.8 * old (its fresh value is 0); targets take the new critic values; the
    other parameters are kept."""
    shrink = 0.8
    agent = Agent(mod)
    before = agent.snapshot()
    rng_state = torch.get_rng_state()
    alpha = agent.reset(mod, reset_scope=scope, shrink_perturb=shrink)
    after = agent.snapshot()
    fresh, _ = fresh_networks(mod, rng_state)
    selected = {"actor.fc_mean.weight", "actor.fc_mean.bias", "actor.fc_logstd.weight", "actor.fc_logstd.bias"} | {
        f"{net}.net.q.{p}" for net in ("qf1", "qf2") for p in ("weight", "bias")}
    for name in after:
        if name == "log_alpha":
            torch.testing.assert_close(after[name], shrink * before[name], rtol=0, atol=0)
            continue
        net, param = name.split(".", 1)
        critic = {"qf1_target": "qf1", "qf2_target": "qf2"}.get(net)
        if critic is not None:  # a target holds its critic's new values where the critic was touched, else its own
            source = f"{critic}.{param}"
            reference = after[source] if (scope == "all" or source in selected) else before[name]
            assert torch.equal(after[name], reference), name
        elif scope == "all" or name in selected:
            hand = shrink * before[name] + (1 - shrink) * fresh[name]
            torch.testing.assert_close(after[name], hand, rtol=1e-6, atol=1e-7)
            assert not torch.equal(after[name], fresh[name]) and not torch.equal(after[name], before[name])
        else:
            assert torch.equal(after[name], before[name]), name
    assert alpha == pytest.approx(float(np.exp(shrink * before["log_alpha"].item())))


def test_no_reset_optimizer_keeps_the_adam_state(mod):
    agent = Agent(mod)
    adam_before = agent.adam_state()
    agent.reset(mod, reset_optimizer=False)
    adam_after = agent.adam_state()
    assert set(adam_after) == set(adam_before)
    for name, state in adam_before.items():
        assert all(torch.equal(adam_after[name][k], v) for k, v in state.items()), name


def test_fresh_copy_on_a_module_is_the_constructors_draw(mod):
    """fresh_copy re-draws every layer in construction order: the same tensors as constructing anew."""
    torch.manual_seed(3)
    trained = mod.Actor(OBS_DIM, LOW, HIGH)
    state = torch.get_rng_state()
    copied = mod.fresh_copy(trained)
    torch.set_rng_state(state)
    built = mod.Actor(OBS_DIM, LOW, HIGH)
    assert list(copied.state_dict()) == list(built.state_dict())
    assert all(torch.equal(copied.state_dict()[k], built.state_dict()[k]) for k in built.state_dict())
    assert not torch.equal(copied.fc_mean.weight, trained.fc_mean.weight)


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process, one thread)
# ---------------------------------------------------------------------------------------------------------------


def test_reset_every_zero_is_a_sac_py_run(mod, sac, tmp_path):
    """--reset-every 0 writes sac.py's episodes.csv and losses byte for byte; with resets the run differs."""
    base, base_dir, _ = run_sac_in_process(sac, tmp_path, "sac", metrics_every=50)
    off, off_dir, summary = run_sac_in_process(mod, tmp_path, "off", metrics_every=50, reset_every=0)
    on, _, _ = run_sac_in_process(mod, tmp_path, "on", metrics_every=0, reset_every=150)
    assert base.count(b"\n") > 5
    assert off == base
    assert on != base
    assert summary["num_resets"] == 0
    base_scalars, off_scalars = read_scalars(base_dir), read_scalars(off_dir)
    for key in ("losses/qf_loss", "losses/actor_loss", "losses/alpha", "plasticity/actor/srank"):
        assert off_scalars[key] == base_scalars[key], key
    assert not any(k.startswith("reset/") for k in off_scalars)


def test_resets_are_counted_logged_and_deterministic(mod, tmp_path):
    """total 300, reset every 100: resets at steps 100 and 200 (not at 300, the end); reset/count and the
    before/after diagnostics are logged; the same seed with diagnostics off writes the same episodes.csv."""
    episodes, run_dir, summary = run_sac_in_process(mod, tmp_path, "a", metrics_every=25, reset_every=100,
                                                reset_scope="last-layers", reset_layers=2)
    assert summary["num_resets"] == 2
    scalars = read_scalars(run_dir)
    assert scalars["reset/count"] == [(100, 1.0), (200, 2.0)]
    for when in ("before", "after"):
        for key in ("plasticity/qf1/dormant_tau0.1/fc2", "plasticity/actor/grad_inactive_tau0", "plasticity/qf2/srank"):
            assert [step for step, _ in scalars[f"reset/{when}/{key}"]] == [100, 200], (when, key)
    assert scalars["reset/after/plasticity/qf1/param_norm"] != scalars["reset/before/plasticity/qf1/param_norm"]
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["reset_every"], config["reset_scope"], config["reset_layers"]) == (100, "last-layers", 2)
    again, _, _ = run_sac_in_process(mod, tmp_path, "b", metrics_every=0, reset_every=100, reset_scope="last-layers",
                                 reset_layers=2)
    assert again == episodes
    other, _, _ = run_sac_in_process(mod, tmp_path, "c", metrics_every=0, reset_every=100, reset_scope="last-layers",
                                 reset_layers=2, seed=5)
    assert other != episodes


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [dict(reset_every=-1), dict(reset_layers=0), dict(reset_layers=4),
                                   dict(shrink_perturb=1.5), dict(shrink_perturb=-0.1),
                                   dict(shrink_perturb=float("nan"))])
def test_bad_reset_flags_are_user_errors(mod, flags):
    # a negative integer flag is caught by the generic check first (docs/conventions.md, section 10)
    with pytest.raises(mod.UserError, match="--reset-every >= 0.*--reset-layers <= 3.*--shrink-perturb <= 1|"
                                            "--reset-every must be >= 0"):
        mod.resolve_args(mod.Args(env_id="Hopper-v4", **flags))


def test_bad_reset_flag_is_one_line_error(tmp_path):
    proc = run_script(RESET_SCRIPT, ["--env-id", "Hopper-v4", "--reset-layers", 4, "--output-dir", str(tmp_path),
                                     "--run-name", "bad"], cwd=str(tmp_path))
    assert_one_line_error(proc, "1 <= --reset-layers <= 3", "got 200000, 4 and 0.0")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))  # rejected before any work
