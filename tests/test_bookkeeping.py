"""Episode bookkeeping (dqn.EpisodeStats): with episodic life and clipped rewards, the logged returns are the
full-game, unclipped scores.

Two EnvPool MsPacman envs with identical seeds and settings except reward clipping are driven in lockstep with the
same random actions. EpisodeStats sees only the clipped twin; the truth comes from the unclipped twin: raw rewards
summed over all lives until a step that is terminated with no lives left, or truncated."""

from __future__ import annotations

import numpy as np
import pytest

STEPS = 1000
MAX_EPISODE_STEPS = 460  # random play loses a life every ~180 steps: games end both ways (game over, truncation)


def make(reward_clip: bool):
    import envpool

    return envpool.make("MsPacman-v5", env_type="gymnasium", num_envs=2, seed=[11, 12], episodic_life=True,
                        reward_clip=reward_clip, max_episode_steps=MAX_EPISODE_STEPS)


@pytest.fixture(scope="module")
def games(dqn):
    clipped, raw = make(True), make(False)
    obs_c, _ = clipped.reset()
    obs_r, _ = raw.reset()
    rng = np.random.default_rng(0)
    stats = dqn.EpisodeStats(2)
    prev_done = np.zeros(2, dtype=bool)
    logged = {0: [], 1: []}  # env -> [(return, length)] from EpisodeStats
    truth = {0: [], 1: []}  # env -> [(return, length, lives played, ended by)] from the unclipped twin
    clipped_lives = {0: [], 1: []}  # env -> clipped per-life sums (what a naive logger would report)
    raw_sum, clip_sum, lives_played = np.zeros(2), np.zeros(2), np.ones(2, dtype=int)
    for _ in range(STEPS):
        actions = rng.integers(0, clipped.action_space.n, 2)
        obs_c, rew_c, term_c, trunc_c, info_c = clipped.step(actions)
        obs_r, rew_r, term_r, trunc_r, info_r = raw.step(actions)
        # the twins are in lockstep (same frames and flags); only the reward scale differs
        assert (obs_c == obs_r).all() and (term_c == term_r).all() and (trunc_c == trunc_r).all()

        _, finished = stats.update(rew_c, term_c, trunc_c, info_c, ~prev_done)
        for i, ret, length in finished:
            logged[i].append((ret, length))
        prev_done = term_c | trunc_c

        raw_sum += rew_r
        clip_sum += rew_c
        for i in range(2):
            if term_r[i] or trunc_r[i]:
                clipped_lives[i].append(clip_sum[i])
                clip_sum[i] = 0.0
            game_over = (term_r[i] and info_r["lives"][i] == 0) or trunc_r[i]
            if game_over:
                ended_by = "truncation" if trunc_r[i] else "game over"
                # EnvPool's elapsed_step counts agent steps since the full reset (the auto-reset steps after a
                # life loss are not agent steps)
                truth[i].append((raw_sum[i], int(info_r["elapsed_step"][i]), lives_played[i], ended_by))
                raw_sum[i], lives_played[i] = 0.0, 1
            elif term_r[i]:
                lives_played[i] += 1
    clipped.close()
    raw.close()
    return logged, truth, clipped_lives


def test_logged_returns_are_full_game_unclipped(games):
    logged, truth, _ = games
    for i in range(2):
        assert len(logged[i]) == len(truth[i]), f"env {i}: {len(logged[i])} games logged, {len(truth[i])} played"
        assert [r for r, _ in logged[i]] == pytest.approx([t[0] for t in truth[i]]), f"env {i}"
    all_truth = truth[0] + truth[1]
    assert len(all_truth) >= 3
    assert any(t[2] >= 2 for t in all_truth), "no game spanned several lives: the test proves little"
    assert {t[3] for t in all_truth} == {"game over", "truncation"}, "games must end both ways"


def test_logged_lengths_are_agent_steps(games):
    logged, truth, _ = games
    for i in range(2):
        assert [n for _, n in logged[i]] == [t[1] for t in truth[i]], f"env {i}"


def test_life_splitting_and_clipping_are_undone(games):
    logged, truth, clipped_lives = games
    returns = [r for i in range(2) for r, _ in logged[i]]
    per_life = [r for i in range(2) for r in clipped_lives[i]]
    assert len(per_life) > len(returns), "lives were not split from games"
    assert returns != pytest.approx(per_life[: len(returns)])
    # a game's score exceeds every clipped per-life sum (MsPacman pellets are worth 10 raw, 1 clipped)
    assert max(returns) > max(per_life)
