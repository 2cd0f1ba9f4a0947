"""SAC + optimistic critics and small actors on EnvPool.

Paper: "Optimistic critics can empower small actors", Mastikhina, Sreenivas and Castro, RLC 2025 (RLJ paper 283),
https://arxiv.org/abs/2506.01016. Read: the abstract and the first paragraph of section 1 only (the body, its
equations, its state-based hyperparameters and its tables were not available). Code read: the co-author's code of
the PIXEL (DrQ) experiments, dhruvsreenivas/rl_with_resets at 6ea5091 ("add small actor stuff", a fork of
Nikishin et al.'s primacy-bias jaxrl repository), continuous_control/agents/sac/critic.py: the critic's TD target is
r + gamma * mask * (Qbar' - alpha * log pi(a'|s')) with Qbar' = min(Q1', Q2') by default, (Q1' + Q2') / 2 with
use_mean_reduction (the optimistic remedy) or max(Q1', Q2') with use_max_reduction; the actor loss always uses
min(Q1, Q2). The state-based SAC code of the paper was not read.

Method (abstract): actor and critic are usually the same size; recent work argues for smaller actors. The paper
finds that small actors generally degrade performance and overfit the critic, and traces this to poor data
collection caused by value underestimation: the pessimistic min of twin critics underestimates more when the actor
is small. Making the critic's target less pessimistic (the mean of the twins instead of their min) mitigates it.

Differences from the base script (`diff algos/sac.py algos/sac_optimistic.py` shows exactly these):
  - flags `--actor-width` and `--critic-width` (the hidden width of the actor's and of each critic's two ReLU
    layers; depth stays 2; both 256 = sac.py), `--q-target` (min = sac.py, mean, max, mix) and `--q-target-beta`
    (mix = beta * min + (1 - beta) * mean), checked in `resolve_args`;
  - `Actor` and `SoftQNetwork` take the hidden width (`hidden`, default 256);
  - `soft_q_target` reduces the twin target critics with `reduce_twins` (the training target and the diagnostics'
    critic loss); the actor loss keeps min(Q1, Q2), as the official code;
  - config.json gets the parameter counts (actor, one critic, a 256-wide actor on the same task) and the
    actor-to-critic and actor-to-base ratios (`record_param_counts`), also printed;
  - the training run's evaluations call `evaluate_recorded` (sac.py's `evaluate` plus a record of its steps) and log
    the value estimation bias under `value/` (the online critics' Q against the discounted Monte-Carlo return of
    the evaluation episodes, with and without the policy's entropy bonuses, which a soft critic counts;
    `value_bias_states`, `entropy_bonus`, `value_bias`, `log_value_bias`); the final one also goes to
    summary.json (`value_bias`); `--eval-checkpoint` evaluations (actor only, sac.py's `evaluate`) log none;
  - an `--eval-checkpoint` whose actor width differs from `--actor-width` is one line naming the flag.
[reconstruction] marks what the paper's text or code does not show: the interpolation `mix` and its beta (asked for
by the issue, not in the code), the state-based actor sizes (the flags are free; the pixel code's actors are 256,
128, 32 and 8 wide, two layers each), and the bias measurement (the paper's Q against Monte-Carlo returns was not
read: ours normalises by |mean return| after REDQ's idea, Chen et al. 2021, but is not REDQ's measurement).

Base script: algos/sac.py (SAC with CleanRL's sac_continuous_action defaults; docs/sac.md).
Docs: docs/sac_optimistic.md. Conventions every script follows: docs/conventions.md.
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
    """if toggled, save the actor and both critics to <run_dir>/model.pt (loadable with torch.load(...,
    weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate its actor on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 1000
    """log the plasticity/ diagnostics every this many gradient updates (0 disables them)"""
    metrics_batch_size: int = 256
    """size of the fresh replay batch the diagnostics are computed on"""
    log_every: int = 100
    """log losses, alpha and SPS every this many gradient updates"""

    # --- environment ---
    env_id: str = "Hopper-v4"
    """the EnvPool task id (MuJoCo: HalfCheetah-v4, Hopper-v4, Walker2d-v4, Ant-v4, Humanoid-v4, ...; DeepMind
    Control: CheetahRun-v1, WalkerRun-v1, ...)"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); all tasks must share observation and action
    spaces (e.g. WalkerStand-v1 WalkerWalk-v1 WalkerRun-v1)"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task)"""
    total_timesteps: Optional[int] = None
    """total environment steps, summed over envs [default: 1M (CleanRL); task sequences:
    len(env_ids) * steps_per_task]"""
    num_envs: int = 1
    """number of parallel EnvPool environments used for collection"""
    env_threads: int = 0
    """EnvPool worker threads (0: one per env up to the core count)"""
    max_episode_steps: Optional[int] = None
    """episode cap in agent steps [default: EnvPool's, 1000 for MuJoCo and DMC]"""

    # --- algorithm (defaults: CleanRL's sac_continuous_action.py) ---
    buffer_size: int = 1_000_000
    """replay memory capacity in transitions (CleanRL: 1M)"""
    gamma: float = 0.99
    """discount factor (CleanRL: 0.99)"""
    tau: float = 0.005
    """target smoothing coefficient of the Polyak update (CleanRL: 0.005)"""
    batch_size: int = 256
    """minibatch size (CleanRL: 256)"""
    replay_ratio: float = 1.0
    """gradient updates (critic updates) per environment step (CleanRL: 1, one update per step with one env)"""
    learning_starts: int = 5000
    """environment steps of uniformly random actions before learning (CleanRL: 5e3)"""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor (CleanRL: 3e-4)"""
    q_lr: float = 1e-3
    """Adam learning rate of the two Q-networks and of alpha (CleanRL: 1e-3)"""
    policy_frequency: int = 2
    """actor (and alpha) updates are delayed: every this many critic updates, done this many times in a row
    (CleanRL: 2, TD3-style delay compensated by repetition)"""
    target_network_frequency: int = 1
    """Polyak-update the target networks every this many critic updates (CleanRL: 1)"""
    alpha: float = 0.2
    """entropy coefficient when --no-autotune (CleanRL: 0.2)"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient towards the target entropy -|A| (CleanRL: True)"""

    # --- Optimistic critics and small actors (docs/sac_optimistic.md, "Hyperparameters") ---
    actor_width: int = 256
    """hidden width of the actor's two ReLU layers (depth stays 2); 256 is sac.py [paper: small actors, sizes of the
    state-based runs not read; official pixel code (dhruvsreenivas/rl_with_resets@6ea5091): (256, 256) XL, (128, 128)
    L, (32, 32) M, (8, 8) S; reconstruction: depth 2 and a free width for state-based SAC]"""
    critic_width: int = 256
    """hidden width of each critic's two ReLU layers (depth stays 2); 256 is sac.py [official pixel code: (256, 256)
    for every actor size]"""
    q_target: Literal["min", "mean", "max", "mix"] = "min"
    """the critic's TD target reduction of the twin target critics, Qbar' in r + gamma * (1 - terminated) * (Qbar' -
    alpha * log pi(a'|s')): min (SAC, sac.py), mean ((Q1' + Q2') / 2, the official pixel code's
    use_mean_reduction, the optimistic remedy), max (use_max_reduction) or mix (beta * min + (1 - beta) * mean,
    --q-target-beta; not in the official code [reconstruction: asked for by the issue]). The actor loss always uses
    min(Q1, Q2), as the official code"""
    q_target_beta: float = 0.5
    """beta of --q-target mix, in [0, 1]: 1 is min, 0 is mean [reconstruction: no such coefficient in the official
    code]"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


def space_size(space, task: str) -> int:
    """Size of the flat float32 observation: a Box (n,) or a Dict of Boxes of shape () or (n,) (docs/sac.md,
    detail 2). Anything else (pixels) is a UserError."""
    if type(space).__name__ == "Dict":
        entries = list(space.spaces.values())
        ok = bool(entries) and all(type(s).__name__ == "Box" and len(s.shape) <= 1 for s in entries)
    else:
        entries = [space]
        ok = type(space).__name__ == "Box" and len(space.shape) == 1
    if not ok:
        raise UserError(f"sac.py needs vector observations (a Box of shape (n,) or a Dict of scalar and vector "
                        f"entries); {task} has {space}")
    return int(sum(int(np.prod(s.shape)) for s in entries))  # a () entry has prod(()) = 1


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the defaults; returns (tasks, family)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    known = envpool.list_all_envs()
    for task in tasks:
        if task.startswith("MinAtar/"):  # dqn.py and ppo.py run MinAtar; its actions are discrete
            raise UserError(f"{task}: MinAtar games have discrete actions; sac.py needs continuous ones (use dqn.py or ppo.py)")
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else " (see envpool.list_all_envs())"
            raise UserError(f"unknown env id '{task}'{hint}")
    specs = [envpool.make_spec(task) for task in tasks]
    layouts = set()
    for task, spec in zip(tasks, specs):
        space = spec.action_space
        if type(space).__name__ != "Box" or len(space.shape) != 1:
            raise UserError(f"sac.py needs a continuous (Box) action space; {task} has {space}")
        if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise UserError(f"sac.py squashes actions into the action bounds, which must be finite; {task} has {space}")
        obs_space = spec.observation_space
        keys = tuple((k, tuple(s.shape)) for k, s in obs_space.spaces.items()) if type(obs_space).__name__ == "Dict" \
            else (("", tuple(obs_space.shape)),)
        space_size(obs_space, task)
        layouts.add((keys, tuple(space.low.tolist()), tuple(space.high.tolist())))
    if len(layouts) > 1:
        raise UserError("all tasks of --env-ids must share the observation space and the action space "
                        "(bounds included)")
    kind = type(specs[0]).__name__
    family = "dmc" if kind.startswith("Dmc") else ("mujoco" if kind.startswith("Gym") else "vector")
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or 1_000_000
    for name in ("num_envs", "batch_size", "buffer_size", "policy_frequency", "target_network_frequency",
                 "total_timesteps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.replay_ratio < 0 or args.learning_starts < 0 or not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UserError("need --replay-ratio >= 0, --learning-starts >= 0, 0 < tau <= 1 and 0 <= gamma <= 1")
    if args.buffer_size < args.num_envs:
        raise UserError("--buffer-size must be >= --num-envs (one vector step adds num_envs transitions)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    if args.actor_width < 1 or args.critic_width < 1 or not 0 <= args.q_target_beta <= 1:  # also NaN
        raise UserError(f"need --actor-width >= 1, --critic-width >= 1 and 0 <= --q-target-beta <= 1; got "
                        f"{args.actor_width}, {args.critic_width} and {args.q_target_beta}")
    return tasks, family


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args):
    """An EnvPool Gymnasium vector env (docs/sac.md, detail 1)."""
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads or 0)
    if args.max_episode_steps is not None:
        kwargs["max_episode_steps"] = args.max_episode_steps
    return envpool.make(env_id, **kwargs)


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct EnvPool seeds per run, task and purpose. EnvPool gives env i the seed `seed + i` when given an int,
    so runs with seeds 1 and 2 would share num_envs - 1 environments; we pass an explicit list instead."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


def obs_keys(space) -> Optional[list[str]]:
    """The keys of a Dict observation space in the space's own order (None for a Box)."""
    return list(space.spaces.keys()) if type(space).__name__ == "Dict" else None


def flatten_obs(obs, keys: Optional[list[str]] = None) -> np.ndarray:
    """(num_envs, obs_dim) float32. DMC's Dict entries are concatenated in the space's key order, scalar entries
    (shape () per env) as one column (docs/sac.md, detail 2); MuJoCo's float64 Box is cast."""
    if keys is None:
        return np.asarray(obs, dtype=np.float32)
    n = len(obs[keys[0]])
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(n, -1) for k in keys], axis=1)


class ReplayBuffer:
    """Flat ring of real transitions (obs, action, reward, terminated, next_obs) (docs/sac.md, detail 3).

    The next observation is stored explicitly: vector observations are small, and EnvPool returns the true final
    observation with the step that ends an episode, so every stored transition is complete on its own. The caller
    adds only the transitions of envs whose previous step did not end an episode: EnvPool's auto-reset step
    (final obs -> first obs of the next episode, action ignored) is never stored, so it can never be sampled.
    `terminated` is the only terminal flag: a time-limit truncation is stored as a normal transition whose target
    bootstraps from its final observation (detail 4)."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0

    def __len__(self):
        return self.size

    def add(self, obs, next_obs, actions, rewards, terminated):
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.next_obs[idx], self.actions[idx] = obs, next_obs, actions
        self.rewards[idx], self.terminated[idx] = rewards, terminated
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator):
        """Uniform with replacement (as CleanRL's buffer); returns obs, actions, rewards, terminated, next_obs."""
        if self.size < 1:
            raise ValueError("not enough data in the replay memory to sample")
        idx = rng.integers(0, self.size, batch_size)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.terminated[idx], self.next_obs[idx]


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


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # CleanRL (SpinUp uses -20); docs/sac.md, detail 5


def mlp_trunk(in_dim: int, hidden: int = 256) -> list:
    """(Linear, ReLU) pairs of CleanRL's 256-256 MLPs, named so diagnostics and interventions can walk them."""
    return [("fc1", nn.Linear(in_dim, hidden)), ("act1", nn.ReLU()), ("fc2", nn.Linear(hidden, hidden)),
            ("act2", nn.ReLU())]


def run_hidden(net: nn.Sequential, x):
    """Forward through `net`, also returning every ReLU output (the hidden units)."""
    hidden = []
    for module in net:
        x = module(x)
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


class SoftQNetwork(nn.Module):
    """Q(s, a): a 256-256 ReLU MLP on the concatenated observation and action (CleanRL), PyTorch default init;
    `hidden` sets both widths (--critic-width, docs/sac_optimistic.md, detail 1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(OrderedDict(mlp_trunk(obs_dim + action_dim, hidden) + [("q", nn.Linear(hidden, 1))]))

    def forward(self, obs, actions, return_hidden: bool = False):
        x, hidden = run_hidden(self.net, torch.cat([obs, actions], dim=1))
        return (x.squeeze(1), hidden) if return_hidden else x.squeeze(1)

    def hidden_layers(self):
        return hidden_layer_names(self.net)


def bounded_log_std(raw: torch.Tensor) -> torch.Tensor:
    """tanh rescaling of the raw head into [LOG_STD_MIN, LOG_STD_MAX] (SpinUp / Yarats, as CleanRL; detail 5)."""
    return LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1)


def squashed_gaussian(mean, log_std, noise, action_scale, action_bias):
    """Reparameterised sample a = tanh(mean + std * noise) * scale + bias and its log-density (summed over action
    dimensions) by the change of variables: log N(u) - sum log(scale * (1 - tanh(u)^2) + 1e-6) (detail 5)."""
    std = log_std.exp()
    u = mean + std * noise
    y = torch.tanh(u)
    # log N(u; mean, std) by the operations of torch.distributions.Normal.log_prob, without building a Normal
    # (whose argument checks cost more than the arithmetic at these sizes; detail 5)
    normal_log_prob = -((u - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    log_prob = normal_log_prob - torch.log(action_scale * (1 - y.pow(2)) + 1e-6)
    return y * action_scale + action_bias, log_prob.sum(dim=1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy: a 256-256 ReLU trunk, a mean head and a log-std head (CleanRL). The action
    bounds are buffers, so a checkpoint carries them. `hidden` sets both widths (--actor-width, docs/sac_optimistic.md,
    detail 1)."""

    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden: int = 256):
        super().__init__()
        action_dim = len(action_low)
        self.trunk = nn.Sequential(OrderedDict(mlp_trunk(obs_dim, hidden)))
        self.fc_mean = nn.Linear(hidden, action_dim)
        self.fc_logstd = nn.Linear(hidden, action_dim)
        low, high = np.asarray(action_low, dtype=np.float32), np.asarray(action_high, dtype=np.float32)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs, return_hidden: bool = False):
        x, hidden = run_hidden(self.trunk, obs)
        mean, log_std = self.fc_mean(x), bounded_log_std(self.fc_logstd(x))
        return (mean, log_std, hidden) if return_hidden else (mean, log_std)

    def get_action(self, obs, return_hidden: bool = False):
        """(sampled action, its log-prob, deterministic action tanh(mean) rescaled[, hidden])."""
        mean, log_std, hidden = self(obs, return_hidden=True)
        action, log_prob = squashed_gaussian(mean, log_std, torch.randn_like(mean), self.action_scale,
                                             self.action_bias)
        deterministic = torch.tanh(mean) * self.action_scale + self.action_bias
        return (action, log_prob, deterministic, hidden) if return_hidden else (action, log_prob, deterministic)

    def mean_action(self, obs):
        """The deterministic evaluation action (draws no random numbers)."""
        return torch.tanh(self(obs)[0]) * self.action_scale + self.action_bias

    def hidden_layers(self):
        return hidden_layer_names(self.trunk)


def target_entropy(action_shape) -> float:
    """SAC's heuristic target entropy -|A| (Haarnoja et al. 2018b; CleanRL)."""
    return -float(np.prod(action_shape))


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    """Polyak averaging theta' <- tau * theta + (1 - tau) * theta' (detail 6)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(1.0 - tau).add_(s, alpha=tau)


@torch.no_grad()
def soft_q_target(actor, qf1_target, qf2_target, rewards, terminated, next_obs, alpha: float, gamma: float,
                  q_target: str = "min", q_target_beta: float = 0.5):
    """r + gamma * (1 - terminated) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')), a' ~ pi(.|s'). Only a
    termination stops the bootstrap; a time-limit truncation bootstraps from the final observation (detail 4).
    `q_target` replaces the min by another reduction of the twins (reduce_twins, docs/sac_optimistic.md, detail 2)."""
    next_actions, next_log_pi, _ = actor.get_action(next_obs)
    min_q = reduce_twins(qf1_target(next_obs, next_actions), qf2_target(next_obs, next_actions), q_target,
                         q_target_beta)
    return rewards + (1.0 - terminated) * gamma * (min_q - alpha * next_log_pi)


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


def plasticity_metrics(actor, qf1, qf2, qf1_target, qf2_target, batch, alpha: float, gamma: float,
                       taus=(0.0, 0.1), q_target: str = "min", q_target_beta: float = 0.5) -> dict[str, float]:
    """Diagnostics of the two critics (each with its own TD loss) and of the actor (the actor loss) on one replay
    batch (docs/sac.md, detail 8)."""
    obs, actions, rewards, terminated, next_obs = batch
    target = soft_q_target(actor, qf1_target, qf2_target, rewards, terminated, next_obs, alpha, gamma, q_target,
                           q_target_beta)  # the training target (docs/sac_optimistic.md, detail 2)
    metrics = {}
    for name, qf in (("qf1", qf1), ("qf2", qf2)):
        q_values, hidden = qf(obs, actions, return_hidden=True)
        metrics.update(network_metrics(name, qf, hidden, F.mse_loss(q_values, target), taus))
    pi, log_pi, _, hidden = actor.get_action(obs, return_hidden=True)
    actor_loss = (alpha * log_pi - torch.min(qf1(obs, pi), qf2(obs, pi))).mean()
    metrics.update(network_metrics("actor", actor, hidden, actor_loss, taus))
    return metrics


def to_torch(batch, device):
    return [torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in batch]


def evaluate(actor, env_id: str, args: Args, episodes: int, seed: int, device) -> list[float]:
    """Play `episodes` episodes in parallel, one per EnvPool env (so short episodes are not over-represented),
    with the deterministic action tanh(mean); returns the episode returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args)
    keys = obs_keys(envs.observation_space)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        with torch.inference_mode():
            actions = actor.mean_action(torch.from_numpy(flatten_obs(obs, keys)).to(device)).cpu().numpy()
        obs, reward, terminated, truncated, info = envs.step(actions)
        _, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        prev_done = terminated | truncated
        for i, ret, _ in finished:
            if np.isnan(returns[i]):
                returns[i] = ret
    envs.close()
    return returns.tolist()


def evaluate_recorded(actor, env_id: str, args: Args, episodes: int, seed: int, device) -> tuple[list[float], list]:
    """`evaluate` (the same episodes, seeds and returns; no random draws) that also records every vector step as
    (obs, actions, reward, terminated, truncated, valid) for the value estimation bias (docs/sac_optimistic.md,
    detail 5). A copy of `evaluate` plus the record, so that evaluate itself stays sac.py's."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args)
    keys = obs_keys(envs.observation_space)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    record = []
    while np.isnan(returns).any():
        flat_obs = flatten_obs(obs, keys)
        with torch.inference_mode():
            actions = actor.mean_action(torch.from_numpy(flat_obs).to(device)).cpu().numpy()
        obs, reward, terminated, truncated, info = envs.step(actions)
        _, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        record.append((flat_obs, actions, reward, terminated, truncated, ~prev_done))
        prev_done = terminated | truncated
        for i, ret, _ in finished:
            if np.isnan(returns[i]):
                returns[i] = ret
    envs.close()
    return returns.tolist(), record


def reduce_twins(q1: torch.Tensor, q2: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Qbar of the twin critics (docs/sac_optimistic.md, detail 2): min (SAC), mean ((q1 + q2) / 2, the official
    pixel code's use_mean_reduction), max (use_max_reduction) or mix = beta * min + (1 - beta) * mean
    [reconstruction: not in the official code]."""
    if kind == "min":
        return torch.min(q1, q2)
    if kind == "mean":
        return (q1 + q2) / 2
    if kind == "max":
        return torch.max(q1, q2)
    if kind == "mix":
        return beta * torch.min(q1, q2) + (1 - beta) * (q1 + q2) / 2
    raise ValueError(f"unknown twin reduction {kind!r}")


def actor_param_count(obs_dim: int, action_dim: int, hidden: int) -> int:
    """Parameters of Actor(obs_dim, ..., hidden): two hidden layers and the mean and log-std heads (detail 1)."""
    return (obs_dim + 1) * hidden + (hidden + 1) * hidden + 2 * (hidden + 1) * action_dim


def critic_param_count(obs_dim: int, action_dim: int, hidden: int) -> int:
    """Parameters of one SoftQNetwork(obs_dim, action_dim, hidden) (detail 1)."""
    return (obs_dim + action_dim + 1) * hidden + (hidden + 1) * hidden + hidden + 1


def record_param_counts(run_dir: str, actor, qf1, obs_dim: int, action_dim: int) -> dict:
    """Adds the parameter counts and ratios to config.json (its other keys kept) and prints them; base_actor_params
    is sac.py's 256-wide actor on the same task, counted without building it (no random draws; detail 1)."""
    counts = {"actor_params": sum(p.numel() for p in actor.parameters()),
              "critic_params": sum(p.numel() for p in qf1.parameters()),
              "base_actor_params": actor_param_count(obs_dim, action_dim, 256)}
    counts["actor_to_critic_param_ratio"] = counts["actor_params"] / counts["critic_params"]
    counts["actor_fraction_of_base"] = counts["actor_params"] / counts["base_actor_params"]
    path = os.path.join(run_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    write_json(path, {**config, **counts})
    print(f"actor {counts['actor_params']} parameters, one critic {counts['critic_params']}: actor/critic "
          f"{counts['actor_to_critic_param_ratio']:.4f}, actor/(256-wide actor) {counts['actor_fraction_of_base']:.4f}")
    return counts


def bias_horizon(gamma: float) -> float:
    """H = ceil(log(0.01) / log(gamma)): a step of an episode cut by the time limit enters the bias only if its
    return counts at least H rewards, so the missing tail weighs gamma^H <= 1% of the discounted sum
    (docs/sac_optimistic.md, detail 5). gamma = 0: 1 (the return is the reward); gamma = 1: never (infinite)."""
    if gamma <= 0:
        return 1
    if gamma >= 1:
        return math.inf
    return math.ceil(round(math.log(0.01) / math.log(gamma), 9))


def value_bias_states(record: list, gamma: float, bonus=None):
    """From evaluate's record (per vector step: obs, actions, reward, terminated, truncated, valid), each env's first
    episode (the evaluated one): its steps' observations, actions and discounted Monte-Carlo returns
    G_t = sum_k gamma^k r_{t+k} to the episode's end. Every step of an episode that terminated; of one cut by the time
    limit, the steps with T - t >= bias_horizon(gamma) rewards to its end (detail 5). With `bonus` (per record step
    and env, alpha times the policy's entropy at that step's observation) also the soft return SAC's critic
    estimates, G^soft_t = r_t + gamma * (bonus_{t+1} + G^soft_{t+1}) within the episode. Returns (obs, actions, G,
    G^soft or None) as arrays (float32, float32, float64, float64), possibly empty."""
    horizon = bias_horizon(gamma)
    obs, actions, returns, soft_returns = [], [], [], []
    num_envs = len(record[0][2]) if record else 0
    for i in range(num_envs):
        rewards, terminal = [], None
        for _, _, reward, terminated, truncated, valid in record:
            if not valid[i]:
                break
            rewards.append(float(reward[i]))
            if terminated[i] or truncated[i]:
                terminal = bool(terminated[i])  # terminated (and possibly also truncated): the return is exact
                break
        if terminal is None:  # the episode did not end within the record
            continue
        length, g, g_soft = len(rewards), 0.0, 0.0
        step_returns, step_soft = np.zeros(length), np.zeros(length)
        for t in range(length - 1, -1, -1):
            g = rewards[t] + gamma * g
            step_returns[t] = g
            if bonus is not None:  # the next step's entropy bonus, within the episode only
                g_soft = rewards[t] + (gamma * (bonus[t + 1][i] + g_soft) if t + 1 < length else 0.0)
                step_soft[t] = g_soft
        keep = [t for t in range(length) if terminal or length - t >= horizon]
        obs += [record[t][0][i] for t in keep]
        actions += [record[t][1][i] for t in keep]
        returns += [step_returns[t] for t in keep]
        soft_returns += [step_soft[t] for t in keep]
    soft = np.asarray(soft_returns, np.float64) if bonus is not None else None
    if not returns:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0), soft
    return np.asarray(obs, np.float32), np.asarray(actions, np.float32), np.asarray(returns, np.float64), soft


@torch.no_grad()
def entropy_bonus(actor, record: list, alpha: float, device, samples: int = 8) -> list:
    """Per record step and env, alpha times the policy's entropy at that step's observation, estimated as the mean of
    -log pi(a|s) over `samples` actions drawn from a private generator (torch's global RNG is untouched: the run is
    the same with or without it; detail 5)."""
    generator = torch.Generator(device=device).manual_seed(0)
    out = []
    for step in record:
        obs = torch.from_numpy(np.asarray(step[0], np.float32)).to(device)
        mean, log_std = actor(obs)
        noise = torch.randn((samples, *mean.shape), generator=generator, device=device)
        _, log_prob = squashed_gaussian(mean.expand_as(noise).reshape(-1, mean.shape[1]),
                                        log_std.expand_as(noise).reshape(-1, mean.shape[1]),
                                        noise.reshape(-1, mean.shape[1]), actor.action_scale, actor.action_bias)
        out.append((-alpha * log_prob.reshape(samples, -1).mean(dim=0)).double().cpu().numpy())
    return out


@torch.no_grad()
def value_bias(qf1, qf2, record: list, gamma: float, device, actor=None, alpha: float = 0.0) -> dict[str, float]:
    """The value estimation bias of the online critics at the evaluation's (s_t, a_t) against the Monte-Carlo return
    (detail 5): means of min(Q1, Q2), (Q1 + Q2) / 2 and G_t, the biases min - G and mean - G, the bias normalised by
    |mean G| and its standard deviation over states, and the number of states. With the actor, also against the
    soft return (entropy bonuses included, what a soft critic estimates): soft_return, soft_bias, soft_bias_mean_twins,
    normalized_soft_bias, and alpha. Draws no random numbers from torch's global RNG."""
    bonus = entropy_bonus(actor, record, alpha, device) if actor is not None and record else None
    obs, actions, returns, soft_returns = value_bias_states(record, gamma, bonus)
    if len(returns) == 0:
        return {"num_states": 0}
    q1 = qf1(torch.from_numpy(obs).to(device), torch.from_numpy(actions).to(device)).double().cpu().numpy()
    q2 = qf2(torch.from_numpy(obs).to(device), torch.from_numpy(actions).to(device)).double().cpu().numpy()
    q_min, q_mean = np.minimum(q1, q2), (q1 + q2) / 2
    scale = abs(float(returns.mean()))
    out = {"q_min": float(q_min.mean()), "q_mean_twins": float(q_mean.mean()), "mc_return": float(returns.mean()),
           "bias": float((q_min - returns).mean()), "bias_mean_twins": float((q_mean - returns).mean())}
    if scale > 0:
        out["normalized_bias"] = out["bias"] / scale
        out["normalized_bias_std"] = float(((q_min - returns) / scale).std())
    if soft_returns is not None:
        out.update(alpha=float(alpha), soft_return=float(soft_returns.mean()),
                   soft_bias=float((q_min - soft_returns).mean()),
                   soft_bias_mean_twins=float((q_mean - soft_returns).mean()))
        soft_scale = abs(float(soft_returns.mean()))
        if soft_scale > 0:
            out["normalized_soft_bias"] = out["soft_bias"] / soft_scale
    out["num_states"] = int(len(returns))
    return out


def log_value_bias(writer, metrics: dict, global_step: int) -> dict:
    """Logs the value_bias metrics as value/<key>; returns them (for summary.json)."""
    for key, value in metrics.items():
        writer.add_scalar(f"value/{key}", value, global_step)
    return metrics


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
        keys = obs_keys(envs.observation_space)
        obs_dim = space_size(envs.observation_space, tasks[0])
        action_low, action_high = envs.action_space.low, envs.action_space.high
        action_dim = len(action_low)
        actor = Actor(obs_dim, action_low, action_high, args.actor_width).to(device)
        qf1 = SoftQNetwork(obs_dim, action_dim, args.critic_width).to(device)
        qf2 = SoftQNetwork(obs_dim, action_dim, args.critic_width).to(device)
        qf1_target = SoftQNetwork(obs_dim, action_dim, args.critic_width).to(device)
        qf2_target = SoftQNetwork(obs_dim, action_dim, args.critic_width).to(device)
        record_param_counts(run_dir, actor, qf1, obs_dim, action_dim)  # config.json (docs/sac_optimistic.md, detail 1)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            first = checkpoint["model"].get("trunk.fc1.weight") if isinstance(checkpoint["model"], dict) else None
            if first is not None and first.shape[0] != args.actor_width:  # an MLP actor of another width
                raise UserError(f"--eval-checkpoint {args.eval_checkpoint}: its actor is {first.shape[0]} wide: "
                                f"evaluate it with --actor-width {first.shape[0]}")
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != ((obs_dim,), action_dim):
                raise UserError(f"the checkpoint's actor takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']}-dimensional actions; {tasks[0]} has ({obs_dim},) and "
                                f"{envs.action_space}")
            load_weights(actor, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(actor, tasks[0], args, args.eval_episodes, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        qf1_target.load_state_dict(qf1.state_dict())
        qf2_target.load_state_dict(qf2.state_dict())
        critic_params = list(qf1.parameters()) + list(qf2.parameters())
        q_optimizer = torch.optim.Adam(critic_params, lr=args.q_lr, fused=True)
        actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
        # Automatic entropy tuning (detail 7): alpha = exp(log_alpha), log_alpha starts at 0, Adam with q_lr
        entropy_target = target_entropy(action_low.shape)
        log_alpha = torch.zeros(1, requires_grad=True, device=device)
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)
        alpha = log_alpha.exp().item() if args.autotune else args.alpha
        rb = ReplayBuffer(args.buffer_size, obs_dim, action_dim)
        stats = EpisodeStats(args.num_envs)
        random_low, random_high = action_low.astype(np.float32), action_high.astype(np.float32)

        obs = flatten_obs(envs.reset()[0], keys)
        prev_done = np.zeros(args.num_envs, dtype=bool)  # last step ended an episode: this step is an auto-reset
        task_index = 0
        update_credit, next_eval = 0.0, args.eval_every
        actor_loss = alpha_loss = None
        while global_step < args.total_timesteps:
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch (docs/sac.md, detail 9): every stored transition carries its own next observation,
                # so the replay memory needs no cut; drop unfinished episodes, new env with its own seeds.
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], args.num_envs,
                                env_seeds(args.seed, task_index, 0, args.num_envs), args)
                obs = flatten_obs(envs.reset()[0], keys)
                prev_done[:] = False
                stats = EpisodeStats(args.num_envs)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")

            if global_step < args.learning_starts:  # uniform random actions within the bounds (CleanRL)
                actions = rng.uniform(random_low, random_high, (args.num_envs, action_dim)).astype(np.float32)
            else:
                with torch.inference_mode():
                    actions = actor.get_action(torch.from_numpy(obs).to(device))[0].cpu().numpy()

            next_obs, reward, terminated, truncated, info = envs.step(actions)
            next_obs = flatten_obs(next_obs, keys)
            global_step += args.num_envs
            # Store only real transitions: the step after a done is EnvPool's auto-reset (detail 3)
            valid = ~prev_done
            rb.add(obs[valid], next_obs[valid], actions[valid], reward[valid], terminated[valid])
            _, finished = stats.update(reward, terminated, truncated, info, valid)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            prev_done = terminated | truncated
            obs = next_obs

            if global_step > args.learning_starts:
                update_credit += args.replay_ratio * args.num_envs  # detail 6
                while update_credit >= 1.0 and len(rb) > 0:
                    update_credit -= 1.0
                    b_obs, b_actions, b_rewards, b_terminated, b_next_obs = to_torch(
                        rb.sample(args.batch_size, rng), device)
                    target = soft_q_target(actor, qf1_target, qf2_target, b_rewards, b_terminated, b_next_obs,
                                           alpha, args.gamma, args.q_target, args.q_target_beta)
                    qf1_values, qf2_values = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
                    qf1_loss, qf2_loss = F.mse_loss(qf1_values, target), F.mse_loss(qf2_values, target)
                    qf_loss = qf1_loss + qf2_loss
                    if not math.isfinite(qf_loss.item()):
                        raise Diverged(f"non-finite critic loss ({qf_loss.item()}) at global_step={global_step}")
                    q_optimizer.zero_grad(set_to_none=True)
                    qf_loss.backward()
                    q_optimizer.step()
                    num_updates += 1

                    if num_updates % args.policy_frequency == 0:  # delayed actor, repeated to compensate (detail 6)
                        for p in critic_params:  # the actor loss needs no critic weight gradients (detail 6)
                            p.requires_grad_(False)
                        for _ in range(args.policy_frequency):
                            pi, log_pi, _ = actor.get_action(b_obs)
                            actor_loss = (alpha * log_pi - torch.min(qf1(b_obs, pi), qf2(b_obs, pi))).mean()
                            if not math.isfinite(actor_loss.item()):
                                raise Diverged(f"non-finite actor loss ({actor_loss.item()}) at "
                                               f"global_step={global_step}")
                            actor_optimizer.zero_grad(set_to_none=True)
                            actor_loss.backward()
                            actor_optimizer.step()
                            if args.autotune:  # detail 7: a fresh sample from the updated actor
                                with torch.no_grad():
                                    _, log_pi, _ = actor.get_action(b_obs)
                                alpha_loss = (-log_alpha.exp() * (log_pi + entropy_target)).mean()
                                a_optimizer.zero_grad(set_to_none=True)
                                alpha_loss.backward()
                                a_optimizer.step()
                                alpha = log_alpha.exp().item()
                        for p in critic_params:
                            p.requires_grad_(True)
                    if num_updates % args.target_network_frequency == 0:
                        soft_update(qf1_target, qf1, args.tau)
                        soft_update(qf2_target, qf2, args.tau)
                    if num_updates % args.log_every == 0:
                        sps = int(global_step / (time.time() - start_time))
                        writer.add_scalar("losses/qf1_values", qf1_values.mean().item(), global_step)
                        writer.add_scalar("losses/qf2_values", qf2_values.mean().item(), global_step)
                        writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                        writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                        writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
                        if actor_loss is not None:
                            writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                        writer.add_scalar("losses/alpha", alpha, global_step)
                        if alpha_loss is not None:
                            writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                        writer.add_scalar("charts/SPS", sps, global_step)
                        writer.add_scalar("charts/num_updates", num_updates, global_step)
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        metrics_batch = to_torch(rb.sample(args.metrics_batch_size, metrics_rng), device)
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep torch's RNG
                            metrics = plasticity_metrics(actor, qf1, qf2, qf1_target, qf2_target, metrics_batch, alpha,
                                                         args.gamma, q_target=args.q_target,
                                                         q_target_beta=args.q_target_beta)
                        for key, value in metrics.items():
                            writer.add_scalar(key, value, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns, eval_record = evaluate_recorded(actor, tasks[task_index], args, args.eval_episodes,
                                                         args.seed + global_step, device)  # + the record (detail 5)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                log_value_bias(writer, value_bias(qf1, qf2, eval_record, args.gamma, device, actor, alpha), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": actor.state_dict(), "qf1": qf1.state_dict(), "qf2": qf2.state_dict(),
                        "log_alpha": float(log_alpha.item()), "obs_shape": [int(obs_dim)],
                        "n_actions": int(action_dim), "args": dataclasses.asdict(args)}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns, eval_record = evaluate_recorded(actor, tasks[-1], args, args.eval_episodes, args.seed,
                                                          device)  # + the record (docs/sac_optimistic.md, detail 5)
            writer.add_scalar("eval/episodic_return", float(np.mean(eval_returns)), global_step)
            summary["value_bias"] = log_value_bias(writer, value_bias(qf1, qf2, eval_record, args.gamma, device,
                                                                      actor, alpha), global_step)
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
