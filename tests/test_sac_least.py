"""algos/sac_least.py: LEAST's stop rule by hand (per-step medians over the window, the learning-potential weight,
the stop test's two sign cases, the minimum count, eviction of the oldest episode, several environments at once),
its statistics against sac.py's soft target, and end-to-end runs (a stopped episode is stored as a truncation and
its environment restarts, per-env bookkeeping with several envs, the least/ logs, the rule off is sac.py exactly,
bad input)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from helpers import (SAC_FLAGS, assert_same_run, call_main, load_script, read_json, read_scalars,
                     run_sac_in_process)

NAN = np.nan


@pytest.fixture(scope="module")
def mod():
    return load_script("sac_least")


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


def rule_with(mod, episodes, window=4, max_len=5, omega_scale=1.0, min_episodes=1, num_envs=1):
    """A StopRule whose window holds `episodes`, each a list of (q, g) pairs from step 0 on, played by env 0."""
    rule = mod.StopRule(num_envs, window, max_len, omega_scale, min_episodes)
    for episode in episodes:
        for q, g in episode:
            rule.record(np.array([0]), np.array([q], np.float32), np.array([g], np.float32))
        rule.end_episode(0)
    return rule


def test_thresholds_are_per_step_medians_over_the_episodes_that_reached_the_step(mod):
    rule = rule_with(mod, [[(1.0, 4.0), (2.0, 1.0), (9.0, 2.0)],
                           [(3.0, 2.0), (-4.0, 8.0)],
                           [(5.0, 6.0), (0.0, 3.0), (7.0, 4.0), (1.0, 1.0)]])
    epsilon, g_median, count = rule.thresholds(np.array([0, 1, 2, 3, 4]))
    # step 0: median(1, 3, 5); step 1: median(2, -4, 0); step 2: median(9, 7) = 8; step 3: only 1; step 4: nobody
    np.testing.assert_allclose(epsilon[:4], [3.0, 0.0, 8.0, 1.0])
    np.testing.assert_allclose(g_median[:4], [4.0, 3.0, 3.0, 1.0])
    assert count.tolist() == [3, 3, 2, 1, 0]
    assert np.isnan(epsilon[4]) and np.isnan(g_median[4])


@pytest.mark.parametrize("q, g, omega_scale, stops", [
    # epsilon = 3 >= 0, median G = 4: omega = c * 4 / G; stop if Q < omega * 3
    (2.9, 4.0, 1.0, True),    # omega 1: bar 3
    (3.0, 4.0, 1.0, False),   # not strictly below
    (2.9, 8.0, 1.0, False),   # a large current G (learning potential): omega 0.5, bar 1.5 (lenient)
    (5.0, 2.0, 1.0, True),    # a small current G: omega 2, bar 6 (strict)
    (1.4, 4.0, 0.5, True),    # c = 0.5: bar 1.5
    (1.6, 4.0, 0.5, False),
])
def test_stop_test_with_a_positive_threshold(mod, q, g, omega_scale, stops):
    rule = rule_with(mod, [[(1.0, 4.0)], [(3.0, 4.0)], [(5.0, 4.0)]], omega_scale=omega_scale)
    got = rule.should_stop(np.array([0]), np.array([q], np.float32), np.array([g], np.float32))
    assert got.tolist() == [stops]


@pytest.mark.parametrize("q, g, stops", [
    # epsilon = -3 < 0, median G = 4: stop if Q < epsilon / omega, omega = 4 / G
    (-3.1, 4.0, True),     # omega 1: bar -3
    (-2.9, 4.0, False),
    (-5.0, 8.0, False),    # a large G: omega 0.5, bar -6 (lenient: dividing a negative threshold by omega < 1)
    (-6.1, 8.0, True),
    (-1.6, 2.0, True),     # a small G: omega 2, bar -1.5 (strict)
    (-1.4, 2.0, False),
])
def test_stop_test_with_a_negative_threshold_divides_by_omega(mod, q, g, stops):
    rule = rule_with(mod, [[(-1.0, 4.0)], [(-3.0, 4.0)], [(-5.0, 4.0)]])
    got = rule.should_stop(np.array([0]), np.array([q], np.float32), np.array([g], np.float32))
    assert got.tolist() == [stops]


def test_no_stop_below_the_minimum_count_or_without_a_threshold(mod):
    rule = rule_with(mod, [[(5.0, 1.0), (5.0, 1.0)], [(5.0, 1.0)]], min_episodes=2)
    q, g = np.array([-100.0, -100.0, -100.0], np.float32), np.ones(3, np.float32)
    # step 0 has 2 episodes (tested), step 1 one (< min_episodes), step 2 none (NaN threshold)
    assert rule.should_stop(np.array([0, 1, 2]), q, g).tolist() == [True, False, False]
    # statistics gathered before learning started are NaN and never count
    rule = rule_with(mod, [[(NAN, NAN)], [(NAN, NAN)]])
    assert rule.should_stop(np.array([0]), q[:1], g[:1]).tolist() == [False]


def test_window_evicts_the_oldest_episode(mod):
    rule = rule_with(mod, [[(10.0, 1.0)], [(20.0, 1.0)], [(30.0, 1.0)]], window=2)
    epsilon, _, count = rule.thresholds(np.array([0]))
    assert count.tolist() == [2] and epsilon.tolist() == [25.0]  # 10 is gone
    assert rule.stored == 2
    rule = rule_with(mod, [[(10.0, 1.0), (1.0, 1.0)], [(20.0, 1.0)], [(30.0, 1.0)]], window=2)
    assert rule.thresholds(np.array([1]))[2].tolist() == [0]  # the evicted row's longer tail went with it


def test_envs_fill_their_own_rows_and_only_finished_episodes_count(mod):
    rule = mod.StopRule(2, 4, 5, 1.0, 1)
    steps = rule.record(np.array([0, 1]), np.array([1.0, 2.0], np.float32), np.ones(2, np.float32))
    assert steps.tolist() == [0, 0]
    steps = rule.record(np.array([1]), np.array([3.0], np.float32), np.ones(1, np.float32))
    assert steps.tolist() == [1] and rule.step.tolist() == [1, 2]
    assert rule.thresholds(np.array([0]))[2].tolist() == [0]  # nothing finished yet
    rule.end_episode(1)
    epsilon, _, count = rule.thresholds(np.array([0, 1]))
    assert epsilon.tolist() == [2.0, 3.0] and count.tolist() == [1, 1]  # env 1's episode only
    assert rule.step.tolist() == [1, 0] and np.isnan(rule.cur_q[1]).all() and rule.cur_q[0, 0] == 1.0


def test_steps_past_the_cap_are_neither_recorded_nor_tested(mod):
    rule = rule_with(mod, [[(5.0, 1.0), (5.0, 1.0)]], max_len=2)
    for _ in range(3):  # steps 0, 1 and 2 of a running episode: step 2 is past the cap
        steps = rule.record(np.array([0]), np.array([9.0], np.float32), np.ones(1, np.float32))
    assert steps.tolist() == [2] and rule.cur_q[0].tolist() == [9.0, 9.0]
    q, g = np.array([-1.0, -1.0], np.float32), np.ones(2, np.float32)
    assert rule.should_stop(np.array([1, 2]), q, g).tolist() == [True, False]


def test_statistics_are_the_min_q_and_the_mean_squared_td_error(mod):
    torch.manual_seed(0)
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    actor = mod.Actor(5, low, high)
    nets = [mod.SoftQNetwork(5, 2) for _ in range(4)]
    obs, actions, next_obs = torch.randn(3, 5), torch.rand(3, 2) * 2 - 1, torch.randn(3, 5)
    rewards, terminated = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.manual_seed(1)
    q, g = mod.least_statistics(actor, *nets, obs, actions, rewards, terminated, next_obs, 0.2, 0.9)
    torch.manual_seed(1)  # the same draw of a' for the hand computation
    with torch.no_grad():
        target = mod.soft_q_target(actor, nets[2], nets[3], rewards, terminated, next_obs, 0.2, 0.9)
        q1, q2 = nets[0](obs, actions), nets[1](obs, actions)
    np.testing.assert_allclose(q, torch.min(q1, q2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(g, (((q1 - target) ** 2 + (q2 - target) ** 2) / 2).numpy(), rtol=1e-5)
    # the batch signal takes G from the critics' update: only Q is computed, and nothing is drawn
    state = torch.get_rng_state()
    q_batch, g_batch = mod.least_statistics(actor, *nets, obs, actions, rewards, terminated, next_obs, 0.2, 0.9,
                                            "batch")
    assert g_batch is None and np.array_equal(q_batch, q) and torch.equal(torch.get_rng_state(), state)


class RecordingBuffer:
    """Wraps the script's ReplayBuffer, keeping a copy of every add (num_envs 1: one call per vector step)."""

    def __init__(self, base):
        self.base, self.calls = base, []

    def __call__(self, *args):
        buffer = self.base(*args)
        add = buffer.add

        def recording_add(obs, next_obs, actions, rewards, terminated):
            self.calls.append((np.array(obs), np.array(next_obs), np.array(terminated), np.array(rewards)))
            add(obs, next_obs, actions, rewards, terminated)
        buffer.add = recording_add
        return buffer


FORCED = dict(least_window=20, least_start=0.0, least_min_episodes=1, least_omega_scale=1e9, least_signal="sample")


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_stopped_episode_is_stored_as_a_truncation_and_its_env_restarts(mod, tmp_path, monkeypatch):
    # c = 1e9 makes every positive threshold unreachable from below: episodes are stopped as soon as tested
    recorder = RecordingBuffer(mod.ReplayBuffer)
    monkeypatch.setattr(mod, "ReplayBuffer", recorder)
    _, run_dir, summary = run_sac_in_process(mod, tmp_path, "forced", **FORCED)
    stops = read_rows(os.path.join(run_dir, "least_stops.csv"))
    assert summary["least_stops"] == len(stops) > 10
    stop_steps = {int(r["global_step"]) for r in stops}
    starts = 0
    for k, (obs, next_obs, terminated, _) in enumerate(recorder.calls[:-1]):
        if len(obs) == 0:
            continue  # EnvPool's auto-reset step after a natural end (never stored)
        step = k + 1  # num_envs 1: the k-th vector step is global step k + 1
        following = recorder.calls[k + 1][0]
        if step in stop_steps:
            assert terminated[0] == 0.0  # a truncation: the target bootstraps from the true next observation
            assert len(following) == 1 and not np.array_equal(following[0], next_obs[0])  # a fresh episode
            starts += 1
        elif terminated[0] == 0.0 and len(following):
            assert np.array_equal(following[0], next_obs[0])  # an episode goes on where it was
    assert starts == len([s for s in stop_steps if s < len(recorder.calls)])
    # every agent step is in exactly one finished episode (episodes.csv or least_stops.csv) or the one in progress,
    # and so is every reward: the partial returns are the stopped episodes' own
    episodes = read_rows(os.path.join(run_dir, "episodes.csv"))
    rows = [(k + 1, c) for k, c in enumerate(recorder.calls) if len(c[0])]
    last_end = max(step for step, c in rows if step in stop_steps or c[2][0] == 1.0)
    in_progress = [c for step, c in rows if step > last_end]
    lengths = sum(int(r["episodic_length"]) for r in stops + episodes)
    assert lengths + len(in_progress) == len(rows)
    returns = sum(float(r["partial_return"]) for r in stops) + sum(float(r["episodic_return"]) for r in episodes)
    stored_rewards = sum(float(c[3][0]) for _, c in rows) - sum(float(c[3][0]) for c in in_progress)
    assert returns == pytest.approx(stored_rewards, rel=1e-5, abs=1e-3)
    scalars = read_scalars(run_dir)
    assert [int(v) for _, v in scalars["least/stop_step"]] == [int(r["episodic_length"]) - 1 for r in stops]
    assert scalars["least/stops"][-1][1] == len(stops)
    assert 0 < scalars["least/stop_rate"][-1][1] <= 1 and "least/steps_saved" in scalars
    assert summary["least_steps_saved"] > 0


class RecordingEnvs:
    """Wraps the training EnvPool env: records each step's done flags and each hand reset's (env ids, observations)."""

    def __init__(self, envs, log):
        self.envs, self.log = envs, log

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def step(self, actions):
        out = self.envs.step(actions)
        self.log.append(("step", np.asarray(out[2]) | np.asarray(out[3])))
        return out

    def reset(self, **kwargs):
        obs, info = self.envs.reset(**kwargs)
        if "env_id" in kwargs:
            self.log.append(("reset", np.asarray(info["env_id"]), np.asarray(obs, dtype=np.float32)))
        return obs, info


def test_several_envs_stop_independently(mod, tmp_path, monkeypatch):
    # three envs with forced stops: each stored transition is traced to its env (the valid mask from the done flags),
    # and each env's next transition continues from its own next observation, or from its own reset observation
    recorder, log, made = RecordingBuffer(mod.ReplayBuffer), [], []
    make_env = mod.make_env

    def recording_make_env(env_id, num_envs, seeds, args):
        envs = make_env(env_id, num_envs, seeds, args)
        if not made:  # the training env (evaluation envs are made later)
            made.append(envs)
            return RecordingEnvs(envs, log)
        return envs
    monkeypatch.setattr(mod, "ReplayBuffer", recorder)
    monkeypatch.setattr(mod, "make_env", recording_make_env)
    _, run_dir, summary = run_sac_in_process(mod, tmp_path, "envs3", num_envs=3, total_timesteps=600, **FORCED)
    stops = read_rows(os.path.join(run_dir, "least_stops.csv"))
    assert summary["least_stops"] == len(stops) > 10
    steps = [entry[1] for entry in log if entry[0] == "step"]
    resets, k = {}, -1  # vector step -> {env: reset observation}
    for entry in log:
        if entry[0] == "step":
            k += 1
        else:
            resets[k] = {int(e): o for e, o in zip(entry[1], entry[2])}
    assert max(len(r) for r in resets.values()) >= 2  # envs stopped in the same vector step
    assert sum(len(r) for r in resets.values()) == len(stops)
    prev_done = np.zeros(3, dtype=bool)
    expected = [None, None, None]  # what each env's next stored observation must be
    checked = 0
    for k, (obs, next_obs, _, _) in enumerate(recorder.calls):
        valid = np.flatnonzero(~prev_done)
        assert len(valid) == len(obs)
        for row, env in enumerate(valid):
            if expected[env] is not None:
                assert np.array_equal(obs[row], expected[env]), (k, env)
                checked += 1
            expected[env] = next_obs[row]
        for env, reset_obs in resets.get(k, {}).items():
            expected[env] = reset_obs  # a stopped env restarts from its own reset observation
        prev_done = steps[k]
        for env in np.flatnonzero(prev_done):
            expected[env] = None  # EnvPool's auto-reset: the new episode's first observation is not checked
    assert checked > 500


def test_a_task_switch_starts_an_empty_window(mod, tmp_path):
    _, run_dir, _ = run_sac_in_process(mod, tmp_path, "switch", env_ids=("Hopper-v4", "Hopper-v4"),
                                       steps_per_task=150, total_timesteps=None, **FORCED)
    stop_steps = [int(r["global_step"]) for r in read_rows(os.path.join(run_dir, "least_stops.csv"))]
    ends = [int(r["global_step"]) for r in read_rows(os.path.join(run_dir, "episodes.csv"))]
    after = [s for s in stop_steps if s > 150]
    assert after and [s for s in stop_steps if s <= 150]
    # no threshold until an episode of the new task has ended by itself (the window is empty after the switch)
    assert min(after) > min(e for e in ends if e > 150)


def test_window_zero_is_sac_exactly(mod, sac, tmp_path):
    run_sac_in_process(sac, tmp_path, "sac")
    run_sac_in_process(mod, tmp_path, "off", least_window=0)
    assert_same_run(os.path.join(str(tmp_path), "sac"), os.path.join(str(tmp_path), "off"), "sac_least.py "
                    "--least-window 0")
    assert not os.path.exists(os.path.join(str(tmp_path), "off", "least_stops.csv"))


@pytest.mark.parametrize("signal", ["batch", "sample"])
def test_statistics_leave_training_unchanged(mod, sac, tmp_path, signal):
    # the rule on but never testing before the last step: the statistics are computed at every step (the sample
    # signal's target in a forked RNG), and the run is still sac.py's
    run_sac_in_process(sac, tmp_path, "sac")
    _, run_dir, summary = run_sac_in_process(mod, tmp_path, "watch", least_start=1.0, least_min_episodes=1,
                                             least_signal=signal)
    assert_same_run(os.path.join(str(tmp_path), "sac"), run_dir, "sac_least.py --least-start 1")
    assert summary["least_stops"] == 0


@pytest.mark.parametrize("flags, fragment", [
    (["--least-start", "1.5"], "--least-start"),
    (["--least-omega-scale", "0"], "--least-omega-scale"),
    (["--least-window", "5", "--least-min-episodes", "6"], "--least-min-episodes"),
    (["--least-min-episodes", "0"], "--least-min-episodes"),
])
def test_bad_least_flags_are_one_line_errors(mod, tmp_path, capsys, flags, fragment):
    code, lines = call_main(mod, ["--env-id", "Hopper-v4", *flags, "--output-dir", tmp_path, "--run-name", "bad"],
                            capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
