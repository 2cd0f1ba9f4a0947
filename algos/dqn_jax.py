"""DQN on EnvPool in JAX: the JAX twin of algos/dqn.py (same algorithm, defaults, flags and outputs).

Paper: "Human-level control through deep reinforcement learning", Mnih, Kavukcuoglu, Silver et al., Nature 2015,
https://www.nature.com/articles/nature14236. Everything algorithmic is dqn.py's (docs/dqn.md): Dopamine's JAX DQN on
Atari, CleanRL's `dqn.py` settings on vector tasks, the MinAtar paper's DQN on MinAtar games, task sequences, the
replay memory that stores each frame once, n-step returns, the replay ratio, the `plasticity/` diagnostics.

Method: a Q-network trained by regression (MSE, as Dopamine) on n-step TD targets computed with a periodically
copied target network, from an experience replay memory filled by an epsilon-greedy policy.

What is JAX here (docs/dqn_jax.md, "Implementation details"): the network is a flax linen module, the TD update
(loss, gradient, optax Adam) is one jitted call that runs k updates with `jax.lax.scan` over k replay batches
sampled ahead (so a replay ratio > 1 costs one call per environment step), the greedy action and the diagnostics
are jitted, parameters and optimizer state stay on the device and are donated to the update. The replay memory,
the environments and the exploration coins stay in NumPy on the host, as in dqn.py (and Dopamine).

Differences from algos/dqn.py (docs/dqn_jax.md, "What differs from dqn.py"):
  - not bit-identical: the initial weights come from JAX's random stream (same distributions as dqn.py's), and XLA
    reduces floats in another order than torch, so the two scripts agree only until learning starts (same
    environment seeds, exploration coins and replay samples from the same NumPy generator);
  - `--save-model` writes `model.msgpack` (flax.serialization, no pickle) instead of `model.pt`;
  - `--xla-threads` replaces `--torch-threads`; there is no `--torch-deterministic` (JAX on the CPU is deterministic);
  - a non-finite TD loss is detected at the next logging point (every `--log-every` updates, at a diagnostics point
    and at the end of training) instead of after every update, so the device never waits for the host;
  - everything dqn.py supports is supported: Atari, classic control (vector observations), MinAtar, task sequences.

Docs: docs/dqn_jax.md (and docs/dqn.md for the algorithm). Conventions every script follows: docs/conventions.md.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.traverse_util import flatten_dict, unflatten_dict
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# EnvPool declares float64 Box bounds that gymnasium casts to float32 with a warning on every env creation: noise.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


@dataclass
class Args:
    # --- experiment and outputs (shared by every script, see docs/conventions.md) ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (network init, exploration, replay sampling, environment seeds)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """the JAX platform: auto is JAX's default (cuda when a CUDA jaxlib is installed), cpu or cuda"""
    xla_threads: int = 0
    """XLA CPU threads: 0 follows OMP_NUM_THREADS when it is set (the benchmark harness sets it per run), else XLA's
    default (one per core); N sizes XLA's pool to N threads, by starting the backend confined to N CPUs. Set when
    JAX's backend starts, once per Python process (docs/dqn_jax.md, detail 8)"""
    output_dir: str = "runs"
    """outputs go to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """the run directory name; default {env}__{exp_name}__{seed}__{unix time}"""
    save_model: bool = False
    """if toggled, save the Q-network to <run_dir>/model.msgpack (read back with flax.serialization.msgpack_restore,
    no pickle)"""
    eval_checkpoint: Optional[str] = None
    """path to a model.msgpack written by --save-model: skip training and only evaluate it on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 1000
    """log the plasticity/ diagnostics every this many gradient updates (0 disables them)"""
    metrics_batch_size: int = 256
    """size of the fresh replay batch the diagnostics are computed on"""
    log_every: int = 100
    """log losses, epsilon and SPS every this many gradient updates"""

    # --- environment ---
    env_id: str = "CartPole-v1"
    """the EnvPool task id (Atari: Pong-v5, Breakout-v5, ...; classic control: CartPole-v1, Acrobot-v1, ...) or a
    MinAtar game: MinAtar/Asterix, MinAtar/Breakout, MinAtar/Freeway, MinAtar/Seaquest, MinAtar/SpaceInvaders"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); all tasks must share observation and action
    spaces (Atari sequences use the full 18-action set; MinAtar sequences the full 6-action set, with observation
    channels zero-padded to 10, Seaquest's count)"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task)"""
    epsilon_per_task: bool = False
    """restart the exploration schedule at every task switch (default: one schedule over the whole run)"""
    total_timesteps: Optional[int] = None
    """total environment steps, summed over envs [default: Atari 50M agent steps = 200M frames (Dopamine);
    vector 500k (CleanRL); MinAtar 5M (MinAtar paper)]"""
    num_envs: int = 1
    """number of parallel EnvPool environments used for collection"""
    env_threads: Optional[int] = None
    """EnvPool worker threads (0: one per env up to the core count) [default: Atari 0; vector 1, since a cheap
    env step costs less than handing it to another thread; MinAtar steps in this process and ignores it]"""
    sticky_action_prob: Optional[float] = None
    """Atari and MinAtar: probability of repeating the previous action [default: Atari 0.25 (Dopamine/Machado et
    al. protocol); MinAtar 0.1 (minatar.Environment's default, the MinAtar paper)]"""
    episodic_life: bool = False
    """Atari only: treat life loss as terminal for learning (returns are still logged per full game)"""
    noop_max: int = 1
    """Atari only: maximum no-op actions at reset (Dopamine uses none; 1 is EnvPool's minimum)"""
    full_action_space: Optional[bool] = None
    """Atari: use all 18 actions; MinAtar: all 6 instead of the game's minimal set [default: Atari True for task
    sequences, else False; MinAtar True (the MinAtar paper's agents act with all 6 actions)]"""
    max_episode_steps: Optional[int] = None
    """episode cap in agent steps, a truncation [default: EnvPool's, 27000 = 108k frames for Atari; MinAtar none
    (the MinAtar paper; Freeway ends itself after 2500 steps)]"""

    # --- algorithm (None means the family default, resolved from the observation shape) ---
    learning_rate: Optional[float] = None
    """Adam learning rate [default: Atari 6.25e-5 (Dopamine); vector 2.5e-4 (CleanRL); MinAtar 2.5e-4 (the MinAtar
    paper's step size)]"""
    adam_eps: Optional[float] = None
    """Adam epsilon [default: Atari 1.5e-4 (Dopamine); vector 1e-8 (PyTorch/CleanRL); MinAtar 3.125e-4 (Dopamine's
    MinAtar Adam; the MinAtar paper uses centered RMSprop, docs/dqn.md detail 13)]"""
    buffer_size: Optional[int] = None
    """replay memory capacity in transitions [default: Atari 1M; vector 10k; MinAtar 100k]"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 1
    """n-step return length (1 is Dopamine's and CleanRL's DQN)"""
    batch_size: Optional[int] = None
    """minibatch size [default: Atari 32; vector 128; MinAtar 32]"""
    replay_ratio: Optional[float] = None
    """gradient updates per environment step [default: Atari 0.25 (update period 4); vector 0.1 (train frequency 10);
    MinAtar 1 (the MinAtar paper)]"""
    target_network_frequency: Optional[int] = None
    """environment steps between hard target-network copies [default: Atari 8000; vector 500; MinAtar 1000]"""
    start_e: float = 1.0
    """epsilon at the start of the exploration schedule"""
    end_e: Optional[float] = None
    """final exploration epsilon [default: Atari 0.01; vector 0.05; MinAtar 0.1]"""
    exploration_steps: Optional[int] = None
    """environment steps over which epsilon decays linearly, starting after learning_starts
    [default: Atari 250k; vector: until half of total_timesteps, as CleanRL's exploration_fraction 0.5; MinAtar 100k]"""
    learning_starts: Optional[int] = None
    """environment steps of uniform-random play before learning [default: Atari 20k; vector 10k; MinAtar 5000]"""
    eval_epsilon: Optional[float] = None
    """epsilon of the evaluation policy [default: Atari 0.001 (Dopamine); vector 0.05 (CleanRL); MinAtar 0.001
    (Dopamine's MinAtar; the MinAtar paper reports training returns only)]"""
    loss: Optional[Literal["mse", "huber"]] = None
    """TD regression loss [default: Atari mse (Dopamine's JAX DQN); vector mse (CleanRL); MinAtar huber (the
    MinAtar paper's smooth L1)]"""
    clip_rewards: Optional[bool] = None
    """clip rewards to [-1, 1] for learning [default: Atari True; vector False; MinAtar False (the MinAtar paper)]"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


# Family defaults: (Atari / pixels, Dopamine dqn.gin), (vector observations, CleanRL dqn.py) and (MinAtar, the
# MinAtar paper's examples/dqn.py). docs/dqn.md, details 1 and 13.
FAMILY_DEFAULTS = {
    "atari": dict(learning_rate=6.25e-5, adam_eps=1.5e-4, buffer_size=1_000_000, batch_size=32, replay_ratio=0.25,
                  target_network_frequency=8000, end_e=0.01, learning_starts=20_000, eval_epsilon=0.001,
                  clip_rewards=True, env_threads=0, total_timesteps=50_000_000, exploration_steps=250_000,
                  loss="mse", sticky_action_prob=0.25),
    "vector": dict(learning_rate=2.5e-4, adam_eps=1e-8, buffer_size=10_000, batch_size=128, replay_ratio=0.1,
                   target_network_frequency=500, end_e=0.05, learning_starts=10_000, eval_epsilon=0.05,
                   clip_rewards=False, env_threads=1, total_timesteps=500_000, loss="mse"),
    "minatar": dict(learning_rate=2.5e-4, adam_eps=3.125e-4, buffer_size=100_000, batch_size=32, replay_ratio=1.0,
                    target_network_frequency=1000, end_e=0.1, learning_starts=5000, eval_epsilon=0.001,
                    clip_rewards=False, env_threads=0, total_timesteps=5_000_000, exploration_steps=100_000,
                    loss="huber", sticky_action_prob=0.1),
}
# MinAtar games by env id (minatar.Environment names). Observations are (channels, 10, 10) 0/1 grids (detail 13).
MINATAR_GAMES = {"MinAtar/Asterix": "asterix", "MinAtar/Breakout": "breakout", "MinAtar/Freeway": "freeway",
                 "MinAtar/Seaquest": "seaquest", "MinAtar/SpaceInvaders": "space_invaders"}
MINATAR_CHANNELS = 10  # the most any game has (Seaquest): task sequences pad every game to it


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the family defaults; returns (tasks, family, spec)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    minatar = tasks[0].startswith("MinAtar/")  # MinAtar games come from the minatar package, not EnvPool (detail 13)
    if any(task.startswith("MinAtar/") != minatar for task in tasks):
        raise UserError(f"a task sequence cannot mix MinAtar and EnvPool ids: {' '.join(tasks)}")
    known = list(MINATAR_GAMES) if minatar else envpool.list_all_envs()
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else " (see envpool.list_all_envs())"
            hint = f" (MinAtar games: {', '.join(MINATAR_GAMES)})" if minatar else hint
            raise UserError(f"unknown env id '{task}'{hint}")
    if args.full_action_space is None:  # MinAtar: all 6 actions, as the MinAtar paper's agents (detail 13)
        args.full_action_space = len(tasks) > 1 or minatar
    specs = [MinAtarVecEnv(MINATAR_GAMES[task], 1, [0], 0.0, args.full_action_space, len(tasks) > 1) if minatar
             else envpool.make_spec(task) for task in tasks]
    spaces = set()
    for task, spec in zip(tasks, specs):
        if type(spec.action_space).__name__ != "Discrete":
            raise UserError(f"dqn_jax.py needs a discrete action space; {task} has {spec.action_space}")
        shape = getattr(spec.observation_space, "shape", None)
        if shape is None or len(shape) not in (1, 3):
            raise UserError(f"dqn_jax.py supports vector or stacked-image observations; {task} has {spec.observation_space}")
        spaces.add(tuple(shape))
    if len(spaces) > 1:
        raise UserError(f"all tasks of --env-ids must share the observation shape; got {sorted(spaces)}")
    family = "minatar" if minatar else ("atari" if len(next(iter(spaces))) == 3 else "vector")
    if family == "atari":  # the full action set is a make() option, so ask EnvPool for the set each task will use
        specs = [envpool.make_spec(task, full_action_space=args.full_action_space) for task in tasks]
    if len({spec.action_space.n for spec in specs}) > 1:
        raise UserError("all tasks of --env-ids must share the action space (Atari: use --full-action-space)")
    for key, value in FAMILY_DEFAULTS[family].items():
        if getattr(args, key) is None and key != "total_timesteps":
            setattr(args, key, value)
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or FAMILY_DEFAULTS[family]["total_timesteps"]
    if args.exploration_steps is None:  # vector: epsilon reaches end_e at half of the run (CleanRL)
        args.exploration_steps = max(1, args.total_timesteps // 2 - args.learning_starts)
    for name in ("num_envs", "batch_size", "buffer_size", "n_step", "target_network_frequency", "total_timesteps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.replay_ratio < 0 or not 0 <= args.end_e <= args.start_e <= 1:
        raise UserError("need --replay-ratio >= 0 and 0 <= end-e <= start-e <= 1")
    if args.device == "cuda" and not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        raise UserError("--device cuda, but no CUDA build of jaxlib is installed (pip install jax[cuda12], or use "
                        "--device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    if args.buffer_size // args.num_envs <= args.n_step + 4:
        raise UserError("--buffer-size is too small for --num-envs and --n-step")
    return tasks, family



def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True):
    """An EnvPool Gymnasium vector env. Atari follows the Dopamine protocol (docs/dqn.md, detail 2). MinAtar ids
    get MinAtarVecEnv, which behaves like EnvPool (detail 13)."""
    if env_id in MINATAR_GAMES:
        return MinAtarVecEnv(MINATAR_GAMES[env_id], num_envs, seeds, args.sticky_action_prob, args.full_action_space,
                             len(args.env_ids) > 1, args.max_episode_steps)
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads or 0)
    config_keys = envpool.make_spec(env_id).config._fields
    atari = dict(
        episodic_life=args.episodic_life and train,  # evaluation always plays full games
        reward_clip=False,  # rewards are clipped in the agent, so the env's reward stays the raw score
        repeat_action_probability=args.sticky_action_prob,
        noop_max=args.noop_max,
        use_fire_reset=False,  # Dopamine does not press FIRE at reset
        full_action_space=args.full_action_space,
    )
    kwargs.update({k: v for k, v in atari.items() if k in config_keys})
    if args.max_episode_steps is not None:
        kwargs["max_episode_steps"] = args.max_episode_steps
    return envpool.make(env_id, **kwargs)


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct EnvPool seeds per run, task and purpose. EnvPool gives env i the seed `seed + i` when given an int,
    so runs with seeds 1 and 2 would share num_envs - 1 environments; we pass an explicit list instead."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


class MinAtarVecEnv:
    """`num_envs` MinAtar games behind the EnvPool interface this script relies on (docs/dqn.md, detail 13).

    Each env is a `minatar.Environment` (its own sticky actions, seeded with `seeds[i]`). Observations are the
    game's (10, 10, C) bool grid as (C, 10, 10) uint8, channels zero-padded to MINATAR_CHANNELS with `pad_channels`
    (task sequences). Actions index the game's minimal action set, or all 6 actions with `full_action_space`.
    Like EnvPool, an env auto-resets on the step *after* its episode ended: that step ignores the action and
    returns the new episode's first observation with reward 0. `max_episode_steps` truncates an episode."""

    def __init__(self, game: str, num_envs: int, seeds: list[int], sticky_action_prob: float,
                 full_action_space: bool, pad_channels: bool, max_episode_steps: Optional[int] = None):
        import gymnasium
        import minatar

        self.games = [minatar.Environment(game, sticky_action_prob=sticky_action_prob) for _ in range(num_envs)]
        for env, seed in zip(self.games, seeds):
            env.seed(seed)  # seeds the game's dynamics and its sticky-action coin (one RandomState)
        self.action_set = list(range(6)) if full_action_space else self.games[0].minimal_action_set()
        self.game_channels = self.games[0].n_channels
        channels = MINATAR_CHANNELS if pad_channels else self.game_channels
        self.observation_space = gymnasium.spaces.Box(0, 1, (channels, 10, 10), np.uint8)
        self.action_space = gymnasium.spaces.Discrete(len(self.action_set))
        self.max_episode_steps = max_episode_steps
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.done = np.zeros(num_envs, dtype=bool)

    def observe(self) -> np.ndarray:
        obs = np.zeros((len(self.games), *self.observation_space.shape), dtype=np.uint8)
        obs[:, : self.game_channels] = np.stack([env.state() for env in self.games]).transpose(0, 3, 1, 2)
        return obs

    def reset(self):
        for env in self.games:
            env.reset()
        self.lengths[:], self.done[:] = 0, False
        return self.observe(), {}

    def step(self, actions):
        n = len(self.games)
        reward = np.zeros(n, dtype=np.float32)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for i, env in enumerate(self.games):
            if self.done[i]:  # EnvPool-style auto-reset step: the action is ignored
                env.reset()
                self.lengths[i] = 0
                continue
            reward[i], terminated[i] = env.act(self.action_set[int(actions[i])])
            self.lengths[i] += 1
        if self.max_episode_steps is not None:
            truncated = ~terminated & ~self.done & (self.lengths >= self.max_episode_steps)
        self.done = terminated | truncated
        return self.observe(), reward, terminated, truncated, {}

    def close(self):
        pass


class ReplayBuffer:
    """Replay memory storing every frame once (docs/dqn.md, detail 3).

    Row t of the per-env ring holds the newest frame of obs_t, a_t, r_t and the flags of the step taken from obs_t.
    The next observation of a transition is row t+1, so no frame is stored twice; stacked Atari observations are
    rebuilt from the last `stack` rows, repeating the first frame of an episode as EnvPool does at a reset.
    `valid[t]` is False for EnvPool's auto-reset step (obs_t is a final observation, its action is ignored), so
    that pseudo-transition is never sampled. `first[t]` marks the first observation after a full reset.
    `stacked`: observations are frame stacks (Atari); otherwise each observation is stored whole (vectors, and
    MinAtar grids as uint8).
    """

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, stacked: bool):
        self.rows = capacity // num_envs
        self.num_envs = num_envs
        self.stack = obs_shape[0] if stacked else 1
        frame_shape = obs_shape[1:] if stacked else obs_shape
        self.frames = np.zeros((self.rows, num_envs, *frame_shape), dtype=obs_dtype)
        self.actions = np.zeros((self.rows, num_envs), dtype=np.int64)
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
        self.frames[p] = obs[:, -1] if self.stack > 1 else obs
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
        self.add(obs, zeros, zeros, zeros, zeros, first, np.zeros(self.num_envs, dtype=bool))

    def sampleable(self, n_step: int) -> int:
        """Number of rows transitions can start from: each needs its next n rows written (and, once the ring has
        wrapped, its `stack - 1` predecessors intact)."""
        size = self.rows if self.full else self.pos
        return max(0, size - n_step - (self.stack - 1 if self.full else 0))

    def stacked(self, rows, envs):
        if self.stack == 1:
            return self.frames[rows, envs]
        idx = np.empty((len(rows), self.stack), dtype=np.int64)
        idx[:, -1] = rows
        for d in range(self.stack - 2, -1, -1):  # walk back, but never past the first frame of an episode
            nxt = idx[:, d + 1]
            idx[:, d] = np.where(self.first[nxt, envs], nxt, (nxt - 1) % self.rows)
        return self.frames[idx, envs[:, None]]

    def sample(self, batch_size: int, rng: np.random.Generator, n_step: int = 1, gamma: float = 0.99):
        """Uniform over stored real transitions; returns obs, actions, n-step returns, bootstrap discounts
        (gamma^m, or 0 after a termination) and the observation to bootstrap from."""
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


class SummaryWriter:
    """TensorBoard scalars and text without torch or TensorFlow, through tensorboard's own event-file writer (the
    torch scripts use torch.utils.tensorboard, which writes the same events)."""

    def __init__(self, log_dir: str):
        self.writer = EventFileWriter(log_dir)

    def add_scalar(self, tag: str, value, step: int):
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self.writer.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_text(self, tag: str, text: str, step: int = 0):
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        value = Summary.Value(tag=tag + "/text_summary", metadata=metadata, tensor=tensor)
        self.writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=[value])))

    def close(self):
        self.writer.close()


def start_jax(device: str, threads: int):
    """Choose the JAX platform and start its backend with `threads` XLA CPU threads (0: XLA's default, one per core).
    XLA sizes its CPU thread pool by the CPUs the process may run on when the backend starts; it ignores
    OMP_NUM_THREADS, and jax 0.10 ignores the `intra_op_parallelism_threads` flag (measured: a 2000 x 2000 matmul
    loop ran on both cores with it). So the process is confined to `threads` of its CPUs while the backend starts,
    then every thread, XLA's pool included, gets all of them back: a pool of `threads` threads that the OS may
    place on any core. In one Python process the backend starts once; later calls change nothing
    (docs/dqn_jax.md, detail 8)."""
    if device != "auto":
        jax.config.update("jax_platforms", device)
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not threads or threads >= len(allowed):
        jax.devices()
        return
    os.sched_setaffinity(0, sorted(allowed)[:threads])
    try:
        jax.devices()  # starts the backend: its CPU thread pool is sized now
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), allowed)
            except OSError:  # a thread that has ended meanwhile
                pass

def resolved_threads(args: Args) -> int:
    """--xla-threads, or OMP_NUM_THREADS when it is 0 (the benchmark harness sets OMP_NUM_THREADS per run)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return args.xla_threads or (int(omp) if omp.isdigit() else 0)


# Parameter init with the distributions of dqn.py's layers (docs/dqn_jax.md, detail 2). PyTorch's default Linear
# and Conv2d init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) weights and U(+-1/sqrt(fan_in)) biases.
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class QNetwork(nn.Module):
    """dqn.py's QNetwork in flax linen, with its layer names (fc1, conv1, ..., q): the Nature CNN (pixels, Dopamine:
    SAME padding, xavier_uniform, zero bias), CleanRL's 120-84 MLP (vectors), or with `minatar` the MinAtar paper's
    network (one 3x3 conv of 16 channels, stride 1, VALID, then 128 units; PyTorch default init).

    `apply(params, x)` returns (Q-values, hidden): every hidden ReLU output in forward order (conv outputs NHWC);
    unused outputs cost nothing under jit. `perturb` (one zero array per hidden output) is added to the hidden
    outputs so that the diagnostics can take the loss gradient with respect to them (detail 6)."""

    obs_shape: tuple
    n_actions: int
    minatar: bool = False

    def hidden_layers(self) -> list[str]:
        """Names of the layers whose ReLU outputs are the hidden units, in forward order (dqn.py's names)."""
        if self.minatar:
            return ["conv1", "fc1"]
        return ["conv1", "conv2", "conv3", "fc1"] if len(self.obs_shape) == 3 else ["fc1", "fc2"]

    @nn.compact
    def __call__(self, x, perturb=None):
        pixel = len(self.obs_shape) == 3 and not self.minatar
        hidden = []

        def relu(z):
            h = nn.relu(z)
            if perturb is not None:
                h = h + perturb[len(hidden)]
            hidden.append(h)
            return h

        def dense(features: int, name: str, x):
            if pixel:  # Dopamine's NatureDQNNetwork: xavier_uniform, zero bias
                return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), name=name)(x)
            return nn.Dense(features, kernel_init=TORCH_DEFAULT_KERNEL, bias_init=torch_default_bias(x.shape[-1]),
                            name=name)(x)

        def flatten(x):  # NHWC -> NCHW before flattening: fc1's kernel is dqn.py's fc1.weight transposed (detail 2)
            return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)

        if self.minatar:  # 0/1 grids, used as they are (docs/dqn.md, detail 13)
            x = jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))  # NCHW (EnvPool's layout) -> NHWC (XLA's conv)
            fan_in = x.shape[-1] * 9
            x = relu(nn.Conv(16, (3, 3), (1, 1), padding="VALID", kernel_init=TORCH_DEFAULT_KERNEL,
                             bias_init=torch_default_bias(fan_in), name="conv1")(x))
            x = relu(dense(128, "fc1", flatten(x)))
        elif pixel:  # uint8 frames travel as bytes and are scaled here (docs/dqn.md, detail 10)
            x = jnp.transpose(x.astype(jnp.float32) / 255.0, (0, 2, 3, 1))
            for i, (out, k, s) in enumerate([(32, 8, 4), (64, 4, 2), (64, 3, 1)], start=1):
                # flax's "SAME" is TensorFlow's (the extra pixel after), as dqn.py's same_padding and Dopamine
                x = relu(nn.Conv(out, (k, k), (s, s), padding="SAME", kernel_init=nn.initializers.xavier_uniform(),
                                 name=f"conv{i}")(x))
            x = relu(dense(512, "fc1", flatten(x)))
        else:
            x = relu(dense(120, "fc1", x.astype(jnp.float32).reshape(x.shape[0], -1)))
            x = relu(dense(84, "fc2", x))
        return dense(self.n_actions, "q", x), hidden


def td_loss(q_network, params, target_params, obs, actions, returns, discounts, next_obs, loss_type: str,
            perturb=None):
    """dqn.py's td_loss on flax parameters: returns (loss, (q_taken, hidden))."""
    next_q, _ = q_network.apply(target_params, next_obs)
    target = jax.lax.stop_gradient(returns + discounts * next_q.max(axis=1))
    q_values, hidden = q_network.apply(params, obs, perturb)
    q_taken = jnp.take_along_axis(q_values, actions[:, None].astype(jnp.int32), axis=1)[:, 0]
    diff = q_taken - target
    if loss_type == "mse":  # F.mse_loss
        loss = jnp.mean(diff**2)
    else:  # F.smooth_l1_loss with beta 1 (Huber with delta 1)
        loss = jnp.mean(jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff**2, jnp.abs(diff) - 0.5))
    return loss, (q_taken, hidden)


def train_steps(q_network, optimizer, loss_type: str, params, opt_state, target_params, batches):
    """k gradient updates, one per batch of `batches` (each array has a leading axis k), in one jitted call (detail 4).
    Returns the new params and optimizer state and each update's loss and mean Q(s, a)."""
    grad_fn = jax.value_and_grad(td_loss, argnums=1, has_aux=True)
    losses, q_means = [], []
    # A Python loop (k copies of the update in one XLA program), not lax.scan: XLA's CPU backend runs convolutions
    # inside a while loop about 10x slower than at the top level (the Nature CNN: 1.15 s against 0.11 s an update,
    # even with scan's unroll=True, which keeps a one-trip loop), and k is small (at most ceil(replay ratio x envs)).
    for i in range(batches[0].shape[0]):
        batch = [x[i] for x in batches]
        (loss, (q_taken, _)), grads = grad_fn(q_network, params, target_params, *batch, loss_type)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
        q_means.append(q_taken.mean())
    return params, opt_state, jnp.stack(losses), jnp.stack(q_means)


def greedy_actions(q_network, params, obs):
    return jnp.argmax(q_network.apply(params, obs)[0], axis=1)


def unit_scores(x):
    """ReDo's layer-normalised score per unit (a conv channel is one unit): mean |x| over batch (and space),
    divided by the layer's mean of that quantity."""
    per_unit = jnp.abs(x).mean(axis=(0, 1, 2)) if x.ndim == 4 else jnp.abs(x).mean(axis=0)  # NHWC: channels last
    return per_unit / (per_unit.mean() + 1e-9)


def srank(features, delta: float = 0.01):
    """Effective rank of Kumar et al. (2021): the fewest singular values holding 1 - delta of their sum."""
    sv = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)
    cumulative = jnp.cumsum(sv) / jnp.maximum(sv.sum(), 1e-12)
    return (cumulative < 1 - delta).sum() + 1


def plasticity_metrics(q_network, params, target_params, batch, loss_type: str, taus=(0.0, 0.1)) -> dict:
    """The plasticity/ diagnostics of docs/conventions.md on one replay batch (docs/dqn.md, detail 7), as arrays (the
    caller jits this and fetches the dict at once). The gradient w.r.t. each hidden output is taken through a zero
    `perturb` added to it (detail 6)."""
    _, hidden = q_network.apply(params, batch[0])
    perturb = [jnp.zeros_like(h) for h in hidden]
    grad_fn = jax.grad(lambda p, e: td_loss(q_network, p, target_params, *batch, loss_type, e), argnums=(0, 1),
                       has_aux=True)
    (param_grads, hidden_grads), (_, hidden) = grad_fn(params, perturb)
    metrics, totals = {}, {}
    for name, h, g in zip(q_network.hidden_layers(), hidden, hidden_grads):
        # GraMa scores the gradient through the ReLU (w.r.t. the pre-activation), so a dead unit scores 0
        act_score, grad_score = unit_scores(h), unit_scores(g * (h > 0))
        for tau in taus:
            for kind, score in (("dormant", act_score), ("grad_inactive", grad_score)):
                key = f"{kind}_tau{tau:g}"
                frac = (score <= tau).astype(jnp.float32)
                metrics[f"plasticity/{key}/{name}"] = frac.mean()
                count, units = totals.get(key, (0.0, 0))
                totals[key] = (count + frac.sum(), units + frac.size)
    for key, (count, units) in totals.items():
        metrics[f"plasticity/{key}"] = count / units
    features = hidden[-1].reshape(hidden[-1].shape[0], -1)
    metrics["plasticity/srank"] = srank(features)
    metrics["plasticity/feature_norm"] = jnp.linalg.norm(features, axis=1).mean()
    metrics["plasticity/param_norm"] = jnp.sqrt(sum((p**2).sum() for p in jax.tree.leaves(params)))
    metrics["plasticity/grad_norm"] = jnp.sqrt(sum((g**2).sum() for g in jax.tree.leaves(param_grads)))
    return metrics


@functools.lru_cache(maxsize=None)
def jitted_functions(q_network: QNetwork, loss_type: str, learning_rate: float, adam_eps: float):
    """The optimizer and the jitted hot paths of run() (detail 4): the greedy action, k updates (parameters and
    optimizer state donated), the diagnostics. The network and the settings are closed over, so shapes alone decide
    compilation: each compiles once per shape. Cached, so that runs in one process (the tests) share compilations."""
    optimizer = optax.adam(learning_rate, eps=adam_eps)  # torch.optim.Adam's update, eps outside the square root
    act = jax.jit(functools.partial(greedy_actions, q_network))
    train = jax.jit(functools.partial(train_steps, q_network, optimizer, loss_type), donate_argnums=(0, 1))
    metrics = jax.jit(functools.partial(plasticity_metrics, q_network, loss_type=loss_type))
    return optimizer, act, train, metrics


def evaluate(act, params, env_id: str, args: Args, episodes: int, epsilon: float, seed: int) -> list[float]:
    """Play `episodes` full games in parallel, one per EnvPool env (so short games are not over-represented),
    with an epsilon-greedy policy; returns the full-game, unclipped returns. `act` is the jitted greedy policy."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False)
    rng = np.random.default_rng(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        actions = np.array(act(params, obs), dtype=np.int64)
        explore = rng.random(episodes) < epsilon
        actions[explore] = rng.integers(0, envs.action_space.n, int(explore.sum()))
        obs, reward, terminated, truncated, info = envs.step(actions)
        _, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        prev_done = terminated | truncated
        for i, ret, _ in finished:
            if np.isnan(returns[i]):
                returns[i] = ret
    envs.close()
    return returns.tolist()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "envpool", "gymnasium", "ale-py", "tyro", "tensorboard"):
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



def peak_gpu_memory_mb() -> Optional[float]:
    """Peak device memory where the backend reports it (GPUs); None on the CPU, whose backend reports none."""
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def read_checkpoint(path: str, task: str) -> dict:
    """An --eval-checkpoint file, read with flax.serialization.msgpack_restore only (arrays and plain containers: a
    file can never run code) and checked to be a --save-model checkpoint trained on `task` (docs/conventions.md,
    section 10; docs/dqn_jax.md, detail 9)."""
    try:
        with open(path, "rb") as f:
            checkpoint = flax.serialization.msgpack_restore(f.read())
    except Exception as err:  # empty, corrupt or not msgpack
        raise UserError(f"--eval-checkpoint {path}: not a msgpack file flax can read ({type(err).__name__})") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and {"model", "obs_shape", "n_actions"} <= checkpoint.keys()):
        raise UserError(f"--eval-checkpoint {path}: not a checkpoint written by --save-model")
    trained_on = checkpoint["args"].get("env_ids") or [checkpoint["args"].get("env_id")]
    if task not in trained_on:
        raise UserError(f"--eval-checkpoint {path}: trained on {' '.join(map(str, trained_on))}, not on {task}")
    return checkpoint


def load_weights(params: dict, checkpoint: dict, path: str) -> dict:
    """The checkpoint's parameters in place of `params` once every parameter path ("fc1/kernel") and shape agrees: a
    checkpoint of another network (another script, other flags) is one line naming what differs."""
    model = checkpoint["model"] if isinstance(checkpoint["model"], dict) else {}
    ours = {key: tuple(value.shape) for key, value in flatten_dict(params["params"], sep="/").items()}
    theirs = {key: tuple(getattr(value, "shape", ("?",))) for key, value in flatten_dict(model, sep="/").items()}
    differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differ:
        raise UserError(f"--eval-checkpoint {path}: written by {checkpoint.get('script', 'another script')}, whose "
                        f"network differs from the one these flags build (in {', '.join(differ[:3])}"
                        f"{', ...' * (len(differ) > 3)})")
    return {"params": jax.tree.map(jnp.asarray, unflatten_dict(flatten_dict(model, sep="/"), sep="/"))}


def save_checkpoint(path: str, params: dict, obs_shape, n_actions: int, args: Args):
    """model.msgpack (docs/dqn_jax.md, detail 9), written atomically: flax.serialization.msgpack_serialize of plain
    containers and NumPy arrays, readable without pickle."""
    data = flax.serialization.msgpack_serialize({
        "script": os.path.basename(__file__),  # named in load_weights' errors
        "model": jax.tree.map(np.asarray, jax.device_get(params["params"])), "obs_shape": list(obs_shape),
        "n_actions": int(n_actions), "args": json.loads(json.dumps(dataclasses.asdict(args)))})
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def run(args: Args) -> dict:
    start_jax(args.device, resolved_threads(args))  # before anything starts JAX's backend (detail 8)
    tasks, family = resolve_args(args)
    label = tasks[0].replace("/", "-") if len(tasks) == 1 else "seq"  # MinAtar/Breakout: a name, not a path
    run_name = args.run_name or f"{label}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
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
    key = jax.random.PRNGKey(args.seed)  # network init; exploration and sampling use rng below (detail 7)
    key, init_key = jax.random.split(key)
    rng = np.random.default_rng(args.seed)
    metrics_rng = np.random.default_rng([args.seed, 1])  # diagnostics draw their own batches: they never change a run
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], args.num_envs, env_seeds(args.seed, 0, 0, args.num_envs), args)
        obs_shape, n_actions = envs.observation_space.shape, int(envs.action_space.n)
        network = dict(minatar=family == "minatar")  # QNetwork's settings; an intervention adds its own below
        q_network = QNetwork(tuple(obs_shape), n_actions, **network)
        params = q_network.init(init_key, jnp.zeros((1, *obs_shape), envs.observation_space.dtype))
        optimizer, act, train, metrics_fn = jitted_functions(q_network, args.loss, args.learning_rate, args.adam_eps)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0])
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (tuple(obs_shape), n_actions):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and {n_actions}")
            params = load_weights(params, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(act, params, tasks[0], args, args.eval_episodes, args.eval_epsilon, args.seed)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        # the target network gets its own buffers: the update donates the online parameters' (detail 4)
        copy_params = functools.partial(jax.tree.map, lambda x: jnp.array(x, copy=True))
        target_params = copy_params(params)
        opt_state = optimizer.init(params)
        rb = ReplayBuffer(args.buffer_size, args.num_envs, obs_shape, envs.observation_space.dtype, family == "atari")
        stats = EpisodeStats(args.num_envs)
        last_loss = None  # the newest logged loss, on the device: checked for divergence when fetched (detail 5)

        def check_finite(loss):
            value = float(loss)
            if not math.isfinite(value):
                raise Diverged(f"non-finite TD loss ({value}) at global_step={global_step}")
            return value

        obs, _ = envs.reset()
        first = np.ones(args.num_envs, dtype=bool)  # obs is the first observation after a full reset
        prev_done = np.zeros(args.num_envs, dtype=bool)  # last step ended an episode: this step is an auto-reset
        prev_game_over = np.zeros(args.num_envs, dtype=bool)
        task_index, task_start = 0, 0
        update_credit, next_target_sync, next_eval = 0.0, args.target_network_frequency, args.eval_every
        while global_step < args.total_timesteps:
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch (docs/dqn.md, detail 6): cut the replay streams, drop unfinished episodes, new env.
                rb.end_episodes(obs, first)
                envs.close()
                task_index, task_start = task_index + 1, global_step
                envs = make_env(tasks[task_index], args.num_envs,
                                env_seeds(args.seed, task_index, 0, args.num_envs), args)
                obs, _ = envs.reset()
                first[:], prev_done[:], prev_game_over[:] = True, False, False
                stats = EpisodeStats(args.num_envs)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")

            # Epsilon: 1 during warm-up, then linear decay to end_e (Dopamine's linearly_decaying_epsilon).
            progress_step = global_step - (task_start if args.epsilon_per_task else 0) - args.learning_starts
            epsilon = max(args.end_e, args.start_e - (args.start_e - args.end_e) * progress_step / args.exploration_steps)
            epsilon = args.start_e if progress_step < 0 else epsilon
            coins = rng.random((2, args.num_envs))  # one generator call per step: explore? and a random action
            explore = coins[0] < epsilon
            actions = (coins[1] * n_actions).astype(np.int64)
            if not explore.all():  # skip the forward pass when every env explores
                actions = np.where(explore, actions, np.asarray(act(params, obs)))

            next_obs, reward, terminated, truncated, info = envs.step(actions)
            global_step += args.num_envs
            learn_reward = np.clip(reward, -1.0, 1.0) if args.clip_rewards else reward
            rb.add(obs, actions, learn_reward, terminated, truncated, first, ~prev_done)
            game_over, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            # next_obs is a fresh reset iff this step was the auto-reset step after a game over
            first = prev_done & prev_game_over
            prev_done, prev_game_over = terminated | truncated, game_over
            obs = next_obs

            if global_step > args.learning_starts:
                update_credit += args.replay_ratio * args.num_envs
                batches = []
                while update_credit >= 1.0 and rb.sampleable(args.n_step) > 0:
                    update_credit -= 1.0  # sampled ahead in dqn.py's order: the memory does not change meanwhile
                    batches.append(rb.sample(args.batch_size, rng, args.n_step, args.gamma))
                while batches:  # one jitted call per run of updates, cut at the diagnostics points (detail 4)
                    k = len(batches)
                    if args.metrics_every:
                        k = min(k, args.metrics_every - num_updates % args.metrics_every)
                    chunk, batches = batches[:k], batches[k:]
                    stacked = jax.device_put(tuple(np.stack(field) for field in zip(*chunk)))
                    params, opt_state, losses, q_means = train(params, opt_state, target_params, stacked)
                    logged = [i for i in range(k) if (num_updates + i + 1) % args.log_every == 0]
                    num_updates += k
                    if logged:
                        losses, q_means = np.asarray(losses), np.asarray(q_means)
                        for i in logged:
                            check_finite(losses[i])
                            step_updates = num_updates - k + i + 1
                            sps = int(global_step / (time.time() - start_time))
                            writer.add_scalar("losses/td_loss", losses[i], global_step)
                            writer.add_scalar("losses/q_values", q_means[i], global_step)
                            writer.add_scalar("charts/epsilon", epsilon, global_step)
                            writer.add_scalar("charts/SPS", sps, global_step)
                            writer.add_scalar("charts/num_updates", step_updates, global_step)
                    last_loss = losses[-1]
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        check_finite(last_loss)
                        metrics_batch = rb.sample(args.metrics_batch_size, metrics_rng, args.n_step, args.gamma)
                        metrics = jax.device_get(metrics_fn(params, target_params, jax.device_put(metrics_batch)))
                        for key, value in metrics.items():
                            writer.add_scalar(key, value, global_step)
            if global_step >= next_target_sync:  # hard copy every target_network_frequency env steps
                target_params = copy_params(params)
                next_target_sync += args.target_network_frequency
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(act, params, tasks[task_index], args, args.eval_episodes, args.eval_epsilon,
                                   args.seed + global_step)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
        envs.close()
        if last_loss is not None:
            check_finite(last_loss)  # the updates since the last logging point (detail 5)
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.msgpack")
            save_checkpoint(model_path, params, obs_shape, n_actions, args)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(act, params, tasks[-1], args, args.eval_episodes, args.eval_epsilon, args.seed)
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
            peak_gpu_memory_mb=peak_gpu_memory_mb())
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
