"""Unit tests of dqn.ReplayBuffer: frame-stack reconstruction on real EnvPool Atari streams, never sampling the
auto-reset pseudo-transitions, n-step returns, the task-switch cut, and memory per transition."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

GAMMA = 0.9  # far from 1, so a wrong number of discount factors changes the result visibly


class Collector:
    """Feeds replay buffers exactly as dqn.run's collection loop does (same `first` / `valid` / game-over logic,
    copied from run()), with uniformly random actions, and logs every row it writes.

    `log[j]` is the observation passed to the j-th row written (end_episodes' row included), so ring row
    `j % rb.rows` holds it; `next_log(j)` is the observation that followed it."""

    def __init__(self, dqn, buffers, envs, num_envs: int, n_actions: int, seed: int = 0):
        self.dqn, self.buffers, self.num_envs, self.n_actions = dqn, buffers, num_envs, n_actions
        self.rng = np.random.default_rng(seed)
        self.log, self.valid_log, self.action_log, self.step_log = [], [], [], []
        self._start(envs)

    def _start(self, envs):  # as run() does at the start and after a task switch
        n = self.num_envs
        self.envs = envs
        self.obs, _ = envs.reset()
        self.first = np.ones(n, dtype=bool)
        self.prev_done = np.zeros(n, dtype=bool)
        self.prev_game_over = np.zeros(n, dtype=bool)
        self.stats = self.dqn.EpisodeStats(n)

    def step(self):
        actions = self.rng.integers(0, self.n_actions, self.num_envs)
        next_obs, reward, terminated, truncated, info = self.envs.step(actions)
        for rb in self.buffers:
            rb.add(self.obs, actions, reward, terminated, truncated, self.first, ~self.prev_done)
        self.log.append(np.array(self.obs, copy=True))
        self.valid_log.append(~self.prev_done)
        self.action_log.append(actions)
        self.step_log.append((reward, terminated, truncated, info))
        game_over, _ = self.stats.update(reward, terminated, truncated, info, ~self.prev_done)
        self.first = self.prev_done & self.prev_game_over
        self.prev_done, self.prev_game_over = terminated | truncated, game_over
        self.obs = next_obs

    def switch(self, envs):  # task switch, as run() does it
        for rb in self.buffers:
            rb.end_episodes(self.obs, self.first)
        self.log.append(np.array(self.obs, copy=True))
        self.valid_log.append(np.zeros(self.num_envs, dtype=bool))
        self.action_log.append(np.zeros(self.num_envs, dtype=np.int64))
        self.step_log.append(None)
        self._start(envs)

    def next_log(self, j: int):
        return self.log[j + 1] if j + 1 < len(self.log) else self.obs


def ring_window(rb, written: int):
    """Write indices j (oldest first) whose ring rows still hold what was written and whose frame stack can be
    rebuilt: everything if the ring has not wrapped, else all but the oldest `stack - 1` rows."""
    if written <= rb.rows:
        return np.arange(written)
    return np.arange(written - rb.rows + rb.stack - 1, written)


def digest(*arrays) -> bytes:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.digest()


# ---------------------------------------------------------------------------------------------------------------
# Frame stacks on a real EnvPool Atari stream
# ---------------------------------------------------------------------------------------------------------------

ATARI_STEPS = 600
SMALL_ROWS = 150  # per env: the small buffer wraps four times


def make_breakout(dqn, protocol: str):
    import envpool

    if protocol == "dqn_make_env":  # the script's own protocol: no FIRE at reset, 1 no-op, sticky actions
        args = dqn.Args(env_id="Breakout-v5", episodic_life=True, max_episode_steps=150, full_action_space=False,
                        sticky_action_prob=0.25)
        return dqn.make_env("Breakout-v5", 2, [3, 4], args)
    # EnvPool's defaults (up to 30 no-ops, FIRE at reset), no sticky actions
    return envpool.make("Breakout-v5", env_type="gymnasium", num_envs=2, seed=[3, 4], episodic_life=True,
                        max_episode_steps=150, repeat_action_probability=0.0)


@pytest.fixture(scope="module", params=["dqn_make_env", "envpool_defaults"])
def atari_stream(request, dqn):
    envs = make_breakout(dqn, request.param)
    shape = envs.observation_space.shape
    assert shape == (4, 84, 84)
    big = dqn.ReplayBuffer(2 * (ATARI_STEPS + 8), 2, shape, np.uint8, stacked=True)
    small = dqn.ReplayBuffer(2 * SMALL_ROWS, 2, shape, np.uint8, stacked=True)
    col = Collector(dqn, [big, small], envs, 2, envs.action_space.n, seed=5)
    events = dict(life_loss=0, game_over=0, truncation=0)
    for _ in range(ATARI_STEPS):
        col.step()
        _, terminated, truncated, info = col.step_log[-1]
        events["life_loss"] += int((terminated & (info["lives"] > 0)).sum())
        events["game_over"] += int((terminated & (info["lives"] == 0)).sum())
        events["truncation"] += int(truncated.sum())
    envs.close()
    # the stream must contain every kind of episode boundary, or the test below proves little
    assert all(count > 0 for count in events.values()), events
    return col, big, small


def check_stacks(rb, col):
    js = ring_window(rb, len(col.log))
    truth = np.stack([col.log[j] for j in js])  # (T, envs, 4, 84, 84)
    rows = np.repeat(js % rb.rows, rb.num_envs)
    envs = np.tile(np.arange(rb.num_envs), len(js))
    got = rb.stacked(rows, envs).reshape(truth.shape)
    bad = np.argwhere((got != truth).any(axis=(2, 3, 4)))
    assert len(bad) == 0, f"{len(bad)} wrong stacks, first at (write index, env) {[(int(js[t]), int(e)) for t, e in bad[:5]]}"


def test_stacks_rebuilt_exactly(atari_stream):
    col, big, _ = atari_stream
    assert not big.full
    check_stacks(big, col)


def test_stacks_rebuilt_exactly_after_wrapping(atari_stream):
    col, _, small = atari_stream
    assert small.full and len(col.log) > 3 * small.rows
    check_stacks(small, col)


def test_run_feeds_the_buffer_consistently(dqn, monkeypatch, tmp_path):
    """dqn.run's own collection loop (not the copy in Collector): on an Atari task sequence with episodic life,
    every stored row rebuilds exactly the stacked observation run() passed for it, across life losses, game overs,
    truncations, auto-resets and the task switch."""
    buffers = []

    class RecordingBuffer(dqn.ReplayBuffer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.log = []
            buffers.append(self)

        def add(self, obs, *rest):
            self.log.append(np.array(obs, copy=True))
            super().add(obs, *rest)

    monkeypatch.setattr(dqn, "ReplayBuffer", RecordingBuffer)
    steps_per_task = 400
    args = dqn.Args(env_ids=("Breakout-v5", "Pong-v5"), steps_per_task=steps_per_task, num_envs=2,
                    episodic_life=True, max_episode_steps=120, buffer_size=2 * (steps_per_task + 8),
                    replay_ratio=0.0, eval_episodes=0, metrics_every=0, device="cpu", output_dir=str(tmp_path),
                    run_name="recorded")
    summary = dqn.run(args)
    assert summary["status"] == "completed"
    assert summary["num_episodes"] > 0
    (rb,) = buffers
    written = len(rb.log)
    assert written == 2 * steps_per_task // args.num_envs + 1  # a row per vector step, plus the task cut's row
    assert not rb.full and (~rb.valid[:written]).sum() > 2  # auto-resets happened
    js = np.arange(written)
    got = rb.stacked(np.repeat(js, 2), np.tile(np.arange(2), written)).reshape(written, 2, 4, 84, 84)
    bad = np.argwhere((got != np.stack(rb.log)).any(axis=(2, 3, 4)))
    assert len(bad) == 0, f"{len(bad)} wrong stacks, first at (row, env) {bad[:5].tolist()}"


@pytest.mark.parametrize("which", ["big", "small"])
def test_sampled_atari_transitions_are_real(atari_stream, which):
    """1-step samples are real (obs, action, reward, discount, next obs) tuples of the stream, never auto-resets."""
    col, big, small = atari_stream
    rb = big if which == "big" else small
    real, pseudo = set(), set()
    for j in ring_window(rb, len(col.log)):
        if col.step_log[j] is None:
            continue
        reward, terminated, _, _ = col.step_log[j]
        nxt = col.next_log(j)
        for e in range(2):
            discount = np.float32(0.0 if terminated[e] else GAMMA)
            key = digest(col.log[j][e], np.int64(col.action_log[j][e]), np.float32(reward[e]), discount, nxt[e])
            (real if col.valid_log[j][e] else pseudo).add(key)
    assert pseudo, "the stream has no auto-reset steps"
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, actions, returns, discounts, next_obs = rb.sample(64, rng, n_step=1, gamma=GAMMA)
        for b in range(64):
            key = digest(obs[b], actions[b], returns[b], discounts[b], next_obs[b])
            assert key not in pseudo, "sampled an auto-reset pseudo-transition"
            assert key in real, "sampled a tuple that is not a transition of the stream"


# ---------------------------------------------------------------------------------------------------------------
# Scripted vector episodes: sampling, n-step returns, task-switch cut
# ---------------------------------------------------------------------------------------------------------------


class ScriptedVectorEnv:
    """An EnvPool-like vector env with scripted episodes. The observation of env i is [task, i, episode, step].

    As EnvPool: the step that ends an episode returns its final observation (step == length); the next step ignores
    the action, resets, and returns the first observation of the next episode with reward 0 and no flags."""

    def __init__(self, episodes, task: int = 0):
        self.episodes, self.task, self.num_envs = episodes, task, len(episodes)

    def _obs(self):
        return np.array([[self.task, i, self.ep[i], self.k[i]] for i in range(self.num_envs)], dtype=np.float32)

    def reset(self):
        n = self.num_envs
        self.ep, self.k, self.done = [0] * n, [0] * n, [False] * n
        return self._obs(), {}

    def step(self, actions):
        n = self.num_envs
        reward = np.zeros(n, dtype=np.float32)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for i in range(n):
            if self.done[i]:  # auto-reset step
                self.ep[i], self.k[i], self.done[i] = self.ep[i] + 1, 0, False
                continue
            rewards, kind = self.episodes[i][self.ep[i]]
            reward[i] = rewards[self.k[i]]
            self.k[i] += 1
            if self.k[i] == len(rewards):
                self.done[i] = True
                terminated[i], truncated[i] = kind == "term", kind == "trunc"
        return self._obs(), reward, terminated, truncated, {}

    def close(self):
        pass


def scripted_episodes(rng, num_envs: int, count: int = 400, max_len: int = 12):
    """Random episode scripts: lengths 1..max_len, integer rewards, ending by termination or truncation."""
    return [[(rng.integers(-3, 4, int(rng.integers(1, max_len + 1))).astype(np.float32),
              "term" if rng.random() < 0.5 else "trunc") for _ in range(count)] for _ in range(num_envs)]


class ScriptedRun:
    """A Collector over scripted tasks, with the ground truth of every stored transition."""

    def __init__(self, dqn, capacity: int, num_envs: int = 2, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.tasks = [scripted_episodes(self.rng, num_envs)]
        self.rb = dqn.ReplayBuffer(capacity, num_envs, (4,), np.float32, stacked=False)
        self.col = Collector(dqn, [self.rb], ScriptedVectorEnv(self.tasks[0], 0), num_envs, 3, seed=seed + 1)
        self.cut_ends = {}  # (task, env, episode) -> length at the cut

    def run(self, steps: int):
        for _ in range(steps):
            self.col.step()

    def switch_task(self):
        task = len(self.tasks)
        for i, (t, e, ep, k) in enumerate(self.col.obs.astype(int).tolist()):
            if not self.col.prev_done[i]:  # mid-episode (or at its first observation): the cut truncates it
                self.cut_ends[(t, e, ep)] = k
        self.tasks.append(scripted_episodes(self.rng, self.rb.num_envs))
        self.col.switch(ScriptedVectorEnv(self.tasks[task], task))

    def actions(self):
        """(task, env, episode, step) -> action, for every real transition written."""
        out = {}
        for j, obs in enumerate(self.col.log):
            for e in range(self.rb.num_envs):
                if self.col.valid_log[j][e]:
                    out[tuple(obs[e].astype(int).tolist())] = int(self.col.action_log[j][e])
        return out

    def truth(self, task, env, ep, k, n):
        """Brute-force n-step return, bootstrap discount and bootstrap observation of the transition from
        [task, env, ep, k]."""
        rewards, kind = self.tasks[task][env][ep]
        length = len(rewards)
        if (task, env, ep) in self.cut_ends:
            length, kind = self.cut_ends[(task, env, ep)], "cut"
        ret, m, terminal = 0.0, 0, False
        for i in range(n):
            ret += GAMMA**i * float(rewards[k + i])
            m += 1
            if k + i + 1 == length:  # the episode ends with this transition
                terminal = kind == "term"
                break
        return ret, (0.0 if terminal else GAMMA**m), (task, env, ep, k + m)


def check_samples(run: ScriptedRun, n: int, batches: int = 80, batch_size: int = 256):
    """Every sample matches the brute-force truth; returns {start: (discount, bootstrap observation)} as sampled."""
    rng = np.random.default_rng(123)
    actions = run.actions()
    sampled = {}
    for _ in range(batches):
        obs, act, returns, discounts, next_obs = run.rb.sample(batch_size, rng, n_step=n, gamma=GAMMA)
        assert obs.shape == next_obs.shape == (batch_size, 4)
        for b in range(batch_size):
            start = tuple(obs[b].astype(int).tolist())
            assert start in actions, f"sampled {start}, which is not a real transition (auto-reset or cut row)"
            assert act[b] == actions[start], f"action of {start}"
            ret, discount, nxt = run.truth(*start, n)
            assert returns[b] == pytest.approx(ret, rel=1e-5, abs=1e-5), f"n={n} return of {start}"
            assert discounts[b] == pytest.approx(discount, rel=1e-6, abs=0), f"n={n} discount of {start}"
            if discount > 0:  # the bootstrap observation only matters when it is used
                assert tuple(next_obs[b].astype(int).tolist()) == nxt, f"n={n} bootstrap observation of {start}"
            sampled[start] = (float(discounts[b]), tuple(next_obs[b].astype(int).tolist()))
    return sampled


@pytest.mark.parametrize("wrap", [False, True], ids=["no_wrap", "wrapped"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_nstep_samples_match_brute_force(dqn, n, wrap):
    steps = 400
    run = ScriptedRun(dqn, capacity=2 * (80 if wrap else steps + 8), seed=n)
    run.run(steps)
    assert run.rb.full == wrap
    sampled = check_samples(run, n)

    # Coverage: every real transition old enough to have its n successors stored, and not overwritten, is sampled
    # (so the checks above covered episode ends of both kinds, not just mid-episode windows).
    oldest = steps - run.rb.rows if wrap else 0
    expected = {tuple(run.col.log[j][e].astype(int).tolist()) for j in range(oldest, steps - n) for e in range(2)
                if run.col.valid_log[j][e]}
    missing = expected - set(sampled)
    assert not missing, f"{len(missing)} stored transitions never sampled, e.g. {sorted(missing)[:5]}"
    stored = {tuple(run.col.log[j][e].astype(int).tolist()) for j in range(oldest, steps) for e in range(2)}
    assert set(sampled) <= stored, "sampled a transition that was overwritten"
    ends = {"term": 0, "trunc": 0}
    for (task, env, ep, k), (discount, _) in sampled.items():
        rewards, kind = run.tasks[task][env][ep]
        if k + n >= len(rewards):
            ends[kind] += 1
    assert ends["term"] > 0 and ends["trunc"] > 0, ends


def test_consecutive_pairs_within_an_episode(dqn):
    """1-step samples pair an observation with the very next one of the same episode: never the pseudo-transition
    from a final observation to the next episode's first observation."""
    run = ScriptedRun(dqn, capacity=2 * 300, seed=11)
    run.run(300)
    assert (~np.stack(run.col.valid_log)).sum() > 20  # plenty of auto-reset rows to avoid
    rng = np.random.default_rng(1)
    for _ in range(50):
        obs, _, _, _, next_obs = run.rb.sample(128, rng, n_step=1, gamma=GAMMA)
        assert (next_obs[:, :3] == obs[:, :3]).all(), "a sampled pair crosses an episode boundary"
        assert (next_obs[:, 3] == obs[:, 3] + 1).all(), "a sampled pair is not consecutive"


def test_task_switch_cut(dqn):
    """end_episodes cuts every stream: transitions before the cut bootstrap from the last observation of the old
    task (as a truncation) and never reach into the new task; a termination right at the cut stays terminal."""
    run = ScriptedRun(dqn, capacity=2 * 400, seed=7)
    run.run(60)
    # move on until env 0 just terminated at the last step while env 1 is mid-episode, then switch
    for _ in range(2000):
        reward, terminated, truncated, _ = run.col.step_log[-1]
        if terminated[0] and not (terminated[1] or truncated[1] or run.col.prev_done[1]) and run.col.obs[1, 3] >= 5:
            break
        run.col.step()
    else:
        pytest.fail("scripted stream never reached the wanted state")
    cut_obs = run.col.obs.copy()
    run.switch_task()
    run.run(60)

    sampled = check_samples(run, n=5, batches=60)
    crossing = [(s, nxt) for s, (discount, nxt) in sampled.items() if discount > 0 and nxt[0] != s[0]]
    assert not crossing, f"n-step windows cross the task switch: {crossing[:5]}"
    # env 1's unfinished episode: its last transitions bootstrap, truncated, from the observation at the cut
    cut_key = tuple(cut_obs[1].astype(int).tolist())
    near_cut = {s: v for s, v in sampled.items() if s[:3] == cut_key[:3] and s[3] >= cut_key[3] - 5}
    assert len(near_cut) == 5, near_cut  # the 5 transitions whose 5-step window reaches the cut
    for (task, env, ep, k), (discount, nxt) in near_cut.items():
        assert nxt == cut_key and discount == pytest.approx(GAMMA ** (cut_key[3] - k))
    # env 0's episode that terminated on the last step before the cut keeps discount 0
    final0 = tuple(cut_obs[0].astype(int).tolist())
    last = (final0[0], final0[1], final0[2], final0[3] - 1)
    assert sampled[last][0] == 0.0
    # the new task's transitions are sampled too
    assert any(s[0] == 1 for s in sampled)


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def test_memory_per_transition_is_one_frame(dqn):
    frame = 84 * 84  # one uint8 frame: 7056 B
    capacity = 10_000
    rb = dqn.ReplayBuffer(capacity, 2, (4, 84, 84), np.uint8, stacked=True)
    arrays = [v for v in vars(rb).values() if isinstance(v, np.ndarray)]
    per_transition = sum(a.nbytes for a in arrays) / capacity
    assert rb.frames.dtype == np.uint8
    assert per_transition < 2 * frame, f"{per_transition:.0f} B per transition: a next-obs copy is stored"
    assert per_transition < 7200, f"{per_transition:.0f} B per transition: more than one frame plus small fields"
    assert per_transition >= frame  # sanity: the frames are all counted
