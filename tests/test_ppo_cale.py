"""Tests of algos/ppo_cale.py (PPO on CALE, docs/ppo_cale.md): a smoke run with the default (SAC) encoder, checkpoint
save and reload, seed determinism, and the new mechanics against hand computations: the squashed-Gaussian
log-probability (change of variables through tanh and the affine map to the box), the entropy of the base Normal,
the stop-gradient between the policy loss and the conv layers, flax's SAME padding, GAE with truncation, the
presets, Dopamine's fixed-length LR annealing and bad input. The shared env block is tested in tests/test_cale.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import call_main, describe, load_script, read_csv, read_json, read_scalars, run_script, script_path

LOW, HIGH = np.array([0.0, -np.pi, 0.0], np.float32), np.array([1.0, np.pi, 1.0], np.float32)


@pytest.fixture(scope="module")
def pc():
    return load_script("ppo_cale")


def small_args(pc, **changes):
    args = pc.Args(**changes)
    pc.resolve_args(args)
    return args


# ---------------------------------------------------------------------------------------------------------------
# the squashed Gaussian
# ---------------------------------------------------------------------------------------------------------------


def test_squashed_log_prob_matches_change_of_variables(pc):
    """log pi(a) = sum_i log N(u_i; loc_i, std_i) - log|da_i/du_i|, a_i = mid_i + half_i tanh(u_i), so
    da/du = half (1 - tanh(u)^2), computed here in float64 from the pre-squash u."""
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    log_std = torch.randn(64, 3, generator=gen, dtype=torch.float64) * 0.5
    u = loc + log_std.exp() * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
    mid, half = (high + low) / 2, (high - low) / 2
    actions = mid + half * torch.tanh(u)
    normal = torch.distributions.Normal(loc, log_std.exp())
    expected = (normal.log_prob(u) - torch.log(half * (1 - torch.tanh(u) ** 2))).sum(-1)
    got = pc.squashed_gaussian_log_prob(loc, log_std, actions, low, high)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_squashed_density_integrates_to_one_on_the_box(pc):
    """Each component's density integrates to 1 over its interval: the log(half) term of the affine map is there
    (without it theta's density would integrate to pi)."""
    for d in range(3):
        a = torch.linspace(float(LOW[d]), float(HIGH[d]), 200_001, dtype=torch.float64)[1:-1]
        loc, log_std = torch.tensor([[0.3, -0.4, 0.1]], dtype=torch.float64), torch.tensor([[-0.2, 0.1, 0.0]])
        lows, highs = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
        # the other components sit at their mid-point; subtract their (constant) log-density
        actions = ((lows + highs) / 2).repeat(len(a), 1)
        actions[:, d] = a
        full = pc.squashed_gaussian_log_prob(loc.expand(len(a), 3), log_std.double().expand(len(a), 3), actions,
                                             lows, highs)
        others = [k for k in range(3) if k != d]
        mids = ((lows + highs) / 2)
        rest = pc.squashed_gaussian_log_prob(loc[:, others], log_std.double()[:, others], mids[others][None],
                                             lows[others], highs[others])
        density = (full - rest).exp()
        assert torch.trapezoid(density, a).item() == pytest.approx(1.0, abs=2e-3)


def test_entropy_is_the_base_normals(pc):
    log_std = torch.tensor([[-0.5, 0.0, 0.7]])
    expected = torch.distributions.Normal(torch.zeros(3), log_std.exp()).entropy().sum()
    assert pc.gaussian_entropy(log_std).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sampled_actions_in_box_and_rollout_log_prob_is_the_losses(pc):
    """Actions lie in the box; the rollout's log-prob (from the stored action, through atanh) is what the loss
    recomputes, so the first minibatch's ratio is 1; the stored action's u is recovered up to float32 rounding."""
    torch.manual_seed(0)
    agent = pc.Agent((4, 84, 84), 3, "nature", LOW, HIGH)
    with torch.no_grad():
        agent.actor_logstd.fill_(1.5)  # wide: many samples near the box's edges
        obs = torch.randint(0, 255, (32, 4, 84, 84), dtype=torch.uint8)
        action, logprob, entropy, _ = agent.get_action_and_value(obs)
        assert ((action >= torch.tensor(LOW)) & (action <= torch.tensor(HIGH))).all()
        again = agent.get_action_and_value(obs, action)[1]
    torch.testing.assert_close(again, logprob)
    assert torch.isfinite(logprob).all()
    assert entropy[0].item() == pytest.approx(3 * (0.5 + 0.5 * math.log(2 * math.pi) + 1.5), rel=1e-6)
    # an action on the box's edge (tanh saturated in float32) has a finite log-prob: atanh's clip 0.99999997
    edge = torch.tensor([[1.0, math.pi, 0.0]])
    lp = agent.log_prob_entropy(torch.zeros(1, 3), edge)[0]
    assert torch.isfinite(lp).all()


# ---------------------------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------------------------


def test_same_padding_is_flaxs(pc):
    assert pc.same_padding(84, 3, 2) == (0, 1)  # SAC encoder's first conv: 84 -> 42, the extra pixel after
    assert pc.same_padding(42, 3, 1) == (1, 1)
    assert [pc.same_padding(s, k, st) for s, k, st in ((84, 8, 4), (21, 4, 2), (11, 3, 1))] == [(2, 2), (1, 2), (1, 1)]


@pytest.mark.parametrize("encoder,features,width", [("sac", 32 * 42 * 42, 50), ("nature", 64 * 11 * 11, 512)])
def test_encoder_shapes(pc, encoder, features, width):
    agent = pc.Agent((4, 84, 84), 3, encoder, LOW, HIGH)
    obs = torch.randint(0, 255, (5, 4, 84, 84), dtype=torch.uint8)
    z = agent.trunk(obs.float() / 255)
    assert z.shape == (5, features)
    assert agent.actor.proj.out_features == width and agent.critic.proj.out_features == width
    loc, value, hidden = agent(obs, return_hidden=True)
    assert loc.shape == (5, 3) and value.shape == (5,)
    names = [name for name, _, _ in hidden]
    assert names[0] == "conv1" and "actor.fc2" in names and "critic.fc2" in names
    if encoder == "sac":  # the first conv pads (0, 1, 0, 1): the top-left output sees input pixels 0..2
        pad = agent.trunk.pad1
        assert tuple(pad.padding) == (0, 1, 0, 1) and agent.trunk.conv1.padding == (0, 0)
        assert agent.trunk.conv2.padding == (1, 1)


@pytest.mark.parametrize("encoder", ["sac", "nature"])
def test_policy_loss_does_not_reach_the_convs(pc, encoder):
    """The actor reads the conv features with the gradient stopped: the policy and entropy terms give the conv
    layers no gradient; the value loss does, and reaches the actor's projection not at all."""
    torch.manual_seed(1)
    agent = pc.Agent((4, 84, 84), 3, encoder, LOW, HIGH)
    obs = torch.randint(0, 255, (16, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    adv, returns = torch.randn(16), torch.randn(16)
    convs = [p for n, p in agent.named_parameters() if n.startswith("trunk.")]
    for ent_coef in (0.0, 0.01):  # the policy loss (and entropy bonus) alone: vf_coef 0
        agent.zero_grad(set_to_none=True)
        loss = pc.ppo_loss(agent, obs, actions, logprobs + 0.1 * torch.randn(16), adv, returns, values,
                           pc.Args(vf_coef=0.0, ent_coef=ent_coef))[0]
        loss.backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in convs)
        assert agent.actor.proj.weight.grad.abs().sum() > 0  # the policy loss trains the actor's projection
    agent.zero_grad(set_to_none=True)
    agent.get_value(obs).square().mean().backward()  # the value alone: the convs learn, the actor does not
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs if p.dim() > 1)
    assert agent.actor.proj.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# GAE (ppo.py's function, checked by hand in tests/test_ppo_units.py)
# ---------------------------------------------------------------------------------------------------------------


def test_gae_is_ppos(pc):
    ppo = load_script("ppo")
    rng = np.random.default_rng(0)
    shape = (16, 3)
    done = (rng.random(shape) < 0.2).astype(np.float32)
    terminated = done * (rng.random(shape) < 0.5)
    valid = np.ones(shape, dtype=bool)
    valid[1:] = done[:-1] == 0
    rollout = (rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32),
               rng.normal(size=3).astype(np.float32), terminated, done, valid, 0.99, 0.95)
    for ours, theirs in zip(pc.compute_gae(*rollout), ppo.compute_gae(*rollout)):
        np.testing.assert_array_equal(ours, theirs)
    # and on tests/test_ppo_units.py's hand-computed case (a truncation, an auto-reset step, a termination)
    hand = (np.array([[1.0], [0.0], [2.0]], np.float32), np.array([[0.5], [5.0], [0.3]], np.float32),
            np.array([7.0], np.float32), np.array([[0], [0], [1]], np.float32), np.array([[1], [0], [1]], np.float32),
            np.array([[True], [False], [True]]), 0.9, 0.95)
    for ours, theirs in zip(pc.compute_gae(*hand), ppo.compute_gae(*hand)):
        np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------------------------
# presets and annealing
# ---------------------------------------------------------------------------------------------------------------


def test_presets(pc):
    a = small_args(pc)
    assert (a.total_timesteps, a.sticky_action_prob, a.episodic_life, a.anneal_lr) == (50_000_000, 0.25, False, True)
    b = small_args(pc, preset="100k")
    assert (b.total_timesteps, b.sticky_action_prob, b.episodic_life, b.anneal_lr) == (100_000, 0.0, True, False)
    for args in (a, b):  # equal in the two gins
        assert (args.num_envs * args.num_steps, args.update_epochs, args.num_minibatches, args.learning_rate,
                args.adam_eps, args.clip_coef, args.ent_coef, args.vf_coef, args.max_grad_norm, args.threshold,
                args.max_episode_steps, args.encoder, args.clip_rewards, args.anneal_steps) == (
            1024, 3, 4, 2.5e-4, 1e-5, 0.1, 0.01, 0.5, 0.5, 0.5, 27_000, "sac", False, 0)
    c = small_args(pc, preset="100k", sticky_action_prob=0.25, episodic_life=False, anneal_lr=True, total_timesteps=4096)
    assert (c.total_timesteps, c.sticky_action_prob, c.episodic_life, c.anneal_lr) == (4096, 0.25, False, True)


def test_anneal_schedule(pc):
    assert pc.anneal_lr_at(0, 100, 1.0) == 1.0
    assert pc.anneal_lr_at(25, 100, 2.0) == pytest.approx(1.5)
    assert pc.anneal_lr_at(100, 100, 1.0) == 0.0 and pc.anneal_lr_at(500, 100, 1.0) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------

SMOKE = ["--env-id", "Breakout-v5", "--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64",
         "--num-minibatches", "2", "--update-epochs", "1", "--max-episode-steps", "100", "--metrics-every", "2",
         "--device", "cpu", "--torch-threads", "1"]


def test_smoke_checkpoint_and_cale_keys(tmp_path):
    proc = run_script(script_path("ppo_cale"), [*SMOKE, "--eval-episodes", "1", "--save-model",
                                                "--output-dir", tmp_path, "--run-name", "run"], cwd=str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    run_dir = tmp_path / "run"
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["global_step"] == 256 and summary["num_updates"] == 4
    assert len(summary["eval_returns"]) == 1
    config = read_json(run_dir / "config.json")
    assert config["family"] == "cale" and config["args"]["threshold"] == 0.5 and config["args"]["anneal_lr"]
    rows = read_csv(run_dir / "episodes.csv")[1]
    assert rows and all(int(r["episodic_length"]) <= 100 for r in rows)
    scalars = read_scalars(str(run_dir))
    cale = {k: v for k, v in scalars.items() if k.startswith("cale/")}
    assert len(cale) == 18
    for i in range(2):  # once per rollout, fractions summing to 1
        assert sum(v[i][1] for v in cale.values()) == pytest.approx(1.0, abs=1e-5)
    for key in ("plasticity/feature_rank", "plasticity/feature_rank/critic", "plasticity/grad_kurtosis",
                "plasticity/ess", "plasticity/dormant_tau0/conv1", "plasticity/grad_inactive_tau0/conv4",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "charts/learning_rate"):
        assert key in scalars, key
    lrs = [v for _, v in scalars["charts/learning_rate"]]  # 200m: annealed over the run, 2 rollouts
    assert lrs == pytest.approx([2.5e-4, 1.25e-4])
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert model["script"] == "ppo_cale.py" and model["n_actions"] == 3
    proc = run_script(script_path("ppo_cale"), [*SMOKE, "--eval-checkpoint", run_dir / "model.pt", "--eval-episodes",
                                                "2", "--output-dir", tmp_path, "--run-name", "eval"], cwd=str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    assert read_json(tmp_path / "eval" / "summary.json")["status"] == "completed"
    # a checkpoint of the other encoder is one line naming the parameters that differ
    proc = run_script(script_path("ppo_cale"), [*SMOKE, "--encoder", "nature", "--eval-checkpoint",
                                                run_dir / "model.pt", "--output-dir", tmp_path, "--run-name", "bad"],
                      cwd=str(tmp_path))
    assert proc.returncode == 2 and "ppo_cale.py" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)


def test_determinism_and_dopamine_anneal_steps(pc, tmp_path):
    """Same seed: identical episodes.csv; another seed differs. --anneal-steps 3 (3 updates per rollout here): the LR
    falls linearly over the first rollout's updates and is 0 from update 3 on."""
    csvs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        args = pc.Args(env_id="Breakout-v5", seed=seed, total_timesteps=1024, num_envs=8, num_steps=64,
                       num_minibatches=3, update_epochs=1, max_episode_steps=150, encoder="nature", anneal_steps=3,
                       eval_episodes=0, metrics_every=0, device="cpu", torch_threads=1, output_dir=str(tmp_path),
                       run_name=name)
        assert pc.run(args)["status"] == "completed"
        with open(tmp_path / name / "episodes.csv", "rb") as f:
            csvs[name] = f.read()
    assert csvs["a"].count(b"\n") > 2
    assert csvs["a"] == csvs["b"] and csvs["a"] != csvs["c"]
    lrs = [v for _, v in read_scalars(str(tmp_path / "a"))["charts/learning_rate"]]
    assert lrs == pytest.approx([2.5e-4 * (1 - 2 / 3), 0.0])  # the last update's LR of each rollout


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,fragments", [
    (["--env-id", "CartPole-v1"], ("CartPole-v1", "Atari")),
    (["--env-id", "MinAtar/Breakout"], ("MinAtar/Breakout", "Atari")),
    (["--env-id", "HalfCheetah-v4"], ("HalfCheetah-v4", "Atari")),
    (["--env-id", "Breakot-v5"], ("Breakot-v5", "Breakout-v5")),
    (["--threshold", "0"], ("--threshold",)),
    (["--threshold", "1"], ("--threshold",)),
    (["--threshold", "-0.2"], ("--threshold",)),
    (["--sticky-action-prob", "1.5"], ("--sticky-action-prob",)),
    (["--env-ids", "Breakout-v5", "Pong-v5", "--steps-per-task", "1000", "--total-timesteps", "2000"],
     ("--steps-per-task",)),
])
def test_bad_input(pc, tmp_path, capsys, extra, fragments):
    code, lines = call_main(pc, [*SMOKE, "--output-dir", tmp_path, "--run-name", "bad", *extra], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "bad")
