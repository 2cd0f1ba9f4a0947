"""The CALE environment block shared by the continuous-Atari scripts (docs/cale.md, details 1-3).

`sac_cale.py` and `ppo_cale.py` carry the same block (standalone scripts): `cale_game`, `joystick_cells`,
`cale_cell_metrics` and `CaleVecEnv`. Checked here: the joystick mapping against the paper's table and against the
installed ale-py's own code (which must be a release with the 2025 centred-stick fix, ALE PR 638, first shipped in
ale-py 0.12.0), the vector env against single ale-py environments replayed with the same actions, seeding,
life-loss terminals, the episode cap, and bad game ids.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from helpers import load_script

SCRIPTS = ["sac_cale", "ppo_cale"]
PI = np.pi

# The joystick cell of an action (r, theta, fire) at tau = 0.5. Each row is checked by hand: x = r cos(theta) and
# y = r sin(theta) must exceed tau in absolute value to move the stick along that axis; fire needs a[2] > tau.
# `old` is the cell ale-py < 0.12 chose (each axis -1 when x < tau instead of x < -tau): a centred stick pushed
# down-left, and no action could stand still or move along one axis.
TABLE = [
    # (r, theta, fire),        cell,           old (pre-0.12.0) cell
    ((0.0, 0.0, 0.0), "NOOP", "DOWNLEFT"),
    ((0.0, 0.0, 1.0), "FIRE", "DOWNLEFTFIRE"),
    ((0.0, 0.0, 0.5), "NOOP", "DOWNLEFT"),          # fire needs strictly more than tau
    ((1.0, 0.0, 0.0), "RIGHT", "DOWNRIGHT"),
    ((1.0, PI, 0.0), "LEFT", "DOWNLEFT"),
    ((1.0, -PI, 0.0), "LEFT", "DOWNLEFT"),
    ((1.0, PI / 2, 0.0), "UP", "UPLEFT"),
    ((1.0, -PI / 2, 0.0), "DOWN", "DOWNLEFT"),
    ((1.0, PI / 4, 0.0), "UPRIGHT", "UPRIGHT"),     # x = y = 0.71 > tau: the one cell the bug did not move
    ((0.6, PI / 4, 0.0), "NOOP", "DOWNLEFT"),       # x = y = 0.42: inside the dead zone
    ((1.0, 3 * PI / 4, 1.0), "UPLEFTFIRE", "UPLEFTFIRE"),
    ((1.0, -3 * PI / 4, 1.0), "DOWNLEFTFIRE", "DOWNLEFTFIRE"),
    ((1.0, -PI / 4, 0.0), "DOWNRIGHT", "DOWNRIGHT"),
    ((0.8, PI / 2, 1.0), "UPFIRE", "UPLEFTFIRE"),
    ((0.8, -PI / 2, 1.0), "DOWNFIRE", "DOWNLEFTFIRE"),
    ((0.8, 0.0, 1.0), "RIGHTFIRE", "DOWNRIGHTFIRE"),
    ((0.8, PI, 1.0), "LEFTFIRE", "DOWNLEFTFIRE"),
    ((1.0, 3 * PI / 4, 0.0), "UPLEFT", "UPLEFT"),
]


@pytest.fixture(scope="module")
def cale():
    return load_script("sac_cale")


def block(module) -> str:
    """The shared block's source: from CALE_ACTIONS to the end of CaleVecEnv."""
    source = inspect.getsource(module)
    start = source.index("CALE_ACTIONS = ")
    end = source.index(inspect.getsource(module.CaleVecEnv)) + len(inspect.getsource(module.CaleVecEnv))
    return source[start:end]


def test_every_script_carries_the_same_block():
    """The block is duplicated by design (standalone scripts); the copies must not drift apart."""
    blocks = {name: block(load_script(name)) for name in SCRIPTS}
    assert len(set(blocks.values())) == 1, "the CALE blocks of sac_cale.py and ppo_cale.py differ"


def test_mapping_matches_the_table(cale):
    actions = np.array([row[0] for row in TABLE], dtype=np.float32)
    cells = cale.joystick_cells(actions, 0.5)
    assert [cale.CALE_ACTIONS[c] for c in cells] == [row[1] for row in TABLE]
    # the 18 names are ALE's action order (ale_py.Action), so a cell index is the emulator's action id
    import ale_py

    assert list(cale.CALE_ACTIONS) == [ale_py.Action(i).name for i in range(18)]


def test_the_table_is_what_the_old_mapping_got_wrong(cale):
    """The pre-fix rule, written out, reproduces the table's `old` column: the table really tells the two apart."""
    actions = np.array([row[0] for row in TABLE], dtype=np.float32)
    x, y = actions[:, 0] * np.cos(actions[:, 1]), actions[:, 0] * np.sin(actions[:, 1])
    old_h = -(x < 0.5).astype(int) + (x > 0.5)
    old_v = -(y < 0.5).astype(int) + (y > 0.5)
    old = cale.CALE_CELL_INDEX[old_h + 1, old_v + 1, (actions[:, 2] > 0.5).astype(int)]
    assert [cale.CALE_ACTIONS[c] for c in old] == [row[2] for row in TABLE]
    assert sum(row[1] != row[2] for row in TABLE) >= 10


def test_threshold_moves_the_dead_zone(cale):
    a = np.array([[0.6, PI / 4, 0.3]], dtype=np.float32)  # x = y = 0.42, fire 0.3
    assert cale.CALE_ACTIONS[cale.joystick_cells(a, 0.5)[0]] == "NOOP"
    assert cale.CALE_ACTIONS[cale.joystick_cells(a, 0.25)[0]] == "UPRIGHTFIRE"


def test_installed_ale_py_single_env_has_the_fix(cale):
    """The emulator receives NOOP for a centred stick. Fails on ale-py < 0.12.0 (DOWNLEFT), whose continuous
    results are not comparable with fixed-version results (docs/cale.md, detail 2)."""
    import gymnasium as gym
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", continuous=True, repeat_action_probability=0.0)
    env.reset(seed=0)
    sent = []
    ale = env.unwrapped.ale
    act = ale.act

    class Spy:
        def __getattr__(self, name):
            return getattr(ale, name)

        def act(self, action, strength=1.0):
            sent.append((ale_py.Action(action).name, float(strength)))
            return act(action, strength)

    env.unwrapped.ale = Spy()
    for a, name, _ in TABLE:
        sent.clear()
        env.step(np.array(a, dtype=np.float32))
        assert {s[0] for s in sent} == {name}, (a, sent)
        assert sent[0][1] == pytest.approx(a[0])  # the radius is the paddle strength
    env.close()


def test_installed_ale_py_vector_env_maps_as_joystick_cells(cale):
    """ale-py's vector env (the one the scripts use) sends the same action ids for 1,000 random actions."""
    env = cale.CaleVecEnv("breakout", 8, list(range(8)), 0.5, 0.25, False, 27000)

    class Recorder:
        def send(self, ids, strength):
            self.ids, self.strength = np.asarray(ids), np.asarray(strength)

    real, env.env.ale = env.env.ale, Recorder()
    rng = np.random.default_rng(0)
    for tau in (0.5, 0.2, 0.8):
        env.env.continuous_action_threshold = tau
        for _ in range(125):
            a = rng.uniform([0, -PI, 0], [1, PI, 1], size=(8, 3)).astype(np.float32)
            env.env.send(a)
            np.testing.assert_array_equal(env.env.ale.ids, cale.joystick_cells(a, tau))
            np.testing.assert_array_equal(env.env.ale.strength, a[:, 0])
    table = np.array([row[0] for row in TABLE[:8]], dtype=np.float32)
    env.env.continuous_action_threshold = 0.5
    env.env.send(table)
    assert [cale.CALE_ACTIONS[i] for i in env.env.ale.ids] == [row[1] for row in TABLE[:8]]
    env.env.ale = real
    env.close()


def test_pyproject_pins_a_fixed_ale_py():
    text = open(re.sub(r"tests/test_cale.py$", "pyproject.toml", __file__)).read()
    low = re.search(r'"ale-py>=(\d+)\.(\d+)', text)
    assert low and (int(low.group(1)), int(low.group(2))) >= (0, 12), "ale-py must be >= 0.12.0 (ALE PR 638)"


def test_cell_metrics_are_fractions(cale):
    cells = np.array([0, 0, 1, 17, 17, 17])
    metrics = cale.cale_cell_metrics(cells)
    assert len(metrics) == 18 and set(metrics) == {f"cale/{n}" for n in cale.CALE_ACTIONS}
    assert metrics["cale/NOOP"] == pytest.approx(2 / 6) and metrics["cale/FIRE"] == pytest.approx(1 / 6)
    assert metrics["cale/DOWNLEFTFIRE"] == pytest.approx(3 / 6) and sum(metrics.values()) == pytest.approx(1.0)
    assert cale.cale_cell_metrics(np.array([], dtype=np.int64))["cale/NOOP"] == 0.0


@pytest.mark.parametrize("env_id, game", [("Breakout-v5", "breakout"), ("MsPacman-v5", "ms_pacman"),
                                          ("KungFuMaster-v5", "kung_fu_master"), ("ALE/Pong-v5", "pong"),
                                          ("UpNDown-v5", "up_n_down")])
def test_game_ids(cale, env_id, game):
    assert cale.cale_game(env_id) == game


@pytest.mark.parametrize("env_id, fragment", [("CartPole-v1", "not an Atari game"),
                                              ("MinAtar/Breakout", "not an Atari game"),
                                              ("Breakout-v4", "not an Atari game"),
                                              ("Breakot-v5", "did you mean Breakout-v5")])
def test_bad_game_ids(cale, env_id, fragment):
    with pytest.raises(cale.UserError, match=fragment):
        cale.cale_game(env_id)


def rollout(cale, game, seeds, sticky, steps, episodic_life=False, cap=27000, action_seed=3):
    env = cale.CaleVecEnv(game, len(seeds), seeds, 0.5, sticky, episodic_life, cap)
    obs, _ = env.reset()
    rng = np.random.default_rng(action_seed)
    out = dict(obs=[obs], actions=[], reward=[], terminated=[], truncated=[], game_over=[], raw=[])
    for _ in range(steps):
        a = rng.uniform([0, -PI, 0], [1, PI, 1], size=(len(seeds), 3)).astype(np.float32)
        obs, r, term, trunc, info = env.step(a)
        for key, value in zip(("actions", "reward", "terminated", "truncated", "game_over", "raw", "obs"),
                              (a, r, term, trunc, info["terminated"], info["reward"], obs)):
            out[key].append(value)
    env.close()
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("game, gym_id", [("breakout", "Breakout"), ("pong", "Pong")])
def test_vector_env_equals_single_envs_replayed(cale, game, gym_id):
    """Rewards and episode ends of each vector env equal a single ale-py env stepped with the same actions
    (no sticky actions, so the games are deterministic given the actions); the step after a game over is the
    EnvPool-style auto-reset: action ignored, reward 0."""
    import gymnasium as gym
    import ale_py

    gym.register_envs(ale_py)
    steps = 1500
    run = rollout(cale, game, [1, 2], 0.0, steps)
    ends = run["game_over"] | run["truncated"]
    assert ends.sum() >= 2, "the test needs finished games"
    assert run["reward"].dtype == np.float32 and (run["raw"] == run["reward"]).all()
    for i in range(2):
        env = gym.make(f"ALE/{gym_id}-v5", continuous=True, repeat_action_probability=0.0, frameskip=4,
                       max_num_frames_per_episode=108000)
        env.reset(seed=0)
        done = False
        for t in range(steps):
            if done:
                env.reset()
                done = False
                assert run["reward"][t, i] == 0 and not ends[t, i]
                continue
            _, r, term, trunc, _ = env.step(run["actions"][t, i])
            done = term or trunc
            assert (r, done) == (run["reward"][t, i], ends[t, i]), (i, t)
        env.close()


def test_seeding_is_deterministic_and_seed_dependent(cale):
    a = rollout(cale, "breakout", [5, 6], 0.25, 300)
    b = rollout(cale, "breakout", [5, 6], 0.25, 300)
    c = rollout(cale, "breakout", [7, 8], 0.25, 300)
    np.testing.assert_array_equal(a["obs"], b["obs"])
    np.testing.assert_array_equal(a["reward"], b["reward"])
    assert not np.array_equal(a["obs"], c["obs"])  # sticky actions draw from the seeded generator


def test_observations_and_spaces(cale):
    env = cale.CaleVecEnv("breakout", 2, [0, 1], 0.5, 0.25, False, 27000)
    obs, info = env.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8 and info == {}
    assert env.observation_space.shape == (4, 84, 84)
    np.testing.assert_allclose(env.action_space.low, [0, -PI, 0], rtol=1e-6)
    np.testing.assert_allclose(env.action_space.high, [1, PI, 1], rtol=1e-6)
    assert env.env.ale is not None and env.env.continuous
    env.close()


def test_life_loss_is_a_learning_terminal_only_with_episodic_life(cale):
    """Breakout has 5 lives: with episodic_life every life lost is a `terminated`, while info["terminated"]
    (the real game over, which ends the reported episode) is unchanged; without it the two agree."""
    life = rollout(cale, "breakout", [3, 4], 0.0, 1000, episodic_life=True)
    game = rollout(cale, "breakout", [3, 4], 0.0, 1000, episodic_life=False)
    np.testing.assert_array_equal(life["game_over"], game["game_over"])
    np.testing.assert_array_equal(game["terminated"], game["game_over"])
    assert life["terminated"].sum() >= 4 * life["game_over"].sum() > 0
    assert (life["terminated"] >= life["game_over"]).all()


def test_episode_cap_truncates(cale):
    run = rollout(cale, "pong", [0], 0.0, 120, cap=50)  # random Pong lasts far longer than 50 steps
    ends = np.flatnonzero(run["truncated"][:, 0])
    assert list(ends[:2]) == [49, 100]  # 50 agent steps, then the auto-reset step, then 50 more
    assert not run["game_over"][:, 0].any()


def test_life_loss_does_not_cut_the_reported_games(tmp_path):
    """--episodic-life changes what the learner sees, never the reported games: with learning off (PPO at learning
    rate 0; SAC before learning starts) and no sticky actions, both settings play the same actions, so episodes.csv
    (full-game returns and lengths) is identical. A life loss is not an auto-reset: counting the step after it as
    one (as after a game over) would shorten every game by its lives lost."""
    runs = {}
    for name in SCRIPTS:
        module = load_script(name)
        for life in (False, True):
            common = dict(env_id="Breakout-v5", seed=3, sticky_action_prob=0.0, episodic_life=life, encoder="nature",
                          eval_episodes=0, metrics_every=0, device="cpu", torch_threads=1,
                          output_dir=str(tmp_path), run_name=f"{name}-{life}")
            if name == "ppo_cale":
                common.update(total_timesteps=1024, num_envs=4, num_steps=128, learning_rate=0.0)
            else:
                common.update(total_timesteps=1200, num_envs=2, learning_starts=5000, buffer_size=2000)
            assert module.run(module.Args(**common))["status"] == "completed"
            with open(tmp_path / f"{name}-{life}" / "episodes.csv", "rb") as f:
                runs[name, life] = f.read()
        assert runs[name, False].count(b"\n") >= 3, name
        assert runs[name, True] == runs[name, False], name
