"""PPO on EnvPool in JAX: the JAX twin of algos/ppo.py, rollout and update jitted end to end.

Paper: "Proximal Policy Optimization Algorithms", Schulman, Wolski, Dhariwal, Radford and Klimov, 2017,
https://arxiv.org/abs/1707.06347. Algorithm, defaults, flags and details are algos/ppo.py's (CleanRL's
`ppo_atari_envpool.py`, `ppo.py` and `ppo_continuous_action.py`), written in JAX + flax (linen) + optax. One jitted
call per iteration collects the rollout through EnvPool's XLA interface (`envs.xla()`: the env step is an XLA
custom call inside `jax.lax.scan`) and runs the whole update (epochs x minibatches in `lax.scan`), as CleanRL's
`ppo_atari_envpool_xla_jax.py` does; the host only writes the logs.

Differences from algos/ppo.py (docs/ppo_jax.md, "Differences from ppo.py"):
  - random streams: one `jax.random.PRNGKey(seed)` split for init, action sampling and minibatch shuffling, and a
    key of its own for the diagnostics' sample; the environment seeds are ppo.py's (same `SeedSequence`), so the
    environments are the same, but the actions and hence the runs are not bit-identical to ppo.py's;
  - float32 reductions in XLA's order (and float32 normalisation statistics unless the task needs 64-bit values,
    detail 2), optax's global-norm clipping (no 1e-6 in the denominator);
  - minibatches are fixed-size windows over the shuffled valid steps with a mask (detail 4): the same split as
    ppo.py's `np.array_split`, in shapes that jit compiles once;
  - MinAtar (the `minatar` package, not EnvPool: no XLA step) is stepped on the host from inside the jitted rollout
    by a callback (detail 1); `--torch-threads` and `--torch-deterministic` are gone (`--xla-threads`; JAX on CPU
    is deterministic); `--save-model` writes model.msgpack, not model.pt.
Families: classic control and MiniGrid, Atari, MuJoCo and DeepMind Control (float64 EnvPool tasks turn on JAX's
64-bit mode, detail 2), MinAtar, task sequences.

Docs: docs/ppo_jax.md. Conventions every script follows: docs/conventions.md.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
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
    """seed of the experiment (network init, action sampling, minibatch shuffling, environment seeds)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """the JAX platform: auto is JAX's default (cuda when a CUDA jaxlib plugin is installed), cpu forces the CPU"""
    xla_threads: int = 0
    """XLA CPU threads: 0 follows OMP_NUM_THREADS when it is set (the benchmark harness sets it per run), else XLA's
    default (one per core); N sizes XLA's pool to N threads, by starting the backend confined to N CPUs. Set when
    JAX's backend starts, once per Python process (docs/ppo_jax.md, detail 9)"""
    output_dir: str = "runs"
    """outputs go to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """the run directory name; default {env}__{exp_name}__{seed}__{unix time}"""
    save_model: bool = False
    """if toggled, save the agent to <run_dir>/model.msgpack (read back with flax.serialization.msgpack_restore)"""
    eval_checkpoint: Optional[str] = None
    """path to a model.msgpack written by --save-model: skip training and only evaluate it on --env-id"""
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




class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, no traceback."""


class Diverged(Exception):
    """A non-finite loss: the run stops with summary status "diverged"."""


# Family defaults: Atari = CleanRL ppo_atari_envpool.py, classic (incl. MiniGrid) = CleanRL ppo.py,
# continuous (MuJoCo, DMC) = CleanRL ppo_continuous_action.py, MinAtar = PureJaxRL's MinAtar PPO: ppo.py's table
# (docs/ppo.md, details 1 and 16).
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
TRACES = {"iteration": 0}  # traces of the jitted iteration: one per task (tests check that nothing retraces)


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
            return (int(np.prod(shape)),)  # MinAtar grids, flattened for the MLPs (docs/ppo.md, detail 16)
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


def flatten_obs(obs, space):
    """EnvPool observations -> the network input, in jnp (inside the jitted rollout and evaluation; docs/ppo.md,
    detail 2). Dict entries are concatenated in the space's key order (EnvPool's XLA step returns them as a dict
    sorted by name: indexing by key keeps ppo.py's order): Discrete entries one-hot, Box entries flattened, the
    MiniGrid mission dropped. Stacked Atari frames stay uint8; everything else becomes float32."""
    if space_kind(space) != "Dict" and obs.ndim == 4 and obs.shape[2:] == (10, 10):
        return obs.reshape(len(obs), -1).astype(jnp.float32)  # MinAtar grids: 0/1 features (docs/ppo.md, 16)
    if space_kind(space) != "Dict":
        return obs if obs.dtype == jnp.uint8 and obs.ndim == 4 else obs.astype(jnp.float32)
    parts = []
    for key, sub in space.spaces.items():
        if key in DROPPED_KEYS:
            continue
        x = jnp.asarray(obs[key])
        if space_kind(sub) == "Discrete":
            parts.append(jax.nn.one_hot(x.astype(jnp.int32) - int(sub.start), int(sub.n), dtype=jnp.float32))
        else:
            parts.append(x.reshape(x.shape[0], -1).astype(jnp.float32))
    return jnp.concatenate(parts, axis=1)


def needs_x64(space) -> bool:
    """EnvPool's MuJoCo and DMC tasks take float64 actions and return float64 observations; its XLA interface
    declares its buffers with JAX's dtypes, which are 32-bit unless JAX's 64-bit mode is on (docs/ppo_jax.md,
    detail 2)."""
    if space_kind(space) == "Dict":
        return any(needs_x64(sub) for sub in space.spaces.values())
    return getattr(space, "dtype", None) == np.float64


def resolve_args(args: Args):
    """Check the flags against the environments and fill in the family defaults; returns (tasks, family)."""
    import envpool

    negative = [(key, value) for key, value in vars(args).items() if type(value) is int and value < 0]
    if negative:  # no count, size, period, budget or seed is negative (docs/conventions.md, section 10)
        raise UserError(f"--{negative[0][0].replace('_', '-')} must be >= 0 (got {negative[0][1]})")
    tasks = list(args.env_ids) if args.env_ids else [args.env_id]
    minatar = tasks[0].startswith("MinAtar/")  # MinAtar games: the minatar package, not EnvPool (docs/ppo.md, 16)
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
            raise UserError(f"ppo_jax.py supports vector, Dict or stacked-image (uint8) observations; {task} has "
                            f"{spec.observation_space}")
        action = spec.action_space
        if space_kind(action) == "Discrete":
            action_sig = ("discrete", int(action.n))
            family = "minatar" if minatar else ("atari" if len(obs_shape) == 3 else "classic")
        elif space_kind(action) == "Box" and len(action.shape) == 1:
            action_sig = ("continuous", int(action.shape[0]))
            family = "continuous"
            if len(obs_shape) == 3:
                raise UserError(f"ppo_jax.py has no network for pixel observations with continuous actions ({task})")
        else:
            raise UserError(f"ppo_jax.py needs a Discrete or 1-D Box action space; {task} has {action}")
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
    if args.device == "cuda" and not cuda_plugin_installed():
        raise UserError("--device cuda, but no CUDA jaxlib plugin is installed (pip install 'jax[cuda12]' or use "
                        "--device cpu)")
    if args.eval_checkpoint and not (os.path.isfile(args.eval_checkpoint) and args.eval_episodes >= 1):
        raise UserError(f"--eval-checkpoint needs an existing file and --eval-episodes >= 1: {args.eval_checkpoint}")
    return tasks, family


def cuda_plugin_installed() -> bool:
    """Whether JAX could use CUDA, without starting JAX's backend (which would fix the XLA flags, detail 9)."""
    from importlib.metadata import distributions

    return any((d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda")) for d in distributions())


def start_jax(device: str, threads: int):
    """Choose the JAX platform and start its backend with `threads` XLA CPU threads (0: XLA's default, one per core).
    XLA sizes its CPU thread pool by the CPUs the process may run on when the backend starts; it ignores
    OMP_NUM_THREADS, and jax 0.10 ignores the `intra_op_parallelism_threads` flag (measured: a 2000 x 2000 matmul
    loop ran on both cores with it). So the process is confined to `threads` of its CPUs while the backend starts,
    then every thread, XLA's pool included, gets all of them back: a pool of `threads` threads that the OS may
    place on any core. In one Python process the backend starts once; later calls change nothing
    (docs/ppo_jax.md, detail 9)."""
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


def make_env(env_id: str, num_envs: int, seeds: list[int], args: Args, train: bool = True, task_index: int = 0):
    """An EnvPool Gymnasium vector env, ppo.py's settings (docs/ppo.md, detail 3). The perturbation of task
    `task_index` of a sequence is added in the network input (`obs_offset`, docs/ppo.md detail 17). MinAtar ids get
    ppo.py's MinAtarVecEnv, stepped from the jitted rollout through a host callback (`host_step`, detail 1)."""
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
    return envpool.make(env_id, **kwargs)


def obs_offset(seed: int, task_index: int, std: float, shape: tuple) -> np.ndarray:
    """The fixed observation offset of task `task_index` >= 1 of a sequence: N(0, std^2) per component, a function of
    the run's seed and the task's position only (docs/ppo.md, detail 17); ppo.py's draw."""
    return np.random.default_rng([seed, task_index, 17]).normal(0.0, std, shape).astype(np.float32)


def env_seeds(seed: int, task_index: int, purpose: int, num_envs: int) -> list[int]:
    """Distinct EnvPool seeds per run, task and purpose. EnvPool gives env i the seed `seed + i` when given an int,
    so runs with seeds 1 and 2 would share num_envs - 1 environments; we pass an explicit list instead (ppo.py's)."""
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


def host_step(envs):
    """An XLA step for an env that has none (MinAtar): `(handle, action) -> (handle, (obs, reward, terminated,
    truncated, info))` as EnvPool's, calling the host env's `step` from inside the jitted rollout through
    `jax.experimental.io_callback` (docs/ppo_jax.md, detail 1). The handle is a dummy token; ordered=True keeps the
    steps in program order."""
    from jax.experimental import io_callback

    n, obs_shape = len(envs.games), envs.observation_space.shape
    shapes = (jax.ShapeDtypeStruct((n, *obs_shape), jnp.uint8), jax.ShapeDtypeStruct((n,), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.bool_), jax.ShapeDtypeStruct((n,), jnp.bool_))

    def step(action):
        obs, reward, terminated, truncated, _ = envs.step(np.asarray(action))
        return obs, reward, terminated, truncated

    def step_env(handle, action):
        obs, reward, terminated, truncated = io_callback(step, shapes, action, ordered=True)
        return handle, (obs, reward, terminated, truncated, {})

    return jnp.zeros((), jnp.int32), step_env


class EpisodeStats:
    """Full-game, unclipped episode returns from EnvPool's `info` (docs/ppo.md, detail 8), on the host: used by the
    evaluation loop (the rollout does the same in jnp, `episode_step`)."""

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


def episode_step(returns, lengths, reward, terminated, truncated, info, valid):
    """EpisodeStats.update in jnp, inside the rollout: returns (returns, lengths, game_over, finished returns,
    finished lengths); the host writes episodes.csv from game_over after the iteration (docs/ppo_jax.md, detail 5)."""
    returns = returns + (info["reward"] if "reward" in info else reward).astype(returns.dtype)
    lengths = lengths + valid.astype(lengths.dtype)
    game_over = (info["terminated"].astype(bool) if "terminated" in info else terminated) | truncated
    return (jnp.where(game_over, 0.0, returns).astype(returns.dtype), jnp.where(game_over, 0, lengths), game_over,
            returns, lengths)


def rms_init(shape: tuple, dtype, epsilon: float = 1e-4) -> dict:
    """Running mean and variance (Chan et al.'s parallel update, as gymnasium's NormalizeObservation and ppo.py's
    RunningMeanStd) as a pytree carried through the jitted rollout and saved with the model."""
    return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype), "count": jnp.asarray(epsilon, dtype)}


def rms_update(rms: dict, x, mask=None) -> dict:
    """Add the rows of `x` (those with `mask`, all without) to the statistics; no rows leaves them as they are."""
    x = x.astype(rms["mean"].dtype)
    w = jnp.ones(x.shape[0], x.dtype) if mask is None else mask.astype(x.dtype)
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    batch_count = w.sum()
    safe = jnp.maximum(batch_count, 1.0)
    batch_mean = (w * x).sum(0) / safe
    batch_var = (w * (x - batch_mean) ** 2).sum(0) / safe
    delta, total = batch_mean - rms["mean"], rms["count"] + batch_count
    m2 = rms["var"] * rms["count"] + batch_var * batch_count + delta**2 * rms["count"] * batch_count / total
    new = {"mean": rms["mean"] + delta * batch_count / total, "var": m2 / total, "count": total}
    return jax.tree.map(lambda a, b: jnp.where(batch_count > 0, a, b), new, rms)


def rms_normalize(rms: dict, x, clip: float):
    out = (x.astype(rms["mean"].dtype) - rms["mean"]) / jnp.sqrt(rms["var"] + 1e-8)
    return jnp.clip(out, -clip, clip).astype(jnp.float32)


def reward_normalize(state: dict, reward, done, valid, gamma: float, clip: float):
    """ppo.py's RewardNormalizer in jnp (docs/ppo.md, detail 5): divide each reward by the running std of the
    discounted return of the current episode, then clip; auto-reset steps update neither. Returns (state, reward)."""
    returns = jnp.where(valid, state["returns"] * gamma + reward, state["returns"])
    rms = rms_update(state["rms"], returns, valid)
    scaled = reward / jnp.sqrt(rms["var"] + 1e-8)
    return ({"returns": jnp.where(done, 0.0, returns).astype(returns.dtype), "rms": rms},
            jnp.clip(scaled, -clip, clip).astype(jnp.float32))


def categorical_log_prob_entropy(logits, actions):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_prob = jnp.take_along_axis(log_p, actions.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(log_p) * log_p).sum(-1)
    return log_prob, entropy


def gaussian_log_prob_entropy(mean, log_std, actions):
    """Diagonal Gaussian: log-probability and entropy summed over the (independent) action components."""
    log_prob = -0.5 * ((actions - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    entropy = jnp.broadcast_to(0.5 + 0.5 * math.log(2 * math.pi) + log_std, mean.shape)
    return log_prob.sum(-1), entropy.sum(-1)


def layer_init(std=np.sqrt(2)):
    """Orthogonal kernels with gain `std` and zero biases, ppo.py's layer_init (docs/ppo.md, detail 4)."""
    return dict(kernel_init=nn.initializers.orthogonal(float(std)), bias_init=nn.initializers.zeros)


class MLP(nn.Module):
    """ppo.py's 64-64 MLP (fc1, fc2, out): tanh, or ReLU on MinAtar (PureJaxRL's, docs/ppo.md detail 16)."""
    out_dim: int
    out_std: float
    relu: bool = False

    @nn.compact
    def __call__(self, x, prefix: str, hidden: Optional[list], perturb: Optional[dict]):
        for name in ("fc1", "fc2"):
            z = nn.Dense(64, name=name, **layer_init())(x)
            if perturb is not None:  # zeros: their gradient is the gradient w.r.t. the pre-activation (detail 7)
                z = z + perturb[prefix + name]
            x = nn.relu(z) if self.relu else jnp.tanh(z)
            if hidden is not None:
                hidden.append((prefix + name, z, x))
        return nn.Dense(self.out_dim, name="out", **layer_init(self.out_std))(x)


class NatureCNN(nn.Module):
    """CleanRL's Nature CNN trunk (VALID padding, 3136 features into 512), NHWC as XLA's CPU convolutions prefer."""

    @nn.compact
    def __call__(self, x, hidden: Optional[list], perturb: Optional[dict]):
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0  # uint8 CHW frames -> float HWC (detail 3)
        layers = (("conv1", nn.Conv(32, (8, 8), (4, 4), padding="VALID", name="conv1", **layer_init())),
                  ("conv2", nn.Conv(64, (4, 4), (2, 2), padding="VALID", name="conv2", **layer_init())),
                  ("conv3", nn.Conv(64, (3, 3), (1, 1), padding="VALID", name="conv3", **layer_init())),
                  ("fc1", nn.Dense(512, name="fc1", **layer_init())))
        for name, layer in layers:
            if name == "fc1":
                x = x.reshape(x.shape[0], -1)  # HWC order (ppo.py flattens CHW: tests permute fc1's rows)
            z = layer(x)
            if perturb is not None:
                z = z + perturb[name]
            x = nn.relu(z)
            if hidden is not None:
                hidden.append((name, z, x))
        return x


class Agent(nn.Module):
    """ppo.py's actor-critic in linen. Pixels: Nature CNN trunk shared by a linear policy and a linear value head.
    Vectors: separate 64-64 tanh MLPs (ReLU on MinAtar's flattened grids). Discrete actions: categorical over logits; Box actions: diagonal Gaussian with a
    state-independent log-std parameter. Parameter paths mirror ppo.py's state-dict names: trunk/conv1, actor/out,
    critic/fc1, actor_logstd (docs/ppo_jax.md, detail 3).

    `__call__(x, return_hidden, perturb)` returns (logits or Gaussian mean, value of shape (B,), hidden list or None);
    the hidden list holds (name, pre-activation, activation) per hidden layer, for the diagnostics."""
    obs_shape: tuple
    action_dim: int
    continuous: bool
    minatar: bool = False

    @nn.compact
    def __call__(self, x, return_hidden: bool = False, perturb: Optional[dict] = None):
        hidden = [] if return_hidden else None
        if len(self.obs_shape) == 3:
            z = NatureCNN(name="trunk")(x, hidden, perturb)
            policy_out = _Head(self.action_dim, 0.01, name="actor")(z)
            value = _Head(1, 1.0, name="critic")(z)[:, 0]
        else:
            x = x.astype(jnp.float32)
            policy_out = MLP(self.action_dim, 0.01, self.minatar, name="actor")(x, "actor.", hidden, perturb)
            value = MLP(1, 1.0, self.minatar, name="critic")(x, "critic.", hidden, perturb)[:, 0]
        if self.continuous:
            self.param("actor_logstd", nn.initializers.zeros, (1, self.action_dim), jnp.float32)
        return policy_out, value, hidden


class _Head(nn.Module):
    """A linear head named `out`, so that the path is actor/out/kernel as ppo.py's actor.out.weight."""
    out_dim: int
    std: float

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out_dim, name="out", **layer_init(self.std))(x)


def log_prob_entropy(params, policy_out, actions, continuous: bool):
    if continuous:
        log_std = jnp.broadcast_to(params["actor_logstd"], policy_out.shape)
        return gaussian_log_prob_entropy(policy_out, log_std, actions)
    return categorical_log_prob_entropy(policy_out, actions)


def sample_action(params, policy_out, key, continuous: bool):
    """A sample of the policy and its log-probability (ppo.py's get_action_and_value, with a JAX key)."""
    if continuous:
        noise = jax.random.normal(key, policy_out.shape, jnp.float32)
        action = policy_out + jnp.exp(params["actor_logstd"]) * noise
    else:
        action = jax.random.categorical(key, policy_out, axis=-1).astype(jnp.int32)
    return action, log_prob_entropy(params, policy_out, action, continuous)[0]


def compute_gae(rewards, values, next_value, terminated, done, valid, gamma: float, gae_lambda: float):
    """ppo.py's compute_gae (docs/ppo.md, details 6-7) as a reverse lax.scan: after a truncation the target bootstraps
    from V(final observation), after a termination it does not, the trace is cut at every done, and auto-reset steps
    (valid False) get advantage 0. Returns (advantages, returns = advantages + values)."""
    next_values = jnp.concatenate([values[1:], next_value[None]], axis=0)

    def body(last, xs):
        reward, value, next_v, term, dn, ok = xs
        delta = reward + gamma * next_v * (1.0 - term) - value
        last = delta + gamma * gae_lambda * (1.0 - dn) * last
        last = jnp.where(ok, last, 0.0).astype(jnp.float32)
        return last, last

    xs = (rewards, values, next_values, terminated.astype(jnp.float32), done.astype(jnp.float32), valid)
    _, advantages = jax.lax.scan(body, jnp.zeros(rewards.shape[1:], jnp.float32), xs, reverse=True)
    return advantages, advantages + values


def minibatch_windows(valid, num_minibatches: int, key):
    """ppo.py's `minibatches` in fixed shapes (docs/ppo_jax.md, detail 4): the valid steps' indices in a random order
    (invalid ones after them), and per minibatch k its start in that order and its size, np.array_split's split of
    the n valid steps into `num_minibatches` nearly equal parts (the first n % M one larger). Returns (order, starts,
    sizes); minibatch k is order[starts[k]: starts[k] + sizes[k]], read as a window of fixed width with a mask."""
    n = valid.sum().astype(jnp.int32)
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)).astype(jnp.int32)
    k = jnp.arange(num_minibatches, dtype=jnp.int32)
    base, extra = n // num_minibatches, n % num_minibatches
    sizes = base + (k < extra).astype(jnp.int32)
    starts = k * base + jnp.minimum(k, extra)
    return order, starts, sizes


def ppo_loss(params, apply_fn, obs, actions, old_logprobs, advantages, returns, old_values, mask, cfg: dict,
             return_hidden: bool = False, perturb: Optional[dict] = None):
    """The PPO loss on one (masked) minibatch (docs/ppo.md, detail 10): clipped surrogate, clipped value loss,
    entropy bonus; every mean is over the rows with `mask` (ppo.py's loss on those rows). Returns (loss, (dict of
    statistics, hidden activations or None))."""
    policy_out, new_values, hidden = apply_fn({"params": params}, obs, return_hidden, perturb)
    new_logprobs, entropy = log_prob_entropy(params, policy_out, actions, cfg["continuous"])
    m = mask.astype(jnp.float32)
    n = m.sum()

    def mean(x):
        return (m * x).sum() / jnp.maximum(n, 1.0)

    logratio = new_logprobs - old_logprobs
    ratio = jnp.exp(logratio)
    if cfg["norm_adv"]:  # torch's std is the unbiased one; one sample is left as it is (as ppo.py)
        adv_mean = mean(advantages)
        adv_std = jnp.sqrt((m * (advantages - adv_mean) ** 2).sum() / jnp.maximum(n - 1.0, 1.0))
        advantages = jnp.where(n > 1, (advantages - adv_mean) / (adv_std + 1e-8), advantages)
    clip = cfg["clip_coef"]
    pg_loss = mean(jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)))
    v_loss_unclipped = (new_values - returns) ** 2
    if cfg["clip_vloss"]:
        v_clipped = old_values + jnp.clip(new_values - old_values, -clip, clip)
        v_loss = 0.5 * mean(jnp.maximum(v_loss_unclipped, (v_clipped - returns) ** 2))
    else:
        v_loss = 0.5 * mean(v_loss_unclipped)
    entropy_loss = mean(entropy)
    loss = pg_loss - cfg["ent_coef"] * entropy_loss + cfg["vf_coef"] * v_loss
    sg = jax.lax.stop_gradient  # debug variables; approx_kl is the (ratio - 1) - log ratio estimator (detail 11)
    stats = dict(policy_loss=sg(pg_loss), value_loss=sg(v_loss), entropy=sg(entropy_loss),
                 old_approx_kl=sg(mean(-logratio)), approx_kl=sg(mean((ratio - 1) - logratio)),
                 clipfrac=sg(mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32))), ratio=sg(ratio))
    return loss, (stats, hidden)


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    var_y = np.var(returns)
    return float("nan") if var_y == 0 else float(1 - np.var(returns - values) / var_y)


def unit_scores(x, m):
    """ReDo's layer-normalised score per unit (a conv channel is one unit) over the rows with mask m: mean |x| over
    batch (and space), divided by the layer's mean of that quantity."""
    w = m.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
    axes = (0, 1, 2) if x.ndim == 4 else (0,)  # NHWC: channels last
    per_unit = (w * jnp.abs(x)).sum(axes) / (jnp.maximum(m.sum(), 1.0) * (x.shape[1] * x.shape[2] if x.ndim == 4 else 1))
    return per_unit / (per_unit.mean() + 1e-9)


def srank(features, delta: float = 0.01):
    """Effective rank of Kumar et al. (2021): the fewest singular values holding 1 - delta of their sum (rows outside
    the sample are zero, which adds only zero singular values)."""
    sv = jnp.linalg.svd(features, compute_uv=False)
    cumulative = jnp.cumsum(sv) / jnp.maximum(sv.sum(), 1e-12)
    return (cumulative < 1 - delta).sum() + 1


def feature_rank(features, energy: float = 0.99):
    """The feature rank of the parallel-data study (docs/ppo.md, detail 18): the fewest singular values whose squares
    hold `energy` of the sum of squares; 0 for all-zero features."""
    sq = jnp.linalg.svd(features, compute_uv=False) ** 2
    return jnp.where(sq.sum() > 0, (jnp.cumsum(sq) < energy * sq.sum()).sum() + 1, 0)


def kurtosis(x):
    """Pearson's kurtosis of the entries of x, E[(x - mean)^4] / Var^2 (docs/ppo.md, detail 18)."""
    return ((x - x.mean()) ** 4).mean() / x.var() ** 2


def effective_sample_size(weights, m):
    """Kish's effective sample size of the importance weights with mask m over their count (detail 18)."""
    w = weights * m
    return w.sum() ** 2 / (m.sum() * (w**2).sum())


def plasticity_metrics(params, apply_fn, batch, mask, cfg: dict, taus=(0.0, 0.1)) -> dict:
    """ppo.py's plasticity/ diagnostics in jnp (docs/ppo.md, detail 12; docs/ppo_jax.md, detail 7) on a masked sample
    of the current rollout with the PPO loss. Gradients w.r.t. the pre-activations are those of zero perturbations
    added to them. Returns {key: scalar}."""
    names = cfg["hidden_names"]
    shapes = cfg["hidden_shapes"]
    batch_size = batch[0].shape[0]
    perturb = {name: jnp.zeros((batch_size, *shapes[name]), jnp.float32) for name in names}

    def loss_fn(p, pert):
        return ppo_loss(p, apply_fn, *batch, mask, cfg, return_hidden=True, perturb=pert)

    (loss, (stats, hidden)), (param_grads, pre_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, perturb)
    m = mask.astype(jnp.float32)
    metrics, totals, penultimate = {}, {}, {}
    for name, _, h in hidden:
        act_score = unit_scores(h, m)
        grad_score = unit_scores(pre_grads[name], m)
        for tau in taus:
            for kind, score in (("dormant", act_score), ("grad_inactive", grad_score)):
                key = f"{kind}_tau{tau:g}"
                frac = (score <= tau).astype(jnp.float32)
                metrics[f"plasticity/{key}/{name}"] = frac.mean()
                count, units = totals.get(key, (0.0, 0))
                totals[key] = (count + frac.sum(), units + frac.size)
        penultimate["/critic" if name.startswith("critic.") else ""] = h.reshape(h.shape[0], -1) * m[:, None]
    for key, (count, units) in totals.items():
        metrics[f"plasticity/{key}"] = count / units
    for suffix, features in penultimate.items():  # policy features (the shared trunk for pixels), then the critic's
        metrics[f"plasticity/srank{suffix}"] = srank(features)
        metrics[f"plasticity/feature_rank{suffix}"] = feature_rank(features)
        metrics[f"plasticity/feature_norm{suffix}"] = (jnp.linalg.norm(features, axis=1) * m).sum() / m.sum()
    leaves = jax.tree.leaves(params)
    grads = jax.tree.leaves(param_grads)
    metrics["plasticity/param_norm"] = jnp.sqrt(sum((p**2).sum() for p in leaves))
    metrics["plasticity/grad_norm"] = jnp.sqrt(sum((g**2).sum() for g in grads))
    metrics["plasticity/grad_kurtosis"] = kurtosis(jnp.concatenate([g.reshape(-1) for g in grads]))
    metrics["plasticity/ess"] = effective_sample_size(stats["ratio"], m)  # ratios pi / pi_old on this sample
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def scan(body, carry, xs, length: int, unroll: bool):
    """jax.lax.scan, or the same loop unrolled in Python inside the jit. XLA on the CPU runs a convolution whose
    weights are a loop's carry about 10x slower than the same step unrolled (0.6 s against 10 s per Adam step of the
    Nature CNN at batch 256, one thread; `unroll=True` of lax.scan did not help), so the updates of pixel networks
    unroll (docs/ppo_jax.md, detail 4)."""
    if not unroll:
        return jax.lax.scan(body, carry, xs, length=length)
    outs = []
    for i in range(length):
        carry, out = body(carry, None if xs is None else jax.tree.map(lambda x: x[i], xs))
        outs.append(out)
    return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)


def make_iteration(step_env, apply_fn, optimizer, cfg: dict, obs_space, action_space):
    """One PPO iteration as one jitted function (docs/ppo_jax.md, detail 4): the rollout (num_steps EnvPool XLA steps
    in lax.scan), GAE, and update_epochs x num_minibatches Adam steps (nested lax.scan). `step_env` is the task's
    EnvPool XLA step, so each task of a sequence gets its own compiled function (one trace per task, TRACES)."""
    num_steps, num_minibatches = cfg["num_steps"], cfg["num_minibatches"]
    continuous = cfg["continuous"]
    batch_size = num_steps * cfg["num_envs"]
    window = -(-batch_size // num_minibatches)  # the largest minibatch: np.array_split's first parts
    metrics_size = max(1, min(cfg["metrics_batch_size"], batch_size))
    if continuous:
        low, high = np.asarray(action_space.low), np.asarray(action_space.high)
        env_dtype = action_space.dtype

    def env_step(params, carry, _):
        key, sub = jax.random.split(carry["key"])
        policy_out, value, _ = apply_fn({"params": params}, carry["obs"])
        action, logprob = sample_action(params, policy_out, sub, continuous)
        # Gaussian samples are clipped to the bounds for the env; the rollout keeps the sample (docs/ppo.md, detail 4)
        env_action = jnp.clip(action, low, high).astype(env_dtype) if continuous else action
        handle, (raw_obs, reward, terminated, truncated, info) = step_env(carry["handle"], env_action)
        valid = ~carry["prev_done"]
        done = terminated | truncated
        learn_reward = jnp.clip(reward, -1.0, 1.0) if cfg["clip_rewards"] else reward.astype(jnp.float32)
        reward_state = carry["reward_norm"]
        if cfg["norm_reward"]:
            reward_state, learn_reward = reward_normalize(reward_state, learn_reward, done, valid, cfg["gamma"],
                                                          cfg["reward_clip"])
        ep_returns, ep_lengths, game_over, finished_returns, finished_lengths = episode_step(
            carry["ep_returns"], carry["ep_lengths"], reward, terminated, truncated, info, valid)
        obs_rms, next_obs = prepare_obs(carry["obs_rms"], raw_obs, obs_space, cfg, carry["offset"], update=True)
        out = dict(obs=carry["obs"], actions=action, logprobs=logprob, values=value, rewards=learn_reward,
                   terminated=terminated, done=done, valid=valid, game_over=game_over,
                   finished_returns=finished_returns, finished_lengths=finished_lengths)
        carry = dict(carry, key=key, handle=handle, obs=next_obs, prev_done=done, obs_rms=obs_rms,
                     reward_norm=reward_state, ep_returns=ep_returns, ep_lengths=ep_lengths)
        return carry, out

    def metrics_on_sample(params, metrics_key, b, valid_flat):
        # the diagnostics' own key: a sample of the rollout's valid steps, never touching the run's key (detail 7)
        metrics_key, sub = jax.random.split(metrics_key)
        order = jnp.argsort(jnp.where(valid_flat, jax.random.uniform(sub, valid_flat.shape), 2.0))[:metrics_size]
        mask = jnp.arange(metrics_size) < valid_flat.sum()
        batch = jax.tree.map(lambda x: x[order], b)
        return plasticity_metrics(params, apply_fn, batch, mask, cfg), metrics_key

    def update(state, b, valid_flat):
        def zero_metrics():  # the skipped branch of the diagnostics' cond: zeros of their shapes
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                metrics_on_sample, state["params"], state["metrics_key"], b, valid_flat)[0])

        stat_keys = ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl")

        def minibatch_step(carry, k):
            order, starts, sizes, stopped = carry["order"], carry["starts"], carry["sizes"], carry["stopped"]
            idx = jax.lax.dynamic_slice(order, (starts[k],), (window,))
            mask = jnp.arange(window) < sizes[k]
            batch = jax.tree.map(lambda x: x[idx], b)
            (loss, (stats, _)), grads = jax.value_and_grad(ppo_loss, has_aux=True)(
                carry["params"], apply_fn, *batch, mask, cfg)
            attempted = (sizes[k] > 0) & ~stopped & ~carry["diverged"]
            finite = jnp.isfinite(loss)
            do_step = attempted & finite  # a non-finite loss stops the run before the step (docs/ppo.md, detail 10)
            updates, opt_state = optimizer.update(grads, carry["opt_state"], carry["params"])
            params = optax.apply_updates(carry["params"], updates)

            def pick(new, old):
                return jax.tree.map(lambda a, c: jnp.where(do_step, a, c), new, old)

            num_updates = carry["num_updates"] + do_step.astype(jnp.int32)
            carry = dict(carry, params=pick(params, carry["params"]), opt_state=pick(opt_state, carry["opt_state"]),
                         diverged=carry["diverged"] | (attempted & ~finite), num_updates=num_updates,
                         last_stats=pick({key: stats[key] for key in stat_keys}, carry["last_stats"]))
            out = dict(clipfrac=stats["clipfrac"], stepped=do_step)
            if cfg["metrics_every"]:  # static: without diagnostics nothing of them is compiled
                do_metrics = do_step & (num_updates % cfg["metrics_every"] == 0)
                metrics, metrics_key = jax.lax.cond(
                    do_metrics, lambda p, mk: metrics_on_sample(p, mk, b, valid_flat),
                    lambda p, mk: (zero_metrics(), mk), carry["params"], carry["metrics_key"])
                carry = dict(carry, metrics_key=metrics_key)
                out.update(metrics=metrics, metrics_logged=do_metrics)
            return carry, out

        def epoch(carry, _):
            key, sub = jax.random.split(carry["key"])
            order, starts, sizes = minibatch_windows(valid_flat, num_minibatches, sub)
            order = jnp.concatenate([order, order[:window]])  # a window never runs past the end
            carry = dict(carry, key=key, order=order, starts=starts, sizes=sizes)
            carry, out = scan(minibatch_step, carry, jnp.arange(num_minibatches), num_minibatches, cfg["unroll"])
            if cfg["target_kl"] is not None:  # early stop on the last minibatch's approx_kl (docs/ppo.md, detail 10)
                carry = dict(carry, stopped=carry["stopped"] | (carry["last_stats"]["approx_kl"] > cfg["target_kl"]))
            return carry, out

        carry = dict(params=state["params"], opt_state=state["opt_state"], key=state["key"],
                     metrics_key=state["metrics_key"], num_updates=state["num_updates"], diverged=jnp.asarray(False),
                     stopped=jnp.asarray(False), last_stats={key: jnp.zeros((), jnp.float32) for key in stat_keys},
                     order=jnp.zeros(batch_size + window, jnp.int32), starts=jnp.zeros(num_minibatches, jnp.int32),
                     sizes=jnp.zeros(num_minibatches, jnp.int32))
        carry, out = scan(epoch, carry, None, cfg["update_epochs"], cfg["unroll"])
        return carry, out

    def iteration(state, learning_rate):
        TRACES["iteration"] += 1  # Python side effect: runs once per trace, not per call
        opt_state = state["opt_state"]
        opt_state.hyperparams["learning_rate"] = learning_rate  # the annealed LR (docs/ppo_jax.md, detail 4)
        # the parameters and the optimizer state stay out of the scan's carry: a carried 1.7M-parameter CNN and its
        # Adam moments were copied at every step (docs/ppo_jax.md, detail 4)
        learner_keys = ("params", "opt_state", "metrics_key", "num_updates")
        env_carry = {k: v for k, v in state.items() if k not in learner_keys}
        env_carry, rollout = jax.lax.scan(partial(env_step, state["params"]), env_carry, None, length=num_steps)
        carry = dict(env_carry, **{k: state[k] for k in learner_keys})
        next_value = apply_fn({"params": carry["params"]}, carry["obs"])[1]
        # GAE with truncation bootstrap and auto-reset masking (docs/ppo.md, details 6-7)
        advantages, returns = compute_gae(rollout["rewards"], rollout["values"], next_value, rollout["terminated"],
                                          rollout["done"], rollout["valid"], cfg["gamma"], cfg["gae_lambda"])
        flat = jax.tree.map(lambda x: x.reshape(batch_size, *x.shape[2:]), dict(
            obs=rollout["obs"], actions=rollout["actions"], logprobs=rollout["logprobs"], advantages=advantages,
            returns=returns, values=rollout["values"]))
        b = (flat["obs"], flat["actions"], flat["logprobs"], flat["advantages"], flat["returns"], flat["values"])
        updated, out = update(carry, b, rollout["valid"].reshape(-1))
        state = dict(carry, params=updated["params"], opt_state=updated["opt_state"], key=updated["key"],
                     metrics_key=updated["metrics_key"], num_updates=updated["num_updates"])
        info = dict(game_over=rollout["game_over"], finished_returns=rollout["finished_returns"],
                    finished_lengths=rollout["finished_lengths"], values=rollout["values"], returns=returns,
                    valid=rollout["valid"], last_stats=updated["last_stats"], diverged=updated["diverged"], **out)
        return state, info

    return jax.jit(iteration, donate_argnums=0)


def prepare_obs(obs_rms, raw_obs, obs_space, cfg: dict, offset, update: bool):
    """EnvPool observation -> network input: flattened (docs/ppo.md, detail 2), shifted by the task's perturbation
    (detail 17), normalised with running statistics when --norm-obs (detail 5; `update` adds this batch to the
    statistics first, evaluation does not). Returns (statistics, input)."""
    x = flatten_obs(raw_obs, obs_space)
    if cfg["obs_perturbation"]:
        x = x + offset
    if cfg["norm_obs"]:
        if update:
            obs_rms = rms_update(obs_rms, x)
        x = rms_normalize(obs_rms, x, cfg["obs_clip"])
    return obs_rms, x


def make_policy(apply_fn, cfg: dict, obs_space, action_space):
    """The jitted evaluation policy: raw observations -> actions for EnvPool (clipped to the bounds), sampling as
    CleanRL's ppo_eval with the evaluation's own key; observation statistics frozen."""
    continuous = cfg["continuous"]

    @jax.jit
    def act(params, obs_rms, raw_obs, offset, key):
        _, x = prepare_obs(obs_rms, raw_obs, obs_space, cfg, offset, update=False)
        policy_out = apply_fn({"params": params}, x)[0]
        action = sample_action(params, policy_out, key, continuous)[0]
        return jnp.clip(action, action_space.low, action_space.high) if continuous else action

    return act


def evaluate(act, params, obs_rms, env_id: str, args: Args, episodes: int, seed: int, offset,
             task_index: int = 0) -> list[float]:
    """Play `episodes` full games in parallel, one per EnvPool env (a host loop over a plain EnvPool env with the
    jitted policy, docs/ppo_jax.md detail 6); returns the full-game, unclipped returns."""
    envs = make_env(env_id, episodes, env_seeds(seed, 0, 1, episodes), args, train=False, task_index=task_index)
    space = envs.observation_space
    key = jax.random.PRNGKey(seed + 10_000)
    stats = EpisodeStats(episodes)
    returns = np.full(episodes, np.nan)
    obs, _ = envs.reset()
    prev_done = np.zeros(episodes, dtype=bool)
    while np.isnan(returns).any():
        key, sub = jax.random.split(key)
        raw = {k: np.asarray(obs[k]) for k in space.spaces} if space_kind(space) == "Dict" else obs
        actions = np.asarray(act(params, obs_rms, raw, offset, sub))
        if space_kind(envs.action_space) == "Box":
            actions = actions.astype(envs.action_space.dtype)
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


def peak_gpu_memory_mb() -> Optional[float]:
    try:
        stats = jax.devices()[0].memory_stats()  # None on CPU
    except Exception:
        return None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def write_json(path: str, data: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)  # atomic: the harness never reads a half-written file


def param_paths(tree, prefix: str = "") -> dict:
    """{"actor/fc1/kernel": shape, ...} of a nested dict of arrays (anything else: shape ("?",))."""
    if not isinstance(tree, dict):
        return {prefix: tuple(getattr(tree, "shape", ("?",)))}
    out = {}
    for key, value in tree.items():
        out.update(param_paths(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def save_checkpoint(path: str, model: dict, obs_shape, action_dim: int, continuous: bool, args: Args):
    """model.msgpack (docs/ppo_jax.md, detail 8): msgpack of plain containers and arrays, written atomically."""
    data = {"script": os.path.basename(__file__),  # named in load_weights' errors
            "model": jax.tree.map(np.asarray, model), "obs_shape": list(obs_shape), "n_actions": int(action_dim),
            "continuous": bool(continuous), "args": json.loads(json.dumps(dataclasses.asdict(args)))}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(data))
    os.replace(tmp, path)


def read_checkpoint(path: str, task: str) -> dict:
    """An --eval-checkpoint file, read with flax.serialization.msgpack_restore only (plain containers and arrays: a
    file can never run code) and checked to be a --save-model checkpoint trained on `task` (docs/conventions.md,
    section 10)."""
    try:
        with open(path, "rb") as f:
            checkpoint = flax.serialization.msgpack_restore(f.read())
    except Exception as err:  # empty, corrupt, not msgpack
        raise UserError(f"--eval-checkpoint {path}: not a file msgpack_restore can read ({type(err).__name__})") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and {"model", "obs_shape", "n_actions"} <= checkpoint.keys()):
        raise UserError(f"--eval-checkpoint {path}: not a checkpoint written by --save-model")
    trained_on = checkpoint["args"].get("env_ids") or [checkpoint["args"].get("env_id")]
    if task not in trained_on:
        raise UserError(f"--eval-checkpoint {path}: trained on {' '.join(map(str, trained_on))}, not on {task}")
    return checkpoint


def load_weights(model: dict, checkpoint: dict, path: str) -> dict:
    """The checkpoint's model as jnp arrays, once every parameter path ("actor/fc1/kernel") and shape agrees with
    `model` (what these flags build): a checkpoint of another network is one line naming what differs."""
    state = checkpoint["model"] if isinstance(checkpoint["model"], dict) else {}
    ours, theirs = param_paths(model), param_paths(state)
    differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differ:
        raise UserError(f"--eval-checkpoint {path}: written by {checkpoint.get('script', 'another script')}, whose "
                        f"network differs from the one these flags build (in {', '.join(differ[:3])}"
                        f"{', ...' * (len(differ) > 3)})")
    return jax.tree.map(lambda ref, value: jnp.asarray(value, ref.dtype), model, state)


def run(args: Args) -> dict:
    start_jax(args.device, resolved_threads(args))  # before anything starts JAX's backend (detail 9)
    tasks, family = resolve_args(args)
    label = tasks[0].replace("/", "-") if len(tasks) == 1 else "seq"
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

    # Random streams (docs/ppo_jax.md, detail 10): one key split for init, rollout/shuffling, and the diagnostics
    key = jax.random.PRNGKey(args.seed)
    init_key, key = jax.random.split(key)
    metrics_key = jax.random.PRNGKey(args.seed + 1_000_003)  # the diagnostics' own: they never change a run
    start_time = time.time()
    summary = {"status": "failed", "run_name": run_name, "global_step": 0, "total_timesteps": args.total_timesteps}
    train_returns, eval_returns = [], []
    global_step, num_updates = 0, 0
    try:
        envs = make_env(tasks[0], args.num_envs, env_seeds(args.seed, 0, 0, args.num_envs), args)
        obs_space, action_space = envs.observation_space, envs.action_space
        # MuJoCo/DMC exchange float64 with EnvPool: JAX's 64-bit mode, compute kept in float32 (docs/ppo_jax.md, 2)
        x64 = needs_x64(obs_space) or needs_x64(action_space)
        jax.config.update("jax_enable_x64", x64)
        stat_dtype = jnp.float64 if x64 else jnp.float32
        continuous = space_kind(action_space) == "Box"
        obs_shape = flat_obs_shape(obs_space)
        action_dim = int(action_space.shape[0]) if continuous else int(action_space.n)
        agent = Agent(tuple(obs_shape), action_dim, continuous, family == "minatar")
        pixel = len(obs_shape) == 3
        dummy = jnp.zeros((1, *obs_shape), jnp.uint8 if pixel else jnp.float32)
        params = agent.init(init_key, dummy)["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        hidden = agent.apply({"params": params}, dummy, True)[2]
        cfg = dict(continuous=continuous, norm_adv=args.norm_adv, clip_coef=args.clip_coef, clip_vloss=args.clip_vloss,
                   ent_coef=args.ent_coef, vf_coef=args.vf_coef, num_steps=args.num_steps, num_envs=args.num_envs,
                   num_minibatches=args.num_minibatches, update_epochs=args.update_epochs, gamma=args.gamma,
                   gae_lambda=args.gae_lambda, clip_rewards=args.clip_rewards, norm_reward=args.norm_reward,
                   norm_obs=args.norm_obs, obs_clip=args.obs_clip, reward_clip=args.reward_clip,
                   target_kl=args.target_kl, metrics_every=args.metrics_every,
                   metrics_batch_size=args.metrics_batch_size, obs_perturbation=args.obs_perturbation,
                   hidden_names=[name for name, _, _ in hidden], unroll=pixel,
                   hidden_shapes={name: tuple(z.shape[1:]) for name, z, _ in hidden})
        obs_rms = rms_init(tuple(obs_shape), stat_dtype)
        act = make_policy(agent.apply, cfg, obs_space, action_space)

        def task_offset(task_index: int):
            if not (args.obs_perturbation and task_index):
                return jnp.zeros(obs_shape if not pixel else (), jnp.float32)
            return jnp.asarray(obs_offset(args.seed, task_index, args.obs_perturbation, tuple(obs_shape)))

        def model_of(params, obs_rms):  # what model.msgpack holds: parameters (+ observation statistics for MLPs)
            return {**params, "obs_norm": obs_rms} if not pixel else dict(params)

        if args.eval_checkpoint:  # evaluation only
            checkpoint = read_checkpoint(args.eval_checkpoint, tasks[0])
            if (tuple(checkpoint["obs_shape"]), checkpoint["n_actions"], checkpoint.get("continuous", False)) != (
                    tuple(obs_shape), action_dim, continuous):
                raise UserError(f"the checkpoint's network takes observations {tuple(checkpoint['obs_shape'])} and "
                                f"{checkpoint['n_actions']} actions; {tasks[0]} has {tuple(obs_shape)} and "
                                f"{action_dim}")
            model = load_weights(model_of(params, obs_rms), checkpoint, args.eval_checkpoint)
            obs_rms = model.pop("obs_norm", obs_rms)
            args.norm_obs = bool(checkpoint["args"].get("norm_obs"))  # evaluate as the agent was trained
            cfg["norm_obs"] = args.norm_obs
            act = make_policy(agent.apply, cfg, obs_space, action_space)
            envs.close()
            returns = evaluate(act, model, obs_rms, tasks[0], args, args.eval_episodes, args.seed, task_offset(0))
            summary.update(status="completed", eval_returns=returns, eval_return_mean=float(np.mean(returns)),
                           checkpoint=args.eval_checkpoint)
            return summary
        # Adam with eps 1e-5 after global-norm clipping; the LR is set every iteration (docs/ppo_jax.md, detail 4)
        optimizer = optax.inject_hyperparams(lambda learning_rate: optax.chain(
            optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=args.adam_eps)))(
            learning_rate=args.learning_rate)
        opt_state = optimizer.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(args.learning_rate, jnp.float32)
        num_steps, num_envs = args.num_steps, args.num_envs
        num_iterations = args.total_timesteps // (num_steps * num_envs)  # CleanRL: whole rollouts only

        def start_task(envs, task_index: int, state: Optional[dict]):
            """The task's XLA step, its jitted iteration and the rollout state after reset (details 4-5)."""
            # EnvPool's XLA step, or MinAtar's host step through a callback (docs/ppo_jax.md, detail 1)
            if isinstance(envs, MinAtarVecEnv):
                handle, step_env = host_step(envs)
            else:
                handle, _, _, step_env = envs.xla()
            iteration_fn = make_iteration(step_env, agent.apply, optimizer, cfg, obs_space, action_space)
            raw_obs, _ = envs.reset()
            raw = {k: jnp.asarray(raw_obs[k]) for k in obs_space.spaces} if space_kind(obs_space) == "Dict" \
                else jnp.asarray(raw_obs)
            offset = task_offset(task_index)
            rms = state["obs_rms"] if state else obs_rms
            rms, obs = prepare_obs(rms, raw, obs_space, cfg, offset, update=True)
            reward_norm = state["reward_norm"] if state else {"returns": None, "rms": rms_init((), stat_dtype)}
            reward_norm = dict(reward_norm, returns=jnp.zeros(num_envs, stat_dtype))  # the running return restarts
            new = dict(handle=handle, obs=obs, prev_done=jnp.zeros(num_envs, bool), obs_rms=rms,
                       reward_norm=reward_norm, ep_returns=jnp.zeros(num_envs, stat_dtype),
                       ep_lengths=jnp.zeros(num_envs, jnp.int32), offset=offset)
            if state is None:
                new.update(params=params, opt_state=opt_state, key=key, metrics_key=metrics_key,
                           num_updates=jnp.asarray(0, jnp.int32))
            else:
                new.update({k: state[k] for k in ("params", "opt_state", "key", "metrics_key", "num_updates")})
            return iteration_fn, new

        iteration_fn, state = start_task(envs, 0, None)
        task_index = 0
        next_eval = args.eval_every
        last_lr = args.learning_rate
        for iteration in range(1, num_iterations + 1):
            if len(tasks) > 1 and global_step >= (task_index + 1) * args.steps_per_task:
                # Task switch between rollouts (docs/ppo.md, detail 9): new env (and XLA step), unfinished episodes
                # dropped, network, optimizer state, LR schedule and normalisation statistics carried on.
                envs.close()
                task_index += 1
                envs = make_env(tasks[task_index], num_envs, env_seeds(args.seed, task_index, 0, num_envs), args,
                                task_index=task_index)
                iteration_fn, state = start_task(envs, task_index, state)
                writer.add_scalar("charts/task_index", task_index, global_step)
                print(f"global_step={global_step}, switching to task {task_index}: {tasks[task_index]}")
            last_lr = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate if args.anneal_lr \
                else args.learning_rate  # detail 4
            state, info = iteration_fn(state, np.float32(last_lr))
            info = jax.device_get(info)  # one transfer per iteration: episodes, logs, diagnostics
            start_step = global_step
            global_step += num_steps * num_envs
            if info["diverged"]:
                raise Diverged(f"non-finite PPO loss at global_step={global_step}")
            for t, e in zip(*np.nonzero(info["game_over"])):  # ppo.py's order: by step, then env
                ep_return, ep_length = float(info["finished_returns"][t, e]), int(info["finished_lengths"][t, e])
                step_t = start_step + (int(t) + 1) * num_envs
                train_returns.append(ep_return)
                episodes_csv.writerow([step_t, ep_return, ep_length, tasks[task_index]])
                writer.add_scalar("charts/episodic_return", ep_return, step_t)
                writer.add_scalar("charts/episodic_length", ep_length, step_t)
            logged = info["metrics_logged"].reshape(-1) if args.metrics_every else np.zeros(0, bool)
            for i in np.flatnonzero(logged):
                for name, values in info["metrics"].items():
                    writer.add_scalar(name, values.reshape(-1)[i], global_step)
            num_updates += int(info["stepped"].sum())
            valid_flat = info["valid"].reshape(-1)
            sps = int(global_step / (time.time() - start_time))
            writer.add_scalar("charts/learning_rate", last_lr, global_step)
            for key_name in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl"):
                writer.add_scalar(f"losses/{key_name}", info["last_stats"][key_name], global_step)
            stepped = info["stepped"].reshape(-1)
            writer.add_scalar("losses/clipfrac", float(np.mean(info["clipfrac"].reshape(-1)[stepped]))
                              if stepped.any() else float("nan"), global_step)
            writer.add_scalar("losses/explained_variance", explained_variance(
                info["values"].reshape(-1)[valid_flat], info["returns"].reshape(-1)[valid_flat]), global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/num_updates", num_updates, global_step)
            if args.eval_every and global_step >= next_eval and args.eval_episodes:
                returns_now = evaluate(act, state["params"], state["obs_rms"], tasks[task_index], args,
                                       args.eval_episodes, args.seed + global_step, state["offset"], task_index)
                writer.add_scalar("eval/episodic_return", float(np.mean(returns_now)), global_step)
                next_eval += args.eval_every
        envs.close()
        train_time = time.time() - start_time
        params, obs_rms = state["params"], state["obs_rms"]
        if args.save_model:
            model_path = os.path.join(run_dir, "model.msgpack")
            save_checkpoint(model_path, model_of(params, obs_rms), obs_shape, action_dim, continuous, args)
            summary["model_path"] = model_path
        if args.eval_episodes:
            eval_returns = evaluate(act, params, obs_rms, tasks[-1], args, args.eval_episodes, args.seed,
                                    task_offset(len(tasks) - 1), len(tasks) - 1)
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
