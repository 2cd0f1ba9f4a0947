"""The MinAtar environment family of the DQN and PPO scripts (docs/dqn.md detail 13, docs/ppo.md detail 16).

`MinAtarVecEnv` against raw `minatar.Environment`s stepped by hand with the same seeds and actions (observations,
rewards, terminals, EnvPool-style next-step auto-reset, truncation, sticky actions, action sets, channel padding),
episode bookkeeping, the MinAtar networks, and end-to-end runs (single games, a task sequence, determinism, bad
input). Every DQN-family and PPO-family script carries the same wrapper; the end-to-end tests run the bases and the
per-script equality tests (tests/test_dqn_redo.py, ...) keep the variants equal to them.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from helpers import (
    assert_one_line_error, describe, load_script, read_csv, read_json, run_script, script_path,
)

GAMES = ["MinAtar/Asterix", "MinAtar/Breakout", "MinAtar/Freeway", "MinAtar/Seaquest", "MinAtar/SpaceInvaders"]
FAMILY = ["dqn", "dqn_jax", "dqn_redo", "dqn_hlgauss", "dqn_gap", "dqn_reset", "dqn_softmoe", "dqn_pruning", "dqn_rigl",
          "dqn_mico", "dqn_qdagger", "dqn_cchain", "ppo", "ppo_gtr", "ppo_simplicial", "stream_q", "ppo_cchain",
          "ppo_regrama", "ppo_sigreg", "ppo_decoupled", "ppo_vaco", "ppo_asyppo", "ppo_kl", "ppo_moe",
          "ppo_stable", "ppo_jax"]


@pytest.fixture(scope="module")
def dqn():
    return load_script("dqn")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def raw_games(game: str, seeds, sticky: float):
    import minatar

    envs = [minatar.Environment(game, sticky_action_prob=sticky) for _ in seeds]
    for env, seed in zip(envs, seeds):
        env.seed(seed)
    return envs


def raw_obs(env, channels: int) -> np.ndarray:
    out = np.zeros((channels, 10, 10), dtype=np.uint8)
    state = env.state()
    out[: state.shape[2]] = np.transpose(state, (2, 0, 1))
    return out


def test_every_script_carries_the_same_wrapper():
    """The wrapper is duplicated by design (standalone scripts); the copies must not drift apart."""
    sources = {name: inspect.getsource(load_script(name).MinAtarVecEnv) for name in FAMILY}
    reference = sources["dqn"].replace("docs/dqn.md, detail 13", "DETAIL")
    for name, source in sources.items():
        assert source.replace("docs/dqn.md, detail 13", "DETAIL").replace("docs/ppo.md, detail 16", "DETAIL") \
            == reference, name
    assert {tuple(load_script(n).MINATAR_GAMES) for n in FAMILY} == {tuple(GAMES)}


@pytest.mark.parametrize("env_id", GAMES)
@pytest.mark.parametrize("full_action_space", [False, True])
def test_wrapper_matches_raw_environments_stepped_by_hand(dqn, env_id, full_action_space):
    """Same seeds and actions: the wrapper's observations, rewards, terminations and auto-resets are exactly those
    of raw minatar.Environment objects, with EnvPool's next-step auto-reset (action ignored, reward 0)."""
    game, num_envs, seeds, sticky = dqn.MINATAR_GAMES[env_id], 3, [11, 12, 13], 0.1
    envs = dqn.MinAtarVecEnv(game, num_envs, seeds, sticky, full_action_space, pad_channels=False)
    raws = raw_games(game, seeds, sticky)
    action_set = list(range(6)) if full_action_space else raws[0].minimal_action_set()
    assert envs.action_space.n == len(action_set)
    channels = raws[0].n_channels
    assert envs.observation_space.shape == (channels, 10, 10) and envs.observation_space.dtype == np.uint8
    obs, _ = envs.reset()
    for env in raws:
        env.reset()
    assert obs.dtype == np.uint8 and np.array_equal(obs, np.stack([raw_obs(e, channels) for e in raws]))
    rng = np.random.default_rng(0)
    pending_reset = np.zeros(num_envs, dtype=bool)
    resets = terminals = 0
    for _ in range(3000):
        actions = rng.integers(0, len(action_set), num_envs)
        obs, reward, terminated, truncated, info = envs.step(actions)
        assert info == {} and not truncated.any()
        for i, env in enumerate(raws):
            if pending_reset[i]:  # the step after a terminal: a reset, whatever the action
                env.reset()
                expected_r, expected_t = 0.0, False
                resets += 1
            else:
                expected_r, expected_t = env.act(action_set[actions[i]])
            assert reward[i] == expected_r and terminated[i] == expected_t
            assert np.array_equal(obs[i], raw_obs(env, channels))
        terminals += int(terminated.sum())
        pending_reset = terminated.copy()
    assert terminals > 0 and resets > 0 or env_id == "MinAtar/Freeway"  # Freeway ends only after 2500 steps


def test_truncation_at_the_episode_cap_then_auto_reset(dqn):
    envs = dqn.MinAtarVecEnv("freeway", 2, [1, 2], 0.1, True, False, max_episode_steps=5)
    envs.reset()
    for t in range(1, 6):
        _, reward, terminated, truncated, _ = envs.step(np.array([0, 2]))
        assert not terminated.any()
        assert truncated.all() == (t == 5) and truncated.any() == (t == 5)
    raw = raw_games("freeway", [1], 0.1)[0]
    raw.reset()
    for _ in range(5):
        raw.act(0)
    raw.reset()  # the wrapper's auto-reset step
    obs, reward, terminated, truncated, _ = envs.step(np.array([2, 2]))
    assert not (terminated.any() or truncated.any()) and (reward == 0).all()
    assert np.array_equal(obs[0], raw_obs(raw, 7))
    assert (envs.lengths == 0).all()
    _, _, _, truncated, _ = envs.step(np.array([0, 0]))
    assert not truncated.any() and (envs.lengths == 1).all()


def test_seeding_is_deterministic_and_seed_dependent(dqn):
    def trajectory(seeds):
        envs = dqn.MinAtarVecEnv("asterix", 2, seeds, 0.1, True, False)
        out = [envs.reset()[0]]
        for t in range(300):
            out.append(envs.step(np.array([t % 6, (t * 5) % 6]))[0])
        return np.stack(out)

    a, b, c = trajectory([5, 6]), trajectory([5, 6]), trajectory([7, 6])
    assert np.array_equal(a, b)
    assert not np.array_equal(a[:, 0], c[:, 0]) and np.array_equal(a[:, 1], c[:, 1])  # env 1 kept seed 6


def test_sticky_actions(dqn):
    """Probability 1: the first action (0, no-op) repeats forever, so the agent never moves; probability 0 obeys."""
    def player_column(sticky):
        envs = dqn.MinAtarVecEnv("breakout", 1, [3], sticky, True, False)
        envs.reset()
        for _ in range(3):
            obs = envs.step(np.array([1]))[0]  # full action 1 = left
        return np.flatnonzero(obs[0, 0, 9])  # breakout channel 0: the paddle, bottom row

    start = np.flatnonzero(dqn.MinAtarVecEnv("breakout", 1, [3], 0.0, True, False).reset()[0][0, 0, 9])
    assert player_column(1.0).tolist() == start.tolist()
    assert player_column(0.0).tolist() == (start - 3).tolist()


def test_sequences_pad_channels_and_use_six_actions(dqn):
    envs = dqn.MinAtarVecEnv("breakout", 2, [1, 2], 0.1, True, pad_channels=True)
    obs, _ = envs.reset()
    assert obs.shape == (2, dqn.MINATAR_CHANNELS, 10, 10) and envs.action_space.n == 6
    assert obs[:, 4:].sum() == 0 and obs[:, :4].sum() > 0


def test_episode_stats_give_the_raw_games_returns(dqn):
    """Full-episode returns and lengths from the wrapper and EpisodeStats equal the raw games' sums."""
    envs = dqn.MinAtarVecEnv("space_invaders", 2, [21, 22], 0.1, True, False)
    raws = raw_games("space_invaders", [21, 22], 0.1)
    for env in raws:
        env.reset()
    stats, prev_done, rng = dqn.EpisodeStats(2), np.zeros(2, dtype=bool), np.random.default_rng(1)
    envs.reset()
    got, expected = [], []
    raw_return, raw_length = np.zeros(2), np.zeros(2, dtype=int)
    while len(expected) < 4:
        actions = rng.integers(0, 6, 2)
        _, reward, terminated, truncated, info = envs.step(actions)
        for i, env in enumerate(raws):
            if prev_done[i]:
                env.reset()
                continue
            r, done = env.act(int(actions[i]))
            raw_return[i] += r
            raw_length[i] += 1
            if done:
                expected.append((i, raw_return[i], raw_length[i]))
                raw_return[i], raw_length[i] = 0, 0
        got += stats.update(reward, terminated, truncated, info, ~prev_done)[1]
        prev_done = terminated | truncated
    assert [(i, r, n) for i, r, n in got] == [(i, float(r), int(n)) for i, r, n in expected]


def test_minatar_networks(dqn, ppo):
    q = dqn.QNetwork((4, 10, 10), 6, minatar=True)
    assert not q.pixel and q.hidden_layers() == ["conv1", "fc1"]
    assert (q.net.conv1.in_channels, q.net.conv1.out_channels, q.net.conv1.kernel_size, q.net.conv1.stride,
            q.net.conv1.padding) == (4, 16, (3, 3), (1, 1), (0, 0))
    assert (q.net.fc1.in_features, q.net.fc1.out_features) == (16 * 8 * 8, 128)
    x = torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8)
    assert torch.equal(q(x), q.net(x.float()))  # 0/1 grids are not rescaled by 1/255
    agent = ppo.Agent((400,), 3, False, minatar=True)
    assert isinstance(agent.actor.act1, torch.nn.ReLU) and isinstance(agent.critic.act2, torch.nn.ReLU)
    assert isinstance(ppo.Agent((400,), 3, False).actor.act1, torch.nn.Tanh)
    space = ppo.MinAtarVecEnv("breakout", 1, [0], 0.1, False, False).observation_space
    assert ppo.flat_obs_shape(space) == (400,)
    grid = np.random.default_rng(0).integers(0, 2, (3, 4, 10, 10)).astype(np.uint8)
    flat = ppo.flatten_obs(grid, space)
    assert flat.dtype == np.float32 and np.array_equal(flat, grid.reshape(3, -1))


def test_family_defaults(dqn, ppo):
    args = dqn.Args(env_id="MinAtar/Breakout")
    _, family = dqn.resolve_args(args)
    assert family == "minatar" and args.full_action_space and args.sticky_action_prob == 0.1
    assert (args.learning_rate, args.buffer_size, args.batch_size, args.replay_ratio, args.target_network_frequency,
            args.learning_starts, args.end_e, args.exploration_steps, args.loss, args.total_timesteps) == (
        2.5e-4, 100_000, 32, 1.0, 1000, 5000, 0.1, 100_000, "huber", 5_000_000)
    args = ppo.Args(env_id="MinAtar/Breakout")
    _, family = ppo.resolve_args(args)
    assert family == "minatar" and not args.full_action_space and args.sticky_action_prob == 0.1
    assert (args.num_envs, args.num_steps, args.learning_rate, args.num_minibatches, args.update_epochs) == (
        64, 128, 5e-3, 8, 4)
    # the other families keep their defaults
    atari = dqn.Args(env_id="Breakout-v5")
    dqn.resolve_args(atari)
    assert (atari.sticky_action_prob, atari.loss, atari.exploration_steps) == (0.25, "mse", 250_000)
    vector = dqn.Args(env_id="CartPole-v1", total_timesteps=100_000)
    dqn.resolve_args(vector)
    assert (vector.loss, vector.exploration_steps) == ("mse", 40_000)


def test_dqn_minatar_run_sequence_and_compact_replay(tmp_path, dqn):
    """A two-game sequence: padded observations and the 6-action set carry one network across games; episodes of
    both games are logged; the replay memory holds uint8 grids."""
    proc = run_script(script_path("dqn"), [
        "--env-ids", "MinAtar/Breakout", "MinAtar/Seaquest", "--steps-per-task", "700", "--learning-starts", "300",
        "--buffer-size", "2000", "--eval-episodes", "2", "--metrics-every", "50", "--save-model",
        "--output-dir", tmp_path, "--run-name", "seq", "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    run_dir = tmp_path / "seq"
    summary, config = read_json(run_dir / "summary.json"), read_json(run_dir / "config.json")
    assert summary["status"] == "completed" and summary["global_step"] == 1400 and config["family"] == "minatar"
    assert {row["task"] for row in read_csv(run_dir / "episodes.csv")[1]} >= {"MinAtar/Breakout"}
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert tuple(checkpoint["obs_shape"]) == (10, 10, 10) and checkpoint["n_actions"] == 6
    rb = dqn.ReplayBuffer(1000, 2, (10, 10, 10), np.uint8, stacked=False)
    assert rb.frames.dtype == np.uint8 and rb.frames.shape == (500, 2, 10, 10, 10)


@pytest.mark.parametrize("script", ["dqn", "ppo"])
def test_minatar_runs_are_deterministic(tmp_path, script):
    flags = (["--total-timesteps", "800", "--learning-starts", "300", "--buffer-size", "1000"] if script == "dqn"
             else ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "128"])
    rows = []
    for seed in (1, 1, 2):
        out = tmp_path / f"s{seed}_{len(rows)}"
        proc = run_script(script_path(script), ["--env-id", "MinAtar/Breakout", *flags, "--seed", seed,
                                                "--eval-episodes", "0", "--output-dir", out, "--run-name", "r",
                                                "--device", "cpu"], cwd=tmp_path)
        assert proc.returncode == 0, describe(proc)
        rows.append(read_csv(out / "r" / "episodes.csv")[1])
    assert rows[0] == rows[1] and rows[0] and rows[0] != rows[2]


@pytest.mark.parametrize("script,args,fragments", [
    ("dqn", ["--env-id", "MinAtar/Pong"], ("unknown env id 'MinAtar/Pong'", "MinAtar/SpaceInvaders")),
    ("ppo", ["--env-id", "MinAtar/Breakou"], ("unknown env id", "MinAtar games: MinAtar/Asterix, MinAtar/Breakout")),
    ("dqn", ["--env-ids", "MinAtar/Breakout", "Breakout-v5", "--steps-per-task", "100"], ("cannot mix MinAtar",)),
    ("ppo", ["--env-ids", "CartPole-v1", "MinAtar/Breakout", "--steps-per-task", "512"], ("cannot mix MinAtar",)),
    ("sac", ["--env-id", "MinAtar/Breakout"], ("discrete actions", "sac.py")),
    ("sac_simplicial", ["--env-id", "MinAtar/Seaquest"], ("discrete actions",)),
    ("sac_reset", ["--env-id", "MinAtar/Asterix"], ("discrete actions",)),
    ("sac_regrama", ["--env-id", "MinAtar/Freeway"], ("discrete actions",)),
    ("sac_optimistic", ["--env-id", "MinAtar/Breakout"], ("discrete actions",)),
    ("sac_least", ["--env-id", "MinAtar/SpaceInvaders"], ("discrete actions",)),
])
def test_bad_minatar_input_is_a_one_line_error(tmp_path, script, args, fragments):
    proc = run_script(script_path(script), [*args, "--output-dir", tmp_path], cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not any(tmp_path.iterdir())  # no run directory: it failed before any work


@pytest.mark.parametrize("script,flags", [
    ("dqn_redo", ["--total-timesteps", "500", "--learning-starts", "200", "--buffer-size", "1000",
                  "--redo-period", "20", "--metrics-every", "50"]),
    ("ppo_gtr", ["--total-timesteps", "512", "--num-envs", "4", "--num-steps", "64"]),
    ("ppo_simplicial", ["--total-timesteps", "512", "--num-envs", "4", "--num-steps", "64"]),
    ("ppo_cchain", ["--total-timesteps", "512", "--num-envs", "4", "--num-steps", "64"]),
    ("ppo_regrama", ["--total-timesteps", "512", "--num-envs", "4", "--num-steps", "64", "--regrama-period", "8",
                     "--regrama-tau", "0.1"]),
])
def test_variants_run_on_minatar(tmp_path, script, flags):
    """The carried MinAtar family runs end to end with each method (ReDo's recycles on the MinAtar CNN every 20
    updates, GTR's and SEM's losses and layers on the ReLU MLPs, ReGraMa's recycles of them every 8 updates)."""
    proc = run_script(script_path(script), ["--env-id", "MinAtar/SpaceInvaders", *flags, "--eval-episodes", "1",
                                            "--output-dir", tmp_path, "--run-name", "r", "--device", "cpu"],
                      cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert read_json(tmp_path / "r" / "summary.json")["status"] == "completed"
    assert read_json(tmp_path / "r" / "config.json")["family"] == "minatar"
