"""PPO on CALE (continuous Atari): the base script of the continuous-Atari PPO family.

Paper: "CALE: Continuous Arcade Learning Environment", Jesse Farebrother and Pablo Samuel Castro, NeurIPS 2024
Datasets and Benchmarks track, https://arxiv.org/abs/2410.23810. Official code: google/dopamine
`dopamine/labs/cale/` (commit 5873f549): `ppo_cale.py` (PPOCALEAgent), `networks.py` (PPOCALEConvNetwork),
`configs/ppo_cale.gin` (200M frames) and `configs/ppo_cale_100k.gin` (Atari 100k), on top of
`dopamine/jax/agents/ppo/ppo_agent.py` and `dopamine/jax/continuous_networks.py`. PPO itself: "Proximal Policy
Optimization Algorithms", Schulman et al., 2017, https://arxiv.org/abs/1707.06347.

Method: CALE replaces the 18 discrete Atari actions by a 3-d box (r, theta, fire) in [0,1] x [-pi,pi] x [0,1]
that the ALE thresholds (tau) into one of the 18 joystick cells. PPO acts with a squashed Gaussian: a diagonal
Normal (state-independent log-std) over R^3, tanh, then the affine map onto the box; the log-probability carries
the tanh Jacobian and the affine's log-scale, the entropy bonus is the base Normal's. A pixel encoder (the SAC-AE
encoder by default) feeds a 2x64 tanh actor and a 2x64 tanh critic; only the value loss trains its convolutions.
The rest is ppo.py's PPO: rollouts of num_envs x num_steps, GAE, epochs of clipped-surrogate minibatch steps.

Differences from ppo.py (the environment, the encoder, the policy, the presets; docs/ppo_cale.md):
  - the environment: CaleVecEnv (ale-py's AtariVectorEnv with continuous=True, Dopamine's Atari protocol, the
    shared block copied verbatim into sac_cale.py too) instead of EnvPool; Atari `<Game>-v5` ids only (the
    MinAtar, classic-control, MiniGrid, MuJoCo and DMC families of ppo.py are gone, with their flags);
    `--threshold`, `--sticky-action-prob`, `--episodic-life`, `--max-episode-steps`, `--env-threads`;
  - the networks: a pixel encoder (`--encoder sac`, the SAC-AE encoder with flax SAME padding, or `nature`)
    with separate critic and actor projections, the actor's on stop-gradient conv features; 2x64 tanh MLPs;
  - the policy: a tanh-squashed Gaussian over the 3-d action box (log-prob through atanh of the stored action);
  - the rollout and update: Dopamine's PPO settings (3 epochs, 4 minibatches of 256, raw rewards, no reward or
    observation normalisation); `--anneal-steps` reproduces Dopamine's fixed-length learning-rate schedule;
  - `--preset 200m | 100k`: the two Dopamine gins' differences (budget, sticky actions, life-loss terminals,
    annealing);
  - logging: `cale/<ACTION>`, the fraction of the rollout's actions in each of the 18 joystick cells.

Docs: docs/ppo_cale.md (environment: docs/cale.md). Conventions every script follows: docs/conventions.md.
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
import tyro

# gymnasium casts float64 Box bounds to float32 with a warning on some env creations: noise.
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

    # --- environment (CALE: ale-py's AtariVectorEnv with continuous actions, docs/cale.md) ---
    env_id: str = "Breakout-v5"
    """the Atari game, as an EnvPool-style id: Breakout-v5, MsPacman-v5, ... (CALE exists only for the ALE)"""
    env_ids: tuple[str, ...] = ()
    """a task sequence for continual learning (overrides --env-id); every CALE game has the same observation
    (4x84x84) and action (the 3-d box) spaces"""
    steps_per_task: Optional[int] = None
    """environment steps spent on each task of --env-ids (total steps = len(env_ids) * steps_per_task; a multiple
    of num_envs * num_steps, since tasks switch between rollouts)"""
    preset: Literal["200m", "100k"] = "200m"
    """the Dopamine CALE setting whose values fill the flags left unset: 200m = configs/ppo_cale.gin (200M frames),
    100k = configs/ppo_cale_100k.gin (Atari 100k)"""
    total_timesteps: Optional[int] = None
    """total environment (agent) steps, summed over envs [default: 200m 50M (ppo_cale.gin: ContinuousRunner
    num_iterations 200 x training_steps 250,000); 100k 100,000 (ppo_cale_100k.gin: 10 x 10,000)]"""
    num_envs: int = 8
    """number of parallel CALE environments (ppo_cale.gin's update_period 1024 comment "8 * 128"; Dopamine itself
    runs one env, docs/ppo_cale.md detail 5)"""
    env_threads: int = 0
    """AtariVectorEnv worker threads (0: one per env up to the core count)"""
    threshold: float = 0.5
    """CALE's tau: an axis (or fire) is pressed when its value exceeds it, in (0, 1) (both gins:
    create_atari_environment.continuous_action_threshold 0.5)"""
    sticky_action_prob: Optional[float] = None
    """probability of repeating the previous action [default: 200m 0.25 (ppo_cale.gin: sticky_actions default
    True, ALE v5); 100k 0.0 (ppo_cale_100k.gin: create_atari_environment.sticky_actions False)]"""
    episodic_life: Optional[bool] = None
    """treat life loss as terminal for learning (returns are still logged per full game) [default: 200m False
    (AtariPreprocessing.terminal_on_life_loss default); 100k True (ppo_cale_100k.gin)]"""
    max_episode_steps: int = 27_000
    """episode cap in agent steps (4 frames each), a truncation (both gins: ContinuousRunner.max_steps_per_episode
    27,000 = 108k frames)"""

    # --- algorithm (both gins unless the docstring says otherwise; docs/ppo_cale.md, hyperparameters) ---
    encoder: Literal["sac", "nature"] = "sac"
    """pixel encoder: sac = the SAC-AE encoder (4 x Conv 32 3x3, tanh(LayerNorm(Linear 50)) projections; both
    gins: PPOCALEConvNetwork.encoder_name 'SAC'); nature = Dopamine's NatureDQNEncoder (Nature CNN with SAME
    padding, 512-unit projections) (docs/ppo_cale.md, detail 2)"""
    num_steps: int = 128
    """steps per environment per rollout (ppo_cale.gin: update_period 1024 = "8 * 128")"""
    learning_rate: float = 2.5e-4
    """Adam learning rate (create_optimizer.learning_rate)"""
    adam_eps: float = 1e-5
    """Adam epsilon (create_optimizer.eps)"""
    anneal_lr: Optional[bool] = None
    """anneal the learning rate linearly to 0 [default: 200m True (ppo_cale.gin: anneal_learning_rate True);
    100k False (ppo_cale_100k.gin)]; over --anneal-steps updates, or the whole run"""
    gamma: float = 0.99
    """discount factor (PPOAgent.gamma)"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation (PPOAgent.lambda_)"""
    num_minibatches: int = 4
    """minibatches per epoch (PPOAgent.batch_size 256 = 1024 / 4)"""
    update_epochs: int = 3
    """epochs over each rollout (PPOAgent.num_epochs)"""
    norm_adv: bool = True
    """normalise advantages per minibatch (ppo_agent.train_minibatch)"""
    clip_coef: float = 0.1
    """surrogate and value clipping coefficient (PPOAgent.epsilon)"""
    clip_vloss: bool = True
    """clip the value loss as PPO2 (PPOAgent.clip_critic_loss True, range epsilon)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient (PPOAgent.entropy_coefficient)"""
    vf_coef: float = 0.5
    """value loss coefficient (PPOAgent.vf_coefficient)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold (PPOAgent.max_gradient_norm)"""
    target_kl: Optional[float] = None
    """stop the epochs of an update early when the approximate KL exceeds this (None: never, as Dopamine)"""
    clip_rewards: bool = False
    """clip rewards to [-1, 1] for learning (Dopamine: off, ContinuousRunner clip_rewards False)"""
    norm_reward: bool = False
    """divide rewards by a running std of the discounted return, clipped to [-reward-clip, reward-clip]
    (Dopamine: off)"""
    reward_clip: float = 10.0
    """clipping range of normalised rewards (CleanRL)"""
    anneal_steps: int = 0
    """with annealing: the learning rate reaches 0 after this many gradient updates (minibatch steps) and stays 0,
    as Dopamine's create_optimizer.anneal_steps (117,600 in ppo_cale.gin); 0 (default): over the whole run
    (docs/ppo_cale.md, detail 9)"""


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


# The values the two Dopamine gins set differently (docs/ppo_cale.md, hyperparameters); everything else is equal.
PRESETS = {
    "200m": dict(total_timesteps=50_000_000, sticky_action_prob=0.25, episodic_life=False, anneal_lr=True),
    "100k": dict(total_timesteps=100_000, sticky_action_prob=0.0, episodic_life=True, anneal_lr=False),
}


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
    """Check the flags and fill in the preset's values (docs/ppo_cale.md, detail 1); returns (tasks, family). No
    environment is created: every CALE game has the same spaces."""
    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    for task in tasks:
        cale_game(task)  # an Atari game, or a one-line error (with close matches)
    if not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must be in (0, 1) (got {args.threshold})")
    family = "cale"
    for key, value in PRESETS[args.preset].items():
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
        args.total_timesteps = args.steps_per_task or PRESETS[args.preset]["total_timesteps"]
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", "max_episode_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.total_timesteps < batch_size:
        raise UserError(f"--total-timesteps ({args.total_timesteps}) is less than one rollout, num_envs * num_steps "
                        f"= {batch_size}")
    if args.num_minibatches > batch_size:
        raise UserError(f"--num-minibatches ({args.num_minibatches}) exceeds the rollout size {batch_size}")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1 and args.clip_coef > 0):
        raise UserError("need 0 <= gamma <= 1, 0 <= gae-lambda <= 1 and clip-coef > 0")
    if not 0.0 <= args.sticky_action_prob <= 1.0:
        raise UserError(f"--sticky-action-prob must be in [0, 1] (got {args.sticky_action_prob})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch or use --device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    return tasks, family


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True, task_index: int = 0):
    """A CaleVecEnv with Dopamine's Atari protocol (docs/cale.md, detail 1). Evaluation always plays full games
    (no life-loss terminals); sticky actions stay on in evaluation, as Dopamine's single environment has them."""
    return CaleVecEnv(cale_game(env_id), num_envs, seeds, args.threshold, args.sticky_action_prob,
                      bool(args.episodic_life) and train, args.max_episode_steps, args.env_threads)


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct environment seeds per run, task and purpose (docs/conventions.md, section 4): runs with neighbouring
    seeds never share an environment."""
    state = np.random.SeedSequence([seed, task_index, purpose]).generate_state(num_envs)
    return [int(s % (2**31 - 1)) for s in state]


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


def layer_init_gain1(layer):
    """Orthogonal weights (gain 1), zero biases: flax's orthogonal() of Dopamine's SACEncoderNetwork."""
    return layer_init(layer, std=1.0)


def xavier_init(layer):
    """Glorot-uniform weights, zero biases: flax's xavier_uniform of Dopamine's NatureDQNEncoder."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# Squashed-Gaussian constants (docs/ppo_cale.md, detail 3): the inverse tanh clips |y| to this value, as Dopamine's
# _Tanh bijector (TF-Agents); float32 rounds it to 1 - 6e-8, so atanh stays finite (about 8.7).
ATANH_CLIP = 0.99999997


def squashed_gaussian_log_prob(loc: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor,
                               low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """log pi(a) of a box action a = mid + half * tanh(u), u ~ N(loc, std^2), summed over the components (change of
    variables, docs/ppo_cale.md detail 3): log N(u) - log(1 - tanh(u)^2) - log(half), with u = atanh(clip((a - mid)
    / half)) recovered from the stored action, as Dopamine's TransformedDistribution.log_prob."""
    mid, half = (high + low) / 2.0, (high - low) / 2.0
    y = ((actions - mid) / half).clamp(-ATANH_CLIP, ATANH_CLIP)
    u = torch.atanh(y)
    base = -0.5 * ((u - loc) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))  # log(1 - tanh(u)^2), stable
    return (base - log_det - torch.log(half)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of the base Normal (before the squash, whose Jacobian is not constant), summed over the components,
    as Dopamine's PPOActorNetwork."""
    return (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """flax/TF 'SAME' padding of one spatial dimension: (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv(name: str, c_in: int, c_out: int, kernel: int, stride: int, size: int, init) -> tuple[list, int]:
    """A Conv2d with flax's default 'SAME' padding (docs/ppo_cale.md, detail 2): symmetric padding in the conv, an
    asymmetric one as a ZeroPad2d before it. Returns ([(name, module), ...], output size)."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        layers = [(f"conv{name}", init(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=before)))]
    else:
        layers = [(f"pad{name}", nn.ZeroPad2d((before, after, before, after))),
                  (f"conv{name}", init(nn.Conv2d(c_in, c_out, kernel, stride=stride)))]
    return layers, math.ceil(size / stride)


class Agent(nn.Module):
    """Dopamine's PPOCALEConvNetwork (docs/ppo_cale.md, detail 2). A pixel encoder's conv trunk, then two
    projections of its flat features: the critic's, and the actor's on the features with the gradient stopped, so
    only the value loss trains the convolutions. `sac`: SAC-AE convs (32 3x3/2, 3 x 32 3x3/1), projections
    tanh(LayerNorm(Linear 50)), orthogonal init; `nature`: Nature CNN convs, critic relu(LayerNorm(Linear 512)),
    actor relu(Linear 512), Glorot init; both with flax's SAME padding. Then a 2x64 tanh MLP to the Gaussian's
    loc (3) and a 2x64 tanh MLP to the value, with a state-independent log-std; the policy is the squashed Gaussian
    over the box [low, high] (detail 3).

    Every Sequential's hidden layers are (Linear|Conv2d, [LayerNorm,] activation) runs; `forward(x,
    return_hidden=True)` also returns (name, pre-activation, activation) for each of them, for the diagnostics
    (the pre-activation is the Linear's output, before the LayerNorm)."""

    def __init__(self, obs_shape: tuple, action_dim: int, encoder: str, low, high):
        super().__init__()
        self.pixel, self.continuous = True, True
        c, size, _ = obs_shape
        if encoder == "sac":
            init, convs, width = layer_init_gain1, ((32, 3, 2), (32, 3, 1), (32, 3, 1), (32, 3, 1)), 50
        else:
            init, convs, width = xavier_init, ((32, 8, 4), (64, 4, 2), (64, 3, 1)), 512
        layers = []
        for i, (c_out, kernel, stride) in enumerate(convs, start=1):
            conv, size = same_conv(str(i), c, c_out, kernel, stride, size, init)
            layers += conv + [(f"act{i}", nn.ReLU())]
            c = c_out
        self.trunk = nn.Sequential(OrderedDict(layers + [("flatten", nn.Flatten())]))
        features = c * size * size  # sac: 32 x 42 x 42 = 56,448; nature: 64 x 11 x 11 = 7,744 (CHW order, detail 2)

        def projection(layer_norm: bool):
            act = nn.Tanh if encoder == "sac" else nn.ReLU
            norm = [("norm", nn.LayerNorm(width, eps=1e-6))] if layer_norm else []  # flax LayerNorm eps
            return [("proj", init(nn.Linear(features, width)))] + norm + [("proj_act", act())]

        def mlp(out_dim: int, std: float, layer_norm: bool):
            return nn.Sequential(OrderedDict(projection(layer_norm) + [
                ("fc1", layer_init(nn.Linear(width, 64))), ("act1", nn.Tanh()),
                ("fc2", layer_init(nn.Linear(64, 64))), ("act2", nn.Tanh()),
                ("out", layer_init(nn.Linear(64, out_dim), std=std))]))

        # loc head: Dopamine's orthogonal(sqrt(0.01)) = gain 0.1; value head orthogonal(1); Nature's actor
        # projection has no LayerNorm (networks.NatureDQNEncoder)
        self.actor, self.critic = mlp(action_dim, 0.1, encoder == "sac"), mlp(1, 1.0, True)
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))  # state-independent, starts at 0 (std 1)
        self.register_buffer("low", torch.as_tensor(np.asarray(low), dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(np.asarray(high), dtype=torch.float32))

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
        """Returns (the Gaussian's loc, value of shape (B,), hidden list or None)."""
        if x.device.type == "cpu":  # channels-last convolutions are faster on CPU (docs/ppo.md, detail 15)
            x = x.contiguous(memory_format=torch.channels_last)  # while still uint8: a 4x smaller copy
        x = x.float() / 255.0
        hidden = [] if return_hidden else None
        z = self._walk(self.trunk, x, "", hidden)
        policy_out = self._walk(self.actor, z.detach(), "actor.", hidden)  # stop-gradient: convs train on the value
        value = self._walk(self.critic, z, "critic.", hidden).squeeze(-1)
        return policy_out, value, hidden

    def log_prob_entropy(self, policy_out, actions):
        log_std = self.actor_logstd.expand_as(policy_out)
        return (squashed_gaussian_log_prob(policy_out, log_std, actions, self.low, self.high),
                gaussian_entropy(log_std))

    def get_value(self, x):
        return self(x)[1]

    def get_action_and_value(self, x, action=None, generator: Optional[torch.Generator] = None):
        policy_out, value, _ = self(x)
        if action is None:  # u ~ N(loc, std^2), squashed and mapped to the box; log-prob from the box action
            noise = torch.randn(policy_out.shape, generator=generator, device=policy_out.device)
            u = policy_out + self.actor_logstd.exp() * noise
            action = (self.high + self.low) / 2.0 + (self.high - self.low) / 2.0 * torch.tanh(u)
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


def anneal_lr_at(update: int, anneal_steps: int, learning_rate: float) -> float:
    """The learning rate of gradient update `update` (0-based) under Dopamine's optax.linear_schedule(lr, 0,
    anneal_steps): linear from lr to 0 over `anneal_steps` updates, then 0 (docs/ppo_cale.md, detail 9)."""
    return learning_rate * max(0.0, 1.0 - update / anneal_steps)


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
    """CaleVecEnv observation (uint8 frames, N x 4 x 84 x 84) -> network input on `device` (the network divides by
    255; no observation normalisation, as Dopamine)."""
    return torch.from_numpy(np.ascontiguousarray(raw_obs)).to(device)


def env_actions(actions: torch.Tensor, action_space) -> np.ndarray:
    """Box actions -> what AtariVectorEnv receives: float32 (it rejects float64). The squash already keeps them in
    the box, so nothing is clipped (docs/ppo_cale.md, detail 3)."""
    return actions.cpu().numpy().astype(np.float32)


def evaluate(agent, env_id: str, args: Args, episodes: int, seed: int, device, task_index: int = 0) -> list[float]:
    """Play `episodes` full games in parallel, one per env (so short games are not over-represented), sampling from
    the policy as Dopamine's PPO select_action does in eval mode too (docs/ppo_cale.md, detail 8); returns the
    full-game, unclipped returns."""
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
        prev_done = info["terminated"] | truncated
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
    label = tasks[0].replace("/", "-") if len(tasks) == 1 else "seq"  # ALE/Breakout-v5: a name, not a path
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
        continuous = True  # CALE's (r, theta, fire) box
        obs_shape = tuple(obs_space.shape)  # (4, 84, 84), CHW
        action_dim = int(action_space.shape[0])
        agent = Agent(obs_shape, action_dim, args.encoder, action_space.low, action_space.high).to(device)
        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0], device)
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"]) != (tuple(obs_shape), action_dim):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and "
                                f"{action_dim}")
            load_weights(agent, checkpoint, args.eval_checkpoint)
            envs.close()
            returns = evaluate(agent, tasks[0], args, args.eval_episodes, args.seed, device)
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        # Adam with eps 1e-5 (docs/ppo.md, detail 4); the LR is annealed linearly over the whole run, all tasks
        # together, or over --anneal-steps updates (docs/ppo_cale.md, detail 9)
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
        num_steps, num_envs = args.num_steps, args.num_envs
        num_iterations = args.total_timesteps // (num_steps * num_envs)  # CleanRL: whole rollouts only

        # Rollout storage (docs/ppo.md, detail 7): step t acts on obs[t]; valid[t] is False for auto-reset steps.
        obs_buf = torch.zeros((num_steps, num_envs, *obs_shape),
                              dtype=torch.uint8 if agent.pixel else torch.float32, device=device)
        actions_buf = torch.zeros((num_steps, num_envs, action_dim), dtype=torch.float32, device=device)
        logprobs_buf = torch.zeros((num_steps, num_envs), device=device)
        values_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        rewards_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        terminated_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        done_buf = np.zeros((num_steps, num_envs), dtype=np.float32)
        valid_buf = np.zeros((num_steps, num_envs), dtype=bool)

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
            if args.anneal_lr and not args.anneal_steps:  # docs/ppo.md, detail 4
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
            rollout_cells = []  # the joystick cell of every action sent to the env (docs/cale.md, detail 3)

            for step in range(num_steps):
                obs_buf[step] = next_obs
                valid = ~prev_done
                valid_buf[step] = valid
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs)
                actions_buf[step], logprobs_buf[step] = action, logprob
                values_buf[step] = value.cpu().numpy()
                sent = env_actions(action, action_space)
                raw_obs, reward, terminated, truncated, info = envs.step(sent)
                rollout_cells.append(joystick_cells(sent[valid], args.threshold))  # auto-reset steps ignore theirs
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
                # the env resets only after a game over or the cap: a life lost under --episodic-life is a learning
                # terminal, but the game goes on, so the next step is a real one (docs/cale.md, detail 1)
                prev_done = info["terminated"] | truncated
                next_obs = prepare_obs(raw_obs, obs_space, agent, device, args, update=True)

            # GAE with truncation bootstrap and auto-reset masking (details 6-7)
            with torch.no_grad():
                next_value = agent.get_value(next_obs).cpu().numpy()
            advantages, returns = compute_gae(rewards_buf, values_buf, next_value, terminated_buf, done_buf,
                                              valid_buf, args.gamma, args.gae_lambda)
            b_obs = obs_buf.reshape(-1, *obs_shape)
            b_actions = actions_buf.reshape(num_steps * num_envs, -1)
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
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # global clipping (detail 10)
                    if args.anneal_lr and args.anneal_steps:  # Dopamine's schedule (docs/ppo_cale.md, detail 9)
                        optimizer.param_groups[0]["lr"] = anneal_lr_at(num_updates, args.anneal_steps,
                                                                       args.learning_rate)
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
            writer.add_scalar("losses/explained_variance", explained_variance(
                values_buf.reshape(-1)[valid_flat], returns.reshape(-1)[valid_flat]), global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/num_updates", num_updates, global_step)
            for key, value in cale_cell_metrics(np.concatenate(rollout_cells)).items():  # once per rollout
                writer.add_scalar(key, value, global_step)
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
