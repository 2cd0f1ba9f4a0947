"""Stream AC(lambda) on EnvPool: streaming actor-critic, one transition at a time, no replay, no batches.

Paper: "Streaming Deep Reinforcement Learning Finally Works", Mohamed Elsayed, Gautham Vasan and A. Rupam Mahmood,
2024, https://arxiv.org/abs/2410.14606. Defaults and behaviour follow the official code (mohmdelsayed/streaming-drl
at 407dca7: `stream_ac_continuous.py`, `stream_ac_discrete.py`, `optim.py`, `normalization_wrappers.py`,
`sparse_init.py`, `time_wrapper.py`), reimplemented (that code is CC BY-NC 4.0; nothing is copied). The paper's
body (its algorithm box, hyperparameter table and ablations) was not readable: every setting here is the code's.

Method: one environment, one update per step. The critic's TD error delta = r~ + gamma (1 - d) v(s') - v(s) (both
values from the current critic, r~ the scaled reward) drives two eligibility-trace learners: the critic's trace
accumulates grad v(s), the actor's grad [log pi(a|s) + c_ent sign(delta) H(pi(.|s))]. Each network is stepped by
ObGD (overshooting-bounded gradient descent): theta <- theta + alpha_eff delta z with the step size alpha_eff cut so
that one update cannot overshoot its target, alpha_eff = min(alpha, 1 / (kappa max(|delta|, 1) ||z||_1)). Sparse
initialisation, parameter-free LayerNorm, observation normalisation, reward scaling and a time feature make the
single-sample updates stable.

What this script adds to the official code (all in docs/stream_ac.md, "Implementation details" and "Deviations"):
  - EnvPool MuJoCo (HalfCheetah-v4, Hopper-v4, ...), DeepMind Control (CheetahRun-v1, DogStand-v1, ...; Dict
    observations flattened), classic control with continuous (Pendulum-v1, MountainCarContinuous-v0) and discrete
    actions (CartPole-v1, Acrobot-v1), with EnvPool's next-step auto-reset (the pseudo-transition is never learned);
  - time-limit truncations bootstrap from v(s') by default (`--no-truncation-bootstraps`: the official behaviour);
  - the paper's components each behind a flag (ablations), task sequences, `plasticity/` diagnostics on a small
    ring of recent transitions kept only for them, evaluation, checkpoints and the project's outputs;
  - one batched critic forward for s and s', the acting forward's graph reused for the actor's update, and both
    gradients from one autograd call (exactly the official update, fewer passes).
The networks live on the CPU by default: single-sample updates are dominated by GPU launch overhead.

Differences from the base script: none (the base of the streaming actor-critic family; its plumbing is sac.py's).

Docs: docs/stream_ac.md. Conventions every script follows: docs/conventions.md.
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
    """seed of the experiment (network init, action sampling, environment seeds)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic algorithms are used"""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """where the networks live (default cpu: one-sample updates are dominated by GPU launch overhead; auto picks
    cuda when available)"""
    torch_threads: int = 0
    """torch CPU threads (0: torch's default, one per core unless OMP_NUM_THREADS is set, as the benchmark harness
    does); on a busy CPU one thread per run avoids oversubscription (docs/conventions.md, threads)"""
    output_dir: str = "runs"
    """outputs go to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """the run directory name; default {env}__{exp_name}__{seed}__{unix time}"""
    save_model: bool = False
    """if toggled, save the actor, the critic and the observation statistics to <run_dir>/model.pt (loadable with
    torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate its actor on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 10000
    """log the plasticity/ diagnostics every this many updates (= agent steps; 0 disables them)"""
    metrics_batch_size: int = 256
    """the diagnostics are computed on the last this many transitions (a ring kept only for them)"""
    log_every: int = 1000
    """log the TD error, values, entropy, ObGD step sizes and SPS every this many updates (= agent steps)"""

    # --- environment ---
    env_id: str = "HalfCheetah-v4"
    """the EnvPool task id (MuJoCo: HalfCheetah-v4, Hopper-v4, Walker2d-v4, Ant-v4, ...; DeepMind Control:
    CheetahRun-v1, DogStand-v1, ...; classic control: CartPole-v1, Acrobot-v1, Pendulum-v1,
    MountainCarContinuous-v0). Default: the official stream_ac_continuous.py's"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); all tasks must share observation and action
    spaces (e.g. WalkerStand-v1 WalkerWalk-v1 WalkerRun-v1)"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task)"""
    total_timesteps: Optional[int] = None
    """total environment steps [default: MuJoCo and DMC 2M (official stream_ac_continuous.py), classic control 500k
    (official stream_ac_discrete.py); task sequences: len(env_ids) * steps_per_task]"""
    num_envs: int = 1
    """must be 1: streaming learning learns from one stream of experience"""
    env_threads: int = 0
    """EnvPool worker threads (0: one per env up to the core count)"""
    max_episode_steps: Optional[int] = None
    """episode cap in agent steps [default: EnvPool's: 1000 for MuJoCo and DMC, 500 for CartPole-v1 and Acrobot-v1,
    200 for Pendulum-v1; the official classic-control scripts use 10000]"""

    # --- algorithm (defaults: the official code at 407dca7) ---
    hidden_size: Optional[int] = None
    """units of each of the two hidden layers of the actor and of the critic [default: 128 for continuous actions
    (official stream_ac_continuous.py), 32 for discrete actions (official stream_ac_discrete.py's StreamAC)]"""
    gamma: float = 0.99
    """discount factor (official: 0.99)"""
    trace_lambda: float = 0.8
    """lambda of the eligibility traces, which decay by gamma * lambda per step (official `lamda`: 0.8)"""
    learning_rate: float = 1.0
    """ObGD's step size alpha, the largest step it takes (official `lr`: 1.0); with --optimizer sgd the step itself"""
    kappa_policy: float = 3.0
    """ObGD's overshooting bound of the actor (official: 3.0)"""
    kappa_value: float = 2.0
    """ObGD's overshooting bound of the critic (official: 2.0)"""
    entropy_coef: float = 0.01
    """c_ent: weight of the entropy gradient in the actor's trace, multiplied by sign(delta) (official: 0.01)"""
    optimizer: Literal["obgd", "sgd"] = "obgd"
    """obgd: the official ObGD; sgd: the same traces with the fixed step --learning-rate (no bound), the no-ObGD
    ablation (the paper's exact ablation settings could not be read: pick --learning-rate yourself)"""
    truncation_bootstraps: bool = True
    """a time-limit truncation bootstraps from v(s') (the traces still reset); --no-truncation-bootstraps is the
    official done = terminated or truncated (docs/stream_ac.md, detail 10)"""
    normalize_observations: bool = True
    """Welford-normalised observations (official NormalizeObservation); --no-normalize-observations for the ablation"""
    scale_rewards: bool = True
    """rewards divided by the std of a discounted return trace (official ScaleReward); --no-scale-rewards for the
    ablation"""
    layer_norm: bool = True
    """parameter-free LayerNorm before each hidden LeakyReLU (official); --no-layer-norm for the ablation"""
    sparse_init: bool = True
    """sparse initialisation of every Linear layer (official); --no-sparse-init: PyTorch's default init"""
    sparsity: float = 0.9
    """fraction of each unit's incoming weights set to 0 by the sparse initialisation (official: 0.9)"""
    time_feature: bool = True
    """append the episode-time feature to the (normalised) observation (official AddTimeInfo); --no-time-feature for
    the ablation"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite TD error: the run stops with summary status "diverged"."""


PIXELS = ("stream_ac.py needs vector observations; pixel tasks are not in this script (stream_q.py covers Atari and "
          "MinAtar for Stream Q(lambda))")


def space_size(space, task: str) -> int:
    """Size of the flat float32 observation: a Box (n,) or a Dict of Boxes of shape () or (n,) (docs/stream_ac.md,
    detail 2). Anything else (pixels) is a UserError."""
    if type(space).__name__ == "Dict":
        entries = list(space.spaces.values())
        ok = bool(entries) and all(type(s).__name__ == "Box" and len(s.shape) <= 1 for s in entries)
    else:
        entries = [space]
        ok = type(space).__name__ == "Box" and len(space.shape) == 1
    if not ok:
        raise UserError(f"{task}: {PIXELS}; {task} has {space}")
    return int(sum(int(np.prod(s.shape)) for s in entries))  # a () entry has prod(()) = 1


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the defaults; returns (tasks, family)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    if args.num_envs != 1:
        raise UserError(f"--num-envs must be 1: streaming learning learns from one stream of experience "
                        f"(got {args.num_envs})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    known = envpool.list_all_envs()
    for task in tasks:
        if task.startswith("MinAtar/"):
            raise UserError(f"{task}: {PIXELS}")
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else " (see envpool.list_all_envs())"
            raise UserError(f"unknown env id '{task}'{hint}")
    specs = [envpool.make_spec(task) for task in tasks]
    layouts = set()
    for task, spec in zip(tasks, specs):
        obs_space = spec.observation_space
        keys = tuple((k, tuple(s.shape)) for k, s in obs_space.spaces.items()) if type(obs_space).__name__ == "Dict" \
            else (("", tuple(obs_space.shape)),)
        space_size(obs_space, task)
        space = spec.action_space
        if type(space).__name__ == "Discrete":
            layouts.add((keys, int(space.n)))
        elif type(space).__name__ == "Box" and len(space.shape) == 1:
            if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
                raise UserError(f"stream_ac.py clips actions to the action bounds, which must be finite; {task} has "
                                f"{space}")
            layouts.add((keys, tuple(space.low.tolist()), tuple(space.high.tolist())))
        else:
            raise UserError(f"stream_ac.py needs a Discrete or a 1-D Box action space; {task} has {space}")
    if len(layouts) > 1:
        raise UserError("all tasks of --env-ids must share the observation space and the action space "
                        "(bounds included)")
    kind = type(specs[0]).__name__
    family = "dmc" if kind.startswith("Dmc") else ("mujoco" if kind.startswith("Gym") else "classic")
    continuous = type(specs[0].action_space).__name__ == "Box"
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or (500_000 if family == "classic" else 2_000_000)
    if args.hidden_size is None:
        args.hidden_size = 128 if continuous else 32
    for name in ("total_timesteps", "hidden_size", "log_every", "metrics_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        raise UserError("--max-episode-steps must be >= 1")
    for name in ("learning_rate", "kappa_policy", "kappa_value"):
        if not getattr(args, name) > 0:  # also catches nan
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in ("gamma", "trace_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not 0 <= args.sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    if not args.entropy_coef >= 0:
        raise UserError(f"--entropy-coef must be >= 0 (got {args.entropy_coef})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    return tasks, family


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args):
    """An EnvPool Gymnasium vector env (docs/stream_ac.md, detail 1)."""
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads or 0)
    if args.max_episode_steps is not None:
        kwargs["max_episode_steps"] = args.max_episode_steps
    return envpool.make(env_id, **kwargs)


def time_limit(env_id: str, family: str, args: Args) -> int:
    """T of the time feature: the episode cap the env runs with (EnvPool's spec, or --max-episode-steps); DMC: 1000
    as the official AddTimeInfo (docs/stream_ac.md, detail 5)."""
    import envpool

    if family == "dmc":
        return 1000
    return int(args.max_episode_steps or envpool.make_spec(env_id).config.max_episode_steps)


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
    (shape () per env) as one column (docs/stream_ac.md, detail 2); MuJoCo's float64 Box is cast."""
    if keys is None:
        return np.asarray(obs, dtype=np.float32)
    n = len(obs[keys[0]])
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(n, -1) for k in keys], axis=1)


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


# ---------------------------------------------------------------------------------------------------------------
# Stream AC(lambda): networks, policy distributions, the update (docs/stream_ac.md, details 6-10)
# ---------------------------------------------------------------------------------------------------------------


def mlp_trunk(in_dim: int, hidden: int, layer_norm: bool) -> list:
    """Two hidden layers, each Linear -> LayerNormNoAffine -> LeakyReLU(0.01) (official Actor/Critic; detail 6),
    named so the diagnostics can walk them."""
    layers = []
    for i, fan_in in enumerate((in_dim, hidden), start=1):
        layers.append((f"fc{i}", nn.Linear(fan_in, hidden)))
        if layer_norm:
            layers.append((f"ln{i}", LayerNormNoAffine()))
        layers.append((f"act{i}", nn.LeakyReLU(0.01)))
    return layers


def run_hidden(net: nn.Sequential, x):
    """Forward through `net`, also returning every LeakyReLU output (the hidden units)."""
    hidden = []
    for module in net:
        x = module(x)
        if isinstance(module, nn.LeakyReLU):
            hidden.append(x)
    return x, hidden


def hidden_layer_names(net: nn.Sequential) -> list[str]:
    """Names of the layers whose LeakyReLU outputs are the hidden units, in forward order."""
    names, last = [], None
    for name, module in net.named_children():
        if isinstance(module, nn.Linear):
            last = name
        elif isinstance(module, nn.LeakyReLU):
            names.append(last)
    return names


def initialize(module: nn.Module, sparse: bool, sparsity: float):
    """Sparse init of every Linear, heads included, biases 0 (official `initialize_weights`; detail 6);
    `sparse=False` keeps PyTorch's default init."""
    if not sparse:
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            sparse_init_(m.weight, sparsity)
            nn.init.zeros_(m.bias)


class Actor(nn.Module):
    """Continuous: a Gaussian with mean `mu(x)` and std softplus(`std(x)`), state dependent, no floor, no tanh.
    Discrete: softmax over `logits(x)` (official Actor of stream_ac_continuous.py / stream_ac_discrete.py)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, continuous: bool, layer_norm: bool):
        super().__init__()
        self.continuous = continuous
        self.trunk = nn.Sequential(OrderedDict(mlp_trunk(obs_dim, hidden, layer_norm)))
        if continuous:
            self.mu = nn.Linear(hidden, n_actions)
            self.std = nn.Linear(hidden, n_actions)
        else:
            self.logits = nn.Linear(hidden, n_actions)

    def forward(self, obs, return_hidden: bool = False):
        """(mu, std) or (logits,) [, hidden]."""
        x, hidden = run_hidden(self.trunk, obs)
        out = (self.mu(x), F.softplus(self.std(x))) if self.continuous else (self.logits(x),)
        return (out, hidden) if return_hidden else out

    def hidden_layers(self):
        return hidden_layer_names(self.trunk)


class Critic(nn.Module):
    """v(s): the same trunk and a Linear -> 1 head (official Critic)."""

    def __init__(self, obs_dim: int, hidden: int, layer_norm: bool):
        super().__init__()
        self.net = nn.Sequential(OrderedDict(mlp_trunk(obs_dim, hidden, layer_norm) + [("v", nn.Linear(hidden, 1))]))

    def forward(self, obs, return_hidden: bool = False):
        x, hidden = run_hidden(self.net, obs)
        return (x.squeeze(1), hidden) if return_hidden else x.squeeze(1)

    def hidden_layers(self):
        return hidden_layer_names(self.net)


class StreamAC(nn.Module):
    """The actor and the critic in one module, so one state_dict holds both (the checkpoint's "model")."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, continuous: bool, layer_norm: bool):
        super().__init__()
        self.actor = Actor(obs_dim, n_actions, hidden, continuous, layer_norm)
        self.critic = Critic(obs_dim, hidden, layer_norm)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def policy_terms(out, actions):
    """(log pi(a|s) summed over action dimensions, entropy H(pi(.|s))), one per row. Continuous: the Gaussian
    log-density of the *unclipped* sample (detail 7), written out as torch.distributions.Normal computes it (without
    the argument checks that dominate at batch 1); discrete: Categorical from log_softmax."""
    if len(out) == 2:
        mu, std = out
        log_std = std.log()
        log_prob = -((actions - mu) ** 2) / (2 * std**2) - log_std - LOG_SQRT_2PI
        entropy = 0.5 + LOG_SQRT_2PI + log_std
        return log_prob.sum(dim=1), entropy.sum(dim=1)
    log_p = F.log_softmax(out[0], dim=1)
    return log_p.gather(1, actions.long().view(-1, 1)).squeeze(1), -(log_p.exp() * log_p).sum(dim=1)


def sample_action(out):
    """a ~ pi(.|s) (no gradient): Gaussian mu + std * N(0, 1), unclipped; discrete: a multinomial draw."""
    with torch.no_grad():
        if len(out) == 2:
            mu, std = out
            return mu + std * torch.randn_like(mu)
        try:
            return torch.multinomial(F.softmax(out[0], dim=1), 1).squeeze(1)
        except RuntimeError as err:  # it checks its probabilities: non-finite logits are a divergence, not a bug
            if torch.isfinite(out[0]).all():
                raise
            raise Diverged("non-finite policy logits") from err


def deterministic_action(out):
    """The evaluation action: the mean (clipped by the caller) or the argmax."""
    return out[0] if len(out) == 2 else out[0].argmax(dim=1)


def sign(x: float) -> float:
    return float((x > 0) - (x < 0))  # torch.sign: 0 at 0


def episode_flags(terminated: bool, truncated: bool, truncation_bootstraps: bool) -> tuple[bool, bool]:
    """(bootstrap from v(s'), reset the traces) for one step (detail 10): a termination never bootstraps; a time-limit
    truncation does unless --no-truncation-bootstraps (the official done = terminated or truncated); both end the
    episode, so both reset the traces."""
    done = terminated or truncated
    return not (terminated or (truncated and not truncation_bootstraps)), done


def stream_ac_update(actor_params, critic, opt_policy, opt_value, log_prob, entropy, obs, next_obs, reward: float,
                     bootstrap: bool, done: bool, gamma: float, entropy_coef: float):
    """One Stream AC(lambda) update (detail 8, 9). `log_prob` and `entropy` come from the actor's forward that sampled
    the action (the actor has not changed since, so they are pi(.|s)'s, with their graph); `obs`, `next_obs` are
    (1, obs_dim). delta = r + gamma * bootstrap * v(s') - v(s) with the current critic, v(s') without gradient. The
    gradients of the *outputs* (not of losses): g_v = grad v(s), g_pi = grad [log pi(a|s) + c_ent sign(delta) H];
    then ObGD steps the actor first, the critic second, both with delta, both traces reset when `done`.
    Returns (delta, v(s), H, step size policy, step size value)."""
    values = critic(torch.cat([obs, next_obs]))  # s and s' as one batch: LayerNorm is per sample, so exact
    v_s, v_next, h = torch.cat([values.detach(), entropy.detach()]).tolist()  # one sync for the three numbers
    delta = reward + (gamma * v_next if bootstrap else 0.0) - v_s
    if not (math.isfinite(delta) and math.isfinite(h)):
        raise Diverged(f"non-finite TD error ({delta}) or policy entropy ({h})")
    actor_out = log_prob.sum() + entropy_coef * sign(delta) * entropy.sum()
    critic_params = opt_value.params
    grads = torch.autograd.grad([actor_out, values[0]], list(actor_params) + critic_params)  # disjoint parameters
    n = len(actor_params)
    step_policy = opt_policy.step(grads[:n], delta, reset=done)
    step_value = opt_value.step(grads[n:], delta, reset=done)
    return delta, v_s, h, step_policy, step_value


class TransitionRing:
    """The last `capacity` transitions (network inputs, action, scaled reward, bootstrap flag), kept ONLY for the
    plasticity diagnostics (detail 12): never read by the learner, and filling it draws no random numbers."""

    def __init__(self, capacity: int, obs_dim: int, action_shape: tuple):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, *action_shape), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.bootstrap = np.zeros(capacity, dtype=np.float32)

    def add(self, obs, next_obs, action, reward, bootstrap):
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i], self.rewards[i], self.bootstrap[i] = \
            obs, next_obs, action, reward, bootstrap
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def batch(self, device):
        return [torch.from_numpy(x[: self.size].copy()).to(device)
                for x in (self.obs, self.actions, self.rewards, self.bootstrap, self.next_obs)]


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
    network's name (plasticity/actor/..., plasticity/critic/...). Units are LeakyReLU outputs: dormant on |h|,
    gradient-inactive on |dL/dz| with z the pre-activation (the gradient through the LeakyReLU: 1 or 0.01)."""
    params = [p for p in network.parameters()]
    grads = torch.autograd.grad(loss, hidden + params, retain_graph=True)
    hidden_grads, param_grads = grads[: len(hidden)], grads[len(hidden):]
    metrics, totals = {}, {}
    for name, h, g in zip(network.hidden_layers(), hidden, hidden_grads):
        slope = torch.where(h.detach() > 0, 1.0, 0.01)  # LeakyReLU'(z); h > 0 exactly where z > 0
        act_score, grad_score = unit_scores(h.detach()), unit_scores(g * slope)
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


def plasticity_metrics(agent: StreamAC, batch, gamma: float, entropy_coef: float, taus=(0.0, 0.1)) -> dict[str, float]:
    """Diagnostics of the critic (loss 0.5 delta^2, mean over the ring) and of the actor (loss
    -(log pi(a|s) delta + c_ent H), mean) with the current networks on the last transitions (detail 12)."""
    obs, actions, rewards, bootstrap, next_obs = batch
    with torch.no_grad():
        target = rewards + gamma * bootstrap * agent.critic(next_obs)
    values, hidden = agent.critic(obs, return_hidden=True)
    delta = target - values
    metrics = network_metrics("critic", agent.critic, hidden, 0.5 * (delta**2).mean(), taus)
    out, hidden = agent.actor(obs, return_hidden=True)
    log_prob, entropy = policy_terms(out, actions)
    actor_loss = -(log_prob * delta.detach() + entropy_coef * entropy).mean()
    metrics.update(network_metrics("actor", agent.actor, hidden, actor_loss, taus))
    return metrics


def network_input(normalizer: ObservationNormalizer, obs: np.ndarray, steps, limit: int, add_time: bool,
                  update: bool = True) -> np.ndarray:
    """(n, obs_dim [+1]) float32: the normalised observation, then the time feature appended (not normalised;
    detail 3, 5). Training updates the statistics with the one observation; evaluation (`update=False`) does not."""
    x = normalizer(obs[0] if update else obs, update=update).reshape(len(obs), -1)
    if not add_time:
        return x
    t = np.array([[time_feature(k, limit)] for k in np.atleast_1d(steps)], dtype=np.float32)
    return np.concatenate([x, t], axis=1)


def evaluate(actor: Actor, normalizer: ObservationNormalizer, env_id: str, limit: int, args: Args, episodes: int,
             seed: int, device) -> list[float]:
    """Play `episodes` episodes in parallel, one per EnvPool env, with the deterministic policy (the mean action
    clipped to the bounds, or the argmax), the observation statistics frozen and a time feature per env (detail 13);
    returns the episode returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args)
    keys = obs_keys(envs.observation_space)
    continuous = type(envs.action_space).__name__ == "Box"
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    steps = np.zeros(episodes, dtype=np.int64)
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        x = network_input(normalizer, flatten_obs(obs, keys), steps, limit, args.time_feature, update=False)
        with torch.inference_mode():
            actions = deterministic_action(actor(torch.from_numpy(x).to(device))).cpu().numpy()
        if continuous:
            actions = np.clip(actions, envs.action_space.low, envs.action_space.high).astype(np.float32)
        obs, reward, terminated, truncated, info = envs.step(actions)
        _, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
        steps = np.where(prev_done, 0, steps + 1)  # the auto-reset step returns a first observation
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


def read_obs_stats(checkpoint: dict, path: str, obs_dim: int, normalizer: ObservationNormalizer):
    """Restore the observation statistics a --save-model checkpoint carries (detail 13)."""
    state = checkpoint.get("obs_stats")
    ok = isinstance(state, dict) and isinstance(state.get("count"), int) and all(
        isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) == (obs_dim,) for k in ("mean", "p", "var"))
    if not ok:
        raise UserError(f"--eval-checkpoint {path}: no observation statistics of shape ({obs_dim},) (obs_stats)")
    normalizer.stats.load_state_dict({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


CHECKPOINT_FLAGS = ("time_feature", "layer_norm", "normalize_observations")  # what shapes alone cannot tell


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
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], 1, env_seeds(args.seed, 0, 0, 1), args)
        keys = obs_keys(envs.observation_space)
        obs_dim = space_size(envs.observation_space, tasks[0])
        continuous = type(envs.action_space).__name__ == "Box"
        if continuous:
            action_low, action_high = envs.action_space.low, envs.action_space.high
            n_actions = len(action_low)
        else:
            n_actions = int(envs.action_space.n)
        agent = StreamAC(obs_dim + int(args.time_feature), n_actions, args.hidden_size, continuous,
                         args.layer_norm).to(device)
        initialize(agent, args.sparse_init, args.sparsity)
        normalizer = ObservationNormalizer((obs_dim,), enabled=args.normalize_observations)
        limit = time_limit(tasks[0], family, args)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != ((obs_dim,), n_actions):
                raise UserError(f"--eval-checkpoint {args.eval_checkpoint}: its networks take observations "
                                f"{tuple(checkpoint['obs_shape'])} and {checkpoint['n_actions']} actions; "
                                f"{tasks[0]} has ({obs_dim},) and {envs.action_space}")
            for key in CHECKPOINT_FLAGS:  # flags that build another network or input with the same shapes
                theirs = checkpoint["args"].get(key)
                if isinstance(theirs, bool) and theirs != getattr(args, key):
                    raise UserError(f"--eval-checkpoint {args.eval_checkpoint}: trained with "
                                    f"--{'' if theirs else 'no-'}{key.replace('_', '-')}; pass the same flag")
            load_weights(agent, checkpoint, args.eval_checkpoint)
            read_obs_stats(checkpoint, args.eval_checkpoint, obs_dim, normalizer)
            envs.close()
            returns = evaluate(agent.actor, normalizer, tasks[0], limit, args, args.eval_episodes, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        actor_params, critic_params = list(agent.actor.parameters()), list(agent.critic.parameters())
        bounded = args.optimizer == "obgd"  # detail 9; sgd: the no-ObGD ablation
        opt_policy = ObGD(actor_params, args.learning_rate, args.gamma, args.trace_lambda, args.kappa_policy, bounded)
        opt_value = ObGD(critic_params, args.learning_rate, args.gamma, args.trace_lambda, args.kappa_value, bounded)
        scaler = RewardScaler(args.gamma, enabled=args.scale_rewards)
        ring = TransitionRing(args.metrics_batch_size, obs_dim + int(args.time_feature),
                              (n_actions,) if continuous else ()) if args.metrics_every else None
        stats = EpisodeStats(1)
        no_op = np.zeros((1, n_actions), dtype=np.float32) if continuous else np.zeros(1, dtype=np.int32)

        x = network_input(normalizer, flatten_obs(envs.reset()[0], keys), 0, limit, args.time_feature)
        steps = 0  # agent steps in the current episode (the time feature's k)
        prev_done = False  # the last step ended an episode: this step is EnvPool's auto-reset (detail 1)
        task_index, next_eval = 0, args.eval_every
        logged = np.zeros(8)  # |delta|, v(s), H, step pi, step v, bound pi, bound v, count
        valid, invalid = np.ones(1, dtype=bool), np.zeros(1, dtype=bool)
        while global_step < args.total_timesteps:
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch (detail 11): the unfinished episode is dropped like an episode end (traces and the
                # reward trace reset); the observation statistics continue.
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], 1, env_seeds(args.seed, task_index, 0, 1), args)
                opt_policy.reset()
                opt_value.reset()
                scaler.trace = 0.0
                limit = time_limit(tasks[task_index], family, args)
                x = network_input(normalizer, flatten_obs(envs.reset()[0], keys), 0, limit, args.time_feature)
                steps, prev_done = 0, False
                stats = EpisodeStats(1)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")

            if prev_done:  # EnvPool's auto-reset step: its action is ignored, nothing is learned (detail 1)
                next_obs, reward, terminated, truncated, info = envs.step(no_op)
                global_step += 1
                stats.update(reward, terminated, truncated, info, invalid)
                x = network_input(normalizer, flatten_obs(next_obs, keys), 0, limit, args.time_feature)
                steps, prev_done = 0, False
                continue

            obs_t = torch.from_numpy(x).to(device)
            policy_out = agent.actor(obs_t)  # its graph is reused by the update: the actor has not changed (detail 8)
            action = sample_action(policy_out)
            log_prob, entropy = policy_terms(policy_out, action)
            action_np = action.cpu().numpy()
            env_action = np.clip(action_np, action_low, action_high).astype(np.float32) if continuous \
                else action_np.astype(np.int32)  # the env gets the clipped sample, log pi is the unclipped one's
            next_obs, reward, terminated, truncated, info = envs.step(env_action)
            global_step += 1
            steps += 1
            bootstrap, done = episode_flags(bool(terminated[0]), bool(truncated[0]), args.truncation_bootstraps)
            x_next = network_input(normalizer, flatten_obs(next_obs, keys), steps, limit, args.time_feature)
            scaled_reward = scaler(float(reward[0]), done)  # detail 4
            delta, value, ent, step_policy, step_value = stream_ac_update(
                actor_params, agent.critic, opt_policy, opt_value, log_prob, entropy, obs_t,
                torch.from_numpy(x_next).to(device), scaled_reward, bootstrap, done, args.gamma, args.entropy_coef)
            num_updates += 1
            logged += (abs(delta), value, ent, step_policy, step_value, step_policy < args.learning_rate,
                       step_value < args.learning_rate, 1)
            if ring is not None:
                ring.add(x[0], x_next[0], action_np[0], scaled_reward, float(bootstrap))
            _, finished = stats.update(reward, terminated, truncated, info, valid)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            prev_done = done
            x = x_next

            if num_updates % args.log_every == 0:
                means = logged[:7] / logged[7]
                for key, value in zip(("losses/td_error", "losses/value", "losses/entropy",
                                       "stream/step_size_policy", "stream/step_size_value",
                                       "stream/bound_active_policy", "stream/bound_active_value"), means):
                    writer.add_scalar(key, float(value), global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
                writer.add_scalar("charts/num_updates", num_updates, global_step)
                logged[:] = 0.0
            if ring is not None and num_updates % args.metrics_every == 0:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep torch's RNG
                    metrics = plasticity_metrics(agent, ring.batch(device), args.gamma, args.entropy_coef)
                for key, value in metrics.items():
                    writer.add_scalar(key, value, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(agent.actor, normalizer, tasks[task_index], limit, args, args.eval_episodes,
                                   args.seed + global_step, device)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": agent.state_dict(), "obs_shape": [int(obs_dim)], "n_actions": int(n_actions),
                        "args": dataclasses.asdict(args), "obs_stats": normalizer.stats.state_dict()}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(agent.actor, normalizer, tasks[-1], limit, args, args.eval_episodes, args.seed,
                                    device)
            writer.add_scalar("eval/episodic_return", float(np.mean(eval_returns)), global_step)
        summary.update(status="completed", sps=int(global_step / train_time))
    except Diverged as err:
        summary.update(status="diverged", error=f"{err} at global_step={global_step}")
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
