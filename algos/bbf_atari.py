"""BBF (Bigger, Better, Faster) on EnvPool Atari: the Atari 100k agent of Schwarzer et al. (2023).

Paper: "Bigger, Better, Faster: Human-level Atari with Human-level Efficiency", Schwarzer, Obando-Ceron, Courville,
Bellemare, Agarwal, Castro, ICML 2023, https://arxiv.org/abs/2305.19452. Official code (JAX/Dopamine):
google-research/google-research, `bigger_better_faster/` (`bbf/configs/BBF.gin`, `bbf/agents/spr_agent.py`,
`bbf/spr_networks.py`, `bbf/replay_memory/subsequence_replay_buffer.py`). This script is a PyTorch re-implementation
written from those files; every component and its source line is listed in docs/bbf_atari.md.

Method: an SPR agent (distributional C51, dueling, double-Q, prioritized replay, DrQ augmentation and a 5-step
self-predictive representation loss) scaled up: an Impala ResNet encoder 4x wider, a 2048-unit projection, 8 gradient
updates per environment step, shrink-and-perturb resets every 40k gradient steps, n-step 10 -> 3 and discount
0.97 -> 0.997 annealed after every reset, AdamW weight decay and an EMA target network that also acts.

Differences from the base script (dqn.py: its EnvPool Atari setup, frame-once replay memory, outputs, diagnostics,
evaluation and error handling are kept; the agent is new):
  - network: Impala-CNN x4 with latent renormalisation, a dueling C51 head, an SPR transition model, projection and
    predictor (docs/bbf_atari.md, details 1-2);
  - loss: C51 cross-entropy with double-Q targets + 5 x SPR, weighted by PER importance weights (details 3-4);
  - replay: prioritized, returns subsequences for SPR, n-step returns and discounts computed at sampling time with
    the current annealed n and gamma (details 5-6);
  - DrQ augmentation of current, future and next states (detail 7);
  - AdamW (weight decay on weight matrices only), EMA target updated every gradient step, acting with the EMA
    network (details 8-9);
  - shrink-and-perturb resets of online and target networks with the n/gamma annealing restarted (details 10-11);
  - Atari 100k protocol defaults (no sticky actions, life loss terminal, 100k agent steps; detail 12);
  - Atari only: no task sequences (--env-ids).

Docs: docs/bbf_atari.md. Conventions every script follows: docs/conventions.md.
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
    """seed of the experiment (network init, exploration, replay sampling, augmentation, environment seeds)"""
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
    """if toggled, save the networks to <run_dir>/model.pt (loadable with torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate it on --env-id"""
    eval_episodes: int = 100
    """evaluation episodes at the end, one per parallel env (official: 100, `DataEfficientAtariRunner.
    num_eval_episodes`). Costly on a CPU: 100 full games through the x4 Impala network (docs/bbf_atari.md, detail 12)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 1000
    """log the plasticity/ diagnostics every this many gradient updates (0 disables them)"""
    metrics_batch_size: int = 256
    """size of the fresh replay batch the diagnostics are computed on"""
    log_every: int = 100
    """log losses, epsilon, SPS and the bbf/ schedule values every this many gradient updates"""

    # --- environment (Atari 100k protocol, BBF.gin; docs/bbf_atari.md, detail 12) ---
    env_id: str = "ChopperCommand-v5"
    """the EnvPool Atari task id (BBF.gin's example game is ChopperCommand)"""
    total_timesteps: int = 100_000
    """total agent steps (Atari 100k: 100k agent steps = 400k frames, `Runner.training_steps`)"""
    num_envs: int = 1
    """parallel EnvPool environments used for collection (official: `num_train_envs = 1`)"""
    env_threads: int = 0
    """EnvPool worker threads (0: one per env up to the core count)"""
    sticky_action_prob: float = 0.0
    """probability of repeating the previous action (Atari 100k: none, `sticky_actions = False`)"""
    episodic_life: bool = True
    """treat life loss as terminal for learning (`terminal_on_life_loss = True`); returns are logged per full game"""
    noop_max: int = 30
    """maximum no-op actions at reset (official `max_noops = 30`; EnvPool's minimum is 1)"""
    full_action_space: bool = False
    """use all 18 actions (official: the minimal action set)"""
    max_episode_steps: int = 27_000
    """episode cap in agent steps (`Runner.max_steps_per_episode = 27000`, 108k frames)"""

    # --- algorithm (defaults: BBF.gin at the paper's replay ratio 8; docs/bbf_atari.md, "Defaults") ---
    learning_rate: float = 1e-4
    """AdamW learning rate (`BBFAgent.learning_rate = encoder_learning_rate = 0.0001`)"""
    adam_eps: float = 1.5e-4
    """AdamW epsilon (`create_scaling_optimizer.eps = 0.00015`)"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on weight matrices/kernels only, never on biases
    (`create_scaling_optimizer.weight_decay = 0.1`, `decay_bias=False`)"""
    buffer_size: int = 200_000
    """replay capacity in transitions (`replay_capacity = 200000`: all 100k steps are kept)"""
    batch_size: int = 32
    """minibatch size (`BBFAgent.batch_size = 32`)"""
    batches_to_group: int = 1
    """draw this many batches at once: one stratified prioritized sample of batches_to_group x batch_size with one n
    and gamma and importance weights normalised over the whole draw, split in stratum order into consecutive updates
    (BBF.gin: `batches_to_group = 2`; 1: each update draws its own batch, as the paper describes; detail 5)"""
    replay_ratio: float = 8.0
    """gradient updates per environment step (paper: RR 8). BBF.gin's `replay_ratio = 64` counts *samples* per env
    step, i.e. 64 / 32 = 2 updates; the paper's main agent uses 256 samples = 8 updates (detail 5)"""
    learning_starts: int = 2000
    """environment steps of random play before learning (`min_replay_history = 2000`)"""
    start_e: float = 1.0
    """epsilon at the start of the exploration schedule"""
    end_e: float = 0.0
    """final training epsilon (`epsilon_train = 0.00`)"""
    exploration_steps: int = 2001
    """env steps over which epsilon decays linearly after learning_starts (`epsilon_decay_period = 2001`)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy (`epsilon_eval = 0.001`)"""
    gamma: float = 0.997
    """final discount of the annealing (`JaxDQNAgent.gamma = 0.997`)"""
    min_gamma: float = 0.97
    """discount right after every reset (`BBFAgent.min_gamma = 0.97`)"""
    n_step: int = 3
    """final n-step length of the annealing (`BBFAgent.update_horizon = 3`)"""
    max_n_step: int = 10
    """n-step length right after every reset (`BBFAgent.max_update_horizon = 10`)"""
    cycle_steps: int = 10_000
    """gradient steps over which n and gamma are annealed after every reset (`BBFAgent.cycle_steps`; detail 11)"""
    reset_every: int = 40_000
    """gradient steps between shrink-and-perturb resets (paper: 40k; 0 disables). As in the official code the reset
    clock is the environment step counter: a reset every reset_every / replay_ratio env steps from the start of the
    run (BBF.gin: `reset_every = 20_000` env steps at its RR 2; detail 10)"""
    no_resets_after: int = 100_000
    """no reset whose following interval would end after this env step (`BBFAgent.no_resets_after = 100_000`)"""
    reset_offset: int = 0
    """reset schedule of the official snapshot: 0 as 1d4d2f1a (reset when the env-step clock reaches the scheduled
    step: 19 resets at RR 8); k >= 1 as 4c429948 with `reset_offset = k` (first reset scheduled k steps later, a reset
    once the clock has passed the scheduled step, limit no_resets_after + k: 18 resets at RR 8 with its default 1;
    detail 10)"""
    shrink_factor: float = 0.5
    """weight of the current parameters of the encoder and transition model at a reset (`shrink_factor = 0.5`)"""
    perturb_factor: float = 0.5
    """weight of a fresh initialisation of the encoder and transition model at a reset (`perturb_factor = 0.5`)"""
    target_update_tau: float = 0.005
    """EMA rate of the target network, updated after every gradient step (`target_update_tau = 0.005`)"""
    target_action_selection: bool = True
    """act (in training and evaluation) with the EMA target network (`target_action_selection = True`)"""
    spr_weight: float = 5.0
    """weight of the SPR loss (`BBFAgent.spr_weight = 5`)"""
    jumps: int = 5
    """SPR prediction steps (`BBFAgent.jumps = 5`)"""
    data_augmentation: bool = True
    """DrQ augmentation: 4-pixel replicate padding + random crop, intensity noise (`data_augmentation = True`)"""
    prioritized: bool = True
    """prioritized replay (`replay_scheme = 'prioritized'`); off: uniform sampling"""
    width_scale: int = 4
    """Impala encoder width multiplier: stages of 16/32/32 x width_scale channels (`width_scale = 4`)"""
    hidden_dim: int = 2048
    """projection (and SPR predictor) width (`hidden_dim = 2048`)"""
    num_atoms: int = 51
    """C51 atoms (`num_atoms = 51`)"""
    v_max: float = 10.0
    """C51 support is [-v_max, v_max] (`vmax = 10`)"""
    renormalize: bool = True
    """min-max renormalise every latent (encoder output, transition-model steps) per sample (`renormalize = True`)"""
    clip_rewards: bool = True
    """clip rewards to [-1, 1] for learning (Dopamine's Atari runner)"""
    channels_last: bool = True
    """run the convolutions in channels-last memory format (same numerics; measured faster on CPU, detail 13)"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


def resolve_args(args: Args):
    """Check the flags against the environment (without creating it); returns the list of tasks (one)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    known = envpool.list_all_envs()
    if args.env_id not in known:
        close = difflib.get_close_matches(args.env_id, known, n=3, cutoff=0.6)
        hint = f" (did you mean: {', '.join(close)}?)" if close else " (see envpool.list_all_envs())"
        raise UserError(f"unknown env id '{args.env_id}'{hint}")
    spec = envpool.make_spec(args.env_id)
    shape = getattr(spec.observation_space, "shape", None)
    if "repeat_action_probability" not in spec.config._fields or shape is None or len(shape) != 3:
        raise UserError(f"bbf_atari.py needs an EnvPool Atari task with pixel observations; {args.env_id} has "
                        f"{spec.observation_space}")
    if type(spec.action_space).__name__ != "Discrete":
        raise UserError(f"bbf_atari.py needs a discrete action space; {args.env_id} has {spec.action_space}")
    for name in ("num_envs", "batch_size", "buffer_size", "n_step", "max_n_step", "total_timesteps", "jumps",
                 "width_scale", "hidden_dim", "num_atoms", "max_episode_steps", "noop_max", "batches_to_group"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_step > args.max_n_step:
        raise UserError("need --n-step <= --max-n-step (n is annealed from max-n-step down to n-step)")
    if not 0 < args.min_gamma <= args.gamma < 1:
        raise UserError("need 0 < --min-gamma <= --gamma < 1")
    if min(args.torch_threads, args.learning_starts, args.reset_every, args.cycle_steps, args.eval_episodes,
           args.reset_offset) < 0:
        raise UserError("--torch-threads, --learning-starts, --reset-every, --cycle-steps, --eval-episodes and "
                        "--reset-offset must be >= 0")
    if args.replay_ratio < 0 or not 0 <= args.end_e <= args.start_e <= 1 or args.exploration_steps < 1:
        raise UserError("need --replay-ratio >= 0, 0 <= end-e <= start-e <= 1 and --exploration-steps >= 1")
    if not 0 < args.target_update_tau <= 1:
        raise UserError("--target-update-tau must be in (0, 1]")
    if args.batches_to_group > 1 and (args.replay_ratio * args.num_envs) % args.batches_to_group:  # whole groups
        raise UserError("--batches-to-group must divide --replay-ratio x --num-envs (the updates of one env step)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    if args.buffer_size // args.num_envs <= max(args.max_n_step, args.jumps) + 4:
        raise UserError("--buffer-size is too small for --num-envs, --max-n-step and --jumps")
    return [args.env_id]


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True):
    """An EnvPool Gymnasium vector env with the Atari 100k settings (docs/bbf_atari.md, detail 12)."""
    import envpool

    return envpool.make(
        env_id, env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads,
        episodic_life=args.episodic_life and train,  # evaluation always plays full games
        reward_clip=False,  # rewards are clipped in the agent, so the env's reward stays the raw score
        repeat_action_probability=args.sticky_action_prob,
        noop_max=args.noop_max,
        use_fire_reset=False,  # Dopamine does not press FIRE at reset
        full_action_space=args.full_action_space,
        max_episode_steps=args.max_episode_steps,
    )


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct EnvPool seeds per run, task and purpose. EnvPool gives env i the seed `seed + i` when given an int,
    so runs with seeds 1 and 2 would share num_envs - 1 environments; we pass an explicit list instead."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


def anneal_n_step(step: int, cycle_steps: int, n_max: int, n_min: int) -> int:
    """n after `step` gradient steps since the last reset: exponential from n_max to n_min over cycle_steps, rounded
    (spr_agent.py `exponential_decay_scheduler` + `update_horizon_scheduler`; docs/bbf_atari.md, detail 11)."""
    frac = min(max(step / cycle_steps, 0.0), 1.0) if cycle_steps > 0 else 1.0
    return int(np.round(n_max * (n_min / n_max) ** frac))


def anneal_gamma(step: int, cycle_steps: int, gamma_min: float, gamma_max: float) -> float:
    """gamma after `step` gradient steps since the last reset: 1 - gamma decays exponentially from 1 - gamma_min to
    1 - gamma_max (the scheduler with reverse=True; detail 11)."""
    frac = min(max(step / cycle_steps, 0.0), 1.0) if cycle_steps > 0 else 1.0
    return float(1.0 - math.exp((1 - frac) * math.log(1 - gamma_min) + frac * math.log(1 - gamma_max)))


def reset_due(global_step: int, next_reset: int, interval: int, no_resets_after: int,
              offset: int = 0) -> tuple[bool, int]:
    """The official reset clock (`_train_step`, `reset_weights`; docs/bbf_atari.md, detail 10) after env step
    `global_step`, with the first reset scheduled at interval + offset. A reset is due once the clock reaches
    next_reset (1d4d2f1a, offset 0) or has passed it (4c429948, `reset_offset` >= 1); then the next one is scheduled
    `interval` env steps later, and this one is skipped if that next one would come after no_resets_after (+ offset in
    4c429948): the network would have less than one interval to recover. Returns (reset now?, next reset)."""
    if global_step < next_reset + (offset > 0):
        return False, next_reset
    next_reset = global_step + interval
    return next_reset <= no_resets_after + offset, next_reset


def epsilon_at(step: int, args: Args) -> float:
    """Dopamine's linearly_decaying_epsilon: start_e until learning_starts, then linear to end_e."""
    progress = step - args.learning_starts
    if progress < 0:
        return args.start_e
    return max(args.end_e, args.start_e - (args.start_e - args.end_e) * progress / args.exploration_steps)


class ReplayBuffer:
    """Prioritized replay memory storing every frame once and returning SPR subsequences (detail 5).

    The storage is dqn.py's: row t of the per-env ring holds the newest frame of obs_t, a_t, r_t and the flags of
    the step taken from obs_t; stacks are rebuilt from the last `stack` rows; `valid[t]` is False for EnvPool's
    auto-reset step, which gets priority 0 and is never sampled. Priorities of new rows are the largest priority
    recorded so far (Dopamine's sum tree, initially 1). n-step returns and discounts are computed in `sample` with
    the n and gamma passed in, so the annealed values apply to all stored data (detail 6).
    """

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, horizon: int):
        self.rows = capacity // num_envs
        self.num_envs = num_envs
        self.stack = obs_shape[0]
        self.horizon = horizon  # rows a sampled transition needs after it: max(max n-step, SPR jumps)
        self.frames = np.zeros((self.rows, num_envs, *obs_shape[1:]), dtype=obs_dtype)
        self.actions = np.zeros((self.rows, num_envs), dtype=np.int64)
        self.rewards = np.zeros((self.rows, num_envs), dtype=np.float32)
        self.terminated = np.zeros((self.rows, num_envs), dtype=bool)
        self.truncated = np.zeros((self.rows, num_envs), dtype=bool)
        self.first = np.zeros((self.rows, num_envs), dtype=bool)
        self.valid = np.zeros((self.rows, num_envs), dtype=bool)
        self.priorities = np.zeros((self.rows, num_envs), dtype=np.float64)
        self.max_priority = 1.0
        self.pos, self.full = 0, False

    def __len__(self):
        return (self.rows if self.full else self.pos) * self.num_envs

    def add(self, obs, actions, rewards, terminated, truncated, first, valid):
        p = self.pos
        self.frames[p] = obs[:, -1]
        self.actions[p], self.rewards[p] = actions, rewards
        self.terminated[p], self.truncated[p] = terminated, truncated
        self.first[p], self.valid[p] = first, valid
        self.priorities[p] = np.where(valid, self.max_priority, 0.0)
        self.pos = (p + 1) % self.rows
        self.full = self.full or self.pos == 0

    def sampleable(self) -> int:
        """Number of rows transitions can start from: each needs its next `horizon` rows written (and, once the
        ring has wrapped, its `stack - 1` predecessors intact)."""
        size = self.rows if self.full else self.pos
        return max(0, size - self.horizon - (self.stack - 1 if self.full else 0))

    def stacked(self, rows, envs):
        idx = np.empty((len(rows), self.stack), dtype=np.int64)
        idx[:, -1] = rows
        for d in range(self.stack - 2, -1, -1):  # walk back, but never past the first frame of an episode
            nxt = idx[:, d + 1]
            idx[:, d] = np.where(self.first[nxt, envs], nxt, (nxt - 1) % self.rows)
        return self.frames[idx, envs[:, None]]

    def sample_indices(self, batch_size: int, rng: np.random.Generator, prioritized: bool):
        """Stratified sampling proportional to priority (Schaul et al.; the official buffer's sum tree) over the
        sampleable rows; invalid rows have weight 0. Uniform over valid rows when not prioritized."""
        count = self.sampleable()
        if count < 1:
            raise ValueError("not enough data in the replay memory to sample")
        first_row = ((self.pos if self.full else 0) + (self.stack - 1 if self.full else 0)) % self.rows
        if first_row + count <= self.rows:
            window = slice(first_row, first_row + count)
            weights = self.priorities[window] if prioritized else self.valid[window]
        else:
            rows = (first_row + np.arange(count)) % self.rows
            weights = self.priorities[rows] if prioritized else self.valid[rows]
        cumulative = np.cumsum(weights.ravel(), dtype=np.float64)
        total = cumulative[-1]
        if total <= 0:
            raise ValueError("no valid transition in the replay memory")
        targets = (np.arange(batch_size) + rng.random(batch_size)) / batch_size * total
        flat = np.minimum(np.searchsorted(cumulative, targets, side="right"), len(cumulative) - 1)
        return (first_row + flat // self.num_envs) % self.rows, flat % self.num_envs

    def sample(self, batch_size: int, rng: np.random.Generator, n_step: int, gamma: float, jumps: int,
               prioritized: bool = True):
        """Returns states (B, jumps+1, stack, H, W) for s_t..s_{t+jumps}, actions (B, jumps+1), n-step returns,
        bootstrap discounts (gamma^m after m real steps, 0 after a termination), next states s_{t+m},
        same-trajectory masks (B, jumps+1), importance weights (B,), and the sampled (rows, envs)."""
        rows, envs = self.sample_indices(batch_size, rng, prioritized)
        returns = np.zeros(batch_size, dtype=np.float32)
        steps = np.zeros(batch_size, dtype=np.int64)
        alive = np.ones(batch_size, dtype=bool)
        terminal = np.zeros(batch_size, dtype=bool)
        for i in range(n_step):  # n-step return with the current (annealed) n and gamma, stopping at episode ends
            r = (rows + i) % self.rows
            returns += np.where(alive, gamma**i * self.rewards[r, envs], 0.0).astype(np.float32)
            steps += alive
            term, trunc = self.terminated[r, envs], self.truncated[r, envs]
            terminal |= alive & term
            alive &= ~(term | trunc)
        discounts = np.where(terminal, 0.0, gamma**steps).astype(np.float32)
        next_rows = (rows + steps) % self.rows
        seq_rows = (rows[:, None] + np.arange(jumps + 1)[None, :]) % self.rows  # (B, jumps+1)
        seq_envs = np.repeat(envs[:, None], jumps + 1, axis=1)
        ends = self.terminated[seq_rows, seq_envs] | self.truncated[seq_rows, seq_envs]
        # s_{t+k} is in the same trajectory iff none of the steps t..t+k-1 ended the episode (detail 3)
        same = np.concatenate([np.ones((batch_size, 1), bool), np.cumprod(~ends[:, :-1], axis=1).astype(bool)], 1)
        states = self.stacked(seq_rows.ravel(), seq_envs.ravel()).reshape(batch_size, jumps + 1, self.stack,
                                                                           *self.frames.shape[2:])
        if prioritized:
            weights = 1.0 / np.sqrt(self.priorities[rows, envs] + 1e-10)  # official: 1/sqrt(p), divided by the max
            weights = (weights / weights.max()).astype(np.float32)
        else:
            weights = np.ones(batch_size, dtype=np.float32)
        return (states, self.actions[seq_rows, seq_envs], returns, discounts, self.stacked(next_rows, envs),
                same.astype(np.float32), weights), (rows, envs)

    def update_priorities(self, rows, envs, priorities):
        self.priorities[rows, envs] = priorities
        self.max_priority = max(self.max_priority, float(np.max(priorities)))


def split_batches(batch, indices, groups: int) -> list:
    """Split one draw of groups x batch_size transitions (ReplayBuffer.sample's output) into `groups` consecutive
    batches of (batch, (rows, envs)). Stratified draws come in stratum order, so with groups = 2 the first batch holds
    the lower half of the priority mass (the older rows) and the second the upper half, both with the draw's n, gamma
    and importance-weight normalisation: the official `train` reshapes its 64 samples to (2, 32) and scans over them
    (docs/bbf_atari.md, detail 5)."""
    size = len(indices[0]) // groups
    return [(tuple(x[i * size:(i + 1) * size] for x in batch), tuple(x[i * size:(i + 1) * size] for x in indices))
            for i in range(groups)]


class EpisodeStats:
    """Full-game, unclipped episode returns from EnvPool's `info` (as dqn.py, docs/dqn.md detail 5)."""

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
    """TensorFlow/Flax 'SAME' padding (the extra pixel goes after)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def renormalize(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling of a latent to [0, 1] (spr_networks.py `renormalize`; detail 1)."""
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-5)).view_as(x)


class ResidualStage(nn.Module):
    """Impala stage: conv3x3, max-pool 3x3/2 (SAME), then pre-activation residual blocks relu-conv-relu-conv."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)])
            for _ in range(num_blocks))

    def forward(self, x, hidden: Optional[list] = None):
        x = self.conv(x)
        (top, bottom), (left, right) = same_padding(x.shape[-2], 3, 2), same_padding(x.shape[-1], 3, 2)
        x = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), 3, 2)
        for conv1, conv2 in self.blocks:
            h = F.relu(x)
            if hidden is not None:
                hidden.append(h)
            h = F.relu(conv1(h))
            if hidden is not None:
                hidden.append(h)
            x = x + conv2(h)
        return x


class BBFNetwork(nn.Module):
    """Encoder (Impala x width, final ReLU, renormalised), SPR transition model, projection, predictor and dueling
    C51 head, with the official module split (`encoder`, `transition_model`, `projection`, `predictor`, `head`) that
    the resets act on (spr_networks.py `RainbowDQNNetwork`; details 1-2). xavier_uniform kernels, zero biases."""

    def __init__(self, obs_shape: tuple, n_actions: int, args: Args):
        super().__init__()
        self.n_actions, self.num_atoms, self.do_renormalize = n_actions, args.num_atoms, args.renormalize
        dims = [16 * args.width_scale, 32 * args.width_scale, 32 * args.width_scale]
        channels, stages = obs_shape[0], []
        for d in dims:
            stages.append(ResidualStage(channels, d, 2))
            channels = d
        self.encoder = nn.ModuleList(stages)
        size = obs_shape[1]
        for _ in dims:
            size = math.ceil(size / 2)
        self.latent_shape = (channels, size, size)
        self.transition_model = nn.ModuleDict({
            "conv1": nn.Conv2d(channels + n_actions, channels, 3, padding=1),
            "conv2": nn.Conv2d(channels, channels, 3, padding=1)})
        self.projection = nn.Linear(channels * size * size, args.hidden_dim)
        self.predictor = nn.Linear(args.hidden_dim, args.hidden_dim)
        self.head = nn.ModuleDict({"advantage": nn.Linear(args.hidden_dim, n_actions * args.num_atoms),
                                   "value": nn.Linear(args.hidden_dim, args.num_atoms)})
        self.register_buffer("support", torch.linspace(-args.v_max, args.v_max, args.num_atoms))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x, hidden: Optional[list] = None):
        """x: float pixels in [0, 1], (N, C, H, W). Returns the renormalised spatial latent."""
        for stage in self.encoder:
            x = stage(x, hidden)
        x = F.relu(x)
        if hidden is not None:
            hidden.append(x)
        return renormalize(x) if self.do_renormalize else x

    def logits(self, latent, hidden: Optional[list] = None):
        """Dueling C51 logits (N, actions, atoms): value + advantage - mean advantage, on relu(projection)."""
        x = F.relu(self.projection(latent.flatten(1)))
        if hidden is not None:
            hidden.append(x)
        adv = self.head["advantage"](x).view(-1, self.n_actions, self.num_atoms)
        value = self.head["value"](x).view(-1, 1, self.num_atoms)
        return value + adv - adv.mean(dim=1, keepdim=True)

    def q_values(self, latent):
        return (F.softmax(self.logits(latent), dim=-1) * self.support).sum(-1)

    def project(self, latent):
        """SPR target branch: projection of the flattened latent, without ReLU (`encode_project`)."""
        return self.projection(latent.flatten(1))

    def transition(self, latent, action):
        """One transition-model step: concat one-hot action planes, conv-relu-conv-relu, renormalise."""
        planes = F.one_hot(action, self.n_actions).to(latent.dtype)[:, :, None, None].expand(
            -1, -1, *latent.shape[-2:])
        x = torch.cat([latent, planes.contiguous(memory_format=torch.channels_last)
                       if latent.is_contiguous(memory_format=torch.channels_last) else planes], dim=1)
        x = F.relu(self.transition_model["conv2"](F.relu(self.transition_model["conv1"](x))))
        return renormalize(x) if self.do_renormalize else x

    def spr_predictions(self, latent, actions):
        """Roll the transition model from `latent` with actions (N, K); predictor(projection(.)) of each step."""
        preds = []
        for k in range(actions.shape[1]):
            latent = self.transition(latent, actions[:, k])
            preds.append(self.predictor(self.project(latent)))
        return torch.stack(preds, dim=1)

    def forward(self, obs):
        """Q-values of uint8 observations (acting and evaluation)."""
        return self.q_values(self.encode(obs.float() / 255.0))

    def hidden_layers(self):
        """Names of the hidden ReLU outputs collected by encode/logits, in forward order."""
        names = []
        for s, stage in enumerate(self.encoder):
            for b in range(len(stage.blocks)):
                names += [f"encoder.stage{s}.block{b}.act1", f"encoder.stage{s}.block{b}.act2"]
        return names + ["encoder.out", "projection"]


RESET_MODULES = ("projection", "predictor", "head")  # fully re-initialised at a reset
SHRINK_PERTURB_MODULES = ("encoder", "transition_model")  # shrink_perturb_keys = "encoder,transition_model"


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ augmentation of float images (N, C, H, W) (spr_networks.py `drq_image_aug`; detail 7): replicate-pad by
    `pad`, crop back at a random offset per image in [0, 2*pad) (JAX randint excludes its maxval), then scale the
    intensity by 1 + 0.05 * clip(N(0, 1), -2, 2) per image. Draws from torch's generator."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad, (n,), device=x.device)
    ox = torch.randint(0, 2 * pad, (n,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    cropped = padded[torch.arange(n, device=x.device)[:, None, None, None],
                     torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    noise = 1.0 + 0.05 * torch.randn(n, 1, 1, 1, device=x.device).clamp(-2.0, 2.0)
    return cropped * noise


def project_distribution(target_support, probabilities, support):
    """Dopamine's C51 projection of a distribution on `target_support` (N, atoms) onto `support` (atoms,)."""
    delta = support[1] - support[0]
    clipped = target_support.clamp(support[0], support[-1])
    weights = (1 - (clipped[:, None, :] - support[None, :, None]).abs() / delta).clamp(0, 1)  # (N, atoms_i, atoms_j)
    return (weights * probabilities[:, None, :]).sum(-1)


def spr_loss(predictions, targets, same_trajectory):
    """Per-sample SPR loss: squared distance of L2-normalised vectors (= 2 - 2 cos) per step, masked where the
    future left the trajectory, averaged over the K steps (masked steps count as 0; detail 3).
    predictions, targets: (B, K, D); same_trajectory: (B, K)."""
    distance = (F.normalize(predictions, dim=-1) - F.normalize(targets, dim=-1)).pow(2).sum(-1)
    return (distance * same_trajectory).mean(1)


def to_torch(batch, device):
    return [torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in batch]


def bbf_loss(online, target, batch, args: Args, return_hidden: bool = False):
    """The BBF training loss on one batch (details 3-4, 7): returns (loss, per-sample C51 cross-entropy, per-sample
    SPR loss, mean Q of the taken actions[, hidden ReLU outputs])."""
    states, actions, returns, discounts, next_states, same, weights = batch
    b, t = states.shape[:2]
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    x = states.flatten(0, 1).float().div_(255.0)
    nx = next_states.float().div_(255.0)
    if args.data_augmentation:  # one draw for current + future states, one for next states, as the official code
        x, nx = augment(x), augment(nx)
    x = x.view(b, t, *x.shape[1:])
    with torch.no_grad():
        # Double-Q C51 target: the online network picks a*, the target network's distribution at a* is projected.
        next_action = online.q_values(online.encode(nx.contiguous(memory_format=mf))).argmax(dim=1)
        target_latents = target.encode(torch.cat([nx, x[:, 1:].flatten(0, 1)]).contiguous(memory_format=mf))
        next_probs = F.softmax(target.logits(target_latents[:b]), dim=-1)[torch.arange(b), next_action]
        target_dist = project_distribution(returns[:, None] + discounts[:, None] * online.support,
                                           next_probs, online.support)
        spr_targets = target.project(target_latents[b:]).view(b, t - 1, -1)
    hidden = [] if return_hidden else None
    latent = online.encode(x[:, 0].contiguous(memory_format=mf), hidden)
    logits = online.logits(latent, hidden)
    chosen = logits[torch.arange(b), actions[:, 0]]
    ce = -(target_dist * F.log_softmax(chosen, dim=-1)).sum(-1)
    spr = spr_loss(online.spr_predictions(latent, actions[:, : t - 1]), spr_targets, same[:, 1:])
    loss = (weights * (ce + args.spr_weight * spr)).mean()
    q_taken = (F.softmax(chosen.detach(), dim=-1) * online.support).sum(-1)
    out = (loss, ce.detach(), spr.detach(), q_taken.mean())
    return out + (hidden,) if return_hidden else out


def make_optimizer(network: nn.Module, args: Args) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on weight matrices/kernels only (optax mask `ndim != 1`; detail 8)."""
    decay = [p for p in network.parameters() if p.ndim > 1]
    no_decay = [p for p in network.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.learning_rate, betas=(0.9, 0.999), eps=args.adam_eps)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float):
    """target <- (1 - tau) target + tau online, every gradient step (`interpolate_weights`; detail 9)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


@torch.no_grad()
def shrink_and_perturb(online: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, fresh_online: nn.Module,
                       fresh_target: nn.Module, shrink: float, perturb: float):
    """A BBF reset (spr_agent.py `jit_reset`; detail 10). Online and target each get their own fresh initialisation:
    encoder and transition model <- shrink * current + perturb * fresh; projection, predictor and head <- fresh.
    The optimizer state is re-initialised for every parameter: the official code rebuilds it with `optimizer.init`
    and its `copy_params` only descends into dicts, so the encoder entries nested in optax's tuple states are not
    carried over either."""
    for net, fresh in ((online, fresh_online), (target, fresh_target)):
        for name in SHRINK_PERTURB_MODULES:
            for p, f in zip(getattr(net, name).parameters(), getattr(fresh, name).parameters()):
                p.mul_(shrink).add_(f, alpha=perturb)
        for name in RESET_MODULES:
            for p, f in zip(getattr(net, name).parameters(), getattr(fresh, name).parameters()):
                p.copy_(f)
    optimizer.state.clear()


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


def plasticity_metrics(online, target, batch, args: Args, taus=(0.0, 0.1)) -> dict[str, float]:
    """The plasticity/ diagnostics of docs/conventions.md on one replay batch with the training loss (detail 14).
    Hidden units: every ReLU output of the encoder (in the residual blocks and the final one) and relu(projection);
    the penultimate features are relu(projection). torch's RNG (augmentation) is left as it was found."""
    with torch.random.fork_rng(devices=[online.support.device] if online.support.is_cuda else []):
        loss, _, _, _, hidden = bbf_loss(online, target, batch, args, return_hidden=True)
    params = [p for p in online.parameters()]
    grads = torch.autograd.grad(loss, hidden + params, allow_unused=True)
    hidden_grads, param_grads = grads[: len(hidden)], [g for g in grads[len(hidden):] if g is not None]
    metrics, totals = {}, {}
    for name, h, g in zip(online.hidden_layers(), hidden, hidden_grads):
        # GraMa scores the gradient through the ReLU (w.r.t. the pre-activation), so a dead unit scores 0
        g = torch.zeros_like(h) if g is None else g
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


def evaluate(network, env_id: str, args: Args, episodes: int, epsilon: float, seed: int, device) -> list[float]:
    """Play `episodes` full games in parallel, one per EnvPool env (as the official `num_eval_envs = 100`,
    `eval_one_to_one`), with an epsilon-greedy policy; returns the full-game, unclipped returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False)
    rng = np.random.default_rng(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        with torch.inference_mode():
            actions = network(torch.from_numpy(obs).to(device)).argmax(dim=1).cpu().numpy()
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

    tasks = resolve_args(args)
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    try:  # a directory that cannot be written is bad input, not a crash (docs/conventions.md, section 10)
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), {
            "args": dataclasses.asdict(args), "tasks": tasks, "family": "atari", "command": sys.argv,
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
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    rng = np.random.default_rng(args.seed)
    metrics_rng = np.random.default_rng([args.seed, 1])  # diagnostics draw their own batches: they never change a run
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates, num_resets = 0, 0, 0
    try:
        envs = make_env(args.env_id, args.num_envs, env_seeds(args.seed, 0, 0, args.num_envs), args)
        obs_shape, n_actions = envs.observation_space.shape, int(envs.action_space.n)

        def new_network(net_args: Args = args):
            return BBFNetwork(obs_shape, n_actions, net_args).to(device, memory_format=mf)

        if args.eval_checkpoint:  # evaluation only, with the network that acted (the EMA target by default)
            checkpoint = read_checkpoint(args.eval_checkpoint, args.env_id, device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (tuple(obs_shape), n_actions):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {args.env_id} has {tuple(obs_shape)} and {n_actions}")
            saved = checkpoint["args"]
            net_args = dataclasses.replace(args, **{k: saved[k] for k in (
                "width_scale", "hidden_dim", "num_atoms", "v_max", "renormalize") if k in saved})
            network = new_network(net_args)
            load_weights(network, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(network, args.env_id, args, args.eval_episodes, args.eval_epsilon, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        online = new_network()
        target = new_network()
        target.load_state_dict(online.state_dict())
        optimizer = make_optimizer(online, args)
        acting = target if args.target_action_selection else online
        rb = ReplayBuffer(args.buffer_size, args.num_envs, obs_shape, envs.observation_space.dtype,
                          max(args.max_n_step, args.jumps))
        stats = EpisodeStats(args.num_envs)
        # Resets run on the env-step clock, every reset_every / replay_ratio env steps, the first one scheduled
        # reset_offset env steps later (detail 10).
        reset_interval = max(1, int(round(args.reset_every / args.replay_ratio))) if args.replay_ratio > 0 else 0
        next_reset = reset_interval + args.reset_offset if args.reset_every > 0 and reset_interval > 0 else None

        obs, _ = envs.reset()
        first = np.ones(args.num_envs, dtype=bool)  # obs is the first observation after a full reset
        prev_done = np.zeros(args.num_envs, dtype=bool)  # last step ended an episode: this step is an auto-reset
        prev_game_over = np.zeros(args.num_envs, dtype=bool)
        update_credit, cycle_updates, next_eval = 0.0, 0, args.eval_every
        group = []  # batches of the current draw not trained on yet (--batches-to-group, detail 5)
        while global_step < args.total_timesteps:
            epsilon = epsilon_at(global_step, args)
            coins = rng.random((2, args.num_envs))  # one generator call per step: explore? and a random action
            explore = coins[0] < epsilon
            actions = (coins[1] * n_actions).astype(np.int64)
            if not explore.all():  # skip the forward pass when every env explores
                with torch.inference_mode():
                    greedy = acting(torch.from_numpy(obs).to(device)).argmax(dim=1).cpu().numpy()
                actions = np.where(explore, actions, greedy)

            next_obs, reward, terminated, truncated, info = envs.step(actions)
            global_step += args.num_envs
            learn_reward = np.clip(reward, -1.0, 1.0) if args.clip_rewards else reward
            rb.add(obs, actions, learn_reward, terminated, truncated, first, ~prev_done)
            game_over, finished = stats.update(reward, terminated, truncated, info, ~prev_done)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                episodes_csv.writerow([global_step, ep_return, ep_length, args.env_id])
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
            # next_obs is a fresh reset iff this step was the auto-reset step after a game over
            first = prev_done & prev_game_over
            prev_done, prev_game_over = terminated | truncated, game_over
            obs = next_obs

            if global_step > args.learning_starts:
                update_credit += args.replay_ratio * args.num_envs
                while update_credit >= 1.0 and rb.sampleable() > 0:
                    update_credit -= 1.0
                    if not group:  # one draw for the next batches_to_group updates, split in stratum order (detail 5)
                        # n and gamma of this draw, annealed since the last reset, applied at sampling (detail 11)
                        n_now = anneal_n_step(cycle_updates, args.cycle_steps, args.max_n_step, args.n_step)
                        gamma_now = anneal_gamma(cycle_updates, args.cycle_steps, args.min_gamma, args.gamma)
                        draw = rb.sample(args.batch_size * args.batches_to_group, rng, n_now, gamma_now, args.jumps,
                                         args.prioritized)
                        group = split_batches(*draw, args.batches_to_group)
                    batch, (rows, envs_idx) = group.pop(0)
                    loss, ce, spr, q_mean = bbf_loss(online, target, to_torch(batch, device), args)
                    if not math.isfinite(loss.item()):
                        raise Diverged(f"non-finite BBF loss ({loss.item()}) at global_step={global_step}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    ema_update(target, online, args.target_update_tau)
                    if args.prioritized:  # priority = sqrt(C51 loss + 1e-10) (detail 5)
                        rb.update_priorities(rows, envs_idx, np.sqrt(ce.cpu().numpy().astype(np.float64) + 1e-10))
                    num_updates += 1
                    cycle_updates += 1
                    if num_updates % args.log_every == 0:
                        sps = int(global_step / (time.time() - start_time))
                        writer.add_scalar("losses/loss", loss.item(), global_step)
                        writer.add_scalar("losses/td_loss", ce.mean().item(), global_step)
                        writer.add_scalar("losses/q_values", q_mean.item(), global_step)
                        writer.add_scalar("bbf/spr_loss", spr.mean().item(), global_step)
                        writer.add_scalar("bbf/n_step", n_now, global_step)
                        writer.add_scalar("bbf/gamma", gamma_now, global_step)
                        writer.add_scalar("bbf/resets", num_resets, global_step)
                        writer.add_scalar("charts/epsilon", epsilon, global_step)
                        writer.add_scalar("charts/SPS", sps, global_step)
                        writer.add_scalar("charts/num_updates", num_updates, global_step)
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        n_m = anneal_n_step(cycle_updates, args.cycle_steps, args.max_n_step, args.n_step)
                        g_m = anneal_gamma(cycle_updates, args.cycle_steps, args.min_gamma, args.gamma)
                        metrics_batch, _ = rb.sample(args.metrics_batch_size, metrics_rng, n_m, g_m, args.jumps,
                                                     args.prioritized)
                        for key, value in plasticity_metrics(online, target, to_torch(metrics_batch, device),
                                                             args).items():
                            writer.add_scalar(key, value, global_step)
            if next_reset is not None:
                do_reset, next_reset = reset_due(global_step, next_reset, reset_interval, args.no_resets_after,
                                                 args.reset_offset)
                if do_reset:
                    shrink_and_perturb(online, target, optimizer, new_network(), new_network(),
                                       args.shrink_factor, args.perturb_factor)
                    num_resets += 1
                    cycle_updates = 0
                    writer.add_scalar("bbf/resets", num_resets, global_step)
                    print(f"global_step={global_step}, num_updates={num_updates}: reset {num_resets}")
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns = evaluate(acting, args.env_id, args, args.eval_episodes, args.eval_epsilon,
                                   args.seed + global_step, device)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": acting.state_dict(), "online_model": online.state_dict(),
                        "target_model": target.state_dict(), "obs_shape": list(obs_shape),
                        "n_actions": int(n_actions), "args": dataclasses.asdict(args)}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(acting, args.env_id, args, args.eval_episodes, args.eval_epsilon, args.seed,
                                    device)
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
            global_step=global_step, num_updates=num_updates, num_resets=num_resets,
            num_episodes=len(train_returns),
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
