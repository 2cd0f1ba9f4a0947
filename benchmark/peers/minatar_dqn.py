"""Runs the MinAtar repository's own PyTorch DQN example as the speed peer of algos/dqn.py on MinAtar.

The peer is `examples/dqn.py` of kenjyoung/MinAtar (GPL-3.0; measured at commit
4241f24685622cfb52f843cab9bbcf385a53484a, "GRAD_MOMENTUM not used by RMSProp in DQN (#37)", 2024-12-19). It is
never copied into this repository: fetch it yourself and pass its path, unmodified, with --peer-file, e.g.

    mkdir -p /work/peers/minatar && curl -L -o /work/peers/minatar/examples_dqn.py \\
        https://raw.githubusercontent.com/kenjyoung/MinAtar/4241f24685622cfb52f843cab9bbcf385a53484a/examples/dqn.py

It needs torch and minatar (`pip install minatar`, or this project's own environment, which has both).

This runner is a CleanRL-style stand-in for `python -m benchmark.measure sps --cleanrl-script`: measure runs
`PY benchmark/peers/minatar_dqn.py --env-id E --total-timesteps N <--cleanrl-args>` and reads the last `SPS: <int>`
line. Flags of our side go after `--` (measure's trailing positional `extra`); the peer's are in --cleanrl-args:

    python -m benchmark.measure sps --script dqn.py --env-id MinAtar/Breakout --total-timesteps 30000 \\
        --repeats 2 --threads 1 --cleanrl-script benchmark/peers/minatar_dqn.py \\
        --cleanrl-args "--peer-file /work/peers/minatar/examples_dqn.py" -- \\
        --batch-size 32 --buffer-size 100000 --replay-ratio 1 --target-network-frequency 1000 \\
        --learning-starts 5000 --exploration-steps 100000 --end-e 0.1 --learning-rate 0.00025 --gamma 0.99 \\
        --loss huber --metrics-every 0

What it does, and nothing else:
  * loads the peer file as a module (importlib, under a name other than __main__, so its main() does not run);
  * sets the module constant NUM_FRAMES to --total-timesteps (read by the peer's training loop at call time; no
    source is patched). Every other constant (the hyperparameters) stays the peer's own; they are printed;
  * builds the environment as the peer's main() does, `Environment(game)` with the minatar defaults (sticky
    actions 0.1, difficulty ramping on), MinAtar/<Game> mapped to the minatar name (SpaceInvaders ->
    space_invaders);
  * calls the peer's training function as its main() does with its default flags: `dqn(env, replay_off=False,
    target_off=False, <temp dir>/<game>, store_intermediate_result=False, load_path=None, step_size=STEP_SIZE)`;
    its final torch.save goes to a temporary directory that is removed afterwards;
  * times that call only: imports, module loading and environment creation are excluded; the call's own setup is
    included (networks, replay list, and the RMSprop optimizer, whose construction in torch 2.x lazily imports
    torch._dynamo, ~1.5 s once; our dqn.py's timer also starts before it builds its env, networks and optimizer),
    and so is its final torch.save of returns and weights (a few hundred KB, into the temporary directory);
  * prints one JSON line (frames, seconds, episodes, the peer's constants, its device) and then
    `SPS: <int(frames / seconds)>` as the last line.

Seeding: the peer's main() seeds nothing, and neither does this runner by default. With --seed S it seeds python's
random, numpy's global RNG and torch, and calls env.seed(S) (minatar's own RNG), which makes episodes repeatable
without changing any code path of the peer. The peer picks cuda when torch sees it (its module-level `device`);
CPU threads follow OMP_NUM_THREADS (measure's --threads).

Hyperparameters of the peer at that commit (all per frame = per agent step, no frame skip): batch 32, replay
100000, target copy every 1000 updates, one update per frame (TRAINING_FREQ 1) from frame index 5001 on
(t > REPLAY_START_SIZE; uniform random actions for t < 5000), epsilon 1.0 -> 0.1 linearly over the 100000 frames
after the replay start, centered RMSprop (lr 0.00025, alpha 0.95, eps 0.01), gamma 0.99, Huber loss, all 6 actions
(Environment.num_actions()), rewards unclipped. Network: conv 16 3x3 stride 1 -> fc 128 -> 6. Our dqn.py's flags
above match all of that but the optimizer (Adam); they are also its MinAtar defaults at the time of writing, and
spelling them out keeps the comparison fixed if those defaults change.

Bad input (unknown game, missing or unusable --peer-file) is one `error: ...` line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time

GAMES = {"Asterix": "asterix", "Breakout": "breakout", "Freeway": "freeway", "Seaquest": "seaquest",
         "SpaceInvaders": "space_invaders"}
PREFIX = "MinAtar/"


class UserError(Exception):
    """Bad input: one `error: ...` line on stderr, exit status 2."""


def game_name(env_id: str) -> str:
    game = env_id[len(PREFIX):] if env_id.startswith(PREFIX) else None
    if game not in GAMES:
        known = ", ".join(PREFIX + g for g in GAMES)
        raise UserError(f"unknown env id {env_id!r}: the MinAtar peer runs {known}")
    return GAMES[game]


def load_peer(path: str):
    """The peer file as a module, without running its main()."""
    if not path:
        raise UserError("--peer-file is required: the path of kenjyoung/MinAtar examples/dqn.py (see this file's "
                        "docstring for where to get it)")
    if not os.path.isfile(path):
        raise UserError(f"--peer-file {path} does not exist")
    spec = importlib.util.spec_from_file_location("minatar_examples_dqn", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that pickling anything the peer defines (e.g. its namedtuple) works
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise UserError(f"cannot import the peer file {path}: {e} (it needs torch and minatar)") from None
    missing = [name for name in ("dqn", "NUM_FRAMES", "STEP_SIZE", "Environment") if not hasattr(module, name)]
    if missing:
        raise UserError(f"{path} does not look like MinAtar's examples/dqn.py: no {', '.join(missing)}")
    return module


def constants(module) -> dict:
    """The peer's module-level constants (upper-case names holding numbers, booleans or strings)."""
    return {name: value for name, value in vars(module).items()
            if name.isupper() and isinstance(value, (bool, int, float, str))}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(args) -> None:
    game = game_name(args.env_id)
    if args.total_timesteps < 1:
        raise UserError("--total-timesteps must be >= 1")
    peer = load_peer(args.peer_file)
    peer.NUM_FRAMES = args.total_timesteps  # the only change: the peer's loop reads this global at call time
    if args.seed is not None:  # the peer's main() seeds nothing; see the docstring
        import random

        import numpy
        import torch

        random.seed(args.seed)
        numpy.random.seed(args.seed)
        torch.manual_seed(args.seed)
    env = peer.Environment(game)  # as the peer's main(): Environment(args.game), minatar's defaults
    if args.seed is not None:
        env.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="minatar_peer_") as out:
        output_file_name = os.path.join(out, game)
        start = time.perf_counter()
        # the peer's main(): dqn(env, args.replayoff, args.targetoff, file_name, args.save, load_file_path, args.alpha)
        peer.dqn(env, False, False, output_file_name, False, None, peer.STEP_SIZE)
        seconds = max(time.perf_counter() - start, 1e-9)
        episodes = last_frame = None
        torch = getattr(peer, "torch", None)
        saved = output_file_name + "_data_and_weights"
        if torch is not None and os.path.isfile(saved):
            data = torch.load(saved, weights_only=True)
            episodes, last_frame = len(data["frame_stamps"]), data["frame_stamps"][-1]
    if last_frame is not None and last_frame != args.total_timesteps:
        raise RuntimeError(f"the peer ran {last_frame} frames, not {args.total_timesteps}")
    device = getattr(peer, "device", None)
    print(json.dumps({
        "peer": "kenjyoung/MinAtar examples/dqn.py", "peer_file": os.path.abspath(args.peer_file),
        "peer_sha256": sha256(args.peer_file), "env_id": args.env_id, "game": game, "seed": args.seed,
        "frames": args.total_timesteps, "seconds": round(seconds, 6), "episodes": episodes,
        "device": None if device is None else str(device), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "hyperparameters": constants(peer),
    }), flush=True)
    print(f"SPS: {int(args.total_timesteps / seconds)}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-file", help="path of kenjyoung/MinAtar examples/dqn.py, unmodified")
    parser.add_argument("--env-id", required=True, help="MinAtar/<Game>: " + ", ".join(GAMES))
    parser.add_argument("--total-timesteps", type=int, required=True, help="frames (= agent steps) to train for")
    parser.add_argument("--seed", type=int, default=None, help="seed random, numpy, torch and the env (default: "
                        "none, as the peer's main)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
