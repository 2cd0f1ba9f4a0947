"""Speed of a script of algos/, optionally side by side with CleanRL's matching script.

    python -m benchmark.measure sps --script ppo.py --env-id Breakout-v5 --total-timesteps 20480 --repeats 2 \\
        --threads 1 --cleanrl-script DIR/ppo_atari_envpool.py --cleanrl-python PY [-- extra flags of ours]

Runs `algos/<script> --env-id E --total-timesteps N --eval-episodes 0 [extra flags]` `--repeats` times and, with
`--cleanrl-script`, CleanRL's script with the same `--env-id` and `--total-timesteps` (plus `--cleanrl-args "..."`)
after each of ours: ours, CleanRL, ours, CleanRL, ..., so that a change in the machine's load over the
measurement hits both sides alike. Each run is a fresh process; nothing else is changed. Prints one JSON line
per run, then one summary line (medians and their ratio):

  side                  "ours" or "cleanrl"
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


def measure_ours(args, out: str, repeat: int, env: dict) -> dict:
    name = f"{os.path.splitext(os.path.basename(args.script))[0]}_{args.env_id}_r{repeat}_{int(time.time())}"
    cmd = [args.python, our_script(args.script), "--env-id", args.env_id, "--total-timesteps",
           str(args.total_timesteps), "--eval-episodes", "0", "--output-dir", out, "--run-name", name, *args.extra]
    wall, status, before, after = timed_run(cmd, ROOT, env, os.path.join(out, name + ".log"))
    summary_path = os.path.join(out, name, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    script = os.path.relpath(cmd[1], ROOT) if args.script in algo_scripts() else cmd[1]
    return {"side": "ours", "script": script, "repeat": repeat, "exit_status": status,
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
    out = os.path.abspath(args.output_dir or tempfile.mkdtemp(prefix="measure_"))
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update({var: str(args.threads) for var in THREAD_VARS})
    rows = []
    for repeat in range(args.repeats):  # interleaved: ours, CleanRL, ours, CleanRL, ...
        sides = [measure_ours] + ([measure_cleanrl] if args.cleanrl_script else [])
        for measure in sides:
            row = measure(args, out, repeat, env)
            row.update(env_id=args.env_id, total_timesteps=args.total_timesteps, threads=args.threads or None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": True, "env_id": args.env_id, "total_timesteps": args.total_timesteps,
               "threads": args.threads or None, "output_dir": out}
    for side in ("ours", "cleanrl"):
        summary[f"{side}_runs_ok"] = sum(r["side"] == side and r["exit_status"] == 0 for r in rows)
        summary[f"{side}_median_sps"] = median_of(rows, side, "sps")
        summary[f"{side}_median_wall_s"] = median_of(rows, side, "wall_s")
    if summary["ours_median_sps"] and summary["cleanrl_median_sps"]:
        summary["sps_ratio"] = round(summary["ours_median_sps"] / summary["cleanrl_median_sps"], 2)
        summary["wall_ratio"] = round(summary["cleanrl_median_wall_s"] / summary["ours_median_wall_s"], 2)
    print(json.dumps(summary), flush=True)
    if any(r["exit_status"] != 0 for r in rows):
        sys.exit(1)


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
    p.add_argument("--output-dir")
    p.add_argument("extra", nargs="*", help="extra flags of our script, after --")
    p.set_defaults(func=sps)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
