"""PPO + a reverse-KL penalty to a fixed reference policy, with the k1 / k2 / k3 estimators in the reward or the loss.

Paper: "A Comedy of Estimators: On KL Regularization in RL Training of LLMs", Vedant Shah, Johan Obando-Ceron, Vineet
Jain, Brian Bartoldson, Bhavya Kailkhura, Sarthak Mittal, Glen Berseth, Pablo Samuel Castro, Yoshua Bengio, Nikolay
Malkin, Moksh Jain, Siddarth Venkatraman, Aaron Courville, 2025 (ICLR 2026 submission),
https://arxiv.org/abs/2512.21852. No official code was found, and only the abstract and secondary summaries of the
paper could be read: this script is a **reconstruction** of the paper's setting for classic RL (the paper trains
LLMs), from the estimator definitions (Schulman's "Approximating KL divergence" note) and the gradient of each
estimator-placement pair, which tests/test_ppo_kl.py computes exactly (docs/ppo_kl.md says which fact has which source).

Method: maximise E[sum_t gamma^t r_t] - beta * KL(pi_theta || pi_ref), a *reverse* KL to a frozen reference policy.
With ell = log pi_theta(a|s) - log pi_ref(a|s) for a sampled action, the per-step KL is estimated by
    k1 = ell,    k2 = ell^2 / 2,    k3 = (exp(-ell) - 1) + ell   (= pi_ref/pi_theta - 1 - log(pi_ref/pi_theta)),
and an estimate is placed either in the reward (r_t - beta * k, detached, before GAE: it enters the discounted return
and the gradient flows through the score function) or in the loss (+ beta * mean(k), differentiated through
pi_theta). The paper's point is that these pairs are different gradients: on-policy, k1 in the reward is the unbiased
reverse-KL gradient (the paper's recommended configuration, and this script's default), k2 in the loss is the same
gradient per state, k1 in the loss is zero in expectation, k3 in the loss (GRPO's default) is the gradient of the
*forward* KL(pi_ref || pi_theta), and k2 or k3 in the reward are biased.

Differences from the base script (`diff algos/ppo.py algos/ppo_kl.py` shows exactly these):
  - flags `--kl-beta` (beta; 0: ppo.py exactly with --kl-reference init, ppo.py fine-tuned from the checkpoint with
    a PATH), `--kl-estimator`, `--kl-placement` and `--kl-reference` (init: a frozen copy of the agent's initial
    weights; PATH: a ppo.py `--save-model` checkpoint, whose weights the agent also starts from), checked in
    `resolve_args`;
  - `kl_estimate` (k1, k2, k3), `kl_exact` (the exact per-state KL: categorical sum, Gaussian closed form),
    `kl_reference_policy`, `kl_keep_policy_output`, `kl_policy_output`, `kl_rollout`, `kl_reward_penalty` and
    `kl_loss`;
  - in `run()`: the frozen reference and a forward hook that keeps the agent's latest policy output (so neither the
    rollout's pi_old nor the loss's pi_theta costs an extra forward pass), the rollout's policy outputs, one batched
    forward of the reference per rollout, the penalty in the learning rewards before GAE or in each minibatch's loss,
    and the `kl/` logs (the exact KL to the reference and the three estimators, logged with --kl-beta 0 too).

Base script: algos/ppo.py (docs/ppo.md). Docs: docs/ppo_kl.md. Conventions: docs/conventions.md.
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
import tyro

# EnvPool declares float64 Box bounds that gymnasium casts to float32 with a warning on every env creation: noise.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


@dataclass
class Args:
    # --- experiment and outputs (shared by every script, see docs/conventions.md) ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (network init, action sampling, minibatch shuffling, environment seeds)"""
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
    """if toggled, save the agent to <run_dir>/model.pt (loadable with torch.load(..., weights_only=True))"""
    eval_checkpoint: Optional[str] = None
    """path to a model.pt written by --save-model: skip training and only evaluate it on --env-id"""
    eval_episodes: int = 10
    """number of evaluation episodes at the end of training (0 disables evaluation)"""
    eval_every: int = 0
    """also evaluate every this many environment steps (0: only at the end)"""
    metrics_every: int = 1000
    """log the plasticity/ diagnostics every this many gradient updates (minibatch steps; 0 disables them)"""
    metrics_batch_size: int = 256
    """size of the sample of the current rollout the diagnostics are computed on"""

    # --- environment ---
    env_id: str = "CartPole-v1"
    """the EnvPool task id (Atari: Pong-v5, ...; classic control: CartPole-v1, ...; MuJoCo: Hopper-v4, ...;
    DeepMind Control: CheetahRun-v1, ...; MiniGrid: MiniGrid-DoorKey-5x5-v0, ...) or a MinAtar game:
    MinAtar/Asterix, MinAtar/Breakout, MinAtar/Freeway, MinAtar/Seaquest, MinAtar/SpaceInvaders"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); all tasks must share observation and action
    spaces (Atari sequences use the full 18-action set; MinAtar sequences the full 6-action set, with observation
    channels zero-padded to 10, Seaquest's count)"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task; a multiple
    of num_envs * num_steps, since tasks switch between rollouts)"""
    total_timesteps: Optional[int] = None
    """total environment steps, summed over envs [default: Atari 10M (CleanRL ppo_atari_envpool); classic control
    and MiniGrid 500k (CleanRL ppo); MuJoCo/DMC 1M (CleanRL ppo_continuous_action); MinAtar 10M (PureJaxRL)]"""
    num_envs: Optional[int] = None
    """number of parallel EnvPool environments [default: Atari 8; classic 4; MuJoCo/DMC 1 (CleanRL); MinAtar 64
    (PureJaxRL)]"""
    env_threads: Optional[int] = None
    """EnvPool worker threads (0: one per env up to the core count) [default: Atari 0; others 1, since a cheap
    env step costs less than handing it to another thread]"""
    sticky_action_prob: Optional[float] = None
    """Atari and MinAtar: probability of repeating the previous action [default: Atari 0 (CleanRL's v4-style
    protocol); MinAtar 0.1 (minatar.Environment's default, the MinAtar paper)]"""
    episodic_life: Optional[bool] = None
    """Atari only: treat life loss as terminal for learning (returns are still logged per full game)
    [default: Atari True (CleanRL)]"""
    noop_max: int = 30
    """Atari only: maximum no-op actions at reset (CleanRL/EnvPool default 30)"""
    full_action_space: Optional[bool] = None
    """Atari: use all 18 actions; MinAtar: all 6 instead of the game's minimal set [default: True for task
    sequences, else False]"""
    max_episode_steps: Optional[int] = None
    """episode cap in agent steps, a truncation [default: EnvPool's, 27000 = 108k frames for Atari, 1000 for
    MuJoCo/DMC; MinAtar none (the MinAtar paper; Freeway ends itself after 2500 steps)]"""
    obs_perturbation: float = 0.0
    """task sequences with vector observations: task k >= 1 adds to every observation a fixed offset drawn once per
    run from N(0, obs_perturbation^2) per component (task 0 is unperturbed): the perturbed levels of continual Gym
    control (TRAC, Muppidi et al. 2024; 2.0 in C-CHAIN's official code); 0 disables (docs/ppo.md, detail 17)"""

    # --- algorithm (None means the family default, resolved from the observation and action spaces) ---
    num_steps: Optional[int] = None
    """steps per environment per rollout [default: Atari 128; classic 128; MuJoCo/DMC 2048 (CleanRL); MinAtar 128]"""
    learning_rate: Optional[float] = None
    """Adam learning rate, annealed linearly to 0 over the run [default: Atari 2.5e-4; classic 2.5e-4;
    MuJoCo/DMC 3e-4 (CleanRL); MinAtar 5e-3 (PureJaxRL, tuned on SpaceInvaders only)]"""
    adam_eps: float = 1e-5
    """Adam epsilon (CleanRL and openai/baselines ppo2)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the whole run (all tasks of a sequence)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch [default: Atari 4; classic 4; MuJoCo/DMC 32 (CleanRL); MinAtar 8 (PureJaxRL)]"""
    update_epochs: Optional[int] = None
    """epochs over each rollout [default: Atari 4; classic 4; MuJoCo/DMC 10 (CleanRL); MinAtar 4 (PureJaxRL)]"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: Optional[float] = None
    """surrogate (and value) clipping coefficient [default: Atari 0.1; classic 0.2; MuJoCo/DMC 0.2 (CleanRL);
    MinAtar 0.2 (PureJaxRL)]"""
    clip_vloss: bool = True
    """clip the value loss as PPO2 (openai/baselines) does"""
    ent_coef: Optional[float] = None
    """entropy bonus coefficient [default: Atari 0.01; classic 0.01; MuJoCo/DMC 0.0 (CleanRL); MinAtar 0.01
    (PureJaxRL)]"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold"""
    target_kl: Optional[float] = None
    """stop the epochs of an update early when the approximate KL exceeds this (None: never, as CleanRL)"""
    clip_rewards: Optional[bool] = None
    """clip rewards to [-1, 1] for learning [default: Atari True (CleanRL: EnvPool reward_clip); others False]"""
    norm_obs: Optional[bool] = None
    """normalise observations with running statistics, clipped to [-obs-clip, obs-clip]
    [default: MuJoCo/DMC True (CleanRL NormalizeObservation); others False]"""
    norm_reward: Optional[bool] = None
    """divide rewards by a running std of the discounted return, clipped to [-reward-clip, reward-clip]
    [default: MuJoCo/DMC True (CleanRL NormalizeReward); others False]"""
    obs_clip: float = 10.0
    """clipping range of normalised observations (CleanRL)"""
    reward_clip: float = 10.0
    """clipping range of normalised rewards (CleanRL)"""

    # --- KL to a reference policy (docs/ppo_kl.md, "Hyperparameters"; the paper's beta was not readable) ---
    kl_beta: float = 0.05
    """beta, the weight of the reverse KL(pi_theta || pi_ref) per step (0: ppo.py exactly with --kl-reference init,
    ppo.py fine-tuned from the checkpoint with a PATH; the kl/ logs either way);
    reconstruction: the paper's value was not readable; 0.05 per step of the learning reward (docs/ppo_kl.md,
    "Hyperparameters", says why)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """the per-step estimate of the KL with ell = log pi_theta(a|s) - log pi_ref(a|s): k1 = ell, k2 = ell^2/2,
    k3 = exp(-ell) - 1 + ell (Schulman's) [paper: k1 in the reward gives the unbiased gradient, the default]"""
    kl_placement: Literal["reward", "loss"] = "reward"
    """reward: r_t - beta * k (detached) in the learning rewards before GAE, after reward clipping and normalisation;
    loss: + beta * mean(k) in each minibatch's loss, through pi_theta, without importance correction (as GRPO)"""
    kl_reference: str = "init"
    """the reference policy: init (a frozen copy of the agent's initial weights) or the path of a model.pt written by
    ppo.py --save-model on the same task, whose weights (policy, value and observation statistics) the agent also
    starts from, as an LLM is fine-tuned from its reference (reconstruction, docs/ppo_kl.md detail 1)"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


# Family defaults: Atari = CleanRL ppo_atari_envpool.py, classic (incl. MiniGrid) = CleanRL ppo.py,
# continuous (MuJoCo, DMC) = CleanRL ppo_continuous_action.py, MinAtar = PureJaxRL's MinAtar PPO. docs/ppo.md,
# details 1 and 16.
FAMILY_DEFAULTS = {
    "atari": dict(num_envs=8, num_steps=128, learning_rate=2.5e-4, num_minibatches=4, update_epochs=4,
                  clip_coef=0.1, ent_coef=0.01, episodic_life=True, clip_rewards=True, norm_obs=False,
                  norm_reward=False, env_threads=0, total_timesteps=10_000_000, sticky_action_prob=0.0),
    "minatar": dict(num_envs=64, num_steps=128, learning_rate=5e-3, num_minibatches=8, update_epochs=4,
                    clip_coef=0.2, ent_coef=0.01, episodic_life=False, clip_rewards=False, norm_obs=False,
                    norm_reward=False, env_threads=0, total_timesteps=10_000_000, sticky_action_prob=0.1),
    "classic": dict(num_envs=4, num_steps=128, learning_rate=2.5e-4, num_minibatches=4, update_epochs=4,
                    clip_coef=0.2, ent_coef=0.01, episodic_life=False, clip_rewards=False, norm_obs=False,
                    norm_reward=False, env_threads=1, total_timesteps=500_000),
    "continuous": dict(num_envs=1, num_steps=2048, learning_rate=3e-4, num_minibatches=32, update_epochs=10,
                       clip_coef=0.2, ent_coef=0.0, episodic_life=False, clip_rewards=False, norm_obs=True,
                       norm_reward=True, env_threads=1, total_timesteps=1_000_000),
}
# Dict entries that are not observations of the state (MiniGrid's mission string, constant within a task).
DROPPED_KEYS = ("mission",)
# MinAtar games by env id (minatar.Environment names). Observations are (channels, 10, 10) 0/1 grids (detail 16).
MINATAR_GAMES = {"MinAtar/Asterix": "asterix", "MinAtar/Breakout": "breakout", "MinAtar/Freeway": "freeway",
                 "MinAtar/Seaquest": "seaquest", "MinAtar/SpaceInvaders": "space_invaders"}
MINATAR_CHANNELS = 10  # the most any game has (Seaquest): task sequences pad every game to it


def space_kind(space) -> str:
    return type(space).__name__


def flat_obs_shape(space) -> Optional[tuple]:
    """Shape of the network input for an observation space, or None when the script cannot handle it: 3-D uint8
    Box (channel-first stacked frames, as EnvPool's Atari) as is, 1-D Box as is, Dict flattened (docs/ppo.md,
    detail 2)."""
    if space_kind(space) == "Box":
        shape = tuple(space.shape)
        if len(shape) == 3 and space.dtype == np.uint8 and shape[0] < min(shape[1:]) and min(shape[1:]) >= 36:
            return shape  # channel-first frame stacks, large enough for the Nature CNN's VALID convolutions
        if len(shape) == 3 and space.dtype == np.uint8 and shape[1:] == (10, 10):
            return (int(np.prod(shape)),)  # MinAtar grids, flattened for the MLPs (detail 16)
        return shape if len(shape) == 1 else None
    if space_kind(space) == "Dict":
        size = 0
        for key, sub in space.spaces.items():
            if key in DROPPED_KEYS:
                continue
            if space_kind(sub) == "Discrete":
                size += int(sub.n)
            elif space_kind(sub) == "Box":
                size += int(np.prod(sub.shape))  # a scalar entry, shape (), counts as 1
            else:
                return None
        return (size,)
    return None


def flatten_obs(obs, space) -> np.ndarray:
    """EnvPool observations -> the network input (docs/ppo.md, detail 2). Dict entries are concatenated in the
    space's key order: Discrete entries one-hot, Box entries flattened (scalars of shape () become 1 feature),
    the MiniGrid mission dropped. Stacked Atari frames stay uint8; everything else becomes float32."""
    if space_kind(space) != "Dict" and obs.ndim == 4 and obs.shape[2:] == (10, 10):
        return obs.reshape(len(obs), -1).astype(np.float32)  # MinAtar grids: 0/1 features for the MLPs (detail 16)
    if space_kind(space) != "Dict":
        return obs if obs.dtype == np.uint8 and obs.ndim == 4 else obs.astype(np.float32, copy=False)
    parts = []
    for key, sub in space.spaces.items():
        if key in DROPPED_KEYS:
            continue
        x = np.asarray(obs[key])
        if space_kind(sub) == "Discrete":
            parts.append(np.eye(int(sub.n), dtype=np.float32)[x.astype(np.int64) - int(sub.start)])
        else:
            parts.append(x.reshape(x.shape[0], -1).astype(np.float32))
    return np.concatenate(parts, axis=1)


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the family defaults; returns (tasks, family)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    minatar = tasks[0].startswith("MinAtar/")  # MinAtar games come from the minatar package, not EnvPool (detail 16)
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
    signatures, families = set(), set()
    for task in tasks:
        if minatar:
            spec = MinAtarVecEnv(MINATAR_GAMES[task], 1, [0], 0.0, args.full_action_space, len(tasks) > 1)
        else:
            spec = envpool.make_spec(task)
            if "full_action_space" in spec.config._fields:  # Atari: the action set is a make() option
                spec = envpool.make_spec(task, full_action_space=args.full_action_space)
        obs_shape = flat_obs_shape(spec.observation_space)
        if obs_shape is None:
            raise UserError(f"ppo.py supports vector, Dict or stacked-image (uint8) observations; {task} has "
                            f"{spec.observation_space}")
        action = spec.action_space
        if space_kind(action) == "Discrete":
            action_sig = ("discrete", int(action.n))
            family = "minatar" if minatar else ("atari" if len(obs_shape) == 3 else "classic")
        elif space_kind(action) == "Box" and len(action.shape) == 1:
            action_sig = ("continuous", int(action.shape[0]))
            family = "continuous"
            if len(obs_shape) == 3:
                raise UserError(f"ppo.py has no network for pixel observations with continuous actions ({task})")
        else:
            raise UserError(f"ppo.py needs a Discrete or 1-D Box action space; {task} has {action}")
        signatures.add((obs_shape, action_sig))
        families.add(family)
    if len(signatures) > 1:
        raise UserError("all tasks of --env-ids must share the observation and action spaces; got (observation "
                        f"shape, action space) = {sorted(signatures)} (Atari: use --full-action-space)")
    family = families.pop()
    for key, value in FAMILY_DEFAULTS[family].items():
        if getattr(args, key) is None and key != "total_timesteps":
            setattr(args, key, value)
    batch_size = args.num_envs * args.num_steps
    if len(tasks) > 1:
        if args.steps_per_task is None:
            raise UserError("--env-ids with more than one task needs --steps-per-task")
        if args.total_timesteps not in (None, len(tasks) * args.steps_per_task):
            raise UserError("--total-timesteps must equal len(env_ids) * steps_per_task (or be left out)")
        if args.steps_per_task % batch_size:  # tasks switch between rollouts (docs/ppo.md, detail 9)
            raise UserError(f"--steps-per-task must be a multiple of num_envs * num_steps = {batch_size}")
        args.total_timesteps = len(tasks) * args.steps_per_task
    elif args.total_timesteps is None:
        args.total_timesteps = args.steps_per_task or FAMILY_DEFAULTS[family]["total_timesteps"]
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.total_timesteps < batch_size:
        raise UserError(f"--total-timesteps ({args.total_timesteps}) is less than one rollout, num_envs * num_steps "
                        f"= {batch_size}")
    if args.num_minibatches > batch_size:
        raise UserError(f"--num-minibatches ({args.num_minibatches}) exceeds the rollout size {batch_size}")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1 and args.clip_coef > 0):
        raise UserError("need 0 <= gamma <= 1, 0 <= gae-lambda <= 1 and clip-coef > 0")
    if args.obs_perturbation < 0 or (args.obs_perturbation and (len(tasks) < 2 or family not in ("classic", "continuous")
                                                                or len(obs_shape) != 1 or space_kind(spec.observation_space) == "Dict")):
        raise UserError("--obs-perturbation must be >= 0 and perturbs tasks 2.. of a sequence (--env-ids) with vector "
                        "(Box) observations")
    if family == "atari" and args.norm_obs:
        raise UserError("--norm-obs applies to vector observations; Atari frames are scaled by 1/255 instead")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    if not (args.kl_beta >= 0 and math.isfinite(args.kl_beta)):
        raise UserError(f"--kl-beta must be a finite number >= 0 (got {args.kl_beta})")
    if args.kl_reference != "init" and args.eval_checkpoint:
        raise UserError("--eval-checkpoint only evaluates a checkpoint: drop --kl-reference")
    return tasks, family


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True, task_index: int = 0):
    """An EnvPool Gymnasium vector env. Atari follows CleanRL's protocol (docs/ppo.md, detail 3). MinAtar ids get
    MinAtarVecEnv, which behaves like EnvPool (detail 16). Task `task_index` of a sequence may be perturbed (detail 17)."""
    if env_id in MINATAR_GAMES:
        return MinAtarVecEnv(MINATAR_GAMES[env_id], num_envs, seeds, args.sticky_action_prob, args.full_action_space,
                             len(args.env_ids) > 1, args.max_episode_steps)
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=num_envs, seed=seeds, num_threads=args.env_threads or 0)
    config_keys = envpool.make_spec(env_id).config._fields
    atari = dict(
        episodic_life=bool(args.episodic_life) and train,  # evaluation always plays full games
        reward_clip=False,  # rewards are clipped in the agent, so the env's reward stays the raw score
        repeat_action_probability=args.sticky_action_prob,
        noop_max=args.noop_max,
        use_fire_reset=True,  # CleanRL's FireResetEnv (EnvPool's default)
        full_action_space=args.full_action_space,
    )
    kwargs.update({k: v for k, v in atari.items() if k in config_keys})
    if args.max_episode_steps is not None:
        kwargs["max_episode_steps"] = args.max_episode_steps
    if args.obs_perturbation and task_index:
        return ObsOffset(envpool.make(env_id, **kwargs), obs_offset(args.seed, task_index, args.obs_perturbation,
                                                                    envpool.make_spec(env_id).observation_space.shape))
    return envpool.make(env_id, **kwargs)


def obs_offset(seed: int, task_index: int, std: float, shape: tuple) -> np.ndarray:
    """The fixed observation offset of task `task_index` >= 1 of a sequence: N(0, std^2) per component, a function of
    the run's seed and the task's position only (detail 17)."""
    return np.random.default_rng([seed, task_index, 17]).normal(0.0, std, shape).astype(np.float32)


class ObsOffset:
    """A vector env whose observations are shifted by a fixed offset (the perturbed levels of detail 17)."""

    def __init__(self, env, offset: np.ndarray):
        self.env, self.offset = env, offset
        self.observation_space, self.action_space = env.observation_space, env.action_space

    def reset(self):
        obs, info = self.env.reset()
        return obs + self.offset, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs + self.offset, reward, terminated, truncated, info

    def close(self):
        self.env.close()


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct EnvPool seeds per run, task and purpose. EnvPool gives env i the seed `seed + i` when given an int,
    so runs with seeds 1 and 2 would share num_envs - 1 environments; we pass an explicit list instead."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


class MinAtarVecEnv:
    """`num_envs` MinAtar games behind the EnvPool interface this script relies on (docs/ppo.md, detail 16).

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
    """Full-game, unclipped episode returns from EnvPool's `info` (docs/ppo.md, detail 8).

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


class RunningMeanStd(nn.Module):
    """Running mean and variance over a stream of batches (Chan et al.'s parallel update, as gymnasium's
    NormalizeObservation/NormalizeReward and baselines' VecNormalize). Buffers, so they are saved in model.pt."""

    def __init__(self, shape: tuple = (), epsilon: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(epsilon, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64, device=self.mean.device)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var.copy_(m2 / total)
        self.count.fill_(total)

    def normalize(self, x: torch.Tensor, clip: float) -> torch.Tensor:
        out = (x.double() - self.mean) / torch.sqrt(self.var + 1e-8)
        return out.clamp(-clip, clip).float()


class RewardNormalizer:
    """Reward scaling (docs/ppo.md, detail 5): divide each reward by the running std of the discounted return of
    the current episode, then clip. Auto-reset steps neither update the return nor the statistics."""

    def __init__(self, num_envs: int, gamma: float, clip: float):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.rms = RunningMeanStd(())
        self.gamma, self.clip = gamma, clip

    def __call__(self, reward, done, valid) -> np.ndarray:
        self.returns = np.where(valid, self.returns * self.gamma + reward, self.returns)
        if valid.any():
            self.rms.update(torch.from_numpy(self.returns[valid]))
        self.returns[done] = 0.0  # the next step starts a new episode
        scaled = reward / np.sqrt(self.rms.var.item() + 1e-8)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias (docs/ppo.md, detail 4)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def categorical_log_prob_entropy(logits: torch.Tensor, actions: torch.Tensor):
    log_p = torch.log_softmax(logits, dim=-1)
    log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_prob, entropy


def gaussian_log_prob_entropy(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor):
    """Diagonal Gaussian: log-probability and entropy summed over the (independent) action components."""
    log_prob = -0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).expand_as(mean)
    return log_prob.sum(-1), entropy.sum(-1)


class Agent(nn.Module):
    """Actor-critic. Pixels: CleanRL's Nature CNN (VALID padding, 3136 features into 512) shared by a linear policy
    and a linear value head. Vectors: separate 64-64 tanh MLPs for policy and value (docs/ppo.md, detail 4);
    MinAtar grids, flattened: the same MLPs with ReLU, as PureJaxRL (detail 16).
    Discrete actions get a categorical policy over logits; Box actions a diagonal Gaussian whose log-std is a
    state-independent parameter.

    Every Sequential's hidden layers are (Linear|Conv2d, activation) pairs; `forward(x, return_hidden=True)` also
    returns (name, pre-activation, activation) for each of them, for the diagnostics."""

    def __init__(self, obs_shape: tuple, action_dim: int, continuous: bool, minatar: bool = False):
        super().__init__()
        self.pixel, self.continuous = len(obs_shape) == 3, continuous
        if self.pixel:
            c, h, w = obs_shape
            for k, s in ((8, 4), (4, 2), (3, 1)):  # VALID convolutions: 84 -> 20 -> 9 -> 7
                h, w = (h - k) // s + 1, (w - k) // s + 1
            self.trunk = nn.Sequential(OrderedDict([
                ("conv1", layer_init(nn.Conv2d(c, 32, 8, stride=4))), ("act1", nn.ReLU()),
                ("conv2", layer_init(nn.Conv2d(32, 64, 4, stride=2))), ("act2", nn.ReLU()),
                ("conv3", layer_init(nn.Conv2d(64, 64, 3, stride=1))), ("act3", nn.ReLU()),
                ("flatten", nn.Flatten()), ("fc1", layer_init(nn.Linear(64 * h * w, 512))), ("act4", nn.ReLU())]))
            self.actor = nn.Sequential(OrderedDict([("out", layer_init(nn.Linear(512, action_dim), std=0.01))]))
            self.critic = nn.Sequential(OrderedDict([("out", layer_init(nn.Linear(512, 1), std=1.0))]))
        else:
            act = nn.ReLU if minatar else nn.Tanh  # MinAtar: PureJaxRL's ReLU MLPs (detail 16)

            def mlp(out_dim: int, std: float):
                return nn.Sequential(OrderedDict([
                    ("fc1", layer_init(nn.Linear(obs_shape[0], 64))), ("act1", act()),
                    ("fc2", layer_init(nn.Linear(64, 64))), ("act2", act()),
                    ("out", layer_init(nn.Linear(64, out_dim), std=std))]))

            self.trunk = nn.Sequential()  # identity: no shared layers
            self.actor, self.critic = mlp(action_dim, 0.01), mlp(1, 1.0)
            self.obs_norm = RunningMeanStd(tuple(obs_shape))  # used with --norm-obs (detail 5)
        if continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))

    def _walk(self, seq: nn.Sequential, x, prefix: str, hidden: Optional[list]):
        pre, pre_name = None, None
        for name, module in seq.named_children():
            x = module(x)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                pre, pre_name = x, name
            elif hidden is not None and isinstance(module, (nn.ReLU, nn.Tanh)):
                hidden.append((prefix + pre_name, pre, x))
        return x

    def forward(self, x, return_hidden: bool = False):
        """Returns (logits or Gaussian mean, value of shape (B,), hidden list or None)."""
        if self.pixel and x.device.type == "cpu":  # channels-last convolutions are faster on CPU (detail 15)
            x = x.contiguous(memory_format=torch.channels_last)  # while still uint8: a 4x smaller copy
        x = x.float() / 255.0 if self.pixel else x.float()
        hidden = [] if return_hidden else None
        z = self._walk(self.trunk, x, "", hidden)
        policy_out = self._walk(self.actor, z, "" if self.pixel else "actor.", hidden)
        value = self._walk(self.critic, z, "" if self.pixel else "critic.", hidden).squeeze(-1)
        return policy_out, value, hidden

    def log_prob_entropy(self, policy_out, actions):
        if self.continuous:
            return gaussian_log_prob_entropy(policy_out, self.actor_logstd.expand_as(policy_out), actions)
        return categorical_log_prob_entropy(policy_out, actions)

    def get_value(self, x):
        return self(x)[1]

    def get_action_and_value(self, x, action=None, generator: Optional[torch.Generator] = None):
        policy_out, value, _ = self(x)
        if action is None:
            if self.continuous:
                noise = torch.randn(policy_out.shape, generator=generator, device=policy_out.device)
                action = policy_out + self.actor_logstd.exp() * noise
            else:
                probs = torch.softmax(policy_out, dim=-1)
                action = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        log_prob, entropy = self.log_prob_entropy(policy_out, action)
        return action, log_prob, entropy, value


def compute_gae(rewards, values, next_value, terminated, done, valid, gamma: float, gae_lambda: float):
    """GAE over a (num_steps, num_envs) rollout with EnvPool's next-step auto-reset (docs/ppo.md, details 6-7).

    Step t acts on obs_t (value values[t]) and its next observation is obs_{t+1} (next_value after the last step).
    When step t ends an episode, obs_{t+1} is the episode's final observation, so the one-step target is
    r_t + gamma * V(final) after a truncation and r_t after a termination, and the GAE trace is cut after t.
    Step t+1 is then EnvPool's auto-reset step (valid False): its advantage is 0 and it is never trained on.
    Returns (advantages, returns = advantages + values)."""
    num_steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float32)
    last = np.zeros(rewards.shape[1:], dtype=np.float32)
    for t in reversed(range(num_steps)):
        next_values = values[t + 1] if t + 1 < num_steps else next_value
        delta = rewards[t] + gamma * next_values * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * gae_lambda * (1.0 - done[t]) * last
        last = np.where(valid[t], last, 0.0).astype(np.float32)
        advantages[t] = last
    return advantages, advantages + values


def minibatches(valid: np.ndarray, num_minibatches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the indices of the rollout's real steps (auto-reset steps left out, docs/ppo.md, detail 7) and split
    them into `num_minibatches` minibatches of nearly equal size."""
    indices = rng.permutation(np.flatnonzero(valid.reshape(-1)))
    return [mb for mb in np.array_split(indices, num_minibatches) if len(mb)]


def ppo_loss(agent, obs, actions, old_logprobs, advantages, returns, old_values, args: Args,
             return_hidden: bool = False):
    """The PPO loss on one minibatch (docs/ppo.md, detail 10): clipped surrogate, clipped value loss, entropy
    bonus. Returns (loss, dict of detached statistics, hidden activations or None)."""
    policy_out, new_values, hidden = agent(obs, return_hidden=return_hidden)
    new_logprobs, entropy = agent.log_prob_entropy(policy_out, actions)
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()
    if args.norm_adv and len(advantages) > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    v_loss_unclipped = (new_values - returns) ** 2
    if args.clip_vloss:
        v_clipped = old_values + (new_values - old_values).clamp(-args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * v_loss_unclipped.mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
    with torch.no_grad():  # debug variables; approx_kl is the (ratio - 1) - log ratio estimator (detail 11)
        stats = dict(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=entropy_loss.detach(),
                     old_approx_kl=(-logratio).mean(), approx_kl=((ratio - 1) - logratio).mean(),
                     clipfrac=((ratio - 1.0).abs() > args.clip_coef).float().mean(), ratio=ratio.detach())
    return loss, stats, hidden


def kl_estimate(logratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-sample estimate of KL(pi_theta || pi_ref) from ell = log pi_theta(a|s) - log pi_ref(a|s), a ~ pi_theta
    (docs/ppo_kl.md, detail 3): k1 = ell (unbiased, can be negative), k2 = ell^2 / 2 (biased, non-negative) or
    k3 = (exp(-ell) - 1) + ell = pi_ref/pi_theta - 1 - log(pi_ref/pi_theta) (Schulman's: unbiased, non-negative)."""
    if estimator == "k1":
        return logratio
    if estimator == "k2":
        return 0.5 * logratio**2
    return torch.expm1(-logratio) + logratio


def kl_exact(agent, policy_out: torch.Tensor, reference, ref_out: torch.Tensor) -> torch.Tensor:
    """The exact KL(pi || pi_ref) of each state from the two networks' outputs (detail 6): categorical,
    sum_a pi(a) (log pi(a) - log pi_ref(a)); diagonal Gaussian, the closed form summed over the action components,
    log(s_ref / s) + (s^2 + (m - m_ref)^2) / (2 s_ref^2) - 1/2 (state-independent log-stds, as ppo.py's policy)."""
    if agent.continuous:
        log_std = agent.actor_logstd.expand_as(policy_out)
        ref_log_std = reference.actor_logstd.expand_as(ref_out)
        return (ref_log_std - log_std + ((2 * log_std).exp() + (policy_out - ref_out) ** 2)
                / (2 * (2 * ref_log_std).exp()) - 0.5).sum(-1)
    log_p, log_ref = torch.log_softmax(policy_out, dim=-1), torch.log_softmax(ref_out, dim=-1)
    return (log_p.exp() * (log_p - log_ref)).sum(-1)


def kl_reference_policy(agent, args: Args, task: str, obs_shape: tuple, action_dim: int, continuous: bool,
                        device) -> nn.Module:
    """The frozen reference policy (detail 1). init: a copy of the agent as built (its initial weights). PATH: a
    ppo.py --save-model checkpoint of this task, read with safe loading and checked against the network these flags
    build (one line naming --kl-reference otherwise, by ppo.py's read_checkpoint and load_weights); the agent takes
    its weights (policy, value and observation statistics) before the copy, so training starts at the reference."""
    path = args.kl_reference
    if path != "init":  # checked here, not in resolve_args, so that a suite can name a file an earlier arm writes
        if not os.path.isfile(path):
            raise UserError(f"--kl-reference {path}: no such file (pass init or a model.pt of ppo.py --save-model)")
        try:
            checkpoint = read_checkpoint(path, task, device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"], checkpoint.get("continuous", False)) != (
                    tuple(obs_shape), action_dim, continuous):
                raise UserError(f"--kl-reference {path}: the checkpoint's network takes observations "
                                f"{tuple(checkpoint['obs_shape'])} and {checkpoint['n_actions']} actions; {task} has "
                                f"{tuple(obs_shape)} and {action_dim}")
            trained_norm_obs = bool(checkpoint["args"].get("norm_obs"))  # its statistics apply only as in training
            if trained_norm_obs != bool(args.norm_obs):
                raise UserError(f"--kl-reference {path}: trained with --norm-obs {trained_norm_obs}, this run has "
                                f"--norm-obs {bool(args.norm_obs)} (pass --norm-obs {trained_norm_obs})")
            load_weights(agent, checkpoint, path)
        except UserError as err:  # ppo.py's read_checkpoint and load_weights name --eval-checkpoint
            raise UserError(str(err).replace("--eval-checkpoint", "--kl-reference")) from None
    return copy.deepcopy(agent).requires_grad_(False)


def kl_keep_policy_output(agent, latest: dict):
    """A forward hook on the agent that keeps the input and the policy output (logits, or the Gaussian mean) of its
    latest forward pass in latest["obs"] and latest["policy"] (detail 2): in the rollout, pi_old's; after ppo_loss,
    the loss pass's own, in its graph. The reference is copied before the hook is registered and does not carry it;
    copies a composed method makes later carry it (deepcopy) but do not write (`module is agent` fails)."""

    def keep(module, inputs, out):
        if module is agent:
            latest["obs"], latest["policy"] = inputs[0], out[0]

    agent.register_forward_hook(keep)


def kl_policy_output(agent, latest: dict, obs: torch.Tensor) -> torch.Tensor:
    """pi_theta's output on the minibatch `obs` (detail 3): the loss pass's own when it was the agent's latest forward
    pass, on these very observations and in a graph (the hook's: no extra forward), else a forward pass of its own (a
    composed method's forward pass came in between; a no-grad one on the same `obs` would give the term no gradient)."""
    if latest.get("obs") is obs and latest["policy"].requires_grad:
        return latest["policy"]
    return agent(obs)[0]


@torch.no_grad()
def kl_rollout(agent, reference, obs_buf, actions_buf, logprobs_buf, policy_buf, valid_buf: np.ndarray, args: Args):
    """The reference on one rollout (details 5-6): one batched forward of the frozen network on the rollout's
    observations gives pi_ref's log-probability of each taken action; with pi_old's own log-probability (the rollout's,
    pi_theta = pi_old there) it gives ell and the chosen estimate k per step. Returns (the reference's log-probs,
    flat (num_steps * num_envs,); k as a (num_steps, num_envs) array; the kl/ logs over the agent's steps: the exact
    KL of pi_old to the reference from the rollout's policy outputs, and the mean of each of k1, k2, k3)."""
    num_steps, num_envs = valid_buf.shape
    obs = obs_buf.reshape(num_steps * num_envs, *obs_buf.shape[2:])
    actions = actions_buf.reshape(num_steps * num_envs, -1) if agent.continuous else actions_buf.reshape(-1)
    ref_out = reference(obs)[0]
    ref_logprobs = reference.log_prob_entropy(ref_out, actions)[0]
    logratio = logprobs_buf.reshape(-1) - ref_logprobs
    valid = torch.from_numpy(valid_buf.reshape(-1)).to(obs.device)
    logs = {"exact": kl_exact(agent, policy_buf.reshape(num_steps * num_envs, -1), reference, ref_out)[valid].mean()}
    for estimator in ("k1", "k2", "k3"):
        logs[estimator] = kl_estimate(logratio[valid], estimator).mean()
    k = kl_estimate(logratio, args.kl_estimator).reshape(num_steps, num_envs).cpu().numpy()
    return ref_logprobs, k, {key: value.item() for key, value in logs.items()}


def kl_reward_penalty(rewards: np.ndarray, k: np.ndarray, valid: np.ndarray, beta: float):
    """The learning rewards with the penalty (detail 4): r_t - beta * k_t on the agent's steps (an auto-reset step,
    whose action is ignored, keeps its reward). Returns (the new rewards, kl/ logs over the agent's steps: `penalty`,
    the mean of beta * k, and `penalty_share`, sum |beta k| / (sum |r| + sum |beta k|), its share of the learning
    reward's magnitude)."""
    penalty = np.where(valid, beta * k, 0.0).astype(np.float32)
    total = np.abs(rewards[valid]).sum() + np.abs(penalty).sum()
    return (rewards - penalty).astype(np.float32), {
        "penalty": float(penalty[valid].mean()), "penalty_share": float(np.abs(penalty).sum() / max(total, 1e-12))}


def kl_loss(agent, policy_out: torch.Tensor, actions: torch.Tensor, ref_logprobs: torch.Tensor,
            estimator: str) -> torch.Tensor:
    """The penalty in the loss (detail 3): the minibatch mean of k(ell), ell = log pi_theta(a|s) - log pi_ref(a|s),
    differentiated through pi_theta (the loss pass's own policy output). The actions come from pi_old (PPO's epochs
    reuse the rollout): no importance correction, as GRPO."""
    logprobs = agent.log_prob_entropy(policy_out, actions)[0]
    return kl_estimate(logprobs - ref_logprobs, estimator).mean()


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    var_y = np.var(returns)
    return float("nan") if var_y == 0 else float(1 - np.var(returns - values) / var_y)


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


def feature_rank(features: torch.Tensor, energy: float = 0.99) -> int:
    """The feature rank of the parallel-data study (Mayor et al. 2025): the fewest singular values whose squares hold
    `energy` of the sum of squares (docs/ppo.md, detail 18); 0 for all-zero features."""
    sq = torch.linalg.svdvals(features.float()).double() ** 2
    return int((torch.cumsum(sq, 0) < energy * sq.sum()).sum().item()) + 1 if sq.sum() > 0 else 0


def kurtosis(x: torch.Tensor) -> float:
    """Pearson's kurtosis of the entries of x, E[(x - mean)^4] / Var^2: 3 for a Gaussian, not the excess
    (docs/ppo.md, detail 18)."""
    x = x.detach().double().flatten()
    return (((x - x.mean()) ** 4).mean() / x.var(correction=0) ** 2).item()


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size of importance weights over their count, (sum w)^2 / (n sum w^2): 1 when all are
    equal, 1/n when one carries all the weight (docs/ppo.md, detail 18)."""
    w = weights.detach().double()
    return (w.sum() ** 2 / (len(w) * (w**2).sum())).item()


def plasticity_metrics(agent, batch, args: Args, taus=(0.0, 0.1)) -> dict[str, float]:
    """The plasticity/ diagnostics of docs/conventions.md on a sample of the current rollout with the PPO loss
    (docs/ppo.md, detail 12). Hidden layers: the CNN trunk (conv1-3, fc1), or actor.fc1-2 and critic.fc1-2."""
    loss, stats, hidden = ppo_loss(agent, *batch, args, return_hidden=True)
    params = [p for p in agent.parameters()]
    grads = torch.autograd.grad(loss, [z for _, z, _ in hidden] + params, allow_unused=True)
    pre_grads = grads[: len(hidden)]
    param_grads = [g for g in grads[len(hidden):] if g is not None]
    metrics, totals, penultimate = {}, {}, {}
    for (name, _, h), g in zip(hidden, pre_grads):
        # GraMa scores the gradient w.r.t. the pre-activation (through the ReLU/tanh), so a dead ReLU unit scores 0
        act_score = unit_scores(h.detach())
        grad_score = unit_scores(g) if g is not None else torch.zeros_like(act_score)
        for tau in taus:
            for kind, score in (("dormant", act_score), ("grad_inactive", grad_score)):
                key = f"{kind}_tau{tau:g}"
                frac = (score <= tau).float()
                metrics[f"plasticity/{key}/{name}"] = frac.mean().item()
                count, units = totals.get(key, (0.0, 0))
                totals[key] = (count + frac.sum().item(), units + frac.numel())
        penultimate["/critic" if name.startswith("critic.") else ""] = h.detach().flatten(1)
    for key, (count, units) in totals.items():
        metrics[f"plasticity/{key}"] = count / units
    for suffix, features in penultimate.items():  # policy features (the shared trunk for pixels), then the critic's
        metrics[f"plasticity/srank{suffix}"] = srank(features)
        metrics[f"plasticity/feature_rank{suffix}"] = feature_rank(features)  # docs/ppo.md, detail 18
        metrics[f"plasticity/feature_norm{suffix}"] = features.norm(dim=1).mean().item()
    metrics["plasticity/param_norm"] = torch.sqrt(sum((p.detach() ** 2).sum() for p in params)).item()
    metrics["plasticity/grad_norm"] = torch.sqrt(sum((g**2).sum() for g in param_grads)).item()
    metrics["plasticity/grad_kurtosis"] = kurtosis(torch.cat([g.flatten() for g in param_grads]))
    metrics["plasticity/ess"] = effective_sample_size(stats["ratio"])  # ratios pi / pi_old on this sample
    return metrics


def prepare_obs(raw_obs, obs_space, agent, device, args: Args, update: bool) -> torch.Tensor:
    """EnvPool observation -> network input on `device`: flattened (detail 2), normalised with running statistics
    when --norm-obs (detail 5; `update` adds this batch to the statistics, evaluation does not)."""
    x = torch.from_numpy(np.ascontiguousarray(flatten_obs(raw_obs, obs_space))).to(device)
    if args.norm_obs:
        if update:
            agent.obs_norm.update(x)
        x = agent.obs_norm.normalize(x, args.obs_clip)
    return x


def env_actions(actions: torch.Tensor, action_space) -> np.ndarray:
    """Sampled actions -> what EnvPool receives: Gaussian samples are clipped to the bounds (the rollout keeps the
    unclipped sample for the log-probability, docs/ppo.md, detail 4)."""
    out = actions.cpu().numpy()
    if space_kind(action_space) == "Box":
        out = np.clip(out, action_space.low, action_space.high).astype(action_space.dtype)
    return out


def evaluate(agent, env_id: str, args: Args, episodes: int, seed: int, device, task_index: int = 0) -> list[float]:
    """Play `episodes` full games in parallel, one per EnvPool env (so short games are not over-represented),
    sampling from the policy as CleanRL's ppo_eval does; returns the full-game, unclipped returns. Observation
    statistics are frozen."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False, task_index=task_index)
    generator = torch.Generator(device=device).manual_seed(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        with torch.inference_mode():
            x = prepare_obs(obs, envs.observation_space, agent, device, args, update=False)
            actions = agent.get_action_and_value(x, generator=generator)[0]
        obs, reward, terminated, truncated, info = envs.step(env_actions(actions, envs.action_space))
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
    metrics_rng = np.random.default_rng([args.seed, 1])  # diagnostics draw their own samples: they never change a run
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], args.num_envs, env_seeds(args.seed, 0, 0, args.num_envs), args)
        obs_space, action_space = envs.observation_space, envs.action_space
        continuous = space_kind(action_space) == "Box"
        obs_shape = flat_obs_shape(obs_space)
        action_dim = int(action_space.shape[0]) if continuous else int(action_space.n)
        agent = Agent(obs_shape, action_dim, continuous, family == "minatar").to(device)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"], checkpoint.get("continuous", False)) != (
                    tuple(obs_shape), action_dim, continuous):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and "
                                f"{action_dim}")
            load_weights(agent, checkpoint, args.eval_checkpoint)
            args.norm_obs = bool(checkpoint["args"].get("norm_obs"))  # evaluate as the agent was trained
            envs.close()
            returns = evaluate(agent, tasks[0], args, args.eval_episodes, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        # Adam with eps 1e-5 (detail 4); the LR is annealed linearly over the whole run, all tasks together
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
        num_steps, num_envs = args.num_steps, args.num_envs
        num_iterations = args.total_timesteps // (num_steps * num_envs)  # CleanRL: whole rollouts only

        # Rollout storage (detail 7): step t acts on obs[t]; valid[t] is False for EnvPool's auto-reset steps.
        obs_buf = torch.zeros((num_steps, num_envs, *obs_shape),
                              dtype=torch.uint8 if agent.pixel else torch.float32, device=device)
        actions_buf = torch.zeros((num_steps, num_envs, action_dim) if continuous else (num_steps, num_envs),
                                  dtype=torch.float32 if continuous else torch.int64, device=device)
        logprobs_buf = torch.zeros((num_steps, num_envs), device=device)
        values_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        rewards_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        terminated_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        done_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        valid_buf = np.zeros((num_steps, num_envs), dtype=bool)
        # KL to a reference policy (docs/ppo_kl.md, details 1-2): the frozen reference (with a PATH, the agent starts
        # from its weights), pi_old's policy outputs of the rollout, and the hook that catches them (and the loss
        # pass's pi_theta) from the forward passes ppo.py already makes
        kl_reference = kl_reference_policy(agent, args, tasks[0], obs_shape, action_dim, continuous, device)
        kl_policy_buf = torch.zeros((num_steps, num_envs, action_dim), device=device)
        kl_latest = {}
        kl_keep_policy_output(agent, kl_latest)

        stats = EpisodeStats(num_envs)
        reward_norm = RewardNormalizer(num_envs, args.gamma, args.reward_clip) if args.norm_reward else None
        raw_obs, _ = envs.reset()
        next_obs = prepare_obs(raw_obs, obs_space, agent, device, args, update=True)
        prev_done = np.zeros(num_envs, dtype=bool)  # last step ended an episode: this step is an auto-reset
        task_index = 0
        next_eval = args.eval_every
        for iteration in range(1, num_iterations + 1):
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch between rollouts (docs/ppo.md, detail 9): new env, unfinished episodes dropped,
                # network, optimizer state, LR schedule and normalisation statistics carried on.
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], num_envs, env_seeds(args.seed, task_index, 0, num_envs), args,
                                task_index=task_index)
                raw_obs, _ = envs.reset()
                next_obs = prepare_obs(raw_obs, obs_space, agent, device, args, update=True)
                prev_done[:] = False
                stats = EpisodeStats(num_envs)
                if reward_norm is not None:
                    reward_norm.returns[:] = 0.0
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")
            if args.anneal_lr:  # detail 4
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

            for step in range(num_steps):
                obs_buf[step] = next_obs
                valid = ~prev_done
                valid_buf[step] = valid
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs)
                actions_buf[step], logprobs_buf[step] = action, logprob
                kl_policy_buf[step] = kl_latest["policy"]  # pi_old's logits (Gaussian mean), from the hook (detail 2)
                values_buf[step] = value.cpu().numpy()
                raw_obs, reward, terminated, truncated, info = envs.step(env_actions(action, action_space))
                global_step += num_envs
                done = terminated | truncated
                learn_reward = np.clip(reward, -1.0, 1.0) if args.clip_rewards else reward.astype(np.float32)
                if reward_norm is not None:
                    learn_reward = reward_norm(learn_reward, done, valid)
                rewards_buf[step], terminated_buf[step], done_buf[step] = learn_reward, terminated, done
                _, finished = stats.update(reward, terminated, truncated, info, valid)
                for _, ep_return, ep_length in finished:
                    train_returns.append(ep_return)
                    episodes_csv.writerow([global_step, ep_return, ep_length, tasks[task_index]])
                    writer.add_scalar("charts/episodic_return", ep_return, global_step)
                    writer.add_scalar("charts/episodic_length", ep_length, global_step)
                prev_done = done
                next_obs = prepare_obs(raw_obs, obs_space, agent, device, args, update=True)

            # KL to the reference on this rollout (details 2-6): the reference's log-probs of the taken actions, the
            # kl/ logs, and with --kl-placement reward the penalty in the learning rewards, before GAE, so that it
            # enters the discounted return
            kl_ref_logprobs, kl_k, kl_logs = kl_rollout(agent, kl_reference, obs_buf, actions_buf, logprobs_buf,
                                                        kl_policy_buf, valid_buf, args)
            if args.kl_beta > 0 and args.kl_placement == "reward":
                rewards_buf, penalty_logs = kl_reward_penalty(rewards_buf, kl_k, valid_buf, args.kl_beta)
                kl_logs.update(penalty_logs)
            # GAE with truncation bootstrap and auto-reset masking (details 6-7)
            with torch.no_grad():
                next_value = agent.get_value(next_obs).cpu().numpy()
            advantages, returns = compute_gae(rewards_buf, values_buf, next_value, terminated_buf, done_buf,
                                              valid_buf, args.gamma, args.gae_lambda)
            b_obs = obs_buf.reshape(-1, *obs_shape)
            b_actions = actions_buf.reshape(num_steps * num_envs, -1) if continuous else actions_buf.reshape(-1)
            b_logprobs = logprobs_buf.reshape(-1)
            b_advantages = torch.from_numpy(advantages.reshape(-1)).to(device)
            b_returns = torch.from_numpy(returns.reshape(-1)).to(device)
            b_values = torch.from_numpy(values_buf.reshape(-1)).to(device)

            clipfracs = []
            for epoch in range(args.update_epochs):  # minibatch epochs (detail 10)
                for mb in minibatches(valid_buf, args.num_minibatches, rng):
                    mb_t = torch.from_numpy(mb).to(device)
                    batch = (b_obs[mb_t], b_actions[mb_t], b_logprobs[mb_t], b_advantages[mb_t], b_returns[mb_t],
                             b_values[mb_t])
                    loss, loss_stats = ppo_loss(agent, *batch, args)[:2]
                    if not math.isfinite(loss.item()):
                        raise Diverged(f"non-finite PPO loss ({loss.item()}) at global_step={global_step}")
                    if args.kl_beta > 0 and args.kl_placement == "loss":  # + beta * mean(k) through pi_theta (detail 3)
                        kl_term = kl_loss(agent, kl_policy_output(agent, kl_latest, batch[0]), batch[1],
                                          kl_ref_logprobs[mb_t], args.kl_estimator)
                        if not math.isfinite(kl_term.item()):
                            raise Diverged(f"non-finite KL term ({kl_term.item()}) at global_step={global_step}")
                        loss = loss + args.kl_beta * kl_term
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # global clipping (detail 10)
                    optimizer.step()
                    num_updates += 1
                    clipfracs.append(loss_stats["clipfrac"].item())
                    if args.metrics_every and num_updates % args.metrics_every == 0:
                        valid_idx = np.flatnonzero(valid_buf.reshape(-1))
                        sample = torch.from_numpy(metrics_rng.choice(
                            valid_idx, min(args.metrics_batch_size, len(valid_idx)), replace=False)).to(device)
                        metrics_batch = (b_obs[sample], b_actions[sample], b_logprobs[sample], b_advantages[sample],
                                         b_returns[sample], b_values[sample])
                        for key, value in plasticity_metrics(agent, metrics_batch, args).items():
                            writer.add_scalar(key, value, global_step)
                if args.target_kl is not None and loss_stats["approx_kl"].item() > args.target_kl:
                    break

            valid_flat = valid_buf.reshape(-1)
            sps = int(global_step / (time.time() - start_time))
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl"):  # last minibatch's
                writer.add_scalar(f"losses/{key}", loss_stats[key].item(), global_step)
            writer.add_scalar("losses/clipfrac", float(np.mean(clipfracs)), global_step)
            for key, value in kl_logs.items():  # the measured KL to the reference and the estimators (detail 6)
                writer.add_scalar(f"kl/{key}", value, global_step)
            if args.kl_beta > 0 and args.kl_placement == "loss":  # the last minibatch's mean k, before beta
                writer.add_scalar("losses/kl_term", kl_term.item(), global_step)
            writer.add_scalar("losses/explained_variance", explained_variance(
                values_buf.reshape(-1)[valid_flat], returns.reshape(-1)[valid_flat]), global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/num_updates", num_updates, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns_now = evaluate(agent, tasks[task_index], args, args.eval_episodes, args.seed + global_step,
                                       device, task_index)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns_now)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            torch.save({"script": os.path.basename(__file__),  # named in load_weights' errors
                        "model": agent.state_dict(), "obs_shape": list(obs_shape), "n_actions": int(action_dim),
                        "continuous": bool(continuous), "args": dataclasses.asdict(args)}, model_path)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(agent, tasks[-1], args, args.eval_episodes, args.seed, device, len(tasks) - 1)
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
