"""A synthetic benchmark for timing and checking the report: N arms x the 26 Atari 100k games x S seeds of fake
run directories (summary.json + episodes.csv, scores drawn around published per-game means), then report it.

    python -m benchmark.synthetic --out /tmp/synthetic --arms 5 --seeds 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import report  # noqa: E402
from utils import scores  # noqa: E402


def write_suite(out: str, arms: int, seeds: int, total: int = 100_000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    games = scores.load_published("DER")
    runs_dir = os.path.join(out, "synthetic", "runs")
    os.makedirs(runs_dir, exist_ok=True)
    for a in range(arms):
        for game, published in games.items():
            mean, std = np.mean(published) * (1 + 0.2 * a), np.std(published) + 1e-3
            for s in range(1, seeds + 1):
                value = float(mean + std * rng.standard_normal())
                run_dir = os.path.join(runs_dir, f"arm{a}__{game}-v5__s{s}")
                os.makedirs(run_dir, exist_ok=True)
                with open(os.path.join(run_dir, "summary.json"), "w") as f:
                    json.dump({"status": "completed", "eval_return_mean": value, "total_timesteps": total,
                               "sps": 100}, f)
                with open(os.path.join(run_dir, "episodes.csv"), "w") as f:
                    f.write("global_step,episodic_return,episodic_length,task\n")
                    for step in range(total // 20, total + 1, total // 20):
                        f.write(f"{step},{value * step / total:.3f},1000,{game}-v5\n")
    return os.path.join(out, "synthetic")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    suite_dir = write_suite(args.out, args.arms, args.seeds)
    start = time.time()
    path = report.report(suite_dir, compare=[f"arm{a},arm0" for a in range(1, args.arms)], reps=args.reps)
    print(f"{path}: built in {time.time() - start:.1f} s ({args.arms} arms x 26 tasks x {args.seeds} seeds, "
          f"{args.reps} bootstrap repetitions)")


if __name__ == "__main__":
    main()
