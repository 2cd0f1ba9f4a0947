"""algos/sac_cale.py (SAC on CALE, docs/sac_cale.md): an end-to-end run on Breakout-v5 (outputs, cale/ fractions,
diagnostics, the checkpoint round trip), seed determinism, and the new mechanics against hand computations: the
squashed-Gaussian log-prob with the affine map to CALE's box, the encoders' shapes and the actor's stop-gradient,
Dopamine's target (target network, target actor's mean action, sampled log-prob, reward scale), the frame-storing
replay's n-step returns, the epsilon schedule and the presets; bad input. The shared CaleVecEnv block and the joystick
mapping are tested in tests/test_cale.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import (
    assert_seed_determinism, call_main, describe, load_script, read_csv, read_json, read_scalars, run_script,
    script_path,
)

SCRIPT = script_path("sac_cale")
STEPS = 400
# 2 envs, the Nature encoder (the SAC encoder costs ~10x more per update on CPU), short games
TINY = ["--env-id", "Breakout-v5", "--encoder", "nature", "--learning-starts", 200, "--buffer-size", 2000,
        "--batch-size", 8, "--max-episode-steps", 60, "--device", "cpu", "--torch-threads", 1]


@pytest.fixture(scope="module")
def sac_cale():
    return load_script("sac_cale")


def run_cale(tmp_dir, run_name: str, *flags):
    return run_script(SCRIPT, [*flags, "--output-dir", str(tmp_dir), "--run-name", run_name], cwd=str(tmp_dir))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cale")
    proc = run_cale(tmp, "smoke", *TINY, "--total-timesteps", STEPS, "--num-envs", 2, "--save-model",
                    "--eval-episodes", 2, "--metrics-every", 20, "--metrics-batch-size", 16, "--log-every", 10,
                    "--seed", 3)
    assert proc.returncode == 0, describe(proc)
    return os.path.join(str(tmp), "smoke")


def test_smoke_outputs(smoke_run):
    config = read_json(os.path.join(smoke_run, "config.json"))
    args = config["args"]
    assert config["family"] == "cale" and config["tasks"] == ["Breakout-v5"]
    # the 200m preset filled what was not given; explicit flags won
    assert (args["preset"], args["replay_ratio"], args["n_step"], args["learning_rate"], args["sticky_action_prob"],
            args["episodic_life"], args["epsilon_train"], args["learning_starts"]) == (
        "200m", 0.25, 1, 6.25e-5, 0.25, False, 0.0, 200)
    assert (args["threshold"], args["reward_scale"], args["adam_eps"], args["gamma"], args["tau"]) == (
        0.5, 0.1, 1.5e-4, 0.99, 0.005)
    summary = read_json(os.path.join(smoke_run, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == STEPS
    assert summary["num_updates"] == (STEPS - 200) // 4  # replay ratio 0.25, 2 envs, from step 202 on
    header, rows = read_csv(os.path.join(smoke_run, "episodes.csv"))
    assert header == ["global_step", "episodic_return", "episodic_length", "task"]
    assert len(rows) >= 4 and all(1 <= int(r["episodic_length"]) <= 60 for r in rows)
    assert summary["num_episodes"] == len(rows) and len(summary["eval_returns"]) == 2


def test_smoke_tensorboard(smoke_run, sac_cale):
    scalars = read_scalars(smoke_run)
    for tag in ("charts/episodic_return", "charts/SPS", "charts/num_updates", "losses/qf1_loss", "losses/qf_loss",
                "losses/qf1_values", "losses/actor_loss", "losses/alpha", "losses/alpha_loss", "eval/episodic_return"):
        assert tag in scalars, f"{tag} missing"
    cale = [f"cale/{name}" for name in sac_cale.CALE_ACTIONS]
    assert len(cale) == 18 and all(tag in scalars for tag in cale)
    assert [s for s, _ in scalars["cale/NOOP"]] == [s for s, _ in scalars["losses/qf_loss"]]  # logged with the losses
    for k in range(len(scalars["cale/NOOP"])):
        assert sum(scalars[tag][k][1] for tag in cale) == pytest.approx(1.0, abs=1e-5)
    for net, layers in (("encoder", ("conv1", "conv3", "critic_proj")), ("qf1", ("fc1",)), ("qf2", ("fc1",)),
                        ("actor", ("actor_proj", "fc1"))):
        for layer in layers:
            assert f"plasticity/{net}/dormant_tau0/{layer}" in scalars
        for key in ("srank", "feature_norm", "param_norm", "grad_norm", "grad_inactive_tau0.1"):
            assert f"plasticity/{net}/{key}" in scalars
    alphas = [v for _, v in scalars["losses/alpha"]]
    assert all(0 < v < 1 for v in alphas)  # starts at 1, moved by Adam


def test_checkpoint_round_trip(smoke_run, sac_cale, tmp_path):
    checkpoint = torch.load(os.path.join(smoke_run, "model.pt"), weights_only=True)
    assert checkpoint["obs_shape"] == [4, 84, 84] and checkpoint["n_actions"] == 3
    args = sac_cale.Args(**checkpoint["args"])
    network = sac_cale.SACNetwork((4, 84, 84), np.array([0, -math.pi, 0]), np.array([1, math.pi, 1]), "nature")
    network.load_state_dict(checkpoint["model"])
    returns = sac_cale.evaluate(network, "Breakout-v5", args, 2, args.epsilon_eval, args.seed, torch.device("cpu"))
    assert returns == read_json(os.path.join(smoke_run, "summary.json"))["eval_returns"]
    proc = run_cale(tmp_path, "evaluated", "--env-id", "Breakout-v5", "--encoder", "nature", "--max-episode-steps", 60,
                    "--eval-checkpoint", os.path.join(smoke_run, "model.pt"), "--eval-episodes", 2, "--seed", 3,
                    "--device", "cpu")
    assert proc.returncode == 0, describe(proc)
    summary = read_json(os.path.join(str(tmp_path), "evaluated", "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 0 and summary["eval_returns"] == returns


def test_seed_determinism(tmp_path):
    assert_seed_determinism(run_cale, tmp_path, *TINY, "--total-timesteps", 600, "--learning-starts", 150,
                            "--max-episode-steps", 40, "--eval-episodes", 0, "--metrics-every", 0)


# ---------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------

LOW, HIGH = np.array([0.0, -math.pi, 0.0], dtype=np.float32), np.array([1.0, math.pi, 1.0], dtype=np.float32)


def test_squashed_gaussian_log_prob(sac_cale):
    """log N(u) - sum log(1 - tanh(u)^2) - sum log(scale), scale = (1/2, pi, 1/2), action = tanh(u) scale + bias."""
    mean = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.5, -0.7]])
    log_std = torch.tensor([[-0.5, 0.2, 0.0], [1.0, -2.0, 0.3]])
    noise = torch.tensor([[0.4, -1.0, 0.1], [-0.3, 2.0, 0.9]])
    scale, bias = torch.tensor([0.5, math.pi, 0.5]), torch.tensor([0.5, 0.0, 0.5])
    action, log_prob = sac_cale.squashed_gaussian(mean, log_std, noise, scale, bias)
    m, s, n = mean.double().numpy(), np.exp(log_std.double().numpy()), noise.double().numpy()
    u = m + s * n
    expected_action = np.tanh(u) * [0.5, math.pi, 0.5] + [0.5, 0.0, 0.5]
    normal = -0.5 * ((u - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)
    expected = (normal - np.log(1 - np.tanh(u) ** 2) - np.log([0.5, math.pi, 0.5])).sum(axis=1)
    assert np.allclose(action.numpy(), expected_action, atol=1e-6)
    assert np.all(action.numpy() >= LOW) and np.all(action.numpy() <= HIGH)
    assert np.allclose(log_prob.numpy(), expected, atol=1e-4)
    # a saturated tanh: the inverse clips at Dopamine's 0.99999997, so the log-prob stays finite
    _, saturated = sac_cale.squashed_gaussian(torch.full((1, 3), 30.0), torch.zeros(1, 3), torch.zeros(1, 3), scale, bias)
    assert torch.isfinite(saturated).all()


def test_encoder_shapes(sac_cale):
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    for encoder, (channels, size, z_dim) in (("sac", (32, 42, 50)), ("nature", (64, 11, 512))):
        enc = sac_cale.Encoder((4, 84, 84), encoder)
        conv_out = enc.net[: [n for n, _ in enc.net.named_children()].index("flatten")](obs.float() / 255)
        assert conv_out.shape == (2, channels, size, size)  # SAME padding: 84 -> 42 -> 42 (sac)
        flat, z = enc(obs)
        assert flat.shape == (2, channels * size * size) and z.shape == (2, z_dim)
    assert sac_cale.Encoder((4, 84, 84), "sac").feature_dim == 56448
    # SAME for the stride-2 3x3 conv: one pixel of padding after, none before (flax/TF)
    assert sac_cale.same_padding(84, 3, 2) == (0, 1) and sac_cale.same_padding(42, 3, 1) == (1, 1)


@pytest.mark.parametrize("encoder", ["sac", "nature"])
def test_actor_gradient_stops_at_the_convs(sac_cale, encoder):
    torch.manual_seed(0)
    net = sac_cale.SACNetwork((4, 84, 84), LOW, HIGH, encoder)
    target = sac_cale.SACNetwork((4, 84, 84), LOW, HIGH, encoder)
    batch = [torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8), torch.rand(4, 3), torch.rand(4),
             torch.full((4,), 0.99), torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8)]
    log_alpha = torch.zeros(1, requires_grad=True)
    out = sac_cale.sac_losses(net, target, batch, log_alpha, -1.5, 0.1)
    out["actor_loss"].backward(retain_graph=True)
    convs = [p for n, p in net.encoder.named_parameters() if n.startswith("net.conv")]
    assert convs and all(p.grad is None for p in net.encoder.parameters())  # stop-gradient: no conv update
    assert all(p.grad is None for p in [*net.qf1.parameters(), *net.qf2.parameters()])  # frozen critics
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.actor.parameters())
    assert log_alpha.grad is None  # alpha is a constant in the policy loss
    net.zero_grad(set_to_none=True)
    out["qf_loss"].backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    assert all(p.grad is None for p in net.actor.parameters())
    out["alpha_loss"].backward()
    assert log_alpha.grad is not None
    assert all(p.grad is None for p in target.parameters())


def test_target_uses_target_mean_action_and_sampled_log_prob(sac_cale):
    """y = 0.1 r + d (min_i Q'_i(s', tanh(loc') scale + bias) - alpha log pi'(a'|s')), a' sampled, all from the target
    network, computed here by hand from the target's modules and the noise torch would draw."""
    torch.manual_seed(1)
    net = sac_cale.SACNetwork((4, 84, 84), LOW, HIGH, "nature")
    target = sac_cale.SACNetwork((4, 84, 84), LOW, HIGH, "nature")  # other weights than the online network
    next_obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    returns, discounts = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.99, 0.0, 0.99**3])
    alpha = 0.7
    torch.manual_seed(5)
    y = sac_cale.soft_q_target(target, returns, discounts, next_obs, alpha, 0.1)
    with torch.no_grad():
        flat, critic_z = target.encoder(next_obs)
        loc, log_std = target.actor(flat)
        torch.manual_seed(5)
        noise = torch.randn_like(loc)
    loc, std, noise = loc.double().numpy(), np.exp(log_std.double().numpy()), noise.double().numpy()
    scale, bias = np.array([0.5, math.pi, 0.5]), np.array([0.5, 0.0, 0.5])
    u = loc + std * noise
    log_prob = (-0.5 * noise**2 - np.log(std) - 0.5 * math.log(2 * math.pi) - np.log(1 - np.tanh(u) ** 2)
                - np.log(scale)).sum(axis=1)
    mean_action = torch.tensor(np.tanh(loc) * scale + bias, dtype=torch.float32)
    with torch.no_grad():
        min_q = torch.min(target.qf1(critic_z, mean_action), target.qf2(critic_z, mean_action)).double().numpy()
    expected = 0.1 * returns.double().numpy() + discounts.double().numpy() * (min_q - alpha * log_prob)
    assert np.allclose(y.double().numpy(), expected, atol=1e-3)
    assert y[1].item() == pytest.approx(0.1 * -2.0)  # a terminal: the scaled reward only
    # the online network gives another target: soft_q_target reads only the network it is given
    torch.manual_seed(5)
    assert not torch.allclose(sac_cale.soft_q_target(net, returns, discounts, next_obs, alpha, 0.1), y)


def test_replay_n_step_returns_and_stacks(sac_cale):
    """One env, 2x2 frames whose value is the row number + 1, rewards 1, 2, 3, ...: an episode of 4 steps ending in a
    termination, the auto-reset row, an episode cut by truncation after 3 steps, the auto-reset row, then 6 steps."""
    rb = sac_cale.ReplayBuffer(100, 1, (4, 2, 2), 3)
    gamma, n = 0.9, 3
    #        row:  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    terminated = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    truncated = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    valid = [1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # rows 4 and 8: auto-reset steps
    first = [1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]  # first observation after a full reset
    for t in range(16):
        obs = np.full((1, 4, 2, 2), t + 1, dtype=np.uint8)
        rb.add(obs, np.full((1, 3), t / 10, dtype=np.float32), np.array([t + 1.0]), np.array([terminated[t]]),
               np.array([truncated[t]]), np.array([first[t]]), np.array([valid[t]]))
    obs, actions, returns, discounts, next_obs = rb.sample(4000, np.random.default_rng(0), n, gamma)
    rows = obs[:, -1, 0, 0].astype(int) - 1
    assert set(rows) == {0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12}  # never an auto-reset row; the last n rows unsampleable
    expected = {  # row: (return, discount, bootstrap row)
        0: (1 + 0.9 * 2 + 0.81 * 3, 0.9**3, 3), 1: (2 + 0.9 * 3 + 0.81 * 4, 0.0, 4), 2: (3 + 0.9 * 4, 0.0, 4),
        3: (4, 0.0, 4),  # terminal inside the n steps: the return stops there, no bootstrap
        5: (6 + 0.9 * 7 + 0.81 * 8, 0.9**3, 8), 6: (7 + 0.9 * 8, 0.9**2, 8),  # truncation: bootstrap gamma^n'
        7: (8, 0.9, 8), 12: (13 + 0.9 * 14 + 0.81 * 15, 0.9**3, 15),
    }
    for k, row in enumerate(rows):
        assert np.allclose(actions[k], row / 10)
        if row in expected:
            ret, disc, nxt = expected[row]
            assert returns[k] == pytest.approx(ret, rel=1e-5) and discounts[k] == pytest.approx(disc, rel=1e-5)
            assert next_obs[k, -1, 0, 0] == nxt + 1
    # stacks: zero frames before an episode's first frame (ale-py's reset stack), never frames of another episode
    by_row = {int(r): obs[k, :, 0, 0].tolist() for k, r in enumerate(rows)}
    assert by_row[0] == [0, 0, 0, 1] and by_row[6] == [0, 0, 6, 7] and by_row[12] == [10, 11, 12, 13]
    k8 = int(np.flatnonzero(rows == 7)[0])  # the final observation (row 8) continues episode 2's frames (rows 5-8)
    assert next_obs[k8, :, 0, 0].tolist() == [6, 7, 8, 9]


def test_epsilon_schedule_matches_dopamine(sac_cale):
    """dqn_agent.linearly_decaying_epsilon(decay_period=5000, step, warmup_steps=1600, epsilon=0.1), by hand:
    steps_left = 5000 + 1600 - step; bonus = clip(0.9 * steps_left / 5000, 0, 0.9); epsilon + bonus."""
    f = sac_cale.linearly_decaying_epsilon
    for step, value in ((0, 1.0), (1600, 1.0), (2600, 0.82), (4100, 0.55), (6600, 0.1), (50_000, 0.1)):
        assert f(5000, step, 1600, 0.1) == pytest.approx(value)
    assert f(0, 10, 20, 0.3) == 1.0 and f(0, 20, 20, 0.3) == 0.3  # no decay: the warm-up, then epsilon


def test_presets(sac_cale):
    expected = {
        "200m": dict(total_timesteps=50_000_000, learning_starts=20_000, replay_ratio=0.25, n_step=1,
                     learning_rate=6.25e-5, sticky_action_prob=0.25, episodic_life=False, epsilon_train=0.0,
                     epsilon_eval=0.0, epsilon_decay_steps=0),
        "100k": dict(total_timesteps=100_000, learning_starts=1600, replay_ratio=1.0, n_step=10, learning_rate=1e-4,
                     sticky_action_prob=0.0, episodic_life=True, epsilon_train=0.1, epsilon_eval=0.05,
                     epsilon_decay_steps=5000),
    }
    for preset, values in expected.items():
        args = sac_cale.Args(preset=preset, device="cpu")
        assert sac_cale.resolve_args(args) == (["Breakout-v5"], "cale")
        assert {key: getattr(args, key) for key in values} == values
        assert (args.batch_size, args.buffer_size, args.gamma, args.tau, args.adam_eps, args.reward_scale,
                args.encoder, args.num_envs, args.threshold, args.max_episode_steps) == (
            32, 1_000_000, 0.99, 0.005, 1.5e-4, 0.1, "sac", 1, 0.5, 27000)
    args = sac_cale.Args(preset="100k", n_step=3, episodic_life=False, epsilon_train=0.0, device="cpu")
    sac_cale.resolve_args(args)  # explicit flags win
    assert (args.n_step, args.episodic_life, args.epsilon_train, args.replay_ratio) == (3, False, 0.0, 1.0)
    assert sac_cale.target_entropy((3,)) == -1.5


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "CartPole-v1"], ("CartPole-v1", "not an Atari game")),
    (["--env-id", "MinAtar/Breakout"], ("MinAtar/Breakout", "not an Atari game")),
    (["--env-id", "HalfCheetah-v4"], ("HalfCheetah-v4", "not an Atari game")),
    (["--env-id", "Breakoutt-v5"], ("Breakoutt-v5", "Breakout-v5")),
    (["--threshold", "0"], ("--threshold",)),
    (["--threshold", "1"], ("--threshold",)),
    (["--threshold", "-0.2"], ("--threshold",)),
    (["--epsilon-train", "1.5"], ("--epsilon-train",)),
    (["--sticky-action-prob", "2"], ("--sticky-action-prob",)),
    (["--n-step", "0"], ("--n-step",)),
    (["--max-episode-steps", "0"], ("--max-episode-steps",)),
])
def test_bad_input(sac_cale, tmp_path, capsys, flags, fragments):
    code, lines = call_main(sac_cale, [*flags, "--output-dir", tmp_path, "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not os.listdir(tmp_path)  # rejected before any run directory
