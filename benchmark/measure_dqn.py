"""Measurements for algos/dqn.py: speed (SPS, side by side with CleanRL's dqn.py) and replay-memory size.

    python benchmark/measure_dqn.py sps                      # dqn.py on CartPole-v1, CleanRL's hyperparameters
    python benchmark/measure_dqn.py sps --cleanrl-dir DIR --cleanrl-python PY   # and CleanRL's dqn.py beside it
    python benchmark/measure_dqn.py atari-sps --env-id Breakout-v5            # training-phase SPS, paper defaults
    python benchmark/measure_dqn.py replay-memory            # fill a 1M-transition Atari buffer, report memory
    python benchmark/measure_dqn.py minatar-breakdown --env-id MinAtar/Breakout   # env step, acting, update costs
    python benchmark/measure_dqn.py minatar-random           # random-policy returns of the five MinAtar games

Each prints one JSON line per measurement. Runs go to a temporary directory unless --output-dir is given.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runs import read_scalars  # noqa: E402
from utils.scripts import ROOT, load_script, script_path  # noqa: E402

DQN = script_path("dqn")


def timed(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def scalar_rate(run_dir: str, tag: str) -> float | None:
    """Environment steps per wall-clock second between the first and last event of `tag` (training phase)."""
    events = read_scalars(run_dir).get(tag, [])
    if len(events) < 2:
        return None
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def sps(args):
    out = args.output_dir or tempfile.mkdtemp(prefix="measure_dqn_")
    for num_envs in args.num_envs:
        name = f"sps_envs{num_envs}_{int(time.time())}"
        cmd = [sys.executable, DQN, "--env-id", "CartPole-v1", "--total-timesteps", str(args.steps),
               "--num-envs", str(num_envs), "--eval-episodes", "0", "--output-dir", out, "--run-name", name,
               "--metrics-every", str(args.metrics_every)]
        wall = timed(cmd, ROOT)
        with open(os.path.join(out, name, "summary.json")) as f:
            summary = json.load(f)
        print(json.dumps({"script": "interventions dqn.py", "num_envs": num_envs, "steps": args.steps,
                          "process_wall_s": round(wall, 2), "sps": summary["sps"],
                          "training_phase_sps": round(scalar_rate(os.path.join(out, name), "losses/td_loss") or 0),
                          "final_train_return": summary["final_train_return"]}))
    if args.cleanrl_dir:
        cmd = [args.cleanrl_python, "dqn.py", "--total-timesteps", str(args.steps)]
        wall = timed(cmd, args.cleanrl_dir)
        newest = max(glob.glob(os.path.join(args.cleanrl_dir, "runs", "*")), key=os.path.getmtime)
        print(json.dumps({"script": "cleanrl dqn.py", "num_envs": 1, "steps": args.steps,
                          "process_wall_s": round(wall, 2), "sps": round(args.steps / wall),
                          "training_phase_sps": round(scalar_rate(newest, "losses/td_loss") or 0)}))


def atari_sps(args):
    out = args.output_dir or tempfile.mkdtemp(prefix="measure_dqn_")
    name = f"atari_sps_{int(time.time())}"
    cmd = [sys.executable, DQN, "--env-id", args.env_id, "--total-timesteps", str(args.learning_starts + args.steps),
           "--learning-starts", str(args.learning_starts), "--eval-episodes", "0", "--output-dir", out,
           "--run-name", name, "--log-every", "25", "--num-envs", str(args.num_envs)] + args.extra
    wall = timed(cmd, ROOT)
    with open(os.path.join(out, name, "summary.json")) as f:
        summary = json.load(f)
    print(json.dumps({"env_id": args.env_id, "num_envs": args.num_envs, "process_wall_s": round(wall, 1),
                      "overall_sps": summary["sps"],
                      "training_phase_sps": round(scalar_rate(os.path.join(out, name), "losses/td_loss") or 0, 1),
                      "peak_memory_mb": round(summary["peak_memory_mb"])}))


def replay_memory(args):
    import numpy as np

    dqn = load_script("dqn")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rb = dqn.ReplayBuffer(args.capacity, args.num_envs, (4, 84, 84), np.uint8, stacked=True)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (args.num_envs, 4, 84, 84), dtype=np.uint8)
    zeros, ones = np.zeros(args.num_envs), np.ones(args.num_envs, dtype=bool)
    start = time.perf_counter()
    for i in range(rb.rows):  # every row written, so every page of the buffer is resident
        rb.add(obs, zeros, zeros, zeros, zeros, ones if i == 0 else ~ones, ones)
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        rb.sample(32, rng, n_step=1)
    sample_ms = (time.perf_counter() - start) * 10
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nbytes = sum(a.nbytes for a in vars(rb).values() if isinstance(a, np.ndarray))
    print(json.dumps({"capacity": len(rb), "buffer_nbytes_gb": round(nbytes / 1e9, 3),
                      "bytes_per_transition": round(nbytes / len(rb), 1), "peak_rss_mb_before": round(before),
                      "peak_rss_mb_after_fill": round(after), "fill_s": round(fill_s, 1),
                      "sample_batch32_ms": round(sample_ms, 3)}))


def minatar_breakdown(args):
    """Where a MinAtar training step's time goes at the family defaults (one env, one update per step): the
    MinAtarVecEnv step, the greedy forward pass for one observation, and one gradient update (replay sample, TD
    loss of online and target network, backward, fused Adam), each timed alone in this process on a replay memory
    filled by random play. Medians over `--repeats` blocks of `--calls` calls, in microseconds."""
    import statistics

    import numpy as np
    import torch

    dqn = load_script("dqn")
    if args.threads:
        torch.set_num_threads(args.threads)
    a = dqn.Args(env_id=args.env_id)
    dqn.resolve_args(a)
    envs = dqn.make_env(args.env_id, 1, dqn.env_seeds(0, 0, 0, 1), a)
    obs_shape, n_actions = envs.observation_space.shape, int(envs.action_space.n)
    q = dqn.QNetwork(obs_shape, n_actions, minatar=True)
    target = dqn.QNetwork(obs_shape, n_actions, minatar=True)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=a.learning_rate, eps=a.adam_eps, fused=True)
    rb = dqn.ReplayBuffer(a.buffer_size, 1, obs_shape, np.uint8, False)
    rng = np.random.default_rng(0)
    obs, _ = envs.reset()
    prev_done = np.zeros(1, dtype=bool)

    def env_step():
        nonlocal obs, prev_done
        actions = rng.integers(0, n_actions, 1)
        next_obs, reward, terminated, truncated, _ = envs.step(actions)
        rb.add(obs, actions, reward, terminated, truncated, prev_done, ~prev_done)
        obs, prev_done = next_obs, terminated | truncated

    def act():
        with torch.inference_mode():
            q(torch.from_numpy(obs)).argmax(dim=1).cpu().numpy()

    def update():
        batch = dqn.to_torch(rb.sample(a.batch_size, rng, a.n_step, a.gamma), "cpu")
        loss, _ = dqn.td_loss(q, target, *batch, a.loss)
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.fill):
        env_step()
    out = {"env_id": args.env_id, "threads": torch.get_num_threads(), "obs_shape": list(obs_shape)}
    for name, fn in (("env_step_and_replay_add_us", env_step), ("greedy_forward_us", act), ("update_us", update)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times.append((time.perf_counter() - start) / args.calls * 1e6)
        out[name] = round(statistics.median(times), 1)
    step = out["env_step_and_replay_add_us"] + out["greedy_forward_us"] + out["update_us"]
    out["implied_training_sps"] = round(1e6 / step)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        batch = dqn.to_torch(rb.sample(a.batch_size, rng, a.n_step, a.gamma), "cpu")
        dqn.td_loss(q, target, *batch, a.loss)[0].backward()
    out["update_mflop"] = round(counter.get_total_flops() / 1e6, 1)
    print(json.dumps(out))
    if args.profile:  # the update's operators, for "where the time goes" (docs/dqn.md, MinAtar speed)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                update()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def minatar_random(args):
    """Returns of a uniform-random policy over all 6 actions through the script's MinAtarVecEnv (MinAtar's sticky
    actions 0.1, no cap), `--episodes` per game (one env, seed 0): mean and standard error."""
    import numpy as np

    dqn = load_script("dqn")
    for env_id, episodes in zip(dqn.MINATAR_GAMES, args.episodes):
        envs = dqn.MinAtarVecEnv(dqn.MINATAR_GAMES[env_id], 1, dqn.env_seeds(0, 0, 0, 1), 0.1, True, False)
        stats, rng, prev_done, returns = dqn.EpisodeStats(1), np.random.default_rng(0), np.zeros(1, bool), []
        envs.reset()
        while len(returns) < episodes:
            _, reward, terminated, truncated, info = envs.step(rng.integers(0, 6, 1))
            returns += [r for _, r, _ in stats.update(reward, terminated, truncated, info, ~prev_done)[1]]
            prev_done = terminated | truncated
        print(json.dumps({"env_id": env_id, "episodes": episodes, "mean_return": round(float(np.mean(returns)), 3),
                          "stderr": round(float(np.std(returns) / np.sqrt(len(returns))), 3)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sps", help="CartPole-v1 SPS at CleanRL's dqn.py hyperparameters")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--num-envs", type=int, nargs="+", default=[1])
    p.add_argument("--metrics-every", type=int, default=1000, help="0 turns the diagnostics off")
    p.add_argument("--cleanrl-dir", help="a directory holding CleanRL's dqn.py (and cleanrl_utils/)")
    p.add_argument("--cleanrl-python", default=sys.executable, help="the python of CleanRL's environment")
    p.add_argument("--output-dir")
    p.set_defaults(func=sps)
    p = sub.add_parser("atari-sps", help="training-phase SPS on Atari at paper defaults")
    p.add_argument("--env-id", default="Breakout-v5")
    p.add_argument("--steps", type=int, default=4000, help="steps measured after learning starts")
    p.add_argument("--learning-starts", type=int, default=2000)
    p.add_argument("--num-envs", type=int, default=1)
    p.add_argument("--output-dir")
    p.add_argument("extra", nargs="*", help="extra dqn.py flags, after --")
    p.set_defaults(func=atari_sps)
    p = sub.add_parser("replay-memory", help="memory of a filled Atari replay memory")
    p.add_argument("--capacity", type=int, default=1_000_000)
    p.add_argument("--num-envs", type=int, default=1)
    p.set_defaults(func=replay_memory)
    p = sub.add_parser("minatar-breakdown", help="per-part cost of a MinAtar training step at the family defaults")
    p.add_argument("--env-id", default="MinAtar/Breakout")
    p.add_argument("--fill", type=int, default=10_000, help="random steps stored before timing")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of --calls updates")
    p.set_defaults(func=minatar_breakdown)
    p = sub.add_parser("minatar-random", help="random-policy returns of the MinAtar games")
    p.add_argument("--episodes", type=int, nargs=5, default=[1000, 1000, 200, 1000, 1000],
                   help="episodes per game, in the order Asterix Breakout Freeway Seaquest SpaceInvaders")
    p.set_defaults(func=minatar_random)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
