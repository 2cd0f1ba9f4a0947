"""algos/ppo_decoupled.py: the two network layouts (which parameters each loss reaches, ppo.py's networks exactly in
ppo.py's layout), ppo.py's runs in ppo.py's layout with every loss off (Atari, CartPole, MinAtar), each auxiliary loss
changing the run, MICo, the dynamics discriminator, its negative actions, the 2-D shift and DrA/DrC against hand
computations, the Polyak update, PPO-sep's critic phase (which network each optimizer step moves, how many steps),
the FLOP accounting (exact counts of the Nature CNN, separate = twice the shared encoder's, no effect on the run),
the parameter counts, checkpoint layouts, bad input, and MinAtar and Atari runs with every loss that applies."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
# Breakout capped at 16 agent steps: 14 episodes in 256 steps, so the comparisons with ppo.py are not vacuous
ATARI = dict(total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=16, update_epochs=2, num_minibatches=2,
             eval_episodes=0, metrics_every=4, metrics_batch_size=16)
MINATAR = dict(total_timesteps=256, num_envs=2, num_steps=32, update_epochs=2, num_minibatches=2, eval_episodes=0,
               metrics_every=4)
ALL_ACTOR = dict(mico_actor_coef=0.25, dynamics_actor_coef=0.25)
ALL_CRITIC = dict(mico_critic_coef=0.5, dynamics_critic_coef=1.0)


@pytest.fixture(scope="module")
def dec():
    return load_script("ppo_decoupled")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


@pytest.fixture(scope="module")
def runs(dec, ppo, tmp_path_factory):
    """Run directories shared by several tests, made on first use: (script, env id, flags) -> directory."""
    out, made = tmp_path_factory.mktemp("shared_runs"), {}

    def get(script: str, env_id: str, settings: dict, **changes) -> str:
        key = (script, env_id, tuple(sorted(settings.items())), tuple(sorted(changes.items())))
        if key not in made:
            module = dec if script == "ppo_decoupled" else ppo
            made[key] = run_in_process(module, out, f"run{len(made)}", env_id, settings, **changes)
        return made[key]
    return get


def episodes(run_dir: str) -> str:
    with open(os.path.join(run_dir, "episodes.csv")) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------------
# The two layouts
# ---------------------------------------------------------------------------------------------------------------

PIXELS, VECTORS = (4, 84, 84), (6,)


def reached_by(agent, loss) -> set[str]:
    """Names of the parameters `loss` has a nonzero gradient for."""
    names, params = zip(*agent.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return {name for name, g in zip(names, grads) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("obs_shape", [PIXELS, VECTORS], ids=["pixels", "vectors"])
def test_separate_encoders_share_no_parameter_and_shared_ones_share_the_trunk(dec, obs_shape):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, *obs_shape), dtype=torch.uint8) if len(obs_shape) == 3 else torch.randn(5, *obs_shape)
    actions = torch.tensor([0, 1, 2, 3, 1])
    counts = {}
    for encoders in ("separate", "shared"):
        agent = dec.Agent(obs_shape, 4, False, False, encoders)
        logits, values, hidden = agent(x, return_hidden=True)
        policy = reached_by(agent, -agent.log_prob_entropy(logits, actions)[0].mean())
        value = reached_by(agent, (values ** 2).mean())
        trunk = {f"trunk.{name}" for name, _ in agent.trunk.named_parameters()}
        if encoders == "separate":
            assert not policy & value and policy and value
            assert all(name.startswith("actor.") for name in policy)
            assert all(name.startswith("critic.") for name in value)
            assert not trunk
            # the diagnostics see both networks: the critic's hidden layers are named critic.* (ppo.py's srank/critic)
            names = [name for name, _, _ in hidden]
            assert any(n.startswith("actor.") for n in names) and any(n.startswith("critic.") for n in names)
        else:
            assert policy & value == trunk and trunk
            assert not any(name.startswith("critic.") for name, _, _ in hidden)
        counts[encoders] = {side: sum(p.numel() for p in dec.encoder_layers(agent, side).parameters())
                            for side in ("actor", "critic")}
    shared_trunk = counts["shared"]["actor"]
    assert counts["shared"]["critic"] == shared_trunk  # one trunk, both sides'
    assert counts["separate"]["actor"] == counts["separate"]["critic"] == shared_trunk  # each side a whole encoder
    if len(obs_shape) == 3:
        assert shared_trunk == 8224 + 32832 + 36928 + 1606144  # the Nature CNN: conv1-3, fc1 (3136 -> 512)


@pytest.mark.parametrize("obs_shape, encoders", [(PIXELS, "shared"), (VECTORS, "separate"), (VECTORS, None)],
                         ids=["pixels-shared", "vectors-separate", "vectors-default"])
def test_ppo_py_layout_is_ppo_py_network(dec, ppo, obs_shape, encoders):
    torch.manual_seed(3)
    ours = dec.Agent(obs_shape, 4, False, False, encoders).state_dict()
    torch.manual_seed(3)
    base = ppo.Agent(obs_shape, 4, False, False).state_dict()
    assert list(ours) == list(base) and all(torch.equal(ours[k], base[k]) for k in base)


def test_other_layouts_keep_ppo_py_init(dec):
    """Pixels separate: two Nature CNNs with ppo.py's init (orthogonal, gain sqrt(2), zero bias), independent draws.
    Vectors shared: a 64-64 trunk (gain sqrt(2)) under a policy head of gain 0.01 and a value head of gain 1."""
    torch.manual_seed(0)
    pixels = dec.Agent(PIXELS, 4, False, False, "separate")
    a, c = pixels.actor.fc1.weight, pixels.critic.fc1.weight
    assert not torch.equal(a, c) and torch.allclose(a @ a.T, 2.0 * torch.eye(512), atol=1e-4)
    assert torch.allclose(c @ c.T, 2.0 * torch.eye(512), atol=1e-4) and not pixels.critic.conv1.bias.any()
    vectors = dec.Agent(VECTORS, 3, False, True, "shared")  # MinAtar: ReLU trunk
    assert [type(m).__name__ for m in vectors.trunk] == ["Linear", "ReLU", "Linear", "ReLU"]
    w, h = vectors.actor.out.weight, vectors.critic.out.weight
    assert torch.allclose(w @ w.T, 1e-4 * torch.eye(3), atol=1e-8) and torch.allclose(h @ h.T, torch.ones(1, 1))
    assert isinstance(dec.Agent(VECTORS, 3, False, False, "shared").trunk.act1, torch.nn.Tanh)


# ---------------------------------------------------------------------------------------------------------------
# ppo.py's runs, and each loss changing them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id, settings, encoders", [
    ("Breakout-v5", ATARI, "shared"), ("CartPole-v1", SMOKE, "separate"), ("MinAtar/Breakout", MINATAR, "separate")])
def test_ppo_py_layout_with_every_loss_off_is_ppo_py(runs, env_id, settings, encoders):
    """ppo.py's episodes and summary; on Atari with the FLOP counter running throughout (it changes nothing)."""
    base = runs("ppo", env_id, settings)
    ours = runs("ppo_decoupled", env_id, settings, encoders=encoders)
    assert_same_run(base, ours, f"ppo_decoupled.py --encoders {encoders} on {env_id}")
    ours_scalars, base_scalars = read_scalars(ours), read_scalars(base)
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl", "plasticity/grad_norm"):
        assert ours_scalars[key] == base_scalars[key], key  # every update the same, to the last bit
    assert not [key for key in read_scalars(ours) if key.startswith("aux/")]


@pytest.mark.parametrize("env_id, settings, flags, logged", [
    ("CartPole-v1", SMOKE, dict(mico_actor_coef=0.25), ["mico_actor"]),
    ("CartPole-v1", SMOKE, dict(mico_critic_coef=0.5), ["mico_critic"]),
    ("CartPole-v1", SMOKE, dict(dynamics_actor_coef=0.25), ["dynamics_actor", "dynamics_actor_accuracy"]),
    ("CartPole-v1", SMOKE, dict(dynamics_critic_coef=1.0), ["dynamics_critic", "dynamics_critic_accuracy"]),
    ("Breakout-v5", ATARI, dict(dra_coef=0.1), ["dra"]),
    ("Breakout-v5", ATARI, dict(drc_coef=0.1), ["drc"]),
])
def test_each_auxiliary_loss_changes_the_run(runs, env_id, settings, flags, logged):
    """The logged losses differ from those of the run without the loss. Episodes are not the test: a critic-side loss
    reaches the policy only through the advantages, which rarely flips a sampled action in a short run, and these
    Breakout episodes all end at the cap."""
    off = runs("ppo_decoupled", env_id, settings)
    on = runs("ppo_decoupled", env_id, settings, **flags)
    scalars, base = read_scalars(on), read_scalars(off)
    for key in ("losses/policy_loss", "losses/value_loss"):
        assert scalars[key] != base[key], key
    assert sorted(k[len("aux/"):] for k in scalars if k.startswith("aux/")) == sorted(logged)
    assert len(scalars[f"aux/{logged[0]}"]) == len(scalars["losses/policy_loss"])  # once per iteration
    assert read_json(os.path.join(on, "summary.json"))["status"] == "completed"


# ---------------------------------------------------------------------------------------------------------------
# The losses against hand computations
# ---------------------------------------------------------------------------------------------------------------


def huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def mico_distance(u, v, beta: float) -> float:
    cos = sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v) + 1e-9)
    return 0.5 * (sum(a * a for a in u) + sum(b * b for b in v)) + beta * math.atan2(math.sqrt(max(1 - cos**2, 0)), cos)


def test_mico_loss_against_hand_computation(dec):
    online = torch.tensor([[1.0, 0.5], [-0.5, 2.0], [0.3, -1.0]], requires_grad=True)
    target = torch.tensor([[0.8, 0.1], [-1.0, 1.5], [0.2, -0.7]], requires_grad=True)
    target_next = torch.tensor([[2.0, 0.0], [0.5, 0.5], [-1.0, 3.0]])
    rewards = torch.tensor([1.0, 0.0, -0.5])
    gamma, beta = 0.9, 0.1
    loss, online_u = dec.mico_loss(online, target, target_next, rewards, gamma, beta)
    expected = 0.0
    for i in range(3):
        for j in range(3):
            u = mico_distance(online[i].tolist(), target[j].tolist(), beta)
            assert online_u[i, j].item() == pytest.approx(u, rel=1e-5)
            t = abs(rewards[i] - rewards[j]).item()
            t += gamma * mico_distance(target_next[i].tolist(), target_next[j].tolist(), beta)
            expected += huber(u - t) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert online.grad is not None and online.grad.abs().sum() > 0 and target.grad is None  # targets are constants


def test_next_observations_are_the_following_steps_and_the_rollouts_next_obs(dec, tmp_path, monkeypatch):
    """x' of step t is obs[t + 1] and, after the rollout's last step, the next_obs the rollout ended on: on a CartPole
    rollout with episode ends, every valid step that ended an episode has as x' the episode's final observation (the
    one EnvPool returned with the done flag, recorded here from the env), as the official code's; the auto-reset
    steps that follow are never trained on. The dynamics loss sees every valid step."""
    seen = {}
    set_rollout = dec.Auxiliary.set_rollout

    def spy(self, obs_buf, next_obs, rewards_buf):
        set_rollout(self, obs_buf, next_obs, rewards_buf)
        seen.setdefault("obs", obs_buf.clone()), seen.setdefault("next", next_obs.clone())
        seen.setdefault("x_next", self.next_obs.clone())

    losses = dec.Auxiliary.losses

    def spy_losses(self, agent, sides, mb, obs, actions, returns, reps):
        seen.setdefault("dynamics_batch", (len(mb), len(reps["critic"])))
        return losses(self, agent, sides, mb, obs, actions, returns, reps)

    finals = []
    make_env = dec.make_env

    def recording_env(*args, **kwargs):
        env = make_env(*args, **kwargs)
        step = env.step

        def recording_step(actions):
            out = step(actions)
            finals.append((out[0].copy(), out[2] | out[3]))
            return out
        env.step = recording_step
        return env

    monkeypatch.setattr(dec.Auxiliary, "set_rollout", spy)
    monkeypatch.setattr(dec.Auxiliary, "losses", spy_losses)
    monkeypatch.setattr(dec, "make_env", recording_env)
    run_in_process(dec, tmp_path, "next", "CartPole-v1", dict(SMOKE, total_timesteps=128, update_epochs=1,
                                                              num_minibatches=1), dynamics_critic_coef=1.0)
    obs, nxt, x_next = seen["obs"], seen["next"], seen["x_next"].reshape(seen["obs"].shape)
    assert torch.equal(x_next[:-1], obs[1:]) and torch.equal(x_next[-1], nxt)
    ends = [(t, e) for t, (_, done) in enumerate(finals[:64]) for e in np.flatnonzero(done)]
    assert ends  # CartPole episodes end within 64 random steps
    for t, e in ends:  # the observation returned with the done flag is x' of step t
        assert torch.allclose(x_next[t, e], torch.from_numpy(finals[t][0][e]).float())
    valid = sum(1 for t in range(64) for e in range(2) if not (t > 0 and finals[t - 1][1][e]))
    assert seen["dynamics_batch"] == (valid, valid)


def test_polyak_update_by_hand(dec):
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    dec.polyak_update(target, online, 0.1)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o.detach(), atol=1e-7)
    dec.polyak_update(target, online, 1.0)
    assert all(torch.equal(t, o) for t, o in zip(target.parameters(), online.parameters()))


def test_dynamics_loss_against_hand_computation(dec):
    torch.manual_seed(1)
    head = dec.DynamicsHead(2, 3)
    z = torch.tensor([[0.5, -1.0], [1.0, 2.0], [-0.3, 0.1]], requires_grad=True)
    z_next = torch.tensor([[1.0, 0.0], [0.2, 0.2], [-1.0, 1.0]], requires_grad=True)
    actions, wrong, perm = torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0]), torch.tensor([2, 0, 1])
    loss, accuracy = dec.dynamics_loss(head, z, actions, z_next, wrong, perm)

    def logit(i, a, j):
        one_hot = [1.0 if k == a else 0.0 for k in range(3)]
        return head.net(torch.tensor([*z[i].tolist(), *one_hot, *z_next[j].tolist()])).item()

    def bce(x, label):
        p = 1 / (1 + math.exp(-x))
        return -math.log(p) if label else -math.log(1 - p)

    real = [logit(i, actions[i].item(), i) for i in range(3)]
    bad_action = [logit(i, wrong[i].item(), i) for i in range(3)]
    bad_next = [logit(i, actions[i].item(), perm[i].item()) for i in range(3)]
    expected = (sum(bce(x, 1) for x in real) + 0.5 * sum(bce(x, 0) for x in bad_action)
                + sum(bce(x, 0) for x in bad_next)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    right = sum(x > 0 for x in real) + sum(x < 0 for x in bad_action) + sum(x < 0 for x in bad_next)
    assert accuracy.item() == pytest.approx(right / 9)
    loss.backward()
    assert z.grad.abs().sum() > 0 and z_next.grad.abs().sum() > 0  # both representations are trained


def test_wrong_actions_follow_the_minibatch_counts_and_never_repeat_the_action(dec):
    gen = torch.Generator().manual_seed(0)
    actions = torch.tensor([0, 0, 0, 1, 2] * 200)
    draws = torch.stack([dec.wrong_actions(actions, 5, gen) for _ in range(20)])
    assert not (draws == actions).any()
    assert set(draws.unique().tolist()) <= {0, 1, 2}  # only actions of the minibatch (3 and 4 never occur in it)
    of_zero, of_one = draws[:, actions == 0], draws[:, actions == 1]
    assert (of_zero == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)  # counts 1 : 1 without action 0
    assert (of_one == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)  # counts 3 : 1 without action 1
    # no other action in the minibatch: uniform over the game's other actions
    alone = torch.stack([dec.wrong_actions(torch.full((100,), 1), 3, gen) for _ in range(20)])
    assert not (alone == 1).any() and (alone == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(dec.wrong_actions(torch.zeros(4, dtype=torch.long), 1, gen), torch.zeros(4, dtype=torch.long))


def test_shift_frames_against_a_hand_built_example(dec):
    x = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(1, 2, 3, 4)  # one sample, 2 channels, 3 x 4 frames
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")  # edge padding on height and width
    for row, col in ((0, 2), (2, 0), (1, 1), (0, 0), (2, 2)):
        out = dec.shift_frames(x, 1, torch.tensor([[row, col]]))
        assert out.dtype == torch.uint8
        assert np.array_equal(out.numpy(), padded[:, :, row:row + 3, col:col + 4]), (row, col)
    # (0, 2): one row down and one column left, written out: the top row repeats, the right column repeats
    assert dec.shift_frames(x, 1, torch.tensor([[0, 2]]))[0, 0].tolist() == [[1, 2, 3, 3], [1, 2, 3, 3], [5, 6, 7, 7]]
    batch = torch.randint(0, 256, (3, 4, 8, 8), dtype=torch.uint8)
    offsets = torch.tensor([[3, 3], [0, 6], [5, 1]])
    out = dec.shift_frames(batch, 3, offsets)
    for b in range(3):  # per sample, channels shifted together (never mixed)
        ref = np.pad(batch[b].numpy(), ((0, 0), (3, 3), (3, 3)), mode="edge")
        assert np.array_equal(out[b].numpy(), ref[:, offsets[b, 0]:offsets[b, 0] + 8, offsets[b, 1]:offsets[b, 1] + 8])
    drawn = dec.shift_offsets(2000, 2, torch.Generator().manual_seed(0))
    assert drawn.min() == 0 and drawn.max() == 4 and len(drawn.unique()) == 5


def test_dra_and_drc_against_hand_computation(dec):
    torch.manual_seed(0)
    agent = dec.Agent(PIXELS, 4, False, False, "separate")
    x = torch.randint(0, 256, (3, *PIXELS), dtype=torch.uint8)
    actions, returns = torch.tensor([1, 3, 0]), torch.tensor([0.5, -1.0, 2.0])
    logits, values, _ = agent(x)
    log_p = torch.log_softmax(logits, -1)
    expected_dra = -sum(log_p[i, actions[i]].item() for i in range(3)) / 3
    expected_drc = 0.5 * sum((values[i].item() - returns[i].item()) ** 2 for i in range(3)) / 3
    dra, drc = dec.dra_loss(agent, x, actions), dec.drc_loss(agent, x, returns)
    assert dra.item() == pytest.approx(expected_dra, rel=1e-5) and drc.item() == pytest.approx(expected_drc, rel=1e-5)
    assert reached_by(agent, dra) <= {n for n, _ in agent.actor.named_parameters(prefix="actor")}
    assert reached_by(agent, drc) <= {n for n, _ in agent.critic.named_parameters(prefix="critic")}


# ---------------------------------------------------------------------------------------------------------------
# PPO-sep's critic phase
# ---------------------------------------------------------------------------------------------------------------


def test_critic_phase_moves_one_network_per_phase(dec, tmp_path, monkeypatch):
    """Per iteration: update_epochs x num_minibatches steps in which only the actor (its encoder, policy head and
    dynamics head) has gradients and moves, then critic_phase_epochs x num_minibatches steps for the critic alone."""
    steps, agents = [], []
    adam = torch.optim.Adam

    class RecordingAdam(adam):
        def step(self, *a, **k):
            before = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
            out = super().step(*a, **k)
            moved = {p for p in before if not torch.equal(p, before[p])}
            steps.append(({p for p in before if p.grad is not None}, moved))
            return out

    record = dec.record_param_counts
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    monkeypatch.setattr(dec, "record_param_counts",
                        lambda run_dir, agent: agents.append(agent) or record(run_dir, agent))
    run = run_in_process(dec, tmp_path, "phase", "CartPole-v1", dict(SMOKE, total_timesteps=256, metrics_every=0),
                         update_epochs=2, num_minibatches=2, critic_phase_epochs=3, mico_actor_coef=0.25,
                         dynamics_critic_coef=1.0)
    names = {p: name for name, p in agents[0].named_parameters()}
    side = {p: "actor" if name.startswith(("actor.", "dynamics_actor.")) else "critic" for p, name in names.items()}
    assert {name.split(".")[0] for name in names.values()} == {"actor", "critic", "dynamics_critic"}
    assert len(steps) == 2 * (2 * 2 + 3 * 2)
    for k, (with_grad, moved) in enumerate(steps):
        phase = "actor" if k % 10 < 4 else "critic"
        assert with_grad == moved == {p for p in names if side[p] == phase}, k
    summary = read_json(os.path.join(run, "summary.json"))
    assert summary["num_updates"] == 8 and summary["critic_updates"] == 12
    scalars = read_scalars(run)
    assert [v for _, v in scalars["charts/critic_updates"]] == [6, 12]
    assert {"aux/mico_actor", "aux/dynamics_critic"} <= scalars.keys()


def test_mico_targets_follow_their_encoders_after_each_step(dec, tmp_path, monkeypatch):
    """The target encoders start as copies and move by tau toward the online encoders after every step with a MICo
    loss: all of them after a policy step (MICo(A) on), as the official code's whole-tree update."""
    calls = []
    update = dec.polyak_update
    monkeypatch.setattr(dec, "polyak_update", lambda t, o, tau: calls.append(tau) or update(t, o, tau))
    run_in_process(dec, tmp_path, "mico", "CartPole-v1", dict(SMOKE, total_timesteps=128, metrics_every=0),
                   update_epochs=1, num_minibatches=2, critic_phase_epochs=1, mico_actor_coef=0.25,
                   mico_critic_coef=0.5, mico_tau=0.3)
    assert calls == [0.3] * (2 * 2 + 2 * 2)  # 2 policy steps and 2 critic steps, each moving both targets


# ---------------------------------------------------------------------------------------------------------------
# Compute accounting
# ---------------------------------------------------------------------------------------------------------------

NATURE_CNN_FLOPS = 2 * (20 * 20 * 32 * 8 * 8 * 4 + 9 * 9 * 64 * 4 * 4 * 32 + 7 * 7 * 64 * 3 * 3 * 64 + 3136 * 512)


def test_flops_of_separate_encoders_are_twice_the_shared_encoders(runs, dec, tmp_path, monkeypatch):
    """Per sample, one Breakout rollout step costs the Nature CNN once (shared) or twice (separate) plus the heads
    (512 -> 4 and 512 -> 1), exactly as FlopCounterMode counts matrix products and convolutions. A training minibatch
    of `separate` is then exactly twice `shared`'s minus one copy of the heads' forward and backward FLOPs (the
    heads exist once in both layouts); the heads are 0.03% of it. Counting changes nothing: `shared` writes ppo.py's
    episodes (test_ppo_py_layout_with_every_loss_off_is_ppo_py) and `separate` without the counter its own."""
    heads = 2 * 512 * (4 + 1)
    flops = {}
    for encoders in ("shared", "separate"):
        run = runs("ppo_decoupled", "Breakout-v5", ATARI, encoders=encoders)
        summary = read_json(os.path.join(run, "summary.json"))
        flops[encoders] = per_sample = summary["flops_per_sample"]
        copies = 1 if encoders == "shared" else 2
        assert per_sample["rollout"] == per_sample["bootstrap"] == copies * NATURE_CNN_FLOPS + heads
        assert summary["flops_per_env_step"] == pytest.approx(summary["train_flops"] / summary["global_step"])
        assert summary["flops_by_kind"]["rollout"] == pytest.approx(per_sample["rollout"] * 256)
        assert summary["train_flops"] == pytest.approx(sum(summary["flops_by_kind"].values()))
        logged = [v for _, v in read_scalars(run)["compute/flops"]]
        assert len(logged) == 4 and logged == sorted(logged) and logged[-1] == pytest.approx(summary["train_flops"])
    heads_train = 3 * heads  # forward, weight gradient, input gradient
    assert flops["separate"]["train"] == 2 * flops["shared"]["train"] - heads_train
    assert 1.99 < flops["separate"]["train"] / flops["shared"]["train"] < 2.0

    class NoCounter:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def get_total_flops(self):
            return 0

    monkeypatch.setattr("torch.utils.flop_counter.FlopCounterMode", NoCounter)
    uncounted = run_in_process(dec, tmp_path, "uncounted", "Breakout-v5", ATARI)
    assert read_json(os.path.join(uncounted, "summary.json"))["train_flops"] == 0
    assert episodes(uncounted) == episodes(runs("ppo_decoupled", "Breakout-v5", ATARI))


def test_parameter_counts_in_config(runs):
    counts = {}
    for encoders in ("shared", "separate"):
        config = read_json(os.path.join(runs("ppo_decoupled", "Breakout-v5", ATARI, encoders=encoders), "config.json"))
        counts[encoders] = c = {k: v for k, v in config.items() if k.endswith("_params")}
        assert c["actor_params"] + c["critic_params"] - c["shared_params"] == c["total_params"]
    cnn, heads = 1684128, 512 * 4 + 4 + 512 + 1
    assert counts["shared"]["total_params"] == cnn + heads and counts["shared"]["shared_params"] == cnn
    assert counts["separate"]["total_params"] == 2 * cnn + heads and counts["separate"]["shared_params"] == 0
    assert counts["separate"]["actor_encoder_params"] == counts["separate"]["critic_encoder_params"] == cnn


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoints_are_evaluated_with_their_layout_only(dec, tmp_path, capsys):
    run = run_in_process(dec, tmp_path, "train", "CartPole-v1", dict(SMOKE, total_timesteps=128, metrics_every=0),
                         save_model=True, dynamics_actor_coef=0.25)
    model = os.path.join(run, "model.pt")
    assert torch.load(model, weights_only=True)["args"]["encoders"] == "separate"
    common = ["--env-id", "CartPole-v1", "--eval-checkpoint", model, "--eval-episodes", 1, "--device", "cpu"]
    code, lines = call_main(dec, [*common, "--encoders", "shared", "--output-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and len(lines) == 1 and "--encoders separate" in lines[0], lines
    code, lines = call_main(dec, [*common, "--output-dir", str(tmp_path / "b")], capsys)  # its dynamics head: unused
    assert code == 0, lines


@pytest.mark.parametrize("argv, fragment", [
    (["--mico-actor-coef", "-0.1"], "--mico-actor-coef"), (["--mico-critic-coef", "-1"], "--mico-critic-coef"),
    (["--dynamics-actor-coef", "-1"], "--dynamics-actor-coef"), (["--drc-coef", "-0.1"], "--drc-coef"),
    (["--mico-beta", "-1"], "--mico-beta"), (["--mico-tau", "0"], "--mico-tau"), (["--mico-tau", "1.5"], "--mico-tau"),
    (["--aug-pad", "-1", "--env-id", "Breakout-v5"], "--aug-pad"), (["--critic-phase-epochs", "-1"], "--critic-phase"),
    (["--encoders", "shared", "--critic-phase-epochs", "9"], "--encoders separate"),
    (["--encoders", "shared", "--mico-critic-coef", "0.5"], "--mico-actor-coef"),
    (["--env-id", "Hopper-v4", "--dynamics-critic-coef", "1"], "discrete"),
    (["--dra-coef", "0.1"], "pixel"), (["--env-id", "MinAtar/Breakout", "--drc-coef", "0.1"], "pixel"),
])
def test_bad_flags_are_one_line_errors(dec, capsys, argv, fragment):
    code, lines = call_main(dec, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines


# ---------------------------------------------------------------------------------------------------------------
# Other families, every loss that applies
# ---------------------------------------------------------------------------------------------------------------


def test_minatar_with_the_critic_phase_and_every_loss(dec, tmp_path):
    run = run_in_process(dec, tmp_path, "minatar", "MinAtar/Breakout", MINATAR, update_epochs=1, critic_phase_epochs=2,
                         **ALL_ACTOR, **ALL_CRITIC)
    summary = read_json(os.path.join(run, "summary.json"))
    assert summary["status"] == "completed" and summary["critic_updates"] == 4 * 2 * 2
    logged = read_scalars(run).keys()
    assert {f"aux/{k}" for k in ("mico_actor", "mico_critic", "dynamics_actor", "dynamics_critic")} <= logged


@pytest.mark.parametrize("encoders, flags", [
    ("separate", dict(critic_phase_epochs=1, dra_coef=0.1, drc_coef=0.1, **ALL_ACTOR, **ALL_CRITIC)),
    ("shared", dict(mico_actor_coef=0.25, dynamics_critic_coef=1.0, dra_coef=0.1, drc_coef=0.1)),
])
def test_atari_smoke_with_every_loss(dec, tmp_path, encoders, flags):
    run = run_in_process(dec, tmp_path, encoders, "Breakout-v5", dict(ATARI, total_timesteps=128, eval_episodes=1),
                         encoders=encoders, aug_pad=4, **flags)
    summary = read_json(os.path.join(run, "summary.json"))
    assert summary["status"] == "completed" and len(summary["eval_returns"]) == 1
    logged = {k for k in read_scalars(run) if k.startswith("aux/")}
    assert {"aux/dra", "aux/drc", "aux/mico_actor", "aux/dynamics_critic"} <= logged
    config = read_json(os.path.join(run, "config.json"))
    assert config["args"]["encoders"] == encoders and config["critic_params"] > config["shared_params"]
