"""THC scores of the released data of "On the consistency of hyper-parameter selection in value-based deep RL"
(Obando-Ceron et al., RLC 2024), against the values the paper's website publishes.

    python -m benchmark.thc --published            # every (regime, agent, hyper-parameter) the website lists
    python -m benchmark.thc --hparam batch_sizes --agent DER --regime 40M   # one, with its per-game ranks

The data (final human-normalised scores, 5 seeds x 26 Atari 100k games per value) and the published values are
stored as JSON in benchmark/reference/consistency/ (README.md there: provenance, licence, conversion); the score is
utils/thc.py's. Exit status 1 when some listed value is not reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.thc import thc_score  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "consistency")
REGIMES = ("100k", "40M")
AGENTS = ("DrQ_eps", "DER")


def load_released(regime: str) -> dict:
    """{"games": [26 names, the column order], "hparams": {hparam: {agent: {value: (5, 26) float32 array}}}} of
    final_perf_<regime>.json (the official pickles' float32 values, exactly)."""
    with open(os.path.join(DATA_DIR, f"final_perf_{regime}.json")) as f:
        data = json.load(f)
    for per_agent in data["hparams"].values():
        for agent, per_value in per_agent.items():
            per_agent[agent] = {v: np.array(x, dtype=np.float32) for v, x in per_value.items()}
    return data


def load_published() -> dict:
    """{"hparam_files": {website name: data file stem}, "thc": {regime: {agent: {website name: [mean, std]}}}}."""
    with open(os.path.join(DATA_DIR, "published_thc.json"), encoding="utf-8") as f:
        return json.load(f)


def published_rows() -> list[dict]:
    """One row per THC value the website lists: regime, agent, name, hparam, k (values), ours and published
    (mean, std), and whether they agree to the website's printed precision (2 decimals) and to 1e-12."""
    published = load_published()
    rows = []
    for regime in REGIMES:
        data = load_released(regime)["hparams"]
        for agent in AGENTS:
            for name, (mean, std) in published["thc"][regime][agent].items():
                hparam = published["hparam_files"][name]
                result = thc_score(data[hparam][agent])
                rows.append(dict(regime=regime, agent=agent, name=name, hparam=hparam, k=len(data[hparam][agent]),
                                 ours=(result.mean, result.std), published=(mean, std),
                                 printed=(f"{result.mean:.2f} ± {result.std:.2f}" == f"{mean:.2f} ± {std:.2f}"),
                                 exact=bool(np.allclose((result.mean, result.std), (mean, std), rtol=0, atol=1e-12))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", action="store_true",
                        help="recompute every THC value the website lists and compare")
    parser.add_argument("--hparam", help="a data file stem (e.g. batch_sizes): print its THC and per-game ranks")
    parser.add_argument("--agent", choices=AGENTS, default="DER")
    parser.add_argument("--regime", choices=REGIMES, default="40M")
    args = parser.parse_args()
    if not args.published and not args.hparam:
        raise SystemExit("error: give --published or --hparam HPARAM")
    if args.hparam:
        data = load_released(args.regime)
        if args.hparam not in data["hparams"] or args.agent not in data["hparams"][args.hparam]:
            raise SystemExit(f"error: --hparam {args.hparam}: no data for {args.agent} at {args.regime} (have: "
                             f"{', '.join(h for h, a in data['hparams'].items() if args.agent in a)})")
        try:
            result = thc_score(data["hparams"][args.hparam][args.agent])
        except ValueError as e:
            raise SystemExit(f"error: --hparam {args.hparam}: {e}") from None
        print(f"THC of {args.hparam}, {args.agent}, {args.regime}: {result.mean:.4f} ± {result.std:.4f}")
        games = data["games"]
        print("| value | spread | " + " | ".join(games) + " |")
        print("|---" * (len(games) + 2) + "|")
        for v, ranks in result.ranks.items():
            print(f"| {v} | {result.spread[v]:.3f} | " + " | ".join(f"{r:g}" for r in ranks) + " |")
    if args.published:
        rows = published_rows()
        print("| regime | agent | hyper-parameter (data file) | values | THC here | THC on the website | match |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            match = "yes (to 1e-12)" if r["exact"] else "to 2 decimals" if r["printed"] else "NO"
            print(f"| {r['regime']} | {r['agent']} | {r['name']} ({r['hparam']}) | {r['k']} | "
                  f"{r['ours'][0]:.4f} ± {r['ours'][1]:.4f} | {r['published'][0]:.4f} ± {r['published'][1]:.4f} | "
                  f"{match} |")
        same = sum(r["printed"] for r in rows)
        print(f"\n{same} of {len(rows)} published values reproduced to the website's printed precision (2 decimals), "
              f"{sum(r['exact'] for r in rows)} to 1e-12.")
        if same < len(rows):
            sys.exit(1)


if __name__ == "__main__":
    main()
