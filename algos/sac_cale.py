"""SAC on CALE (the Continuous Arcade Learning Environment): the base script for continuous-action Atari.

Paper: "CALE: Continuous Arcade Learning Environment", Jesse Farebrother and Pablo Samuel Castro, NeurIPS 2024
Datasets and Benchmarks track, https://arxiv.org/abs/2410.23810. Official code: google/dopamine
`dopamine/labs/cale/` (commit 5873f549), the SACCALEAgent with `configs/sac_cale.gin` (200M frames) and
`configs/sac_cale_100k.gin` (Atari 100k); SAC itself is "Soft Actor-Critic Algorithms and Applications", Haarnoja
et al., 2018, https://arxiv.org/abs/1812.05905.

Method: CALE gives every Atari game the same continuous action space, a joystick (r, theta, fire) in
[0, 1] x [-pi, pi] x [0, 1] that the emulator maps onto the 18 discrete joystick actions with a threshold tau. A
SAC agent acts in that box from 4 stacked 84x84 frames: one conv encoder feeds a critic projection (the two soft Q
heads) and, through a stop-gradient, an actor projection (a tanh-squashed Gaussian mapped to the box), so only the
critic loss trains the convolutions. The whole network is Polyak-averaged into a target network, whose mean action
and sampled log-prob give the entropy-regularised n-step target on rewards scaled by 0.1; one Adam step minimises
0.5 * critic loss + policy loss, a second one tunes alpha. The 100k preset adds epsilon-uniform exploration.

Differences from sac.py (`diff algos/sac.py algos/sac_cale.py`; all in docs/sac_cale.md):
  - the environment: CALE through ale-py's AtariVectorEnv (the shared `CaleVecEnv` block, docs/cale.md details
    1-3) instead of EnvPool MuJoCo/DMC; Atari `<Game>-v5` ids only; `--threshold`, `--sticky-action-prob`,
    `--episodic-life`, `--max-episode-steps`; `cale/<ACTION>` fractions of the training actions;
  - the networks: a shared pixel encoder (`--encoder sac`, the SAC-AE conv stack of the official gin, or
    `--encoder nature`) with a critic and a detached actor projection, Dopamine's 1 x 512 actor and critics, flax's
    initialisers, an unclamped log-scale;
  - the update: Dopamine's SAC train step (the target network is the whole network; the target uses the target
    actor's mean action and a sampled log-prob; reward scale 0.1; one Adam on 0.5 * critic + policy loss; alpha's
    loss on log_alpha; no policy delay) replaces CleanRL's;
  - the replay memory: dqn.py's frame-storing memory (each frame once, stacks rebuilt, n-step returns) with
    float32 actions, instead of sac.py's flat (obs, next_obs) rows;
  - the presets: `--preset 200m | 100k` fill the values of the two gin files, plus Dopamine's epsilon schedule.

Docs: docs/sac_cale.md. Conventions every script follows: docs/conventions.md.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import json
import math
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# gymnasium warns when a Box's bounds are cast to float32: noise.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


@dataclass
class Args:
    # --- experiment and outputs (shared by every script, see docs/conventions.md) ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (network init, exploration, replay sampling, environment seeds)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic algorithms are used"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the networks live: auto picks cuda when available"""
    torch_threads: int = 0
    """torch CPU threads (0: torch's default, one per core unless OMP_NUM_THREADS is set, as the benchmark harness
    does); on a busy CPU one thread per run avoids oversubscription (docs/conventions.md, threads)"""
    output_dir: str = "runs"
    """outputs go to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """the run directory name; default {env}__{exp_name}__{seed}__{unix time}"""
    save_model: bool = False
    """if toggled, save the whole network (encoder, actor, both critics) to <run_dir>/model.pt (loadable with
    torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate its actor on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes (full games) at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 1000
    """log the plasticity/ diagnostics every this many gradient updates (0 disables them)"""
    metrics_batch_size: int = 256
    """size of the fresh replay batch the diagnostics are computed on"""
    log_every: int = 100
    """log losses, alpha, SPS and the cale/ action fractions every this many gradient updates"""

    # --- environment (CALE: ale-py's AtariVectorEnv with continuous=True, docs/cale.md) ---
    env_id: str = "Breakout-v5"
    """the Atari game, as `<Game>-v5` (Breakout-v5, MsPacman-v5, ...; `ALE/` prefix optional)"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); every CALE game has the same observation and
    action spaces"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task)"""
    preset: Literal["200m", "100k"] = "200m"
    """which official gin fills the flags left at None: 200m (`sac_cale.gin`, 200M frames) or 100k
    (`sac_cale_100k.gin`, Atari 100k); explicit flags win"""
    total_timesteps: Optional[int] = None
    """total environment (agent) steps, summed over envs [default: 200m 50M = 200 iterations x 250k agent steps
    (sac_cale.gin, Runner.num_iterations x training_steps); 100k 100k = 10 x 10k (sac_cale_100k.gin); task
    sequences: len(env_ids) * steps_per_task]"""
    num_envs: int = 1
    """number of parallel CALE environments used for collection (Dopamine runs one)"""
    env_threads: int = 0
    """AtariVectorEnv worker threads (0: ale-py's choice)"""
    max_episode_steps: int = 27000
    """episode cap in agent steps, a truncation (Dopamine's max_steps_per_episode 27000 = 108k frames)"""
    threshold: float = 0.5
    """CALE's joystick threshold tau in (0, 1) (Dopamine's continuous_action_threshold 0.5; docs/cale.md, detail 2)"""
    sticky_action_prob: Optional[float] = None
    """probability of repeating the previous action [default: 200m 0.25 (sac_cale.gin: create_atari_environment.
    sticky_actions = True); 100k 0.0 (sac_cale_100k.gin: sticky_actions = False)]"""
    episodic_life: Optional[bool] = None
    """treat a life loss as terminal for learning; returns are still full games and evaluation plays full games
    [default: 200m False; 100k True (sac_cale_100k.gin: AtariPreprocessing.terminal_on_life_loss = True)]"""

    # --- algorithm (defaults: Dopamine's SACCALEAgent and the gin files; docs/sac_cale.md, hyperparameters) ---
    buffer_size: int = 1_000_000
    """replay memory capacity in transitions (both gins: ReplayBuffer.max_capacity 1M)"""
    gamma: float = 0.99
    """discount factor (both gins: SACAgent.gamma 0.99)"""
    tau: float = 0.005
    """target smoothing coefficient of the Polyak update, after every gradient step (both gins:
    SACAgent.target_smoothing_coefficient 0.005, target_update_type 'soft')"""
    batch_size: int = 32
    """minibatch size (both gins: ReplayBuffer.batch_size 32)"""
    replay_ratio: Optional[float] = None
    """gradient updates per environment step [default: 200m 0.25 (sac_cale.gin: update_period 4); 100k 1.0
    (sac_cale_100k.gin: update_period 1)]"""
    learning_starts: Optional[int] = None
    """environment steps of uniformly random actions before learning [default: 200m 20000 (sac_cale.gin:
    min_replay_history); 100k 1600 (sac_cale_100k.gin)]"""
    n_step: Optional[int] = None
    """n-step return length [default: 200m 1 (sac_cale.gin: update_horizon); 100k 10 (sac_cale_100k.gin)]"""
    learning_rate: Optional[float] = None
    """Adam learning rate of the network and of alpha [default: 200m 6.25e-5 (sac_cale.gin: create_optimizer.
    learning_rate); 100k 1e-4 (sac_cale_100k.gin)]"""
    adam_eps: float = 1.5e-4
    """Adam epsilon (both gins: create_optimizer.eps 1.5e-4)"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in the TD target (both gins: SACAgent.reward_scale_factor 0.1); rewards are
    not clipped"""
    encoder: Literal["sac", "nature"] = "sac"
    """the pixel encoder: sac = the SAC-AE conv stack, 4 x 32 3x3 convs (the gins' encoder_name 'SAC'); nature =
    Nature DQN's convs (labs/cale/networks.NatureDQNEncoder)"""
    epsilon_train: Optional[float] = None
    """probability of a uniform action in the box instead of the SAC action, after the decay (0: off, plain SAC
    sampling) [default: 200m 0 (sac_cale.gin: exploration_strategy 'standard'); 100k 0.1 (sac_cale_100k.gin:
    'eps_greedy', epsilon_train 0.1)]"""
    epsilon_eval: Optional[float] = None
    """the same probability during evaluation, whose SAC action is the mean action [default: 200m 0; 100k 0.05
    (sac_cale_100k.gin: epsilon_eval)]"""
    epsilon_decay_steps: Optional[int] = None
    """environment steps over which epsilon decays linearly from 1 to --epsilon-train after --learning-starts
    (Dopamine's linearly_decaying_epsilon; 0: no decay) [default: 200m 0; 100k 5000 (sac_cale_100k.gin:
    epsilon_decay_period)]"""


# The two official gin files (dopamine/labs/cale/configs/sac_cale{,_100k}.gin): every value they set differently.
PRESETS = {
    "200m": dict(total_timesteps=50_000_000, learning_starts=20_000, replay_ratio=0.25, n_step=1,
                 learning_rate=6.25e-5, sticky_action_prob=0.25, episodic_life=False, epsilon_train=0.0,
                 epsilon_eval=0.0, epsilon_decay_steps=0),
    "100k": dict(total_timesteps=100_000, learning_starts=1600, replay_ratio=1.0, n_step=10,
                 learning_rate=1e-4, sticky_action_prob=0.0, episodic_life=True, epsilon_train=0.1,
                 epsilon_eval=0.05, epsilon_decay_steps=5000),
}


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


# ---- the block both scripts copy verbatim (tests/test_cale.py checks that the copies are identical) ----
CALE_ACTIONS = ("NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE",
                "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE")


def cale_game(env_id: str) -> str:
    """The ale-py ROM id of an Atari task id: "Breakout-v5" -> "breakout", "MsPacman-v5" -> "ms_pacman". Raises
    UserError for ids that are not an Atari game (CALE exists only for the ALE)."""
    from ale_py import roms

    name = env_id.removeprefix("ALE/")
    if not name.endswith("-v5"):
        raise UserError(f"{env_id!r} is not an Atari game: CALE scripts take '<Game>-v5' ids, e.g. Breakout-v5")
    game = re.sub(r"(?<!^)(?=[A-Z])", "_", name[: -len("-v5")]).lower()
    if game not in roms.get_all_rom_ids():
        close = difflib.get_close_matches(game, roms.get_all_rom_ids(), n=3)
        hint = f" (did you mean {', '.join(''.join(w.title() for w in c.split('_')) + '-v5' for c in close)}?)" if close else ""
        raise UserError(f"unknown Atari game {env_id!r}{hint}")
    return game


def joystick_cells(actions: np.ndarray, threshold: float) -> np.ndarray:
    """The ALE joystick action (an index into CALE_ACTIONS) that each CALE action (r, theta, fire) selects, computed
    as ale-py >= 0.12 does (docs/cale.md, detail 2): x = r cos(theta), y = r sin(theta); each axis is -1 below
    -threshold, +1 above +threshold, else 0; fire is pressed above the threshold. Float32, as the env computes it."""
    actions = np.asarray(actions, dtype=np.float32)
    x = actions[:, 0] * np.cos(actions[:, 1])
    y = actions[:, 0] * np.sin(actions[:, 1])
    horizontal = (x > threshold).astype(np.int64) - (x < -threshold)
    vertical = (y > threshold).astype(np.int64) - (y < -threshold)
    fire = actions[:, 2] > threshold
    return CALE_CELL_INDEX[horizontal + 1, vertical + 1, fire.astype(np.int64)]


def _cale_cell_index() -> np.ndarray:
    index = np.zeros((3, 3, 2), dtype=np.int64)  # [horizontal + 1, vertical + 1, fire]
    for h, horizontal in ((-1, "LEFT"), (0, ""), (1, "RIGHT")):
        for v, vertical in ((-1, "DOWN"), (0, ""), (1, "UP")):
            for f, fire in ((0, ""), (1, "FIRE")):
                index[h + 1, v + 1, f] = CALE_ACTIONS.index((vertical + horizontal + fire) or "NOOP")
    return index


CALE_CELL_INDEX = _cale_cell_index()


def cale_cell_metrics(cells: np.ndarray) -> dict[str, float]:
    """`cale/<ACTION>`: the fraction of `cells` (joystick_cells of the actions taken since the last log) that fell in
    each of the 18 joystick cells (docs/cale.md, detail 3): whether the policy uses the space or sits in a few cells."""
    fractions = np.bincount(np.asarray(cells, dtype=np.int64), minlength=len(CALE_ACTIONS)) / max(len(cells), 1)
    return {f"cale/{name}": float(f) for name, f in zip(CALE_ACTIONS, fractions)}


class CaleVecEnv:
    """`num_envs` CALE games (ale-py's AtariVectorEnv, `continuous=True`) behind the EnvPool interface this script
    relies on (docs/cale.md, detail 1).

    Dopamine's Atari protocol: sticky actions (`sticky_action_prob`), frame skip 4 with the max over the last two
    frames, 84x84 greyscale, 4 stacked frames (C, H, W), no no-op starts, no fire reset, the full 18-action set (CALE
    forces it), episodes cut at `max_episode_steps` agent steps (4 emulator frames each). The returned reward is the
    raw score; `info["reward"]` repeats it and `info["terminated"]` marks a real game over, as EnvPool's Atari info,
    so episode returns are full games. With `episodic_life` the returned `terminated` is also True on the step that
    loses a life (a learning terminal; the game goes on), as EnvPool's `episodic_life` and Dopamine's
    `terminal_on_life_loss`. An env auto-resets on the step *after* its episode ended (ale-py's NEXT_STEP mode, as
    EnvPool): that step ignores its action and returns the new game's first observation with reward 0."""

    def __init__(self, game: str, num_envs: int, seeds: list[int], threshold: float, sticky_action_prob: float,
                 episodic_life: bool, max_episode_steps: int, num_threads: int = 0):
        from ale_py.vector_env import AtariVectorEnv

        self.env = AtariVectorEnv(
            game, num_envs, num_threads=num_threads, continuous=True, continuous_action_threshold=threshold,
            repeat_action_probability=sticky_action_prob, full_action_space=True, noop_max=0, use_fire_reset=False,
            episodic_life=False, reward_clipping=False, max_num_frames_per_episode=4 * max_episode_steps,
            frameskip=4, maxpool=True, stack_num=4, img_height=84, img_width=84, grayscale=True)
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space
        self.episodic_life = episodic_life
        self.lives = np.zeros(num_envs, dtype=np.int64)

    def reset(self):
        obs, info = self.env.reset(seed=self.seeds)
        self.lives = info["lives"].astype(np.int64)
        return obs, {}

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(np.ascontiguousarray(actions, dtype=np.float32))
        reward, game_over = reward.astype(np.float32), terminated.astype(bool)
        life_lost = info["lives"] < self.lives
        self.lives = info["lives"].astype(np.int64)
        if self.episodic_life:
            terminated = game_over | life_lost
        return obs, reward, terminated, truncated.astype(bool), {"reward": reward, "terminated": game_over}

    def close(self):
        self.env.close()
# ---- end of the block ----


def resolve_args(args: Args):
    """Check the flags against the games and fill in the preset's values; returns (tasks, family)."""
    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    for task in tasks:
        cale_game(task)  # Atari ids only, unknown games with close matches (docs/cale.md)
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be in (0, 1) (got {args.threshold}): it is CALE's joystick threshold tau")
    for key, value in PRESETS[args.preset].items():  # detail 7: explicit flags win
        if getattr(args, key) is None and key != "total_timesteps":
            setattr(args, key, value)
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or PRESETS[args.preset]["total_timesteps"]
    for name in ("num_envs", "batch_size", "buffer_size", "n_step", "max_episode_steps", "total_timesteps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.replay_ratio < 0 or args.learning_starts < 0 or not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UserError("need --replay-ratio >= 0, --learning-starts >= 0, 0 < tau <= 1 and 0 <= gamma <= 1")
    for name in ("sticky_action_prob", "epsilon_train", "epsilon_eval"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not (args.learning_rate > 0 and args.adam_eps > 0 and math.isfinite(args.reward_scale)):
        raise UserError("need --learning-rate > 0, --adam-eps > 0 and a finite --reward-scale")
    if args.buffer_size // args.num_envs <= args.n_step + 4:
        raise UserError("--buffer-size is too small for --num-envs and --n-step")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    return tasks, "cale"


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True):
    """A CALE vector env with EnvPool's interface (docs/cale.md, detail 1); evaluation plays full games."""
    return CaleVecEnv(cale_game(env_id), num_envs, seeds, args.threshold, args.sticky_action_prob,
                      args.episodic_life and train, args.max_episode_steps, args.env_threads)


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct environment seeds per run, task and purpose (the same derivation as every script, so runs with
    neighbouring seeds never share environments)."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


class ReplayBuffer:
    """dqn.py's replay memory storing every frame once (docs/dqn.md, detail 3; docs/sac_cale.md, detail 3), with
    float32 actions of shape (action_dim,).

    Row t of the per-env ring holds the newest frame of obs_t, a_t, r_t and the flags of the step taken from obs_t.
    The next observation of a transition is row t+1, so no frame is stored twice (1M stacks of 4x84x84 would be
    28 GB, the frames alone are 7 GB); stacked observations are rebuilt from the last `stack` rows, with zero frames
    before the first frame of an episode, as ale-py's frame stack starts. `valid[t]` is False for the auto-reset
    step (obs_t is a final observation, its action is ignored), so that pseudo-transition is never sampled.
    `first[t]` marks the first observation after a full reset."""

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, action_dim: int):
        self.rows = capacity // num_envs
        self.num_envs = num_envs
        self.stack = obs_shape[0]
        self.frames = np.zeros((self.rows, num_envs, *obs_shape[1:]), dtype=np.uint8)
        self.actions = np.zeros((self.rows, num_envs, action_dim), dtype=np.float32)
        self.rewards = np.zeros((self.rows, num_envs), dtype=np.float32)
        self.terminated = np.zeros((self.rows, num_envs), dtype=bool)
        self.truncated = np.zeros((self.rows, num_envs), dtype=bool)
        self.first = np.zeros((self.rows, num_envs), dtype=bool)
        self.valid = np.zeros((self.rows, num_envs), dtype=bool)
        self.pos, self.full = 0, False

    def __len__(self):
        return (self.rows if self.full else self.pos) * self.num_envs

    def add(self, obs, actions, rewards, terminated, truncated, first, valid):
        p = self.pos
        self.frames[p] = obs[:, -1]
        self.actions[p], self.rewards[p] = actions, rewards
        self.terminated[p], self.truncated[p] = terminated, truncated
        self.first[p], self.valid[p] = first, valid
        self.pos = (p + 1) % self.rows
        self.full = self.full or self.pos == 0

    def end_episodes(self, obs, first):
        """Cut every stream here (task switch): the last stored step becomes a truncation whose next observation
        is `obs`, stored as a row that is never sampled itself."""
        self.truncated[(self.pos - 1) % self.rows] = True
        zeros = np.zeros(self.num_envs)
        self.add(obs, np.zeros(self.actions.shape[1:]), zeros, zeros, zeros, first,
                 np.zeros(self.num_envs, dtype=bool))

    def sampleable(self, n_step: int) -> int:
        """Number of rows transitions can start from: each needs its next n rows written (and, once the ring has
        wrapped, its `stack - 1` predecessors intact)."""
        size = self.rows if self.full else self.pos
        return max(0, size - n_step - (self.stack - 1 if self.full else 0))

    def stacked(self, rows, envs):
        idx = np.empty((len(rows), self.stack), dtype=np.int64)
        blank = np.zeros((len(rows), self.stack), dtype=bool)  # before the episode's first frame: zeros
        idx[:, -1] = rows
        for d in range(self.stack - 2, -1, -1):  # walk back, but never past the first frame of an episode
            nxt = idx[:, d + 1]
            blank[:, d] = blank[:, d + 1] | self.first[nxt, envs]
            idx[:, d] = np.where(blank[:, d], nxt, (nxt - 1) % self.rows)
        out = self.frames[idx, envs[:, None]]
        out[blank] = 0
        return out

    def sample(self, batch_size: int, rng: np.random.Generator, n_step: int = 1, gamma: float = 0.99):
        """Uniform over stored real transitions; returns obs, actions, n-step returns, bootstrap discounts
        (gamma^m, or 0 after a termination) and the observation to bootstrap from (detail 4)."""
        count = self.sampleable(n_step)
        if count < 1:
            raise ValueError("not enough data in the replay memory to sample")
        start = self.pos if self.full else 0
        oldest = self.stack - 1 if self.full else 0
        rows = np.empty(batch_size, dtype=np.int64)
        envs = np.empty(batch_size, dtype=np.int64)
        todo = np.arange(batch_size)
        while len(todo):  # rejection sampling keeps the distribution uniform over valid transitions
            rows[todo] = (start + oldest + rng.integers(0, count, len(todo))) % self.rows
            envs[todo] = rng.integers(0, self.num_envs, len(todo))
            todo = todo[~self.valid[rows[todo], envs[todo]]]
        returns = np.zeros(batch_size, dtype=np.float32)
        steps = np.zeros(batch_size, dtype=np.int64)
        alive = np.ones(batch_size, dtype=bool)
        terminal = np.zeros(batch_size, dtype=bool)
        for i in range(n_step):  # n-step return, stopping at the end of the episode (docs/dqn.md, detail 4)
            r = (rows + i) % self.rows
            returns += np.where(alive, gamma**i * self.rewards[r, envs], 0.0).astype(np.float32)
            steps += alive
            term, trunc = self.terminated[r, envs], self.truncated[r, envs]
            terminal |= alive & term
            alive &= ~(term | trunc)
        discounts = np.where(terminal, 0.0, gamma**steps).astype(np.float32)
        next_rows = (rows + steps) % self.rows
        return (self.stacked(rows, envs), self.actions[rows, envs], returns, discounts,
                self.stacked(next_rows, envs))


class EpisodeStats:
    """Full-game, unclipped episode returns from EnvPool's `info` (docs/dqn.md, detail 5).

    Atari's `info["reward"]` is the raw score and `info["terminated"]` is a real game over, so returns are per game
    even when life loss is a training terminal and rewards are clipped. Other families report neither key, and
    their returned reward and `terminated` are already the true ones."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, reward, terminated, truncated, info, valid):
        """Add one vector step; returns (game_over mask, [(env index, return, length) for finished games])."""
        self.returns += info["reward"] if "reward" in info else reward
        self.lengths += valid  # the auto-reset step is not an agent step
        game_over = (info["terminated"].astype(bool) if "terminated" in info else terminated) | truncated
        if not game_over.any():
            return game_over, []
        finished = [(int(i), float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(game_over)]
        self.returns[game_over], self.lengths[game_over] = 0.0, 0
        return game_over, finished


TANH_CLIP = 0.99999997  # Dopamine's _Tanh inverse clips |y| to this before arctanh (detail 5)
LAYER_NORM_EPS = 1e-6  # flax's nn.LayerNorm default (torch's is 1e-5)
HIDDEN = 512  # the gins' SACCALEConvNetwork num_layers 1, hidden_units 512 (actor and each critic)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding (the extra pixel goes after), as flax's nn.Conv default (detail 2)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def projection(name: str, in_dim: int, encoder: str, critic: bool) -> list:
    """The encoder's projection of the conv features (detail 2): sac = Dense 50, LayerNorm, tanh (both branches);
    nature = Dense 512, LayerNorm (critic branch only), ReLU."""
    if encoder == "sac":
        return [(name, nn.Linear(in_dim, 50)), (f"{name}_norm", nn.LayerNorm(50, eps=LAYER_NORM_EPS)),
                (f"{name}_act", nn.Tanh())]
    norm = [(f"{name}_norm", nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS))] if critic else []
    return [(name, nn.Linear(in_dim, HIDDEN)), *norm, (f"{name}_act", nn.ReLU())]


def init_layers(module: nn.Module, encoder: str, heads: bool):
    """flax's initialisers (detail 2): the SAC encoder's convs and projections orthogonal (gain 1), the Nature
    encoder's xavier_uniform; the actor and critic MLPs (`heads`) glorot_uniform; zero biases everywhere."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if encoder == "sac" and not heads:
                nn.init.orthogonal_(m.weight)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def run_hidden(net: nn.Sequential, x, frozen: bool = False):
    """Forward through `net`, also returning every ReLU output (the hidden units). `frozen`: the Linear layers use
    detached weights, so no gradient reaches them (the policy loss's critic, detail 6)."""
    hidden = []
    for module in net:
        x = F.linear(x, module.weight.detach(), module.bias.detach()) if frozen and isinstance(module, nn.Linear) \
            else module(x)
        if isinstance(module, nn.ReLU):
            hidden.append(x)
    return x, hidden


def hidden_layer_names(net: nn.Sequential) -> list[str]:
    """Names of the layers whose ReLU outputs are the hidden units, in forward order."""
    names, last = [], None
    for name, module in net.named_children():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
        elif isinstance(module, nn.ReLU):
            names.append(last)
    return names


class Encoder(nn.Module):
    """The shared pixel encoder (detail 2): uint8 frames / 255, the conv stack with SAME padding, flatten (CHW
    order), then the critic projection. Returns the flat conv features (the actor's projection reads them
    detached) and the critic's features critic_z."""

    def __init__(self, obs_shape: tuple, encoder: str):
        super().__init__()
        convs = [(32, 3, 2), (32, 3, 1), (32, 3, 1), (32, 3, 1)] if encoder == "sac" else \
            [(32, 8, 4), (64, 4, 2), (64, 3, 1)]
        layers, (c, size) = [], (obs_shape[0], obs_shape[1])
        for i, (out, k, s) in enumerate(convs, start=1):
            lo, hi = same_padding(size, k, s)
            layers += [(f"pad{i}", nn.ZeroPad2d((lo, hi, lo, hi))), (f"conv{i}", nn.Conv2d(c, out, k, s)),
                       (f"act{i}", nn.ReLU())]
            c, size = out, math.ceil(size / s)
        self.feature_dim = c * size * size  # sac: 42 * 42 * 32 = 56448; nature: 11 * 11 * 64 = 7744
        layers += [("flatten", nn.Flatten())] + projection("critic_proj", self.feature_dim, encoder, critic=True)
        self.net = nn.Sequential(OrderedDict(layers))
        self.out_dim = 50 if encoder == "sac" else HIDDEN
        init_layers(self, encoder, heads=False)

    def forward(self, obs, return_hidden: bool = False):
        x, hidden, flat = obs.float() / 255.0, [], None
        for module in self.net:
            x = module(x)
            if isinstance(module, nn.Flatten):
                flat = x
            elif isinstance(module, nn.ReLU):
                hidden.append(x)
        return (flat, x, hidden) if return_hidden else (flat, x)

    def hidden_layers(self):
        return hidden_layer_names(self.net)


class SoftQNetwork(nn.Module):
    """Q(s, a): one hidden layer of 512 ReLU units on the concatenated critic_z and action (in box units), then
    Dense 1; glorot_uniform kernels, zero biases (Dopamine's CriticNetwork with num_layers 1)."""

    def __init__(self, z_dim: int, action_dim: int):
        super().__init__()
        self.net = nn.Sequential(OrderedDict([("fc1", nn.Linear(z_dim + action_dim, HIDDEN)), ("act1", nn.ReLU()),
                                              ("q", nn.Linear(HIDDEN, 1))]))
        init_layers(self, "", heads=True)

    def forward(self, z, actions, return_hidden: bool = False, frozen: bool = False):
        x, hidden = run_hidden(self.net, torch.cat([z, actions], dim=1), frozen)
        return (x.squeeze(1), hidden) if return_hidden else x.squeeze(1)

    def hidden_layers(self):
        return hidden_layer_names(self.net)


def squashed_gaussian(mean, log_std, noise, action_scale, action_bias):
    """Reparameterised sample a = tanh(mean + std * noise) * scale + bias, std = exp(log_std) unclamped, and its
    log-density as Dopamine's TFP TransformedDistribution computes it (detail 5): through the inverse
    u = arctanh(clip((a - bias) / scale, +-TANH_CLIP)), log N(u; mean, std) - log(1 - tanh(u)^2) - log(scale),
    summed over the action dimensions (log(1 - tanh^2) in TFP's stable form 2 (log 2 - u - softplus(-2u)))."""
    std = log_std.exp()
    action = torch.tanh(mean + std * noise) * action_scale + action_bias
    u = torch.atanh(((action - action_bias) / action_scale).clamp(-TANH_CLIP, TANH_CLIP))
    normal_log_prob = -((u - mean) ** 2) / (2 * std**2) - log_std - math.log(math.sqrt(2 * math.pi))
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u)) + torch.log(action_scale)
    return action, (normal_log_prob - log_det).sum(dim=1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy on the conv features, detached (detail 2): the actor projection, one hidden
    layer of 512 ReLU units, then one Dense head of 2 x action_dim (loc, log-scale), as Dopamine's ActorNetwork with
    num_layers 1. The action bounds are buffers, so a checkpoint carries them."""

    def __init__(self, feature_dim: int, action_low: np.ndarray, action_high: np.ndarray, encoder: str):
        super().__init__()
        action_dim = len(action_low)
        z_dim = 50 if encoder == "sac" else HIDDEN
        self.proj = nn.Sequential(OrderedDict(projection("actor_proj", feature_dim, encoder, critic=False)))
        self.trunk = nn.Sequential(OrderedDict([("fc1", nn.Linear(z_dim, HIDDEN)), ("act1", nn.ReLU())]))
        self.fc_head = nn.Linear(HIDDEN, 2 * action_dim)
        init_layers(self.proj, encoder, heads=False)
        init_layers(self.trunk, encoder, heads=True)
        init_layers(self.fc_head, encoder, heads=True)
        low, high = np.asarray(action_low, dtype=np.float32), np.asarray(action_high, dtype=np.float32)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, features, return_hidden: bool = False):
        z, proj_hidden = run_hidden(self.proj, features.detach())  # only the critic trains the convs (detail 2)
        x, hidden = run_hidden(self.trunk, z)
        mean, log_std = self.fc_head(x).chunk(2, dim=1)
        return (mean, log_std, proj_hidden + hidden) if return_hidden else (mean, log_std)

    def get_action(self, features, return_hidden: bool = False):
        """(sampled action, its log-prob, mean action tanh(loc) rescaled[, hidden])."""
        mean, log_std, hidden = self(features, return_hidden=True)
        action, log_prob = squashed_gaussian(mean, log_std, torch.randn_like(mean), self.action_scale,
                                             self.action_bias)
        deterministic = torch.tanh(mean) * self.action_scale + self.action_bias
        return (action, log_prob, deterministic, hidden) if return_hidden else (action, log_prob, deterministic)

    def mean_action(self, features):
        """The deterministic evaluation action (draws no random numbers)."""
        return torch.tanh(self(features)[0]) * self.action_scale + self.action_bias

    def hidden_layers(self):
        return hidden_layer_names(self.proj) + hidden_layer_names(self.trunk)


class SACNetwork(nn.Module):
    """Dopamine's SACCALEConvNetwork: the encoder, the actor and the two critics in one module, so that one Adam
    trains it all and the target network is one Polyak-averaged copy of it (detail 6)."""

    def __init__(self, obs_shape: tuple, action_low: np.ndarray, action_high: np.ndarray, encoder: str):
        super().__init__()
        self.encoder = Encoder(obs_shape, encoder)
        self.actor = Actor(self.encoder.feature_dim, action_low, action_high, encoder)
        self.qf1 = SoftQNetwork(self.encoder.out_dim, len(action_low))
        self.qf2 = SoftQNetwork(self.encoder.out_dim, len(action_low))

    def sample_action(self, obs):
        """A training action: a sample of the policy."""
        return self.actor.get_action(self.encoder(obs)[0])[0]

    def mean_action(self, obs):
        return self.actor.mean_action(self.encoder(obs)[0])


def target_entropy(action_shape) -> float:
    """Dopamine's SAC target entropy -0.5 * |A| (-1.5 for CALE's 3-d actions; target_entropy None in the gins)."""
    return -0.5 * float(np.prod(action_shape))


def linearly_decaying_epsilon(decay_period: int, step: int, warmup_steps: int, epsilon: float) -> float:
    """Dopamine's dqn_agent.linearly_decaying_epsilon (detail 8): 1 until `warmup_steps`, then linear to `epsilon`
    over `decay_period` steps, then `epsilon`. A period of 0 jumps to `epsilon` after the warm-up."""
    if decay_period == 0:
        return 1.0 if step < warmup_steps else epsilon
    steps_left = decay_period + warmup_steps - step
    bonus = (1.0 - epsilon) * steps_left / decay_period
    return epsilon + min(max(bonus, 0.0), 1.0 - epsilon)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    """Polyak averaging theta' <- tau * theta + (1 - tau) * theta' of the whole network (detail 6)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(1.0 - tau).add_(s, alpha=tau)


@torch.no_grad()
def soft_q_target(target_network, returns, discounts, next_obs, alpha: float, reward_scale: float):
    """Dopamine's SAC target (detail 6): reward_scale * R + discount * (min_i Q'_i(s', mean a') - alpha * log pi'(a'
    sampled | s')), everything from the target network; `discounts` is gamma^m, 0 after a termination; a truncation
    bootstraps from its final observation (detail 4)."""
    features, critic_z = target_network.encoder(next_obs)
    _, next_log_pi, next_mean = target_network.actor.get_action(features)
    min_q = torch.min(target_network.qf1(critic_z, next_mean), target_network.qf2(critic_z, next_mean))
    return reward_scale * returns + discounts * (min_q - alpha * next_log_pi)


def sac_losses(network, target_network, batch, log_alpha, entropy_target: float, reward_scale: float,
               return_hidden: bool = False) -> dict:
    """Dopamine's sac_agent.train losses on one batch (detail 6): the critic loss mean((Q1 - y)^2 + (Q2 - y)^2), the
    policy loss mean(alpha * log pi(a|s) - min_i Q_i(s, a)), a ~ pi, through critics with frozen weights, and the
    alpha loss mean(log_alpha * stop_grad(-log pi - target entropy))."""
    obs, actions, returns, discounts, next_obs = batch
    alpha = log_alpha.detach().exp()
    target = soft_q_target(target_network, returns, discounts, next_obs, alpha, reward_scale)
    features, critic_z, encoder_hidden = network.encoder(obs, return_hidden=True)
    qf1_values, qf1_hidden = network.qf1(critic_z, actions, return_hidden=True)
    qf2_values, qf2_hidden = network.qf2(critic_z, actions, return_hidden=True)
    qf1_loss, qf2_loss = F.mse_loss(qf1_values, target), F.mse_loss(qf2_values, target)
    pi, log_pi, _, actor_hidden = network.actor.get_action(features, return_hidden=True)
    frozen_z = critic_z.detach()  # the policy loss moves the actor only (Dopamine's frozen_params)
    min_q_pi = torch.min(network.qf1(frozen_z, pi, frozen=True), network.qf2(frozen_z, pi, frozen=True))
    out = dict(qf1_values=qf1_values, qf2_values=qf2_values, qf1_loss=qf1_loss, qf2_loss=qf2_loss,
               qf_loss=qf1_loss + qf2_loss, actor_loss=(alpha * log_pi - min_q_pi).mean(),
               alpha_loss=(log_alpha * (-log_pi - entropy_target).detach()).mean())
    if return_hidden:
        out.update(encoder_hidden=encoder_hidden, qf1_hidden=qf1_hidden, qf2_hidden=qf2_hidden,
                   actor_hidden=actor_hidden)
    return out


def unit_scores(x: torch.Tensor) -> torch.Tensor:
    """ReDo's layer-normalised score per unit (a conv channel is one unit): mean |x| over batch (and space),
    divided by the layer's mean of that quantity."""
    per_unit = x.abs().mean(dim=(0, 2, 3)) if x.dim() == 4 else x.abs().mean(dim=0)
    return per_unit / (per_unit.mean() + 1e-9)


def srank(features: torch.Tensor, delta: float = 0.01) -> int:
    """Effective rank of Kumar et al. (2021): the fewest singular values holding 1 - delta of their sum."""
    sv = torch.linalg.svdvals(features.float())
    cumulative = torch.cumsum(sv, 0) / sv.sum().clamp_min(1e-12)
    return int((cumulative < 1 - delta).sum().item()) + 1


def network_metrics(prefix: str, network: nn.Module, hidden: list, loss: torch.Tensor, taus) -> dict[str, float]:
    """The plasticity/ diagnostics of docs/conventions.md for one network and its own loss, keys prefixed with the
    network's name (plasticity/actor/..., plasticity/qf1/...)."""
    params = [p for p in network.parameters()]
    grads = torch.autograd.grad(loss, hidden + params, retain_graph=True)
    hidden_grads, param_grads = grads[: len(hidden)], grads[len(hidden):]
    metrics, totals = {}, {}
    for name, h, g in zip(network.hidden_layers(), hidden, hidden_grads):
        # GraMa scores the gradient through the ReLU (w.r.t. the pre-activation), so a dead unit scores 0
        act_score, grad_score = unit_scores(h.detach()), unit_scores(g * (h.detach() > 0))
        for tau in taus:
            for kind, score in (("dormant", act_score), ("grad_inactive", grad_score)):
                key = f"{kind}_tau{tau:g}"
                frac = (score <= tau).float()
                metrics[f"plasticity/{prefix}/{key}/{name}"] = frac.mean().item()
                count, units = totals.get(key, (0.0, 0))
                totals[key] = (count + frac.sum().item(), units + frac.numel())
    for key, (count, units) in totals.items():
        metrics[f"plasticity/{prefix}/{key}"] = count / units
    features = hidden[-1].detach().flatten(1)
    metrics[f"plasticity/{prefix}/srank"] = srank(features)
    metrics[f"plasticity/{prefix}/feature_norm"] = features.norm(dim=1).mean().item()
    metrics[f"plasticity/{prefix}/param_norm"] = torch.sqrt(sum((p.detach() ** 2).sum() for p in params)).item()
    metrics[f"plasticity/{prefix}/grad_norm"] = torch.sqrt(sum((g**2).sum() for g in param_grads)).item()
    return metrics


def plasticity_metrics(network, target_network, batch, log_alpha, entropy_target: float, reward_scale: float,
                       taus=(0.0, 0.1)) -> dict[str, float]:
    """Diagnostics of the encoder (its conv layers, with the critic loss that trains them), of the two critics
    (each with its own TD loss) and of the actor (the policy loss) on one replay batch (detail 9)."""
    out = sac_losses(network, target_network, batch, log_alpha, entropy_target, reward_scale, return_hidden=True)
    metrics = network_metrics("encoder", network.encoder, out["encoder_hidden"], out["qf_loss"], taus)
    for name in ("qf1", "qf2"):
        metrics.update(network_metrics(name, getattr(network, name), out[f"{name}_hidden"], out[f"{name}_loss"], taus))
    metrics.update(network_metrics("actor", network.actor, out["actor_hidden"], out["actor_loss"], taus))
    return metrics


def to_torch(batch, device):
    return [torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in batch]


def evaluate(network, env_id: str, args: Args, episodes: int, epsilon: float, seed: int, device) -> list[float]:
    """Play `episodes` full games in parallel, one per env (so short games are not over-represented), with the
    mean action tanh(loc), replaced by a uniform action in the box with probability `epsilon` (detail 8)."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False)
    rng = np.random.default_rng(seed + 10_000)
    low, high = envs.action_space.low, envs.action_space.high
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        with torch.inference_mode():
            actions = network.mean_action(torch.from_numpy(obs).to(device)).cpu().numpy()
        if epsilon > 0:
            explore = rng.random(episodes) < epsilon
            actions = np.where(explore[:, None], rng.uniform(low, high, actions.shape), actions).astype(np.float32)
        obs, reward, terminated, truncated, info = envs.step(actions)
        game_over, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        prev_done = game_over
        for i, ret, _ in finished:
            if np.isnan(returns[i]):
                returns[i] = ret
    envs.close()
    return returns.tolist()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "envpool", "gymnasium", "ale-py", "tyro", "tensorboard"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_json(path: str, data: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)  # atomic: the harness never reads a half-written file


def read_checkpoint(path: str, task: str, device) -> dict:
    """An --eval-checkpoint file, read with safe loading only (tensors and plain containers: a file can never run code)
    and checked to be a --save-model checkpoint trained on `task` (docs/conventions.md, section 10)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # empty, corrupt, or holding objects safe loading refuses: never retry it unsafely
        raise UserError(f"--eval-checkpoint {path}: not a file safe loading can read ({type(err).__name__})") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and {"model", "obs_shape", "n_actions"} <= checkpoint.keys()):
        raise UserError(f"--eval-checkpoint {path}: not a checkpoint written by --save-model")
    trained_on = checkpoint["args"].get("env_ids") or [checkpoint["args"].get("env_id")]
    if task not in trained_on:
        raise UserError(f"--eval-checkpoint {path}: trained on {' '.join(map(str, trained_on))}, not on {task}")
    return checkpoint


def load_weights(module: nn.Module, checkpoint: dict, path: str):
    """module.load_state_dict(checkpoint's model) once every parameter name and shape agrees: a checkpoint of another
    network (another script, other flags) is one line naming what differs, not torch's multi-line error."""
    state = checkpoint["model"] if isinstance(checkpoint["model"], dict) else {}
    ours = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    theirs = {key: tuple(getattr(value, "shape", ("?",))) for key, value in state.items()}
    differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differ:
        raise UserError(f"--eval-checkpoint {path}: written by {checkpoint.get('script', 'another script')}, whose "
                        f"network differs from the one these flags build (in {', '.join(differ[:3])}"
                        f"{', ...' * (len(differ) > 3)})")
    module.load_state_dict(state)


def run(args: Args) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    tasks, family = resolve_args(args)
    run_name = args.run_name or f"{tasks[0] if len(tasks) == 1 else 'seq'}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name.replace("/", "-"))
    try:  # a directory that cannot be written is bad input, not a crash (docs/conventions.md, section 10)
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), {
            "args": dataclasses.asdict(args), "tasks": tasks, "family": family, "command": sys.argv,
            "versions": package_versions(), "git_commit": git_commit(), "start_time": time.time()})
    except OSError as err:
        raise UserError(f"--output-dir {args.output_dir}: cannot write {run_dir} ({err.strerror or err})") from None
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
    episodes_file = open(os.path.join(run_dir, "episodes.csv"), "w", newline="")
    episodes_csv = csv.writer(episodes_file)
    episodes_csv.writerow(["global_step", "episodic_return", "episodic_length", "task"])

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if device.type == "cuda":  # CPU kernels used here are deterministic; this call costs ~2 s of imports
        torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
    rng = np.random.default_rng(args.seed)
    metrics_rng = np.random.default_rng([args.seed, 1])  # diagnostics draw their own batches: they never change a run
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], args.num_envs, env_seeds(args.seed, 0, 0, args.num_envs), args)
        obs_shape = tuple(envs.observation_space.shape)
        action_low, action_high = envs.action_space.low, envs.action_space.high
        action_dim = len(action_low)
        network = SACNetwork(obs_shape, action_low, action_high, args.encoder).to(device)
        target_network = copy.deepcopy(network)  # detail 6: the whole network, encoder included
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (obs_shape, action_dim):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']}-dimensional actions; {tasks[0]} has {obs_shape} and "
                                f"{envs.action_space}")
            load_weights(network, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(network, tasks[0], args, args.eval_episodes, args.epsilon_eval, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        target_network.requires_grad_(False)
        # One Adam on 0.5 * critic loss + policy loss over the whole network, one for log_alpha (detail 6)
        optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
        entropy_target = target_entropy(action_low.shape)
        log_alpha = torch.zeros(1, requires_grad=True, device=device)  # alpha = 1 at the start (Dopamine)
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.learning_rate, eps=args.adam_eps)
        alpha = log_alpha.exp().item()
        rb = ReplayBuffer(args.buffer_size, args.num_envs, obs_shape, action_dim)
        stats = EpisodeStats(args.num_envs)
        random_low, random_high = action_low.astype(np.float32), action_high.astype(np.float32)
        cells = []  # joystick cells of the training actions sent since the last log (cale/, docs/cale.md detail 3)

        obs, _ = envs.reset()
        first = np.ones(args.num_envs, dtype=bool)  # obs is the first observation after a full reset
        prev_done = np.zeros(args.num_envs, dtype=bool)  # last step ended a game: this step is an auto-reset
        task_index = 0
        update_credit, next_eval = 0.0, args.eval_every
        epsilon = 1.0
        while global_step < args.total_timesteps:
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch (docs/sac_cale.md, detail 10): cut the replay streams, drop unfinished episodes, new env.
                rb.end_episodes(obs, first)
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], args.num_envs,
                                env_seeds(args.seed, task_index, 0, args.num_envs), args)
                obs, _ = envs.reset()
                first[:], prev_done[:] = True, False
                stats = EpisodeStats(args.num_envs)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")

            if global_step < args.learning_starts:  # uniform random actions in the box (Dopamine's warm-up)
                actions = rng.uniform(random_low, random_high, (args.num_envs, action_dim)).astype(np.float32)
            else:
                with torch.inference_mode():
                    actions = network.sample_action(torch.from_numpy(obs).to(device)).cpu().numpy()
                if args.epsilon_train > 0:  # detail 8: each env draws its own coin
                    epsilon = linearly_decaying_epsilon(args.epsilon_decay_steps, global_step, args.learning_starts,
                                                        args.epsilon_train)
                    explore = rng.random(args.num_envs) < epsilon
                    uniform = rng.uniform(random_low, random_high, (args.num_envs, action_dim))
                    actions = np.where(explore[:, None], uniform, actions).astype(np.float32)

            next_obs, reward, terminated, truncated, info = envs.step(actions)
            global_step += args.num_envs
            # Row of every step; the auto-reset step (after a game over) is stored but never sampled (detail 3).
            # A life loss under --episodic-life is a terminal, but the game goes on: no auto-reset follows it.
            valid = ~prev_done
            rb.add(obs, actions, reward, terminated, truncated, first, valid)
            cells.append(joystick_cells(actions[valid], args.threshold))
            game_over, finished = stats.update(reward, terminated, truncated, info, valid)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            first = prev_done  # next_obs is a fresh reset iff this step was the auto-reset step
            prev_done = game_over
            obs = next_obs

            if global_step > args.learning_starts:
                update_credit += args.replay_ratio * args.num_envs  # detail 7
                while update_credit >= 1.0 and rb.sampleable(args.n_step) > 0:
                    update_credit -= 1.0
                    batch = to_torch(rb.sample(args.batch_size, rng, args.n_step, args.gamma), device)
                    out = sac_losses(network, target_network, batch, log_alpha, entropy_target, args.reward_scale)
                    qf_loss, actor_loss, alpha_loss = out["qf_loss"], out["actor_loss"], out["alpha_loss"]
                    loss = 0.5 * qf_loss + actor_loss  # Dopamine's combined loss (detail 6)
                    if not math.isfinite(loss.item()):
                        raise Diverged(f"non-finite loss (critic {qf_loss.item()}, actor {actor_loss.item()}) at "
                                       f"global_step={global_step}")
                    optimizer.zero_grad(set_to_none=True)
                    a_optimizer.zero_grad(set_to_none=True)
                    (loss + alpha_loss).backward()  # alpha_loss reaches log_alpha only
                    optimizer.step()
                    a_optimizer.step()
                    alpha = log_alpha.exp().item()
                    soft_update(target_network, network, args.tau)
                    num_updates += 1
                    if num_updates % args.log_every == 0:
                        sps = int(global_step / (time.time() - start_time))
                        writer.add_scalar("losses/qf1_values", out["qf1_values"].mean().item(), global_step)
                        writer.add_scalar("losses/qf2_values", out["qf2_values"].mean().item(), global_step)
                        writer.add_scalar("losses/qf1_loss", out["qf1_loss"].item(), global_step)
                        writer.add_scalar("losses/qf2_loss", out["qf2_loss"].item(), global_step)
                        writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
                        writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                        writer.add_scalar("losses/alpha", alpha, global_step)
                        writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                        if args.epsilon_train > 0:
                            writer.add_scalar("charts/epsilon", epsilon, global_step)
                        writer.add_scalar("charts/SPS", sps, global_step)
                        writer.add_scalar("charts/num_updates", num_updates, global_step)
                        for key, value in cale_cell_metrics(np.concatenate(cells)).items():
                            writer.add_scalar(key, value, global_step)
                        cells = []
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        metrics_batch = to_torch(rb.sample(args.metrics_batch_size, metrics_rng, args.n_step,
                                                           args.gamma), device)
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep torch's RNG
                            metrics = plasticity_metrics(network, target_network, metrics_batch, log_alpha,
                                                         entropy_target, args.reward_scale)
                        for key, value in metrics.items():
                            writer.add_scalar(key, value, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(network, tasks[task_index], args, args.eval_episodes, args.epsilon_eval,
                                   args.seed + global_step, device)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": network.state_dict(), "log_alpha": float(log_alpha.item()),
                        "obs_shape": list(obs_shape), "n_actions": int(action_dim), "args": dataclasses.asdict(args)},
                       model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(network, tasks[-1], args, args.eval_episodes, args.epsilon_eval, args.seed, device)
            writer.add_scalar("eval/episodic_return", float(np.mean(eval_returns)), global_step)
        summary.update(status="completed", sps=int(global_step / train_time))
    except Diverged as err:
        summary.update(status="diverged", error=str(err))
        raise
    except UserError as err:
        summary.update(status="failed", error=str(err))
        raise
    except Exception as err:
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        summary.update(
            global_step=global_step, num_updates=num_updates, num_episodes=len(train_returns),
            final_train_return=float(np.mean(train_returns[-10:])) if train_returns else None,
            eval_returns=summary.get("eval_returns", eval_returns),
            eval_return_mean=summary.get("eval_return_mean", float(np.mean(eval_returns)) if eval_returns else None),
            wall_time_s=time.time() - start_time, peak_memory_mb=peak_memory_mb(),
            peak_gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
        summary.setdefault("sps", int(global_step / max(time.time() - start_time, 1e-9)))
        write_json(os.path.join(run_dir, "summary.json"), summary)
        episodes_file.close()
        writer.close()
    return summary


def main():
    args = tyro.cli(Args)
    try:
        summary = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Diverged as err:
        print(f"error: run diverged: {err}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps({k: summary.get(k) for k in (
        "status", "global_step", "final_train_return", "eval_return_mean", "sps", "wall_time_s")}))


if __name__ == "__main__":
    main()
