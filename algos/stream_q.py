"""Stream Q(lambda) on MinAtar and EnvPool: the base script of the streaming family (learning from each sample once).

Paper: "Streaming Deep Reinforcement Learning Finally Works", Elsayed, Vasan and Mahmood, 2024,
https://arxiv.org/abs/2410.14606. Official code: mohmdelsayed/streaming-drl (read at 407dca7: `stream_q.py`,
`stream_q_minatar.py`, `stream_q_atari.py`, `optim.py`, `sparse_init.py`, `normalization_wrappers.py`,
`time_wrapper.py`; its licence is CC BY-NC 4.0, so this is a reimplementation). Only the paper's abstract could be
read: every default and detail here is the official code's, cited on the docs page.

Method: one environment, one transition, one update per step: no replay memory, no minibatch, no target network.
The TD error delta = r + gamma * max_a Q(s', a) - Q(s, a) uses the current network on both sides; the gradient of
the *output* Q(s, a) enters an accumulating eligibility trace z <- gamma * lambda * z + grad Q(s, a) (Watkins-style:
cut after an exploratory action), and ObGD, the overshooting-bounded step, moves theta <- theta + alpha' * delta * z
with alpha' = min(alpha, 1 / (kappa * max(|delta|, 1) * ||z||_1)). What makes it stable (the paper's "stream-x"):
ObGD, sparse initialisation, LayerNorm without parameters before every hidden activation, online observation
normalisation and reward scaling (Welford statistics), and for vector observations a time-in-episode feature.

What this script adds to the official code (all documented in docs/stream_q.md, "Implementation details"):
  - EnvPool (classic control, Atari) and MinAtar through the same `MinAtarVecEnv` as the DQN and PPO families, with
    next-step auto-reset pseudo-transitions never learned from;
  - every stream-x ingredient as a flag, so the paper's ablations (the "stream barrier") run from this script;
  - the Q(lambda) trace cut as a flag: the official code's (after the update, on the current action), the textbook
    Watkins cut, or none (the official default before commit d8bf7d0);
  - time-limit truncations bootstrap (the official vector scripts do not: `--no-truncation-bootstraps`);
  - task sequences, `plasticity/` diagnostics on the last transitions, evaluation episodes, checkpoints (with the
    normaliser's statistics), and machine-readable outputs (config.json, episodes.csv, summary.json).

Differences from the base script: none (this *is* the base script of the streaming family; `algos/stream_ac.py`
is its actor-critic sibling and carries the same stream-x pieces verbatim).

Docs: docs/stream_q.md. Conventions every script follows: docs/conventions.md.
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
    """seed of the experiment (network init, exploration, environment seeds)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic algorithms are used"""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """where the network lives. Default cpu, not auto: every update is one sample, so a GPU's launch overhead costs
    more than it saves (docs/stream_q.md, detail 9)"""
    torch_threads: int = 0
    """torch CPU threads (0: torch's default, one per core unless OMP_NUM_THREADS is set, as the benchmark harness
    does); on a busy CPU one thread per run avoids oversubscription (docs/conventions.md, threads)"""
    output_dir: str = "runs"
    """outputs go to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """the run directory name; default {env}__{exp_name}__{seed}__{unix time}"""
    save_model: bool = False
    """if toggled, save the Q-network and the observation statistics to <run_dir>/model.pt (loadable with
    torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate it on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 10000
    """log the plasticity/ diagnostics every this many updates (= agent steps; 0 disables them)"""
    metrics_batch_size: int = 256
    """the diagnostics are computed on the last this many transitions (kept only for them, never learned from)"""
    log_every: int = 1000
    """log TD errors, step sizes, epsilon and SPS every this many updates"""

    # --- environment ---
    env_id: str = "MinAtar/Breakout"
    """a MinAtar game (MinAtar/Asterix, MinAtar/Breakout, MinAtar/Freeway, MinAtar/Seaquest, MinAtar/SpaceInvaders),
    an EnvPool classic-control task (CartPole-v1, Acrobot-v1, MountainCar-v0) or an EnvPool Atari game (Breakout-v5,
    ...); default the official MinAtar script's Breakout"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); all tasks must share observation and action
    spaces (MinAtar sequences use all 6 actions with channels zero-padded to 10; Atari the full 18 actions)"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task)"""
    total_timesteps: Optional[int] = None
    """total environment steps [default: MinAtar 5M (official stream_q_minatar.py at 407dca7); vector 500k
    (stream_q.py); Atari 10M agent steps = 40M frames (stream_q_atari.py)]"""
    num_envs: int = 1
    """parallel environments: streaming learns from one stream, so only 1 is accepted (docs/stream_q.md, detail 1)"""
    env_threads: int = 1
    """EnvPool worker threads (one env: one thread; MinAtar steps in this process and ignores it)"""
    sticky_action_prob: Optional[float] = None
    """Atari and MinAtar: probability of repeating the previous action [default: Atari 0.0 (the official Atari
    script plays NoFrameskip-v4 games, which have none); MinAtar 0.1 (the `MinAtar/<Game>-v1` Gymnasium envs the
    official code makes)]"""
    episodic_life: bool = True
    """Atari only: life loss is a terminal for learning, as the official Atari script's EpisodicLifeEnv (returns are
    still logged per full game)"""
    noop_max: int = 30
    """Atari only: maximum no-op actions at reset (the official Atari script's NoopResetEnv(30))"""
    fire_reset: bool = True
    """Atari only: press FIRE at reset in games that need it (the official Atari script's FireResetEnv)"""
    full_action_space: Optional[bool] = None
    """Atari: use all 18 actions; MinAtar: all 6 instead of the game's minimal set [default: True for task
    sequences, else False (the official code makes `MinAtar/<Game>-v1`, the minimal action set)]"""
    max_episode_steps: Optional[int] = None
    """episode cap in agent steps, a truncation [default: EnvPool's (CartPole-v1 500; Atari 27000 = 108k frames);
    MinAtar none. The official classic-control script raises the cap to 10,000: pass --max-episode-steps 10000]"""

    # --- algorithm: the stream-x ingredients (defaults: the official code at 407dca7, docs/stream_q.md) ---
    learning_rate: float = 1.0
    """step size alpha: ObGD's upper bound on the step (official `lr` 1.0 in every script); with --optimizer sgd the
    fixed step"""
    gamma: float = 0.99
    """discount factor (official 0.99)"""
    trace_lambda: float = 0.8
    """eligibility-trace decay lambda (official `lamda` 0.8)"""
    kappa: float = 2.0
    """ObGD's bound kappa for the Q-network (official `kappa_value` 2.0): larger is more conservative"""
    optimizer: Literal["obgd", "sgd"] = "obgd"
    """obgd: the overshooting-bounded step; sgd: the same trace update with the fixed step --learning-rate (the
    ablation without ObGD; the paper's exact ablation settings could not be read: a reconstruction, detail 3)"""
    sparse_init: bool = True
    """sparse initialisation of every Linear/Conv weight (official `sparse_init`, detail 4); off: PyTorch's default
    initialisation"""
    sparsity: float = 0.9
    """fraction of each unit's incoming weights set to zero by the sparse initialisation (official 0.9)"""
    layer_norm: bool = True
    """LayerNorm without learnable parameters before every hidden activation (official, detail 5)"""
    normalize_observations: bool = True
    """online observation normalisation with Welford statistics (official NormalizeObservation, detail 6)"""
    scale_rewards: bool = True
    """divide rewards by the running std of a discounted return trace (official ScaleReward, detail 6)"""
    time_feature: Optional[bool] = None
    """append the time-in-episode feature to vector observations (official AddTimeInfo, detail 7) [default: vector
    True; MinAtar and Atari False, as the official scripts]"""
    trace_cut: Literal["official", "textbook", "none"] = "official"
    """when an exploratory action cuts the trace (detail 2): official (after the update that learns from the
    exploratory action, the official code since d8bf7d0), textbook (Watkins: before adding that action's gradient,
    so it is learned but earns no credit from later errors), none (the official default before d8bf7d0)"""
    truncation_bootstraps: bool = True
    """a time-limit truncation bootstraps from Q(s') (this project's convention; the trace is still reset); off: the
    official vector and MinAtar scripts' done = terminated or truncated (detail 8)"""
    hidden_size: Optional[int] = None
    """width of the dense hidden layers [default: vector 32 (stream_q.py, two layers); MinAtar 128
    (stream_q_minatar.py); Atari 256 (stream_q_atari.py)]"""
    start_e: float = 1.0
    """epsilon at the start of the exploration schedule (official `epsilon_start`)"""
    end_e: float = 0.01
    """final epsilon (official `epsilon_target` 0.01)"""
    exploration_fraction: Optional[float] = None
    """fraction of total_timesteps over which epsilon decays linearly [default: MinAtar 0.2 (stream_q_minatar.py at
    407dca7); vector 0.05 (stream_q.py); Atari 0.05 (stream_q_atari.py)]"""
    eval_epsilon: float = 0.01
    """epsilon of the evaluation policy (ours: the final training epsilon; the official code reports training
    returns only)"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite TD error: the run stops with summary status "diverged"."""


# Family defaults from the official scripts at 407dca7 (docs/stream_q.md, hyperparameters).
FAMILY_DEFAULTS = {
    "minatar": dict(total_timesteps=5_000_000, exploration_fraction=0.2, hidden_size=128, time_feature=False,
                    sticky_action_prob=0.1),
    "vector": dict(total_timesteps=500_000, exploration_fraction=0.05, hidden_size=32, time_feature=True),
    "atari": dict(total_timesteps=10_000_000, exploration_fraction=0.05, hidden_size=256, time_feature=False,
                  sticky_action_prob=0.0),
}
# MinAtar games by env id (minatar.Environment names). Observations are (channels, 10, 10) 0/1 grids.
MINATAR_GAMES = {"MinAtar/Asterix": "asterix", "MinAtar/Breakout": "breakout", "MinAtar/Freeway": "freeway",
                 "MinAtar/Seaquest": "seaquest", "MinAtar/SpaceInvaders": "space_invaders"}
MINATAR_CHANNELS = 10  # the most any game has (Seaquest): task sequences pad every game to it


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the family defaults; returns (tasks, family)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    if args.num_envs != 1:
        raise UserError(f"--num-envs must be 1: streaming learns from one stream, one transition per update "
                        f"(got {args.num_envs}; docs/stream_q.md, detail 1)")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    minatar = tasks[0].startswith("MinAtar/")
    if any(task.startswith("MinAtar/") != minatar for task in tasks):
        raise UserError(f"a task sequence cannot mix MinAtar and EnvPool ids: {' '.join(tasks)}")
    known = list(MINATAR_GAMES) if minatar else envpool.list_all_envs()
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else " (see envpool.list_all_envs())"
            hint = f" (MinAtar games: {', '.join(MINATAR_GAMES)})" if minatar else hint
            raise UserError(f"unknown env id '{task}'{hint}")
    if args.full_action_space is None:
        args.full_action_space = len(tasks) > 1
    specs = [MinAtarVecEnv(MINATAR_GAMES[task], 1, [0], 0.0, args.full_action_space, len(tasks) > 1) if minatar
             else envpool.make_spec(task) for task in tasks]
    spaces = set()
    for task, spec in zip(tasks, specs):
        if type(spec.action_space).__name__ != "Discrete":
            raise UserError(f"stream_q.py needs a discrete action space; {task} has {spec.action_space} "
                            f"(stream_ac.py handles continuous actions)")
        shape = getattr(spec.observation_space, "shape", None)
        if shape is None or len(shape) not in (1, 3):
            raise UserError(f"stream_q.py supports vector or image observations; {task} has {spec.observation_space}")
        spaces.add(tuple(shape))
    if len(spaces) > 1:
        raise UserError(f"all tasks of --env-ids must share the observation shape; got {sorted(spaces)}")
    family = "minatar" if minatar else ("atari" if len(next(iter(spaces))) == 3 else "vector")
    if family == "atari":  # the full action set is a make() option, so ask EnvPool for the set each task will use
        specs = [envpool.make_spec(task, full_action_space=args.full_action_space) for task in tasks]
    if len({spec.action_space.n for spec in specs}) > 1:
        raise UserError("all tasks of --env-ids must share the action space (Atari: use --full-action-space)")
    for key, value in FAMILY_DEFAULTS[family].items():
        if getattr(args, key, None) is None and key != "total_timesteps":
            setattr(args, key, value)
    if args.time_feature and family != "vector":
        raise UserError("--time-feature is for vector observations (the official scripts add it to those only)")
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or FAMILY_DEFAULTS[family]["total_timesteps"]
    for name in ("total_timesteps", "hidden_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.learning_rate > 0 or not args.kappa > 0:
        raise UserError(f"need --learning-rate > 0 and --kappa > 0 (got {args.learning_rate}, {args.kappa})")
    for name in ("gamma", "trace_lambda", "exploration_fraction", "eval_epsilon"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not 0 <= args.sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    if not 0 <= args.end_e <= args.start_e <= 1:
        raise UserError("need 0 <= end-e <= start-e <= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    return tasks, family


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True):
    """An EnvPool Gymnasium vector env (Atari: the official Atari script's protocol, docs/stream_q.md detail 10), or
    MinAtarVecEnv for MinAtar ids, which behaves like EnvPool."""
    if env_id in MINATAR_GAMES:
        return MinAtarVecEnv(MINATAR_GAMES[env_id], num_envs, seeds, args.sticky_action_prob, args.full_action_space,
                             len(args.env_ids) > 1, args.max_episode_steps)
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads)
    config_keys = envpool.make_spec(env_id).config._fields
    atari = dict(
        episodic_life=args.episodic_life and train,  # evaluation always plays full games
        reward_clip=False,  # the official Atari script does not clip rewards (it scales them, detail 6)
        repeat_action_probability=args.sticky_action_prob,
        noop_max=args.noop_max,
        use_fire_reset=args.fire_reset,
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


class EpisodeStats:
    """Full-game, unclipped episode returns from EnvPool's `info` (docs/stream_q.md, detail 1).

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



# ---------------------------------------------------------------------------------------------------------------
# The stream-x pieces shared (duplicated by design) by algos/stream_q.py and algos/stream_ac.py. Copy them verbatim;
# tests/test_stream.py checks that the copies are identical (like MinAtarVecEnv in the DQN/PPO families).
# Only the "docs/stream_q.md" / "docs/stream_ac.md" page names in comments may differ.
# ---------------------------------------------------------------------------------------------------------------


class LayerNormNoAffine(nn.Module):
    """LayerNorm without learnable parameters over everything but the batch dimension (a conv layer's whole C x H x W
    map of one sample, as the official `F.layer_norm(x, x.size())` on an unbatched input; eps 1e-5)."""

    def forward(self, x):
        return F.layer_norm(x, x.shape[1:])


def sparse_init_(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The official `sparse_init` (uniform): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then for every output unit (conv:
    output channel) ceil(sparsity * fan_in) of its incoming weights, chosen by torch.randperm, set to 0."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    zeros = int(math.ceil(sparsity * fan_in))
    with torch.no_grad():
        weight.uniform_(-math.sqrt(1.0 / fan_in), math.sqrt(1.0 / fan_in))
        flat = weight.view(fan_out, fan_in)
        for unit in range(fan_out):
            flat[unit, torch.randperm(fan_in)[:zeros]] = 0.0
    return weight


class ObGD:
    """Overshooting-bounded gradient descent with accumulating eligibility traces (the official `ObGD`).

    `step(grads, delta, reset)`, with `grads` the gradient of the *output* (Q(s, a), V(s) or the actor's log-prob +
    entropy term), not of a loss:
        z <- gamma * lambda * z + grads                          (one trace per parameter tensor)
        M = lr * kappa * max(|delta|, 1) * ||z||_1               (||z||_1 summed over every parameter: one number)
        step = lr / M if M > 1 else lr
        theta <- theta + step * delta * z
        z <- 0 if reset                                          (after the update)
    With `bounded=False` the step is always `lr`: SGD with eligibility traces (the ablation without ObGD).
    Returns the step size used."""

    def __init__(self, params, lr: float, gamma: float, lamda: float, kappa: float, bounded: bool = True):
        self.params = [p for p in params]
        self.traces = [torch.zeros_like(p) for p in self.params]
        self.lr, self.gamma, self.lamda, self.kappa, self.bounded = lr, gamma, lamda, kappa, bounded

    @torch.no_grad()
    def step(self, grads, delta: float, reset: bool = False) -> float:
        torch._foreach_mul_(self.traces, self.gamma * self.lamda)
        torch._foreach_add_(self.traces, list(grads))
        step = self.lr
        if self.bounded:
            z_sum = torch.stack([z.abs().sum() for z in self.traces]).sum().item()
            bound = self.lr * self.kappa * max(abs(delta), 1.0) * z_sum
            step = self.lr / bound if bound > 1.0 else self.lr
        torch._foreach_add_(self.params, self.traces, alpha=step * delta)
        if reset:
            self.reset()
        return step

    def reset(self):
        for z in self.traces:
            z.zero_()


class SampleMeanStd:
    """Welford's running mean and sample variance (n - 1), float64, per element (the official `SampleMeanStd`):
    var is 1 until two samples have been seen."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, dtype=np.float64)
        self.p = np.zeros(shape, dtype=np.float64)  # sum of squared deviations
        self.var = np.ones(shape, dtype=np.float64)
        self.count = 0

    def update(self, x):
        x = np.asarray(x, dtype=np.float64)
        self.count += 1
        old_mean = self.mean
        self.mean = old_mean + (x - old_mean) / self.count
        self.p = self.p + (x - old_mean) * (x - self.mean)
        self.var = self.p / (self.count - 1) if self.count >= 2 else np.ones_like(self.mean)

    def state_dict(self) -> dict:
        return {"mean": torch.from_numpy(np.array(self.mean)), "p": torch.from_numpy(np.array(self.p)),
                "var": torch.from_numpy(np.array(self.var)), "count": self.count}

    def load_state_dict(self, state: dict):
        self.mean, self.p, self.var = (state[k].cpu().double().numpy().copy() for k in ("mean", "p", "var"))
        self.count = int(state["count"])


class ObservationNormalizer:
    """The official `NormalizeObservation`: update the statistics with every observation the env returns (reset
    observations included), then (x - mean) / sqrt(var + 1e-8); no clipping. `update=False` (evaluation) only
    normalises. `enabled=False` passes observations through as float32."""

    def __init__(self, shape, enabled: bool = True, eps: float = 1e-8):
        self.stats, self.enabled, self.eps = SampleMeanStd(shape), enabled, eps

    def __call__(self, obs, update: bool = True) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, dtype=np.float32)
        if update:
            self.stats.update(obs)
        return ((obs - self.stats.mean) / np.sqrt(self.stats.var + self.eps)).astype(np.float32)


class RewardScaler:
    """The official `ScaleReward`: a discounted return trace u <- gamma * (1 - done) * u + r, with `done` the end of
    an episode *at this step*; Welford statistics of u over every step; the reward divided (never centred, never
    clipped) by sqrt(Var(u) + 1e-8). `enabled=False` returns the reward unchanged."""

    def __init__(self, gamma: float, enabled: bool = True, eps: float = 1e-8):
        self.stats, self.gamma, self.enabled, self.eps = SampleMeanStd(()), gamma, enabled, eps
        self.trace = 0.0

    def __call__(self, reward: float, done: bool) -> float:
        if not self.enabled:
            return float(reward)
        self.trace = self.trace * self.gamma * (1.0 - float(done)) + float(reward)
        self.stats.update(self.trace)
        return float(reward / np.sqrt(self.stats.var + self.eps))


def time_feature(steps: int, limit: int) -> float:
    """The official `AddTimeInfo` value appended to vector observations: -0.5 at the reset observation *and* after the
    first step (the official wrapper increments after appending), then -0.5 + (k - 1) / limit after k steps."""
    return -0.5 + max(steps - 1, 0) / limit


class QNetwork(nn.Module):
    """The official Stream Q networks (docs/stream_q.md, detail 5): every hidden layer is (Linear|Conv2d,
    LayerNormNoAffine, LeakyReLU(0.01)), then a Linear head.
      vector:  (obs [+ time feature]) -> hidden -> hidden -> |A|            (stream_q.py, hidden 32)
      MinAtar: Conv(C, 16, 3x3, stride 1) -> 1024 -> hidden -> |A|          (stream_q_minatar.py, hidden 128)
      Atari:   Conv(4, 32, 8x8, s5) -> Conv(32, 64, 4x4, s3) -> Conv(64, 64, 3x3, s2) -> 256 -> hidden -> |A|
               (stream_q_atari.py, hidden 256: strides 5, 3, 2, not the Nature CNN's)
    Inputs are the normalised observations (float32). One nn.Sequential, so the diagnostics can walk it
    (`hidden_layers`); `forward(x, return_hidden=True)` also returns every activation's output."""

    def __init__(self, in_shape: tuple, n_actions: int, hidden_size: int, layer_norm: bool = True,
                 sparse_init: bool = True, sparsity: float = 0.9):
        super().__init__()
        norm = LayerNormNoAffine if layer_norm else nn.Identity
        layers = []
        if len(in_shape) == 3:
            c, size = in_shape[0], in_shape[1]
            convs = [(16, 3, 1)] if size == 10 else [(32, 8, 5), (64, 4, 3), (64, 3, 2)]  # MinAtar 10x10, Atari 84x84
            for i, (out, k, s) in enumerate(convs, start=1):
                layers += [(f"conv{i}", nn.Conv2d(c, out, k, s)), (f"norm{i}", norm()), (f"act{i}", nn.LeakyReLU())]
                c, size = out, (size - k) // s + 1
            layers += [("flatten", nn.Flatten())]
            dims = [c * size * size, hidden_size]
        else:
            dims = [in_shape[0], hidden_size, hidden_size]
        first = len(layers) // 3 + 1
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]), start=first):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"norm{i}", norm()), (f"act{i}", nn.LeakyReLU())]
        layers += [("q", nn.Linear(dims[-1], n_actions))]
        self.net = nn.Sequential(OrderedDict(layers))
        if sparse_init:  # every weight, heads included; biases 0 (official initialize_weights, detail 4)
            for m in self.net:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    sparse_init_(m.weight, sparsity)
                    nn.init.zeros_(m.bias)

    def forward(self, x, return_hidden: bool = False):
        if not return_hidden:
            return self.net(x)
        hidden = []
        for module in self.net:
            x = module(x)
            if isinstance(module, nn.LeakyReLU):
                hidden.append(x)
        return x, hidden

    def hidden_layers(self):
        """Names of the layers whose activations are the hidden units, in forward order."""
        names, last = [], None
        for name, module in self.net.named_children():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                last = name
            elif isinstance(module, nn.LeakyReLU):
                names.append(last)
        return names


def epsilon_at(args: Args, step: int) -> float:
    """The official linear_schedule: from start_e to end_e over exploration_fraction * total_timesteps steps."""
    duration = max(args.exploration_fraction * args.total_timesteps, 1e-9)
    return max(args.start_e + (args.end_e - args.start_e) * step / duration, args.end_e)


def epsilon_greedy(greedy: int, n_actions: int, epsilon: float, coins) -> tuple[int, bool]:
    """The official sample_action from two uniform draws: with probability epsilon a uniformly random action, else the
    greedy one. Returns (action, nongreedy); a random draw that equals the greedy action counts as greedy, so it does
    not cut the trace (detail 2)."""
    action = int(coins[1] * n_actions) if coins[0] < epsilon else greedy
    return action, action != greedy


def stream_q_update(q_network, optimizer, q_values, action: int, reward: float, bootstrap: float, next_x, gamma: float,
                    done: bool, nongreedy: bool, trace_cut: str) -> tuple[float, float]:
    """One Stream Q(lambda) update (docs/stream_q.md, details 1-3). `q_values` is Q(s, .) from the forward pass that
    chose the action (its graph is kept); the target uses the same, current network on s' without gradient:
        delta = r + gamma * bootstrap * max_a Q(s', a) - Q(s, a),   z <- gamma * lambda * z + grad Q(s, a),
    then ObGD's step along delta * z. The trace is emptied after the update at the end of an episode and, with
    trace_cut "official", after an exploratory action's update; "textbook" (Watkins) empties it before an
    exploratory action's gradient is added instead. Returns (delta, the step size used)."""
    with torch.no_grad():
        q_next = q_network(next_x)[0].max().item()
    q_taken = q_values[action]
    delta = reward + gamma * bootstrap * q_next - q_taken.item()
    grads = torch.autograd.grad(q_taken, optimizer.params)
    if trace_cut == "textbook" and nongreedy:
        optimizer.reset()
    step = optimizer.step(grads, delta, reset=done or (trace_cut == "official" and nongreedy))
    return delta, step


def td_errors(q_network, obs, actions, rewards, bootstrap, next_obs, gamma: float, return_hidden: bool = False):
    """delta = r + gamma * bootstrap * max_a Q(s', a) - Q(s, a), the current network on both sides and no gradient
    through the target (detail 1); batched over transitions. Returns (delta, Q(s, a)[, hidden])."""
    with torch.no_grad():
        target = rewards + gamma * bootstrap * q_network(next_obs).max(dim=1).values
    out = q_network(obs, return_hidden=return_hidden)
    q_values, hidden = out if return_hidden else (out, None)
    q_taken = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    return (target - q_taken, q_taken, hidden) if return_hidden else (target - q_taken, q_taken)


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


def plasticity_metrics(q_network, batch, gamma: float, taus=(0.0, 0.1)) -> dict[str, float]:
    """The plasticity/ diagnostics of docs/conventions.md on the last transitions, with the loss 0.5 * delta^2
    (whose gradient is ObGD's delta * grad Q without the trace; docs/stream_q.md, detail 11)."""
    delta, _, hidden = td_errors(q_network, *batch, gamma, return_hidden=True)
    loss = 0.5 * (delta**2).mean()
    params = [p for p in q_network.parameters()]
    grads = torch.autograd.grad(loss, hidden + params)
    hidden_grads, param_grads = grads[: len(hidden)], grads[len(hidden):]
    metrics, totals = {}, {}
    for name, h, g in zip(q_network.hidden_layers(), hidden, hidden_grads):
        # GraMa scores the gradient w.r.t. the pre-activation: through LeakyReLU's derivative (1, or 0.01 below 0)
        slope = torch.where(h.detach() > 0, 1.0, 0.01)
        act_score, grad_score = unit_scores(h.detach()), unit_scores(g * slope)
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


class RecentTransitions:
    """The last `size` transitions (normalised obs, action, scaled reward, bootstrap flag, next obs), kept only for
    the diagnostics: never sampled, never learned from (docs/stream_q.md, detail 11)."""

    def __init__(self, size: int, in_shape: tuple):
        self.obs = np.zeros((size, *in_shape), dtype=np.float32)
        self.next_obs = np.zeros((size, *in_shape), dtype=np.float32)
        self.actions = np.zeros(size, dtype=np.int64)
        self.rewards = np.zeros(size, dtype=np.float32)
        self.bootstrap = np.zeros(size, dtype=np.float32)
        self.pos, self.count = 0, 0

    def add(self, obs, action, reward, bootstrap, next_obs):
        p = self.pos
        self.obs[p], self.actions[p], self.rewards[p], self.bootstrap[p], self.next_obs[p] = (
            obs, action, reward, bootstrap, next_obs)
        self.pos, self.count = (p + 1) % len(self.actions), min(self.count + 1, len(self.actions))

    def batch(self, device):
        n = self.count
        return [torch.from_numpy(x[:n]).to(device) for x in (self.obs, self.actions, self.rewards, self.bootstrap,
                                                             self.next_obs)]


def agent_input(obs: np.ndarray, normalizer: ObservationNormalizer, steps, limit: Optional[int],
                update: bool) -> np.ndarray:
    """The network's input for a batch of observations: normalised (statistics updated with each of them when
    `update`), then, with a time limit, the time feature of each env's episode step appended (detail 7)."""
    x = np.stack([normalizer(o, update=update) for o in obs]) if update else normalizer(obs, update=False)
    if limit is None:
        return x
    time = np.array([[time_feature(int(k), limit)] for k in np.atleast_1d(steps)], dtype=np.float32)
    return np.concatenate([x, time], axis=1)


def evaluate(q_network, normalizer, env_id: str, args: Args, episodes: int, epsilon: float, seed: int, device,
             limit: Optional[int]) -> list[float]:
    """Play `episodes` full games in parallel, one per env, epsilon-greedy, with the observation statistics frozen;
    returns the full-game, unclipped returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False)
    rng = np.random.default_rng(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    steps = np.zeros(episodes, dtype=np.int64)
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        x = agent_input(obs, normalizer, steps, limit, update=False)
        with torch.inference_mode():
            actions = q_network(torch.from_numpy(x).to(device)).argmax(dim=1).cpu().numpy()
        explore = rng.random(episodes) < epsilon
        actions[explore] = rng.integers(0, envs.action_space.n, int(explore.sum()))
        obs, reward, terminated, truncated, info = envs.step(actions)
        _, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        steps = np.where(prev_done, 0, steps + 1)
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
            and {"model", "obs_shape", "n_actions", "obs_stats"} <= checkpoint.keys()):
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
    if device.type == "cuda":
        torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
    rng = np.random.default_rng(args.seed)
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], 1, env_seeds(args.seed, 0, 0, 1), args)
        obs_shape, n_actions = envs.observation_space.shape, int(envs.action_space.n)
        # The time feature's episode length T: the env's cap (detail 7)
        limit = (args.max_episode_steps or envs.spec.config.max_episode_steps) if args.time_feature else None
        in_shape = (obs_shape[0] + 1,) if limit else tuple(obs_shape)
        q_network = QNetwork(in_shape, n_actions, args.hidden_size, args.layer_norm, args.sparse_init,
                             args.sparsity).to(device)
        normalizer = ObservationNormalizer(obs_shape, enabled=args.normalize_observations)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (tuple(obs_shape), n_actions):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and {n_actions}")
            load_weights(q_network, checkpoint, args.eval_checkpoint)
            normalizer.stats.load_state_dict(checkpoint["obs_stats"])
            envs.close()
            returns = evaluate(q_network, normalizer, tasks[0], args, args.eval_episodes, args.eval_epsilon,
                               args.seed, device, limit)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        optimizer = ObGD(q_network.parameters(), args.learning_rate, args.gamma, args.trace_lambda, args.kappa,
                         bounded=args.optimizer == "obgd")
        scaler = RewardScaler(args.gamma, enabled=args.scale_rewards)
        recent = RecentTransitions(args.metrics_batch_size, in_shape) if args.metrics_every else None
        stats = EpisodeStats(1)

        obs, _ = envs.reset()
        episode_steps = 0  # agent steps in the current episode (the time feature's k)
        x = agent_input(obs, normalizer, episode_steps, limit, update=True)
        prev_done = False  # the last step ended an episode: this step is EnvPool's auto-reset step
        task_index = 0
        next_eval = args.eval_every
        log = dict(td_error=0.0, q=0.0, step=0.0, bound=0.0, n=0)
        while global_step < args.total_timesteps:
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch: drop the unfinished episode and its trace; the statistics carry on (detail 12).
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], 1, env_seeds(args.seed, task_index, 0, 1), args)
                obs, _ = envs.reset()
                optimizer.reset()
                scaler.trace, episode_steps, prev_done = 0.0, 0, False
                x = agent_input(obs, normalizer, episode_steps, limit, update=True)
                stats = EpisodeStats(1)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")

            if prev_done:  # EnvPool's auto-reset step: the action is ignored and there is nothing to learn
                next_obs, reward, terminated, truncated, info = envs.step(np.zeros(1, dtype=np.int64))
                global_step += 1
                stats.update(reward, terminated, truncated, info, np.zeros(1, dtype=bool))
                episode_steps, prev_done = 0, False
                x = agent_input(next_obs, normalizer, episode_steps, limit, update=True)
                continue

            # Act epsilon-greedily with Q(s) from the same forward pass the update differentiates: the network has
            # not changed since, so this is the official code's separate act and update passes, once (detail 9).
            epsilon = epsilon_at(args, global_step)
            q_values = q_network(torch.from_numpy(x).to(device))[0]
            action, nongreedy = epsilon_greedy(int(q_values.argmax()), n_actions, epsilon, rng.random(2))

            next_obs, reward, terminated, truncated, info = envs.step(np.array([action]))
            global_step += 1
            _, finished = stats.update(reward, terminated, truncated, info, np.ones(1, dtype=bool))
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            terminated, truncated = bool(terminated[0]), bool(truncated[0])
            done = terminated or truncated
            episode_steps += 1
            next_x = agent_input(next_obs, normalizer, episode_steps, limit, update=True)
            r = scaler(float(reward[0]), done)
            bootstrap = 0.0 if terminated or (truncated and not args.truncation_bootstraps) else 1.0  # detail 8
            delta, step = stream_q_update(q_network, optimizer, q_values, action, r, bootstrap,
                                          torch.from_numpy(next_x).to(device), args.gamma, done, nongreedy,
                                          args.trace_cut)
            if not math.isfinite(delta):
                raise Diverged(f"non-finite TD error ({delta}) at global_step={global_step}")
            num_updates += 1
            if recent is not None:
                recent.add(x[0], action, r, bootstrap, next_x[0])

            log["td_error"] += abs(delta)
            log["q"] += q_values[action].item()
            log["step"] += step
            log["bound"] += step < args.learning_rate
            log["n"] += 1
            if num_updates % args.log_every == 0:
                n = log.pop("n")
                for key, name in (("td_error", "losses/td_error"), ("q", "losses/q_values"),
                                  ("step", "stream/step_size"), ("bound", "stream/bound_active")):
                    writer.add_scalar(name, log[key] / n, global_step)
                log = dict(td_error=0.0, q=0.0, step=0.0, bound=0.0, n=0)
                writer.add_scalar("stream/trace_l1", sum(z.abs().sum().item() for z in optimizer.traces), global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
                writer.add_scalar("charts/num_updates", num_updates, global_step)
            if args.metrics_every and num_updates % args.metrics_every == 0:
                for key, value in plasticity_metrics(q_network, recent.batch(device), args.gamma).items():
                    writer.add_scalar(key, value, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(q_network, normalizer, tasks[task_index], args, args.eval_episodes,
                                   args.eval_epsilon, args.seed + global_step, device, limit)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
            x, prev_done = next_x, done
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": q_network.state_dict(), "obs_shape": list(obs_shape), "n_actions": int(n_actions),
                        "args": dataclasses.asdict(args), "obs_stats": normalizer.stats.state_dict()}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(q_network, normalizer, tasks[-1], args, args.eval_episodes, args.eval_epsilon,
                                    args.seed, device, limit)
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

