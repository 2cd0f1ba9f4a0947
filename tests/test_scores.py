"""utils/scores.py: normalisation tables and the published reference runs shipped in benchmark/reference/."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import scores  # noqa: E402


def test_atari_keys_follow_the_table():
    assert scores.atari_key("MsPacman-v5") == "mspacman"
    assert scores.atari_key("KungFuMaster-v5") == "kungfumaster"
    table = scores.human_random_table()
    for game in ("Breakout-v5", "Pong-v5", "PrivateEye-v5", "MontezumaRevenge-v5"):
        assert scores.atari_key(game) in table["human"], game


def test_human_normalisation_maps_random_to_0_and_human_to_1():
    table = scores.human_random_table()
    for game in ("Breakout-v5", "Pong-v5", "Seaquest-v5"):
        key = scores.atari_key(game)
        assert scores.normalize(game, table["random"][key]) == pytest.approx(0.0)
        assert scores.normalize(game, table["human"][key]) == pytest.approx(1.0)
    arr = scores.normalize("Breakout-v5", np.array([table["random"]["breakout"], table["human"]["breakout"]]))
    np.testing.assert_allclose(arr, [0.0, 1.0])


def test_other_families():
    assert scores.family("CheetahRun-v1") == "dmc" and scores.normalize("CheetahRun-v1", 500.0) == 0.5
    # every DMC task of the suites is normalised (dmc.toml and resets-dmc.toml run QuadrupedRun-v1 and Swimmer)
    for task in ("QuadrupedRun-v1", "SwimmerSwimmer15-v1", "HumanoidStand-v1", "FishSwim-v1"):
        assert scores.family(task) == "dmc", task
    assert scores.family("CartPole-v1") == "classic" and scores.normalize("CartPole-v1", 500.0) == 1.0
    assert scores.normalize("Acrobot-v1", -500.0) == 0.0
    with pytest.raises(KeyError):
        scores.normalize("HalfCheetah-v4", 1000.0)  # no fixed reference: raw returns
    with pytest.raises(KeyError):
        scores.normalize("Defender-v5", 1000.0)  # the table has no human score for Defender


def hns_matrix(agent: str) -> np.ndarray:
    runs = scores.load_published(agent)
    assert len(runs) == 26, f"{agent}: expected the 26 Atari 100k games"
    return np.concatenate([scores.normalize(f"{game}-v5", np.asarray(v, dtype=float)) for game, v in runs.items()])


@pytest.mark.parametrize("agent,published", [("DER", 0.183), ("DrQ_eps", 0.280), ("SPR", 0.337)])
def test_published_iqm_is_recomputed(agent, published):
    """The shipped per-run data and the normalisation table reproduce the IQMs published in the rliable paper."""
    iqm = stats.trim_mean(hns_matrix(agent), 0.25, axis=None)
    assert iqm == pytest.approx(published, abs=0.0015)


def test_bbf_reference_runs():
    """BBF's released runs (RR 8): the BBF paper reports IQM 1.045 with an interval of about [0.99, 1.06]."""
    assert 0.99 <= stats.trim_mean(hns_matrix("BBF"), 0.25, axis=None) <= 1.06
