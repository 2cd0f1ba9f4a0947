"""DQN + C-CHAIN (Continual Churn Approximated Reduction) on EnvPool.

Paper: "Mitigating Plasticity Loss in Continual Reinforcement Learning by Reducing Churn", Tang, Obando-Ceron,
Castro, Courville, Berseth, ICML 2025, https://arxiv.org/abs/2506.00592. Official code: bluecontra/C-CHAIN; the DQN
variant is `crl_minatar/agents/double_dqn_c_chain.py` (Double DQN on a MinAtar task sequence; read at 2f8bedf).

Method: churn is the change an update makes to the network's outputs on states that were not in its minibatch.
C-CHAIN adds a churn penalty to the TD loss: lambda * L_reg, L_reg = MSE(Q_theta(x_reg), Q_ref(x_reg)) over all
actions, on a batch x_reg drawn from the replay memory independently of the training batch (same size), where Q_ref
is the network as it was one optimizer step ago (no gradient through it). Both losses go through one backward pass
and one Adam step; the penalty is off at the first update (there is no older network yet). lambda starts at 50 and,
from update 10k on, is set after every update to beta * mean|L_TD| / (mean L_reg + 1e-8) over the last 50k updates,
beta = 0.01 (the target ratio of the two losses); it is never reset, also not at a task switch.

Differences from the base script (`diff algos/dqn.py algos/dqn_cchain.py` shows exactly these):
  - flags `--cchain` (on), `--cchain-beta` (0.01), `--cchain-lambda-init` (50), `--cchain-adapt-start` (10k
    updates), `--cchain-window` (50k updates) and `--cchain-adapt`, checked in `resolve_args`;
  - `--double-q` (default off, dqn.py's target): the Double DQN target, because the official MinAtar base is Double
    DQN (a `QNetwork` setting read by `td_loss`, so the plasticity/ diagnostics use the same loss);
  - `cchain_reg_loss`, `cchain_copy_`, `churn_metrics`, `WindowMean` and `CChainLambda`: the regulariser against
    one lagged copy of the parameters (not a list of deep copies), the churn diagnostics and the adaptive lambda;
  - in the training loop: the regulariser added to the TD loss before the backward pass (on its own replay batch
    and generator), the lagged copy taken before every optimizer step, and the `churn/` and `cchain/` logs (churn
    on a third batch with a third generator). With `--no-cchain` the run is dqn.py's, draw for draw; the lagged
    copy and the logs stay (the base arm of a suite).

Base script: algos/dqn.py (DQN with Dopamine's JAX DQN configuration on Atari, CleanRL's on vector tasks, the MinAtar
paper's network on MinAtar; docs/dqn.md). Docs: docs/dqn_cchain.md. Conventions every script follows:
docs/conventions.md.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
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
from collections import OrderedDict
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# EnvPool declares float64 Box bounds that gymnasium casts to float32 with a warning on every env creation: noise.
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
    """if toggled, save the Q-network to <run_dir>/model.pt (loadable with torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate it on --env-id"""
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

    # --- C-CHAIN (docs/dqn_cchain.md, "Hyperparameters") ---
    cchain: bool = True
    """add C-CHAIN's churn penalty lambda * MSE(Q(x_reg), Q_ref(x_reg)) to the TD loss; --no-cchain switches it off
    (the run is then dqn.py's; churn/ diagnostics are still logged) [official code:
    crl_minatar/agents/double_dqn_c_chain.py]"""
    cchain_beta: float = 0.01
    """beta, the target ratio of the penalty to the TD loss in the adaptive lambda [official code: MinAtar
    target_rel_loss_scale 0.01 (crl_minatar/crl_run_double_dqn_c_chain.py)]"""
    cchain_lambda_init: float = 50.0
    """lambda until the adaptation starts (and always with --no-cchain-adapt) [official code: reg_coef = 50,
    crl_minatar/agents/double_dqn_c_chain.py]"""
    cchain_adapt_start: int = 10_000
    """gradient updates before lambda adapts (from this update on, across tasks) [official code: update_cnt >= 10000,
    crl_minatar/agents/double_dqn_c_chain.py]"""
    cchain_window: int = 50_000
    """gradient updates averaged by the adaptive lambda: the last this many TD and penalty losses [official code:
    the last 50000, crl_minatar/agents/double_dqn_c_chain.py]"""
    cchain_adapt: bool = True
    """adapt lambda = beta * mean|L_TD| / (mean L_reg + 1e-8) after every update; --no-cchain-adapt keeps lambda at
    --cchain-lambda-init (CHAIN's fixed coefficient) [official code: crl_minatar/agents/double_dqn_c_chain.py]"""
    double_q: bool = False
    """Double DQN target (the online network picks the next action, the target network values it), not part of
    C-CHAIN: the official MinAtar base is Double DQN [official code: crl_minatar/agents/double_dqn_c_chain.py];
    default off, dqn.py's target (docs/dqn_cchain.md, detail 7)"""


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
            raise UserError(f"dqn.py needs a discrete action space; {task} has {spec.action_space}")
        shape = getattr(spec.observation_space, "shape", None)
        if shape is None or len(shape) not in (1, 3):
            raise UserError(f"dqn.py supports vector or stacked-image observations; {task} has {spec.observation_space}")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    if args.buffer_size // args.num_envs <= args.n_step + 4:
        raise UserError("--buffer-size is too small for --num-envs and --n-step")
    if not (args.cchain_beta >= 0 and args.cchain_lambda_init >= 0):  # C-CHAIN (docs/dqn_cchain.md, detail 9)
        bad = "--cchain-beta" if not args.cchain_beta >= 0 else "--cchain-lambda-init"
        raise UserError(f"{bad} must be >= 0 (got {getattr(args, bad[2:].replace('-', '_'))})")
    if args.cchain_window < 1:
        raise UserError(f"--cchain-window must be >= 1 (got {args.cchain_window})")
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


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding (the extra pixel goes after), as Dopamine's Nature CNN uses."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class QNetwork(nn.Module):
    """Nature CNN (pixels, Dopamine: SAME padding, xavier_uniform, zero bias), CleanRL's 120-84 MLP (vectors), or
    with `minatar` the MinAtar paper's network (one 3x3 conv of 16 channels, stride 1, VALID, then 128 units).

    One nn.Sequential whose hidden layers are (Linear|Conv2d, ReLU) pairs, so interventions and diagnostics can
    walk it (`hidden_layers`); `forward(x, return_hidden=True)` also returns every ReLU output."""

    def __init__(  # one parameter per line: an intervention adds its own (docs/conventions.md, section 9)
        self,
        obs_shape: tuple,
        n_actions: int,
        minatar: bool = False,
        double_q: bool = False,
    ):
        super().__init__()
        self.double_q = double_q  # td_loss's target: Double DQN (--double-q; docs/dqn_cchain.md, detail 7)
        self.pixel = len(obs_shape) == 3 and not minatar  # Atari frames: uint8 scaled by 1/255 in forward
        if minatar:  # 0/1 grids, used as they are; PyTorch default init as the MinAtar paper's code (detail 13)
            c, h, w = obs_shape
            layers = [("conv1", nn.Conv2d(c, 16, 3, 1)), ("act1", nn.ReLU()), ("flatten", nn.Flatten()),
                      ("fc1", nn.Linear(16 * (h - 2) * (w - 2), 128)), ("act2", nn.ReLU()),
                      ("q", nn.Linear(128, n_actions))]
        elif self.pixel:
            layers, (c, size) = [], (obs_shape[0], obs_shape[1])
            for i, (out, k, s) in enumerate([(32, 8, 4), (64, 4, 2), (64, 3, 1)], start=1):
                lo, hi = same_padding(size, k, s)
                layers += [(f"pad{i}", nn.ZeroPad2d((lo, hi, lo, hi))), (f"conv{i}", nn.Conv2d(c, out, k, s)),
                           (f"act{i}", nn.ReLU())]
                c, size = out, math.ceil(size / s)
            layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(c * size * size, 512)), ("act4", nn.ReLU()),
                       ("q", nn.Linear(512, n_actions))]
        else:
            layers = [("fc1", nn.Linear(int(np.prod(obs_shape)), 120)), ("act1", nn.ReLU()),
                      ("fc2", nn.Linear(120, 84)), ("act2", nn.ReLU()), ("q", nn.Linear(84, n_actions))]
        self.net = nn.Sequential(OrderedDict(layers))
        if self.pixel:
            for m in self.net:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x, return_hidden: bool = False):
        x = x.float() / 255.0 if self.pixel else x.float()
        if not return_hidden:
            return self.net(x)
        hidden = []
        for module in self.net:
            x = module(x)
            if isinstance(module, nn.ReLU):
                hidden.append(x)
        return x, hidden

    def hidden_layers(self):
        """Names of the layers whose ReLU outputs are the hidden units, in forward order."""
        names, last = [], None
        for name, module in self.net.named_children():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                last = name
            elif isinstance(module, nn.ReLU):
                names.append(last)
        return names


def td_loss(q_network, target_network, obs, actions, returns, discounts, next_obs, loss_type: str,
            return_hidden: bool = False):
    with torch.no_grad():
        target = returns + discounts * target_network(next_obs).max(dim=1).values
    out = q_network(obs, return_hidden=return_hidden)
    q_values, hidden = out if return_hidden else (out, None)
    if q_network.double_q:  # Double DQN: the online network picks a', the target network values it; after the
        with torch.no_grad():  # online pass on obs, which hooks on it see first (docs/dqn_cchain.md, detail 7)
            best = q_network(next_obs).argmax(dim=1, keepdim=True)
            target = returns + discounts * target_network(next_obs).gather(1, best).squeeze(1)
    q_taken = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    loss = F.mse_loss(q_taken, target) if loss_type == "mse" else F.smooth_l1_loss(q_taken, target)
    return (loss, q_taken, hidden) if return_hidden else (loss, q_taken)


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


def plasticity_metrics(q_network, target_network, batch, loss_type: str, taus=(0.0, 0.1)) -> dict[str, float]:
    """The plasticity/ diagnostics of docs/conventions.md on one replay batch (docs/dqn.md, detail 7)."""
    loss, _, hidden = td_loss(q_network, target_network, *batch, loss_type, return_hidden=True)
    params = [p for p in q_network.parameters()]
    grads = torch.autograd.grad(loss, hidden + params)
    hidden_grads, param_grads = grads[: len(hidden)], grads[len(hidden):]
    metrics, totals = {}, {}
    for name, h, g in zip(q_network.hidden_layers(), hidden, hidden_grads):
        # GraMa scores the gradient through the ReLU (w.r.t. the pre-activation), so a dead unit scores 0
        act_score, grad_score = unit_scores(h.detach()), unit_scores(g * (h.detach() > 0))
        for tau in taus:
            for kind, score in (("dormant", act_score), ("grad_inactive", grad_score)):
                key = f"{kind}_tau{tau:g}"
                frac = (score <= tau).float()
                metrics[f"plasticity/{key}/{name}"] = frac.mean().item()
                count, units = totals.get(key, (0.0, 0))
                totals[key] = (count + frac.sum().item(), units + frac.numel())
    for key, (count, units) in totals.items():
        metrics[f"plasticity/{key}"] = count / units
    features = hidden[-1].detach().flatten(1)
    metrics["plasticity/srank"] = srank(features)
    metrics["plasticity/feature_norm"] = features.norm(dim=1).mean().item()
    metrics["plasticity/param_norm"] = torch.sqrt(sum((p.detach() ** 2).sum() for p in params)).item()
    metrics["plasticity/grad_norm"] = torch.sqrt(sum((g**2).sum() for g in param_grads)).item()
    return metrics


def cchain_reg_loss(q_network, lagged: dict, obs) -> torch.Tensor:
    """C-CHAIN's penalty (docs/dqn_cchain.md, detail 1): MSE over the batch and all actions between the network's
    Q-values on `obs` and those of the same network with the lagged parameters `lagged` (no gradient)."""
    with torch.no_grad():
        reference = torch.func.functional_call(q_network, lagged, (obs,))
    return F.mse_loss(q_network(obs), reference)


@torch.no_grad()
def cchain_copy_(lagged: dict, q_network):
    """Copy the network's parameters into the preallocated lagged copy (docs/dqn_cchain.md, detail 2)."""
    for name, param in q_network.named_parameters():
        lagged[name].copy_(param)


@torch.no_grad()
def churn_metrics(q_network, lagged: dict, obs) -> dict[str, float]:
    """The churn of the last update on the states `obs` (docs/dqn_cchain.md, detail 8): the network against its
    lagged copy, one update older."""
    q, reference = q_network(obs), torch.func.functional_call(q_network, lagged, (obs,))
    return {"churn/q_abs": (q - reference).abs().mean().item(), "churn/q_mse": (q - reference).pow(2).mean().item(),
            "churn/greedy_change": (q.argmax(dim=1) != reference.argmax(dim=1)).float().mean().item()}


class WindowMean:
    """The mean of the last `size` values added, kept as a running sum (re-summed exactly every `size` values, so
    rounding cannot accumulate over a long run)."""

    def __init__(self, size: int):
        self.values, self.total, self.added = deque(maxlen=size), 0.0, 0

    def add(self, value: float):
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]  # the value the append below evicts
        self.values.append(value)
        self.total, self.added = self.total + value, self.added + 1
        if self.added % self.values.maxlen == 0:
            self.total = math.fsum(self.values)

    def mean(self) -> float:
        return self.total / len(self.values)


class CChainLambda:
    """C-CHAIN's coefficient lambda (docs/dqn_cchain.md, detail 4): `init` until update `start`; from then on, after
    every update, beta * mean|L_TD| / (mean L_reg + 1e-8) over the last `window` updates (penalties only from the
    updates that had one). Never reset; `adapt=False` keeps `init`."""

    def __init__(self, init: float, beta: float, start: int, window: int, adapt: bool = True):
        self.value, self.beta, self.start, self.adapt = init, beta, start, adapt
        self.td, self.reg = WindowMean(window), WindowMean(window)

    def record(self, update: int, td_loss: float, reg_loss: Optional[float]) -> float:
        """Add update number `update`'s losses (`reg_loss` None: no penalty at that update); returns lambda for the
        next update."""
        self.td.add(abs(td_loss))
        if reg_loss is not None:
            self.reg.add(reg_loss)
        if self.adapt and update >= self.start and self.reg.values:
            self.value = self.beta * self.td.mean() / (self.reg.mean() + 1e-8)
        return self.value


def to_torch(batch, device):
    return [torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in batch]


def evaluate(q_network, env_id: str, args: Args, episodes: int, epsilon: float, seed: int, device) -> list[float]:
    """Play `episodes` full games in parallel, one per EnvPool env (so short games are not over-represented),
    with an epsilon-greedy policy; returns the full-game, unclipped returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False)
    rng = np.random.default_rng(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        with torch.inference_mode():
            actions = q_network(torch.from_numpy(obs).to(device)).argmax(dim=1).cpu().numpy()
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
        obs_shape, n_actions = envs.observation_space.shape, int(envs.action_space.n)
        network = dict(minatar=family == "minatar")  # QNetwork's settings; an intervention adds its own below
        network.update(double_q=args.double_q)  # Double DQN target (docs/dqn_cchain.md, detail 7)
        q_network = QNetwork(obs_shape, n_actions, **network).to(device)
        target_network = QNetwork(obs_shape, n_actions, **network).to(device)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (tuple(obs_shape), n_actions):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and {n_actions}")
            load_weights(q_network, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(q_network, tasks[0], args, args.eval_episodes, args.eval_epsilon, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        target_network.load_state_dict(q_network.state_dict())
        optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
        rb = ReplayBuffer(args.buffer_size, args.num_envs, obs_shape, envs.observation_space.dtype, family == "atari")
        # C-CHAIN (docs/dqn_cchain.md, details 2, 3 and 8): one lagged copy of the parameters, lambda, and their own
        # generators for the penalty's and the churn diagnostics' batches (the base's draws stay the base's)
        lagged = {name: param.detach().clone() for name, param in q_network.named_parameters()}
        cchain = CChainLambda(args.cchain_lambda_init, args.cchain_beta, args.cchain_adapt_start, args.cchain_window,
                              args.cchain_adapt)
        cchain_rng, churn_rng = np.random.default_rng([args.seed, 7091]), np.random.default_rng([args.seed, 7092])
        stats = EpisodeStats(args.num_envs)

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
                with torch.inference_mode():
                    greedy = q_network(torch.from_numpy(obs).to(device)).argmax(dim=1).cpu().numpy()
                actions = np.where(explore, actions, greedy)

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
                while update_credit >= 1.0 and rb.sampleable(args.n_step) > 0:
                    update_credit -= 1.0
                    batch = to_torch(rb.sample(args.batch_size, rng, args.n_step, args.gamma), device)
                    loss, q_taken = td_loss(q_network, target_network, *batch, args.loss)
                    if not math.isfinite(loss.item()):
                        raise Diverged(f"non-finite TD loss ({loss.item()}) at global_step={global_step}")
                    # C-CHAIN (docs/dqn_cchain.md, details 1-4): + lambda * churn penalty against the lagged copy,
                    # from the second update on; then the copy takes the parameters this update's step starts from
                    td_value, reg_value = loss.item(), None
                    if args.cchain and num_updates >= 1:
                        reg_obs = to_torch(rb.sample(args.batch_size, cchain_rng, args.n_step, args.gamma)[:1], device)[0]
                        reg_loss = cchain_reg_loss(q_network, lagged, reg_obs)
                        loss, reg_value = loss + cchain.value * reg_loss, reg_loss.item()
                    cchain.record(num_updates + 1, td_value, reg_value)
                    cchain_copy_(lagged, q_network)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    num_updates += 1
                    if num_updates % args.log_every == 0:
                        sps = int(global_step / (time.time() - start_time))
                        writer.add_scalar("losses/td_loss", loss.item(), global_step)
                        writer.add_scalar("losses/q_values", q_taken.mean().item(), global_step)
                        writer.add_scalar("charts/epsilon", epsilon, global_step)
                        writer.add_scalar("charts/SPS", sps, global_step)
                        writer.add_scalar("charts/num_updates", num_updates, global_step)
                        # C-CHAIN's logs: churn of this update on a third batch (docs/dqn_cchain.md, detail 8)
                        churn_obs = to_torch(rb.sample(args.metrics_batch_size, churn_rng, args.n_step, args.gamma)[:1],
                                             device)[0]
                        for key, value in churn_metrics(q_network, lagged, churn_obs).items():
                            writer.add_scalar(key, value, global_step)
                        writer.add_scalar("cchain/td_loss", td_value, global_step)
                        writer.add_scalar("cchain/td_loss_abs", cchain.td.mean(), global_step)
                        if args.cchain and cchain.reg.values:
                            writer.add_scalar("cchain/lambda", cchain.value, global_step)
                            writer.add_scalar("cchain/reg_loss", cchain.reg.mean(), global_step)
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        metrics_batch = to_torch(rb.sample(args.metrics_batch_size, metrics_rng, args.n_step, args.gamma), device)
                        for key, value in plasticity_metrics(q_network, target_network, metrics_batch, args.loss).items():
                            writer.add_scalar(key, value, global_step)
            if global_step >= next_target_sync:  # hard copy every target_network_frequency env steps
                target_network.load_state_dict(q_network.state_dict())
                next_target_sync += args.target_network_frequency
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(q_network, tasks[task_index], args, args.eval_episodes, args.eval_epsilon,
                                   args.seed + global_step, device)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": q_network.state_dict(), "obs_shape": list(obs_shape), "n_actions": int(n_actions),
                        "args": dataclasses.asdict(args)}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(q_network, tasks[-1], args, args.eval_episodes, args.eval_epsilon, args.seed, device)
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
