"""Score normalisation for reports (docs/benchmark.md once the harness lands; data provenance in
benchmark/reference/PROVENANCE.md).

- Atari (EnvPool `<Game>-v5`): human-normalised, (score - random) / (human - random), rliable's table.
- DeepMind Control (EnvPool `<Domain><Task>-v1`): score / 1000, the maximum return of a 1000-step episode.
- Classic control: fixed, documented ranges (below), never ranges derived from the data being normalised.
Anything else has no normalisation: `normalize` raises, and reports show raw returns.
"""

from __future__ import annotations

import json
import os
import re

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark", "reference")

# (min, max) such that (score - min) / (max - min) is 0 for the worst and 1 for the best possible episode.
CLASSIC_CONTROL_RANGES = {
    "CartPole-v0": (0.0, 200.0),  # +1 per step, capped at 200 steps
    "CartPole-v1": (0.0, 500.0),  # +1 per step, capped at 500 steps
    "Acrobot-v1": (-500.0, 0.0),  # -1 per step until the goal, capped at 500 steps
    "MountainCar-v0": (-200.0, 0.0),  # -1 per step until the goal, capped at 200 steps
}

_DMC_DOMAINS = ("AcrobotSwingup", "BallInCup", "Cartpole", "Cheetah", "Finger", "Fish", "Hopper", "Humanoid",
                "Manipulator", "PendulumSwingup", "PointMass", "Quadruped", "Reacher", "Swimmer", "Walker")
_human_random: dict | None = None


def atari_key(env_id: str) -> str:
    """'MsPacman-v5' -> 'mspacman' (the table's keys: lower case, no separators)."""
    return re.sub(r"[^a-z0-9]", "", env_id.split("-v")[0].lower())


def human_random_table() -> dict:
    global _human_random
    if _human_random is None:
        with open(os.path.join(REFERENCE_DIR, "atari_human_random.json")) as f:
            _human_random = json.load(f)
    return _human_random


def family(env_id: str) -> str:
    """'atari', 'dmc', 'classic' or 'other', from the EnvPool id."""
    if env_id.endswith("-v5"):
        return "atari"
    if env_id.endswith("-v1") and env_id.startswith(_DMC_DOMAINS) and env_id not in CLASSIC_CONTROL_RANGES:
        return "dmc"
    if env_id in CLASSIC_CONTROL_RANGES:
        return "classic"
    return "other"


def normalize(env_id: str, score):
    """Normalised score(s) for one task; works on floats and NumPy arrays. Raises KeyError when the task has no
    reference (e.g. Atari games without a human score, MuJoCo)."""
    kind = family(env_id)
    if kind == "atari":
        table, key = human_random_table(), atari_key(env_id)
        if key not in table["human"]:
            raise KeyError(f"no human score for {env_id} (key {key!r}) in the rliable table")
        low, high = table["random"][key], table["human"][key]
    elif kind == "dmc":
        low, high = 0.0, 1000.0
    elif kind == "classic":
        low, high = CLASSIC_CONTROL_RANGES[env_id]
    else:
        raise KeyError(f"no normalisation reference for {env_id}; report raw returns")
    return (score - low) / (high - low)


def load_published(agent: str) -> dict[str, list[float]]:
    """Published per-run Atari 100k final scores ({Game: [runs]}) of DER, DrQ, DrQ_eps, SPR or BBF."""
    with open(os.path.join(REFERENCE_DIR, "atari100k", f"{agent}.json")) as f:
        return json.load(f)
