"""Speed of a script of algos/, optionally side by side with CleanRL's matching script.

    python -m benchmark.measure sps --script ppo.py --env-id Breakout-v5 --total-timesteps 20480 --repeats 2 \\
        --threads 1 --cleanrl-script DIR/ppo_atari_envpool.py --cleanrl-python PY [-- extra flags of ours]

Runs `algos/<script> --env-id E --total-timesteps N --eval-episodes 0 [extra flags]` `--repeats` times and, with
`--cleanrl-script`, CleanRL's script with the same `--env-id` and `--total-timesteps` (plus `--cleanrl-args "..."`)
after each of ours: ours, CleanRL, ours, CleanRL, ..., so that a change in the machine's load over the
measurement hits both sides alike. With `--against S` the baseline is instead another of our scripts (or a copy
of one: an older version), with `--against-args "..."` as its extra flags, interleaved the same way: the cost of an
intervention against its base script, or the gain of a change:

    python -m benchmark.measure sps --script sac_simplicial.py --against sac.py --env-id HalfCheetah-v4 \
        --total-timesteps 12000 --repeats 2

Each run is a fresh process; nothing else is changed. Prints one JSON line per run, then one summary line (medians
and their ratio, ours / baseline):

  side                  "ours", "cleanrl" or "against"
  wall_s                wall time of the whole process (imports and env creation included)
  sps                   the script's own steps per second, measured after setup: ours from summary.json (steps /
                        training time), CleanRL's from its last printed `SPS:` line
  loadavg_before/after  /proc/loadavg (1, 5, 15 minutes) before and after the run

`--threads T` sets OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to T for both sides (our scripts'
default `--torch-threads 0` follows it); without it both inherit this process's environment. Run outputs go to a
temporary directory unless --output-dir is given; CleanRL's `runs/` goes to a subdirectory of it.
Hyperparameters are not touched: each side runs at its own defaults, so compare scripts whose defaults agree (or
pass the differing flags on both sides). Results and commands: docs/<script>.md, "Measured".

DQN-specific measurements (CartPole at several env counts, Atari training phase, replay memory):
benchmark/measure_dqn.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.scripts import ROOT, algo_scripts, script_path  # noqa: E402

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CLEANRL_SPS = re.compile(r"SPS:\s*(\d+)")


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:  # not Linux
        return None


def timed_run(cmd: list[str], cwd: str, env: dict, log_path: str) -> tuple[float, int, list, list]:
    """Run `cmd`, stdout and stderr into `log_path`; returns (wall seconds, exit status, loadavg before, after)."""
    before = loadavg()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    return wall, proc.returncode, before, loadavg()


def our_script(script: str) -> str:
    return script_path(script) if script in algo_scripts() else os.path.abspath(script)


def measure_ours(args, out: str, repeat: int, env: dict, side: str = "ours") -> dict:
    """One run of our script (side "ours") or of the --against script (side "against")."""
    script, extra = (args.script, args.extra) if side == "ours" else (args.against, shlex.split(args.against_args))
    env_name = args.env_id.replace("/", "-")  # MinAtar/Breakout: a run name, not a path
    name = f"{side}_{os.path.splitext(os.path.basename(script))[0]}_{env_name}_r{repeat}_{int(time.time())}"
    cmd = [args.python, our_script(script), "--env-id", args.env_id, "--total-timesteps",
           str(args.total_timesteps), "--eval-episodes", "0", "--output-dir", out, "--run-name", name, *extra]
    wall, status, before, after = timed_run(cmd, ROOT, env, os.path.join(out, name + ".log"))
    summary_path = os.path.join(out, name, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    script = os.path.relpath(cmd[1], ROOT) if script in algo_scripts() else cmd[1]
    return {"side": side, "script": script, "repeat": repeat, "exit_status": status,
            "wall_s": round(wall, 2), "sps": summary.get("sps"), "global_step": summary.get("global_step"),
            "run_wall_s": round(summary["wall_time_s"], 2) if "wall_time_s" in summary else None,
            "loadavg_before": before, "loadavg_after": after, "command": cmd}


def measure_cleanrl(args, out: str, repeat: int, env: dict) -> dict:
    cwd = os.path.join(out, "cleanrl")  # CleanRL writes runs/ under its working directory
    os.makedirs(cwd, exist_ok=True)
    cmd = [args.cleanrl_python, os.path.abspath(args.cleanrl_script), "--env-id", args.env_id,
           "--total-timesteps", str(args.total_timesteps), *shlex.split(args.cleanrl_args)]
    log_path = os.path.join(cwd, f"r{repeat}_{int(time.time())}.log")
    wall, status, before, after = timed_run(cmd, cwd, env, log_path)
    with open(log_path, errors="replace") as f:
        printed = CLEANRL_SPS.findall(f.read())
    return {"side": "cleanrl", "script": args.cleanrl_script, "repeat": repeat, "exit_status": status,
            "wall_s": round(wall, 2), "sps": int(printed[-1]) if printed else None,
            "loadavg_before": before, "loadavg_after": after, "command": cmd}


def median_of(rows: list[dict], side: str, key: str):
    values = [r[key] for r in rows if r["side"] == side and r["exit_status"] == 0 and r[key] is not None]
    return round(statistics.median(values), 2) if values else None


def sps(args):
    if args.script not in algo_scripts() and not os.path.isfile(args.script):
        sys.exit(f"error: --script must be one of {', '.join(algo_scripts())} or a file; got {args.script!r}")
    if args.cleanrl_script and not os.path.isfile(args.cleanrl_script):
        sys.exit(f"error: --cleanrl-script {args.cleanrl_script} does not exist")
    if args.against and args.against not in algo_scripts() and not os.path.isfile(args.against):
        sys.exit(f"error: --against must be one of {', '.join(algo_scripts())} or a file; got {args.against!r}")
    if args.against and args.cleanrl_script:
        sys.exit("error: give one baseline: --cleanrl-script or --against, not both")
    out = os.path.abspath(args.output_dir or tempfile.mkdtemp(prefix="measure_"))
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update({var: str(args.threads) for var in THREAD_VARS})
    rows = []
    baseline = "cleanrl" if args.cleanrl_script else ("against" if args.against else None)
    for repeat in range(args.repeats):  # interleaved: ours, baseline, ours, baseline, ...
        for side in ["ours"] + ([baseline] if baseline else []):
            row = measure_cleanrl(args, out, repeat, env) if side == "cleanrl" else measure_ours(
                args, out, repeat, env, side)
            row.update(env_id=args.env_id, total_timesteps=args.total_timesteps, threads=args.threads or None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": True, "env_id": args.env_id, "total_timesteps": args.total_timesteps,
               "threads": args.threads or None, "output_dir": out}
    for side in ("ours", baseline or "cleanrl"):
        summary[f"{side}_runs_ok"] = sum(r["side"] == side and r["exit_status"] == 0 for r in rows)
        summary[f"{side}_median_sps"] = median_of(rows, side, "sps")
        summary[f"{side}_median_wall_s"] = median_of(rows, side, "wall_s")
    if baseline and summary["ours_median_sps"] and summary[f"{baseline}_median_sps"]:
        summary["sps_ratio"] = round(summary["ours_median_sps"] / summary[f"{baseline}_median_sps"], 2)
        summary["wall_ratio"] = round(summary[f"{baseline}_median_wall_s"] / summary["ours_median_wall_s"], 2)
    print(json.dumps(summary), flush=True)
    if any(r["exit_status"] != 0 for r in rows):
        sys.exit(1)


# The settings of CleanRL's scripts that the speed targets compare against (issue 3): what one env step costs in
# network arithmetic depends only on these and on the networks, which ours share with CleanRL's.
ROOFLINE_CASES = {
    # PPO on Atari (ppo_atari_envpool.py): 8 envs x 128 steps per rollout, 4 epochs x 4 minibatches of 256.
    "ppo-atari": dict(script="ppo", obs_shape=(4, 84, 84), actions=4, envs=8, steps=128, epochs=4, minibatches=4),
    # PPO on CartPole (ppo.py): 4 envs x 128 steps, 4 epochs x 4 minibatches of 128.
    "ppo-cartpole": dict(script="ppo", obs_shape=(4,), actions=2, envs=4, steps=128, epochs=4, minibatches=4),
    # SAC on HalfCheetah (sac_continuous_action.py): batch 256, one critic update per env step, policy_frequency 2
    # (two actor and alpha updates every second step: one per step on average). The baseline SPS quoted in issue 3
    # is over 12k steps of which the first 5k are random and update nothing: `updating` is that share of steps.
    "sac-halfcheetah": dict(script="sac", obs_dim=17, action_dim=6, batch=256, updating=7000 / 12000),
    # DQN (dqn.py's family defaults, once learning has started): one greedy forward per env step, and per update the
    # target network's forward on the next observations plus the online network's forward and backward. Atari:
    # Dopamine's Nature CNN, batch 32, an update every 4th step; CartPole: CleanRL's 120-84 MLP, batch 128, every
    # 10th step; MinAtar (Breakout, all 6 actions): the MinAtar paper's network, batch 32, every step.
    "dqn-atari": dict(script="dqn", obs_shape=(4, 84, 84), actions=4, batch=32, replay_ratio=0.25),
    "dqn-cartpole": dict(script="dqn", obs_shape=(4,), actions=2, batch=128, replay_ratio=0.1),
    "dqn-minatar": dict(script="dqn", obs_shape=(4, 10, 10), actions=6, batch=32, replay_ratio=1.0, minatar=True),
}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_env_step(case: dict) -> int:
    """Matmul and convolution FLOPs (torch's FlopCounterMode: forward and backward) of the training computation per
    environment step, on our scripts' own networks (the same layers as CleanRL's)."""
    import numpy as np
    import torch

    from utils.scripts import load_script

    module = load_script(case["script"])
    if case["script"] == "dqn":
        q_net, target = (module.QNetwork(case["obs_shape"], case["actions"], case.get("minatar", False))
                         for _ in range(2))
        n = case["batch"]

        def greedy():
            with torch.no_grad():
                q_net(torch.rand(1, *case["obs_shape"])).argmax(1)

        def dqn_update():
            with torch.no_grad():
                target(torch.rand(n, *case["obs_shape"])).max(1)
            q_net(torch.rand(n, *case["obs_shape"])).sum().backward()

        return count_flops(greedy) + round(count_flops(dqn_update) * case["replay_ratio"])
    if case["script"] == "ppo":
        agent = module.Agent(case["obs_shape"], case["actions"], continuous=False)
        batch = case["envs"] * case["steps"]
        mb = batch // case["minibatches"]
        obs = lambda n: torch.rand(n, *case["obs_shape"])  # noqa: E731

        def act():
            with torch.no_grad():
                agent.get_action_and_value(obs(case["envs"]))

        def update():
            _, logprob, entropy, value = agent.get_action_and_value(obs(mb), torch.zeros(mb, dtype=torch.long))
            (logprob.sum() + entropy.sum() + value.sum()).backward()

        rollout = count_flops(act) * case["steps"]
        updates = count_flops(update) * case["epochs"] * case["minibatches"]
        return (rollout + updates) // batch
    low, high = -np.ones(case["action_dim"]), np.ones(case["action_dim"])
    actor = module.Actor(case["obs_dim"], low, high)
    qf1, qf2 = (module.SoftQNetwork(case["obs_dim"], case["action_dim"]) for _ in range(2))
    qt1, qt2 = (module.SoftQNetwork(case["obs_dim"], case["action_dim"]) for _ in range(2))
    n = case["batch"]
    obs, act_ = torch.rand(n, case["obs_dim"]), torch.rand(n, case["action_dim"])

    def critic():  # target from the actor and both target critics, then both critics forward and backward
        with torch.no_grad():
            next_a, next_logp, _ = actor.get_action(obs)
            torch.min(qt1(obs, next_a), qt2(obs, next_a))
        (qf1(obs, act_).sum() + qf2(obs, act_).sum()).backward()

    def actor_and_alpha():  # actor through both critics (CleanRL computes the critics' weight gradients too), then
        a, logp, _ = actor.get_action(obs)  # the alpha loss's fresh actor forward
        (torch.min(qf1(obs, a), qf2(obs, a)).sum() - logp.sum()).backward()
        with torch.no_grad():
            actor.get_action(obs)

    return count_flops(critic) + count_flops(actor_and_alpha)


def gemm_gflops(threads: int, size: int = 1024, seconds: float = 3.0) -> float:
    """Sustained fp32 GEMM throughput of this machine in PyTorch (the practical ceiling for dense layers)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(size, size), torch.rand(size, size)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def roofline(args):
    """FLOPs per env step of each case, this machine's fp32 GEMM ceiling, and what a speed target asks of it."""
    peak = gemm_gflops(args.threads)
    print(json.dumps({"gemm_fp32_gflops": round(peak, 1), "threads": args.threads, "loadavg": loadavg()}))
    for name in args.cases:
        flops = flops_per_env_step(ROOFLINE_CASES[name])
        row = {"case": name, "flops_per_env_step": flops,
               "sps_ceiling_at_gemm_peak": round(peak * 1e9 / flops, 1)}
        baseline = dict(kv.split("=") for kv in args.baseline_sps).get(name)
        if baseline:  # averaged over the baseline's steps; ignoring the time of steps without updates makes the
            average = flops * ROOFLINE_CASES[name].get("updating", 1.0)  # GFLOP/s below lower bounds
            target = float(baseline) * args.speedup
            row.update(baseline_sps=float(baseline), target_sps=target,
                       baseline_gflops=round(float(baseline) * average / 1e9, 1),
                       target_gflops=round(target * average / 1e9, 1),
                       target_fraction_of_gemm_peak=round(target * average / 1e9 / peak, 2))
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sps", help="steps per second of a script of algos/, optionally beside CleanRL's")
    p.add_argument("--script", required=True,
                   help="a file of algos/, e.g. ppo.py, or the path of a copy of one (e.g. an older version)")
    p.add_argument("--env-id", required=True)
    p.add_argument("--total-timesteps", type=int, required=True)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP/MKL/OpenBLAS threads for both sides (0: inherit the environment)")
    p.add_argument("--python", default=sys.executable, help="the python that runs our script")
    p.add_argument("--cleanrl-script", help="path of CleanRL's matching script (run from a scratch directory)")
    p.add_argument("--cleanrl-python", default=sys.executable, help="the python of CleanRL's environment")
    p.add_argument("--cleanrl-args", default="", help="extra flags for CleanRL's script, one quoted string")
    p.add_argument("--against", help="baseline: another file of algos/ (or a copy of one), run interleaved with "
                   "ours, e.g. the base script of an intervention (its cost) or an older version (a change's gain)")
    p.add_argument("--against-args", default="", help="extra flags for the --against script, one quoted string")
    p.add_argument("--output-dir")
    p.add_argument("extra", nargs="*", help="extra flags of our script, after --")
    p.set_defaults(func=sps)
    r = sub.add_parser("roofline", help="FLOPs per env step against this machine's fp32 GEMM throughput")
    r.add_argument("--cases", nargs="*", default=list(ROOFLINE_CASES), choices=list(ROOFLINE_CASES))
    r.add_argument("--threads", type=int, default=2, help="torch threads for the GEMM measurement")
    r.add_argument("--baseline-sps", nargs="*", default=[], metavar="CASE=SPS",
                   help="a baseline's SPS per case (e.g. CleanRL's), to see what --speedup of it would require")
    r.add_argument("--speedup", type=float, default=2.0)
    r.set_defaults(func=roofline)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
