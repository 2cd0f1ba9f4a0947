"""Report task sequences (continual runs) per task visit: what `benchmark/report.py` cannot show from final scores.

    python -m benchmark.continual benchmarks/gtr --compare gtr,ppo gtr,kl --out docs/results/gtr

For every completed run whose config.json has a task sequence (`env_ids` with more than one entry and
`steps_per_task`), visit v covers environment steps [v * S, (v + 1) * S), S = steps_per_task. From `episodes.csv`
(one row per finished game, with the step it ended at):

- **visit score**: mean return of the episodes that end in the last 25% of the visit. Arms are aggregated over
  (runs, visits) with rliable (IQM, median, mean, optimality gap; stratified bootstrap over runs, the visits as
  the tasks) and compared with probability of improvement for the `--compare` pairs.
- **start score**: mean return of the episodes ending in the first 25% of the visit (how much survived the switch).
- **recovery**: environment steps from the start of the visit until the moving average of the last 20 episodes
  of the visit first reaches 90% of a reference score: the run's score at the end of the previous visit of the
  same task, or, on a task's first visit, its own end-of-visit score. A run that never gets there counts as the
  whole visit and is reported as not recovered.
- **policy path** (runs that write `gtr_tasks` in summary.json: algos/ppo_gtr.py, any --objective): divergence
  travelled, net displacement and their ratio (directional efficiency) per visit.
- **trust-region activity** (runs that log `gtr/beyond_sigma` and `gtr/penalty`: algos/ppo_gtr.py): the mean of
  each logged value within the visit, the weighted fraction of anchor divergences beyond sigma and the kernel
  penalty, so one can see whether the Gaussian shape (beyond sigma) acts at all in a visit.
- **from scratch**: a single-task run of the suite whose task is in a sequence and whose length is one visit
  (`total_timesteps` = `steps_per_task`) is that task's from-scratch reference: its score (the last 25% of the run),
  beside the visits. A visit that scores far below it is a failed transition, not a task the budget cannot learn.

Writes `continual.md` and `continual_curves.png/.pdf` (mean training return of each arm over the whole sequence,
task switches marked) to --out (default: the suite directory). Runs without a readable sequence are listed as
excluded with the reason; nothing is averaged in silently.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.report import check_suite_dir, fmt, suite_parser, write_markdown  # noqa: E402
from utils import aggregate  # noqa: E402
from utils.runs import collect, read_csv, read_flags, read_json, read_scalars  # noqa: E402

END_SHARE = 0.25  # the last quarter of a visit gives its score, the first quarter its start score
WINDOW = 20  # episodes in the moving average of the recovery measure
RECOVERED = 0.9  # share of the reference score that counts as recovered


def visit_measures(run_dir: str) -> dict:
    """Per-visit measures of one run (see the module docstring). Raises ValueError with the reason when the run
    has no task sequence or a visit has no episode at its end."""
    flags = read_flags(run_dir)
    tasks, steps = list(flags.get("env_ids") or []), flags.get("steps_per_task")
    if len(tasks) < 2 or not steps:
        raise ValueError("config.json has no task sequence (env_ids with 2+ tasks and steps_per_task)")
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    ends = np.array([int(r["global_step"]) for r in rows])
    returns = np.array([float(r["episodic_return"]) for r in rows])
    out = defaultdict(list)
    out["tasks"] = tasks
    for v, task in enumerate(tasks):
        lo, hi = v * steps, (v + 1) * steps
        inside = (ends > lo) & (ends <= hi)
        last = inside & (ends > hi - END_SHARE * steps)
        first = inside & (ends <= lo + END_SHARE * steps)
        if not last.any():
            raise ValueError(f"no episode ended in the last {END_SHARE:.0%} of visit {v + 1} ({task})")
        out["score"].append(float(returns[last].mean()))
        out["start"].append(float(returns[first].mean()) if first.any() else float("nan"))
    for v, task in enumerate(tasks):
        previous = [u for u in range(v) if tasks[u] == task]
        reference = out["score"][previous[-1]] if previous else out["score"][v]
        lo, hi = v * steps, (v + 1) * steps
        inside = (ends > lo) & (ends <= hi)
        visit_ends, visit_returns = ends[inside], returns[inside]
        steps_to = steps  # not recovered: the whole visit
        for i in range(len(visit_returns)):
            if visit_returns[max(0, i - WINDOW + 1):i + 1].mean() >= RECOVERED * reference:
                steps_to = int(visit_ends[i] - lo)
                break
        out["recovery"].append(steps_to)
        out["recovered"].append(steps_to < steps)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    path = summary.get("gtr_tasks")
    if path and len(path) == len(tasks):
        out["travelled"] = [float(p["travelled"]) for p in path]
        out["displacement"] = [float(p["displacement"]) for p in path]
    scalars = read_scalars(run_dir) if any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir)) else {}
    for key in ("beyond_sigma", "penalty"):
        events = scalars.get(f"gtr/{key}")
        if events:
            at = np.array([e.step for e in events])
            values = np.array([e.value for e in events])
            visit = np.ceil(at / steps).astype(int) - 1  # step in (v S, (v + 1) S] -> visit v
            out[key] = [float(values[visit == v].mean()) if (visit == v).any() else float("nan")
                        for v in range(len(tasks))]
    out["steps_per_task"] = steps
    out["curve"] = (ends, returns)
    return dict(out)


def single_task_score(run_dir: str) -> tuple[str, int, float]:
    """(task, total_timesteps, score) of a single-task run: the mean return of the episodes ending in its last 25%.
    Raises ValueError when the run is a sequence or has no such episode."""
    flags = read_flags(run_dir)
    tasks = list(flags.get("env_ids") or []) or [flags.get("env_id")]
    total = flags.get("total_timesteps")
    if len(tasks) != 1 or not total:
        raise ValueError("not a single-task run with total_timesteps")
    _, rows = read_csv(os.path.join(run_dir, "episodes.csv"))
    last = [float(r["episodic_return"]) for r in rows if int(r["global_step"]) > (1 - END_SHARE) * total]
    if not last:
        raise ValueError(f"no episode ended in the last {END_SHARE:.0%} of the run")
    return tasks[0], int(total), float(np.mean(last))


def mean_curve(curves: list, total: int, points: int) -> np.ndarray:
    """Mean over runs of each run's mean return per window (a window without an episode repeats the last value)."""
    edges = np.linspace(0, total, points + 1)
    per_run = []
    for ends, returns in curves:
        idx = np.clip(np.searchsorted(edges, ends, side="left") - 1, 0, points - 1)
        sums, counts = np.bincount(idx, returns, points), np.bincount(idx, None, points)
        values, last = [], np.nan
        for s, c in zip(sums, counts):
            last = s / c if c else last
            values.append(last)
        per_run.append(values)
    return np.nanmean(np.array(per_run, dtype=float), axis=0)


def report(suite_dir: str, out: str | None = None, compare: list[str] = (), reps: int = 2000, seed: int = 0,
           points: int = 40, make_figures: bool = True) -> str:
    t0 = time.time()
    out = out or suite_dir
    os.makedirs(out, exist_ok=True)
    rows = collect(os.path.join(suite_dir, "runs"))
    by_arm, excluded, singles = defaultdict(list), [], []
    for r in sorted(rows, key=lambda r: (r["arm"], r["seed"])):
        if r["excluded"]:
            excluded.append((r, r["excluded"]))
            continue
        try:
            measures = visit_measures(r["dir"])
        except (OSError, ValueError, KeyError) as e:
            try:
                singles.append((r, *single_task_score(r["dir"])))
            except (OSError, ValueError, KeyError):
                excluded.append((r, f"no per-visit measures: {e}"))
            continue
        by_arm[r["arm"]].append(measures)
    visits = {(task, m["steps_per_task"]) for ms in by_arm.values() for m in ms for task in m["tasks"]}
    excluded += [(r, "no per-visit measures: a single-task run that is no visit's from-scratch reference")
                 for r, task, total, _ in singles if (task, total) not in visits]
    singles = [single for single in singles if single[1:3] in visits]
    lines = [f"# Continual report: `{os.path.basename(os.path.normpath(suite_dir))}`", "",
             f"Runs found: {len(rows)}; used: {sum(len(v) for v in by_arm.values()) + len(singles)} "
             f"({len(singles)} as from-scratch references); excluded: {len(excluded)}. "
             f"Visit score: mean training return of the episodes ending in the last {END_SHARE:.0%} of a visit; "
             f"start: the first {END_SHARE:.0%}. Recovery: steps until the {WINDOW}-episode moving average reaches "
             f"{RECOVERED:.0%} of the score at the end of the task's previous visit (a task's first visit: of its own "
             f"end score). Intervals: 95% stratified bootstrap over runs (visits as tasks), {reps} repetitions, seed "
             f"{seed} (rliable). Definitions: `benchmark/continual.py`.", ""]
    sequences = {arm: tuple(m["tasks"] for m in ms[:1])[0] for arm, ms in by_arm.items()}
    groups = defaultdict(list)
    for arm in sorted(by_arm):
        groups[(tuple(sequences[arm]), by_arm[arm][0]["steps_per_task"])].append(arm)
    written = []
    for k, ((tasks, steps), arms) in enumerate(sorted(groups.items())):
        for arm in arms:  # every run of an arm must follow the arm's sequence
            bad = [m for m in by_arm[arm] if tuple(m["tasks"]) != tasks or m["steps_per_task"] != steps]
            if bad:
                raise SystemExit(f"error: runs of arm {arm} follow different task sequences")
        labels = [f"{v + 1}: {t}" for v, t in enumerate(tasks)]
        lines += [f"## Sequence {k + 1}: {' -> '.join(tasks)}, {steps:,} steps per visit", "",
                  f"Arms: {', '.join(arms)}.", ""]
        matrices = {arm: np.array([m["score"] for m in by_arm[arm]]) for arm in arms}
        agg = aggregate.aggregate(matrices, reps=reps, seed=seed)
        lines += ["### Visit scores aggregated over (runs, visits)", "",
                  "| arm | runs | " + " | ".join(aggregate.METRICS) + " |", "|---" * (len(aggregate.METRICS) + 2) + "|"]
        lines += [f"| {arm} | {len(by_arm[arm])} | " + " | ".join(fmt(agg[arm][m]) for m in aggregate.METRICS) + " |"
                  for arm in arms]
        pairs = {p: (matrices[p.split(",")[0]], matrices[p.split(",")[1]]) for p in compare
                 if all(a in matrices for a in p.split(","))}
        if pairs:
            poi = aggregate.probability_of_improvement(pairs, reps=reps, seed=seed)
            lines += ["", "| X, Y | P(X > Y) [95% CI] |", "|---|---|"] + [f"| {p} | {fmt(v)} |" for p, v in poi.items()]

        def table(title, key, cell):
            rows_ = [f"| {arm} | " + " | ".join(cell(by_arm[arm], v) for v in range(len(tasks))) + " |"
                     for arm in arms if all(key in m for m in by_arm[arm])]
            return ["", f"### {title}", "", "| arm | " + " | ".join(labels) + " |",
                    "|---" * (len(tasks) + 1) + "|"] + rows_ if rows_ else []

        mean = lambda ms, key, v: float(np.nanmean([m[key][v] for m in ms]))  # noqa: E731
        lines += table("Visit score (mean over runs)", "score", lambda ms, v: f"{mean(ms, 'score', v):.3f}")
        lines += table("Start score: first quarter of the visit (mean over runs)", "start",
                       lambda ms, v: f"{mean(ms, 'start', v):.3f}")
        lines += table("Recovery: median steps to 90% of the reference (runs recovered / runs)", "recovery",
                       lambda ms, v: f"{np.median([m['recovery'][v] for m in ms]):,.0f} "
                                     f"({sum(m['recovered'][v] for m in ms)}/{len(ms)})")
        lines += table("Divergence travelled per visit (mean over runs)", "travelled",
                       lambda ms, v: f"{mean(ms, 'travelled', v):.3f}")
        lines += table("Net displacement per visit (mean over runs)", "displacement",
                       lambda ms, v: f"{mean(ms, 'displacement', v):.3f}")
        lines += table("Directional efficiency = displacement / travelled (mean over runs)", "travelled",
                       lambda ms, v: f"{np.mean([m['displacement'][v] / m['travelled'][v] if m['travelled'][v] > 0 else 0.0 for m in ms]):.3f}")
        lines += table("Fraction of anchor divergences beyond sigma per visit (mean of gtr/beyond_sigma)",
                       "beyond_sigma", lambda ms, v: f"{mean(ms, 'beyond_sigma', v):.3f}")
        lines += table("Kernel penalty per visit (mean of gtr/penalty)", "penalty",
                       lambda ms, v: f"{mean(ms, 'penalty', v):.4f}")
        scratch = [(r, task, score) for r, task, total, score in singles if task in tasks and total == steps]
        if scratch:
            lines += ["", "### From scratch: single-task runs of one visit's length (score: last quarter, mean)", "",
                      "| arm | task | runs | score | visits of the task in the sequence (mean score over arms) |",
                      "|---|---|---|---|---|"]
            for (arm, task) in sorted({(r["arm"], task) for r, task, _ in scratch}):
                values = [score for r, t, score in scratch if r["arm"] == arm and t == task]
                visits = ", ".join(f"{v + 1}: {np.mean([mean(by_arm[a], 'score', v) for a in arms]):.3f}"
                                   for v, t in enumerate(tasks) if t == task)
                lines.append(f"| {arm} | {task} | {len(values)} | {np.mean(values):.3f} | {visits} |")
        if make_figures:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            total = steps * len(tasks)
            x = (np.arange(points) + 0.5) * total / points
            fig, ax = plt.subplots(figsize=(8, 4))
            for arm in arms:
                ax.plot(x, mean_curve([m["curve"] for m in by_arm[arm]], total, points), label=arm)
            for v in range(1, len(tasks)):
                ax.axvline(v * steps, color="gray", ls="--", lw=0.8)
            ax.set_xlabel("environment steps (dashed: task switches)")
            ax.set_ylabel("mean training return")
            ax.set_title(" -> ".join(tasks), fontsize=8)
            ax.legend()
            name = "continual_curves" if len(groups) == 1 else f"continual_curves_{k + 1}"
            for ext in ("png", "pdf"):
                fig.savefig(os.path.join(out, f"{name}.{ext}"), bbox_inches="tight")
                written.append(f"{name}.{ext}")
            plt.close(fig)
            lines += ["", f"Figure: `{name}.png`"]
        lines.append("")
    return write_markdown(os.path.join(out, "continual.md"), lines, excluded, t0)


def main():
    parser = suite_parser(__doc__, "continual.md and the figure")
    parser.add_argument("--points", type=int, default=40, help="windows of the return curves")
    args = parser.parse_args()
    check_suite_dir(args.suite_dir)
    print(report(args.suite_dir, args.out, args.compare, args.reps, args.seed, args.points))


if __name__ == "__main__":
    main()
