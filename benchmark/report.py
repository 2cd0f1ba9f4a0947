"""Report a suite's runs the way the field expects: rliable aggregates with stratified-bootstrap intervals,
probability of improvement, performance profiles, sample-efficiency curves and plasticity curves.

    python -m benchmark.report benchmarks/smoke --compare dqn_rr1,dqn --out docs/results/smoke
    python -m benchmark.report benchmarks/atari100k --published BBF SPR --compare bbf,published:BBF

Writes `report.md` plus PNG and PDF figures to --out (default: the suite directory). Runs that are not completed,
have no summary, or have a non-finite score are excluded and listed with the reason; so are runs dropped to give
every task of an arm the same number of runs (rliable's stratified bootstrap needs a (runs, tasks) array).

A group of several tasks scored in raw returns (some task has no normalisation reference, e.g. MinAtar) is not
pooled: raw returns of games with different scales make one IQM meaningless. Its aggregates and probabilities of
improvement are computed per task ((runs, 1) arrays), and the pooled figures (aggregates, performance profile,
sample-efficiency curves) give way to per_task_curves (training return per task, mean and min-max over runs).

`--reach RETURN` (or `--reach TASK=RETURN ...`) adds how soon each run reaches a return: the first step at which the
mean of its last `--reach-window` training episodes is at least RETURN (utils/runs.py, steps_to_reach), with the
median over runs and a bootstrap interval per arm and task; runs that never reach it count as never (infinite).
For claims such as "the student reaches the teacher's return in a fraction of the teacher's steps".

`--keys KEY ...` adds any logged TensorBoard scalar per task (e.g. `eval/episodic_return`, `value/bias`): each run's
events binned into `--points` windows of its budget (key_curves), a figure `keys` (one row per key, one column per
task, mean and min-max over runs per arm) and a section `Logged keys` (per key, arms x tasks: the last window's
mean [min, max] over runs, and how many runs logged it). Runs that never logged a key are counted as missing.

`--auc` adds the area under the training curve (AUC), which papers report instead of final scores: per run, the
mean of its training-return curve over its whole budget, the curve the figures draw (episodes.csv binned into
`--points` equal windows of [0, total_timesteps] by the step each episode ends at; an empty window keeps the previous
window's value, the windows before the first episode ended take the first non-empty window's value), in the scores'
units (normalised when they are). Per arm and task (and pooled where the group is pooled) IQM and mean AUC with
stratified-bootstrap intervals; per `--compare` pair and task the probability of improvement on AUC and the relative
change mean AUC of X / mean AUC of Y - 1 (a ratio of means, shown when Y's mean is positive). Published arms have no
training curve, hence no AUC.

`--published AGENT ...` adds the published per-run Atari 100k scores of DER, DrQ, DrQ_eps, SPR or BBF
(benchmark/reference/, with provenance) as arms `published:<AGENT>`, only when the protocol matches: every task is
an Atari 100k game, and every used run's config.json says 100k agent steps and no sticky actions. Otherwise the
report says why they were left out.

`--sweep FIELD` (e.g. batch_size; `FIELD,FIELD` for a grid such as num_envs,num_steps) reads each run's value of
that config.json field and adds "Sweep over FIELD": per value (sorted numerically) the IQM [95% CI] of the final
score per task and pooled (when normalised), each `--keys` key's last logged value (mean [min, max] over runs), and
the figure sweep_FIELD (log2 x axis when every value is a power of 2). Arms that share a value must agree on every
other field that matters (SWEEP_IGNORED lists those that may differ); otherwise a one-line error.

`--thc FIELD` adds the THC score (utils/thc.py; Obando-Ceron et al. 2024) of that field over the group's tasks: how
much the ranking of its values changes from task to task, with each value's spread and per-task ranks. Needs at
least 2 tasks and 2 values (otherwise a one-line error).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
import warnings
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import aggregate, scores  # noqa: E402
from utils.runs import (collect, episode_curve, read_flags, read_json, read_scalars, steps_to_reach,  # noqa: E402
                        window_means)
from utils.thc import thc_score  # noqa: E402

# The DQN and PPO families log one network's diagnostics; the SAC family logs them per network (docs/sac.md):
# a figure shows the keys its runs have.
PLASTICITY_KEYS = ("plasticity/dormant_tau0.1", "plasticity/grad_inactive_tau0.1", "plasticity/srank",
                   "plasticity/feature_norm", "plasticity/qf1/dormant_tau0.1", "plasticity/qf1/grad_inactive_tau0.1",
                   "plasticity/qf1/srank", "plasticity/actor/dormant_tau0.1", "plasticity/actor/grad_inactive_tau0.1")


def score_matrices(rows: list[dict], normalise: bool):
    """{arm: (runs, tasks) array}, tasks (sorted), {arm: [rows used, in matrix order]}, and the rows dropped to
    equalise run counts (added to the exclusions)."""
    usable = [r for r in rows if r["excluded"] is None]
    tasks = sorted({r["env_id"] for r in usable})
    by_arm = defaultdict(lambda: defaultdict(list))
    for r in sorted(usable, key=lambda r: r["seed"]):
        by_arm[r["arm"]][r["env_id"]].append(r)
    matrices, used, dropped = {}, {}, []
    for arm, per_task in sorted(by_arm.items()):
        n = min(len(per_task.get(t, [])) for t in tasks)
        if n == 0:
            missing = [t for t in tasks if not per_task.get(t)]
            for t in tasks:
                for r in per_task.get(t, []):
                    dropped.append((r, f"arm has no usable run on {', '.join(missing)}"))
            continue
        chosen = []
        for t in tasks:
            chosen.append(per_task[t][:n])
            dropped += [(r, f"run counts equalised to {n} per task") for r in per_task[t][n:]]
        x = np.array([[r["score"] for r in column] for column in chosen], dtype=float).T  # (runs, tasks)
        if normalise:
            x = np.stack([scores.normalize(t, x[:, j]) for j, t in enumerate(tasks)], axis=1)
        matrices[arm], used[arm] = x, [r for column in chosen for r in column]
    return matrices, tasks, used, dropped


PUBLISHED_AGENTS = ("DER", "DrQ", "DrQ_eps", "SPR", "BBF")


def published_matrices(agents: list[str], tasks: list[str], used: dict) -> tuple[dict, list[str]]:
    """{`published:<agent>`: human-normalised (runs, tasks) array} for the suite's tasks, and notes on what was
    added or left out (and why). A game's published run count varies (BBF: 52-60), so every game keeps its first
    n runs, n the smallest count over the suite's games."""
    if not agents:
        return {}, []
    notes = []
    games = {scores.atari_key(g): g for g in scores.load_published(agents[0])}
    missing = [t for t in tasks if scores.family(t) != "atari" or scores.atari_key(t) not in games]
    if missing or not tasks:
        return {}, [f"Published arms left out: {', '.join(missing) or 'no tasks'} not among the 26 Atari 100k games."]
    mismatched = []
    for rows in used.values():
        for r in rows:
            try:
                config = read_flags(r["dir"])
            except (OSError, ValueError):
                mismatched.append(f"{r['run']} (no readable config.json with its flags)")
                continue
            sticky = config.get("sticky_action_prob", config.get("repeat_action_probability"))
            if config.get("total_timesteps") != 100_000 or sticky not in (0, 0.0):
                mismatched.append(f"{r['run']} (total_timesteps {config.get('total_timesteps')}, sticky actions "
                                  f"{sticky})")
    if mismatched:
        return {}, ["Published arms left out: the Atari 100k protocol is 100k agent steps without sticky actions; "
                    f"not so for {', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}."]
    out = {}
    for agent in agents:
        data = {scores.atari_key(g): v for g, v in scores.load_published(agent).items()}
        n = min(len(data[scores.atari_key(t)]) for t in tasks)
        x = np.array([data[scores.atari_key(t)][:n] for t in tasks], dtype=float).T
        out[f"published:{agent}"] = np.stack([scores.normalize(t, x[:, j]) for j, t in enumerate(tasks)], axis=1)
        notes.append(f"`published:{agent}`: published final scores, first {n} runs per game "
                     "(benchmark/reference/PROVENANCE.md).")
    return out, notes


def curve_matrices(used: dict, tasks: list[str], normalise: bool, points: int):
    """({arm: (runs, tasks, points) training curves}, {arm: the steps of its points}): each run's episodes.csv binned
    into `points` windows of its own budget (episode_curve). An arm's steps are those of the largest budget of its
    runs, so arms of different budgets in one group (e.g. 150k-step DQN and 5M-step PPO) are each drawn over their
    own budget."""
    curves, steps = {}, {}
    for arm, rows in used.items():
        n = len(rows) // len(tasks)
        x = np.zeros((n, len(tasks), points))
        totals = []
        for j, t in enumerate(tasks):
            for i, r in enumerate(rows[j * n:(j + 1) * n]):
                total = read_json(os.path.join(r["dir"], "summary.json"))["total_timesteps"]
                totals.append(total)
                c = np.array(episode_curve(r["dir"], total, points) or [np.nan] * points)
                x[i, j] = scores.normalize(t, c) if normalise else c
        if np.isfinite(x).all():
            curves[arm] = x
            steps[arm] = np.linspace(max(totals) / points, max(totals), points)
    return curves, steps


def task_curves(used: dict, tasks: list[str], points: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{task: {arm: (steps, (runs, points) raw training returns)}}: each run's episodes.csv binned into `points`
    windows of its budget as curve_matrices bins it (episode_curve). For the per-task figure of raw multi-task
    groups; a run that ended no episode is left out of its curve. The steps are those of the largest budget of the
    arm's runs on the task (a suite gives them all the same)."""
    out: dict = {t: {} for t in tasks}
    for arm, rows in used.items():
        per_task, totals = defaultdict(list), defaultdict(list)
        for r in rows:
            total = read_json(os.path.join(r["dir"], "summary.json"))["total_timesteps"]
            c = episode_curve(r["dir"], total, points)
            if c is not None:
                per_task[r["env_id"]].append(c)
                totals[r["env_id"]].append(total)
        for t, cs in per_task.items():
            total = max(totals[t])
            out[t][arm] = (np.linspace(total / points, total, points), np.array(cs, dtype=float))
    return {t: per_arm for t, per_arm in out.items() if per_arm}


def plasticity_curves(used: dict, points: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{key: {arm: (steps, mean over runs)}}, each run's values averaged within `points` windows of its steps."""
    out: dict = defaultdict(dict)
    for arm, rows in used.items():
        per_key = defaultdict(list)
        for r in rows:
            scalars = read_scalars(r["dir"])
            for key in PLASTICITY_KEYS:
                events = scalars.get(key)
                if events:
                    per_key[key].append(([e.step for e in events], [e.value for e in events]))
        for key, series in per_key.items():
            hi = max(max(s) for s, _ in series)
            edges = np.linspace(0, hi, points + 1)
            binned = []
            for s, v in series:
                idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, points - 1)
                sums, counts = np.bincount(idx, v, points), np.bincount(idx, None, points)
                binned.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
            with warnings.catch_warnings():  # a window no run logged in stays NaN (a gap in the curve)
                warnings.simplefilter("ignore", RuntimeWarning)
                out[key][arm] = ((edges[1:] + edges[:-1]) / 2, np.nanmean(np.array(binned), axis=0))
    return out


def key_curves(used: dict, keys: list[str], points: int) -> dict[str, dict[str, dict[str, tuple]]]:
    """{key: {task: {arm: (steps, (runs that logged it, points) binned values, runs used)}}} for logged scalars
    such as eval/episodic_return: each run's events binned into `points` windows of its budget (window_means: mean
    of the events in a window, an empty window carries the previous value forward, the leading empty ones NaN).
    Every (task, arm) with runs has an entry, with 0 rows where none logged the key (key_logged tells whether any
    did). The steps are those of the largest budget of the arm's runs on the task, as task_curves gives them."""
    binned = {key: defaultdict(lambda: defaultdict(list)) for key in keys}  # key -> task -> arm -> [curve]
    runs, totals = defaultdict(int), defaultdict(list)  # (task, arm) -> runs used, budgets
    for arm, rows in used.items():
        for r in rows:
            total = read_json(os.path.join(r["dir"], "summary.json"))["total_timesteps"]
            runs[(r["env_id"], arm)] += 1
            totals[(r["env_id"], arm)].append(total)
            scalars = read_scalars(r["dir"])
            for key in keys:
                events = scalars.get(key)
                if events:
                    curve = window_means([e.step for e in events], [e.value for e in events], total, points)
                    binned[key][r["env_id"]][arm].append(np.array(curve, dtype=float))  # None -> NaN
    out = {key: defaultdict(dict) for key in keys}
    for (t, arm), n in sorted(runs.items()):
        total = max(totals[(t, arm)])
        for key in keys:
            curves = np.array(binned[key][t][arm], dtype=float).reshape(-1, points)
            out[key][t][arm] = (np.linspace(total / points, total, points), curves, n)
    return {key: dict(per_task) for key, per_task in out.items()}


def key_logged(per_task: dict) -> bool:
    """Whether any run logged a key (one key's entry of key_curves)."""
    return any(len(c) for per_arm in per_task.values() for _, c, _ in per_arm.values())


def save(fig, out: str, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out, f"{name}.{ext}")
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def figures(out, matrices, agg, curves, steps, plast, poi, label, prefix="", metrics=aggregate.METRICS,
            per_task=None, keys=None, tasks=()) -> list[str]:
    """Write the figures; returns their paths. With `per_task` (task_curves, for a group of several tasks scored in
    raw returns) the figures that pool tasks (aggregates, performance profile, sample-efficiency curves) are
    replaced by per_task_curves: one panel per task, mean training return over runs per arm with the min-max band.
    `poi` keys are "X,Y" pairs, or (task, "X,Y") for per-task probabilities of improvement. `keys` (key_curves)
    adds the figure `keys` (key_figure) over the group's `tasks`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, written = list(matrices), []
    if per_task is None:
        written += pooled_figures(plt, out, matrices, agg, curves, steps, label, prefix, metrics)
    elif per_task:
        cols = min(len(per_task), 3)
        rows = -(-len(per_task) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
        colour = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
        for ax, (task, per_arm) in zip(axes.flat, per_task.items()):
            for arm, (s, c) in per_arm.items():
                ax.plot(s, c.mean(axis=0), color=colour[arm], label=f"{arm} ({len(c)} runs)")
                ax.fill_between(s, c.min(axis=0), c.max(axis=0), color=colour[arm], alpha=0.2)
            ax.set_title(task)
            ax.set_xlabel("environment steps")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # long step counts would overlap
            ax.legend(fontsize="small")
        for ax in axes[:, 0]:
            ax.set_ylabel("training episodic return")
        for ax in axes.flat[len(per_task):]:
            ax.set_visible(False)
        fig.suptitle("mean over runs (line), min-max over runs (band)", fontsize="medium")
        fig.tight_layout()
        written += save(fig, out, prefix + "per_task_curves")
        plt.close(fig)

    if plast:
        fig, axes = plt.subplots(1, len(plast), figsize=(4 * len(plast), 3.5))
        for ax, (key, per_arm) in zip(np.atleast_1d(axes), sorted(plast.items())):
            for arm, (s, v) in per_arm.items():  # markers: a window between two empty ones is a point, not a line
                ax.plot(s, v, marker=".", label=arm)
            ax.set_title(key.replace("plasticity/", ""))
            ax.set_xlabel("environment steps")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # long step counts would overlap
        np.atleast_1d(axes)[0].legend()
        fig.tight_layout()
        written += save(fig, out, prefix + "plasticity")
        plt.close(fig)

    if poi:
        def name(key):
            task, pair = key if isinstance(key, tuple) else (None, key)
            x, y = pair.split(",")
            return f"P({x} > {y})" + (f" on {task}" if task else "")

        fig, ax = plt.subplots(figsize=(6, 0.6 * len(poi) + 1.5))
        for i, (pair, (p, low, high)) in enumerate(poi.items()):
            ax.barh(i, high - low, left=low, height=0.6, alpha=0.6)
            ax.plot([p, p], [i - 0.3, i + 0.3], color="k")
        ax.axvline(0.5, ls="--", color="gray")
        ax.set_yticks(range(len(poi)), [name(k) for k in poi])
        if per_task is not None:  # per task, P = 0 or 1 is common with few runs: keep its marker off the frame
            ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("probability of improvement")
        written += save(fig, out, prefix + "probability_of_improvement")
        plt.close(fig)
    if keys and any(key_logged(per_task) for per_task in keys.values()):
        written += key_figure(plt, out, keys, list(matrices), tasks, prefix)
    return written


def key_figure(plt, out, keys: dict, arms: list[str], tasks: list[str], prefix: str) -> list[str]:
    """The figure `keys`: one row per logged key (key_curves; keys no run logged are left out), one column per task,
    per arm the mean over the runs that logged the key (line) and their min-max band. Leading windows before a
    run's first event are NaN and left out of the mean and band (a gap before the first point)."""
    logged = {key: per_task for key, per_task in keys.items() if key_logged(per_task)}
    fig, axes = plt.subplots(len(logged), len(tasks), figsize=(4.5 * len(tasks), 3.5 * len(logged)), squeeze=False)
    colour = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for row, (key, per_task) in zip(axes, logged.items()):
        for ax, t in zip(row, tasks):
            for arm, (s, c, _) in per_task.get(t, {}).items():
                if not len(c):
                    continue
                with warnings.catch_warnings():  # a window before every run's first event stays NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, lo, hi = np.nanmean(c, axis=0), np.nanmin(c, axis=0), np.nanmax(c, axis=0)
                ax.plot(s, mean, marker=".", color=colour[arm], label=f"{arm} ({len(c)} runs)")
                ax.fill_between(s, lo, hi, color=colour[arm], alpha=0.2)
            ax.set_title(f"{key} on {t}", fontsize="medium")
            ax.set_xlabel("environment steps")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # long step counts would overlap
            if ax.has_data():
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("mean over runs (line), min-max over runs (band)", fontsize="medium")
    fig.tight_layout()
    paths = save(fig, out, prefix + "keys")
    plt.close(fig)
    return paths


def pooled_figures(plt, out, matrices, agg, curves, steps, label, prefix, metrics) -> list[str]:
    """The figures that pool a group's tasks: aggregates, performance profile, sample-efficiency curves."""
    from rliable import plot_utils

    arms, written = list(matrices), []
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.6 * len(arms) + 1.5))
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(arms):
            point, low, high = agg[arm][metric]
            ax.barh(i, high - low, left=low, height=0.6, alpha=0.6)
            ax.plot([point, point], [i - 0.3, i + 0.3], color="k")
        ax.set_yticks(range(len(arms)), arms if metric == metrics[0] else [""] * len(arms))
        ax.set_title(metric)
        ax.set_xlabel(label)
    written += save(fig, out, prefix + "aggregates")
    plt.close(fig)

    hi = max(float(np.max(x)) for x in matrices.values())
    lo = min(0.0, min(float(np.min(x)) for x in matrices.values()))
    taus = np.linspace(lo, hi, 101)
    with aggregate.seeded_global_numpy(0):
        from rliable import library

        profiles, profile_cis = library.create_performance_profile(matrices, taus, reps=200)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, ax=ax,
                                         xlabel=f"{label} tau", ylabel="fraction of runs with score > tau")
    ax.legend(arms)
    written += save(fig, out, prefix + "performance_profile")
    plt.close(fig)

    if curves:
        curve_est = aggregate.iqm_curve(curves, reps=500)
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, (iqm, low, high) in curve_est.items():
            ax.plot(steps[arm], iqm, label=arm)
            ax.fill_between(steps[arm], low, high, alpha=0.2)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"IQM {label} (training episodes)")
        ax.legend()
        written += save(fig, out, prefix + "sample_efficiency")
        plt.close(fig)
    return written


def fmt(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def task_groups(rows: list[dict]) -> list[list[str]]:
    """Arms grouped by the set of tasks they were run on (every run found, usable or not, so an arm whose runs
    failed on one task stays with its group and is reported as missing that task rather than moved elsewhere).
    One group for an ordinary suite; several when a suite mixes families (SAC on DMC next to PPO on classic
    control), which cannot share one (runs, tasks) matrix or one normalisation."""
    tasks_of = defaultdict(set)
    for r in rows:
        tasks_of[r["arm"]].add(r["env_id"])
    groups = defaultdict(list)
    for arm, tasks in sorted(tasks_of.items()):
        groups[tuple(sorted(tasks))].append(arm)
    return [arms for _, arms in sorted(groups.items())]


def per_task_aggregates(matrices, tasks, used, metrics, reps, seed, h) -> list[str]:
    """The aggregates table of a group of several tasks scored in raw returns: one row per (task, arm), each task's
    metrics from its own (runs, 1) array, with the lowest and highest final score over runs and the mean SPS."""
    lines = [f"{h} Per-task aggregates", "",
             "Scores are raw returns, whose scale differs from task to task, so they are not pooled across tasks: "
             "each task is aggregated on its own ((runs, 1) array per arm, same stratified bootstrap); min and max "
             "are the lowest and highest final score over the runs.", "",
             "| task | arm | runs | " + " | ".join(metrics) + " | min | max | mean SPS |",
             "|---" * (len(metrics) + 6) + "|"]
    for t, column, agg in per_task_columns(matrices, tasks, reps, seed):
        for arm, x in column.items():
            sps = [r.get("sps") for r in used.get(arm, []) if r["env_id"] == t and r.get("sps")]
            lines.append(f"| {t} | {arm} | {x.shape[0]} | " + " | ".join(fmt(agg[arm][m]) for m in metrics)
                         + f" | {x.min():.3f} | {x.max():.3f} |" + (f" {np.mean(sps):.0f} |" if sps else " — |"))
    return lines


def per_task_columns(matrices: dict, tasks: list[str], reps: int, seed: int):
    """Per task in order: (task, {arm: its (runs, 1) column}, aggregate.aggregate of those columns): the aggregates
    of a group whose tasks are not pooled (per_task_aggregates), and the per-task AUC table (auc_lines)."""
    for j, t in enumerate(tasks):
        column = {arm: x[:, j:j + 1] for arm, x in matrices.items()}
        yield t, column, aggregate.aggregate(column, reps=reps, seed=seed)


def parse_reach(values: list[str]) -> dict[str, float]:
    """--reach arguments: one bare RETURN for every task ({"*": RETURN}) or TASK=RETURN pairs (a MinAtar id's "/" as
    the run names write it, "-"). Bad input is a one-line SystemExit."""
    out = {}
    for value in values:
        task, _, number = value.rpartition("=")
        try:
            out[task.replace("/", "-") or "*"] = float(number)
        except ValueError:
            raise SystemExit(f"error: --reach {value}: expected RETURN or TASK=RETURN with a number") from None
    if "*" in out and len(out) > 1:
        raise SystemExit("error: --reach takes one bare RETURN for every task or TASK=RETURN pairs, not both")
    return out


def reach_lines(used: dict, tasks: list[str], reach: dict[str, float], window: int, reps: int, seed: int,
                h: str) -> list[str]:
    """The "steps to reach" table: per task with a threshold and per arm, the runs that reach it, and the median
    over runs of steps_to_reach with a 95% percentile-bootstrap interval (runs resampled; the bounds are order
    statistics, so never-reached runs (inf) need no interpolation)."""
    rng = np.random.default_rng(seed)
    lines = [f"{h} Steps to reach a return", "",
             f"First step at which the mean of a run's last {window} training episodes reaches the return; a run "
             "that never does counts as never (the median is then 'never' when half the runs or more never reach "
             "it). Median over runs, 95% percentile bootstrap over runs.", "",
             "| task | return | arm | reached | median steps [95% CI] | per run |", "|---|---|---|---|---|---|"]

    def show(v):
        return "never" if not np.isfinite(v) else f"{v:,.0f}"

    for t in tasks:
        threshold = reach.get(t, reach.get("*"))
        if threshold is None:
            continue
        for arm, rows in used.items():
            steps = np.array([steps_to_reach(r["dir"], threshold, window) for r in rows if r["env_id"] == t])
            if not len(steps):
                continue
            boot = np.median(rng.choice(steps, (reps, len(steps))), axis=1)
            lo, hi = np.quantile(boot, 0.025, method="lower"), np.quantile(boot, 0.975, method="higher")
            lines.append(f"| {t} | {threshold:g} | {arm} | {int(np.isfinite(steps).sum())}/{len(steps)} | "
                         f"{show(np.median(steps))} [{show(lo)}, {show(hi)}] | {', '.join(map(show, steps))} |")
    return lines


def key_lines(keys: dict, arms: list[str], tasks: list[str], h: str) -> list[str]:
    """The "Logged keys" section: per key (key_curves), a table of arms x tasks whose cell is the mean over runs of
    the last window's value, [min, max] over runs, and the runs that logged the key out of the runs used; the runs
    that never logged it are counted as missing. A key no run logged is one line."""
    lines = [f"{h} Logged keys", "",
             "Each run's logged values averaged within equal windows of its budget (an empty window keeps the previous "
             "window's value); per cell, the last window's value: mean over runs [min, max over runs], and the runs "
             "that logged the key out of the runs used (the others are missing: left out of mean, min and max).", ""]
    for key, per_task in keys.items():
        if not key_logged(per_task):
            lines += [f"{key}: logged by no run.", ""]
            continue
        lines += [f"`{key}`:", "", "| arm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        missing = 0
        for arm in arms:
            cells = []
            for t in tasks:
                if arm not in per_task.get(t, {}):  # no run of the arm on the task (not expected in a group)
                    cells.append("—")
                    continue
                _, c, n = per_task[t][arm]
                missing += n - len(c)
                last = c[:, -1]
                cells.append((f"{fmt((last.mean(), last.min(), last.max()))} " if len(c) else "— ")
                             + f"({len(c)}/{n} runs)")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += ["", f"Runs that did not log `{key}` (missing): {missing}.", ""]
    return lines[:-1]


AUC_METRICS = ("IQM", "Mean")


def auc_lines(curves: dict, matrices: dict, tasks: list[str], compare: list[str], pooled: bool, label: str,
              points: int, reps: int, seed: int, h: str) -> list[str]:
    """The "Area under the training curve" section. A run's AUC is the mean of its training-return curve over its
    budget (curve_matrices: episode_curve's `points` windows, normalised as the scores are), so {arm: (runs, tasks)}
    arrays in the order of the score matrices. Per task (and pooled over tasks when the group is `pooled`) the IQM
    and mean AUC with stratified-bootstrap intervals; per --compare pair and task (and pooled) the probability of
    improvement on AUC and the relative change of mean AUC, mean(X) / mean(Y) - 1, shown only when mean(Y) > 0."""
    auc = {arm: c.mean(axis=2) for arm, c in (curves or {}).items()}
    lines = [f"{h} Area under the training curve", "",
             f"Per run, the area under its training-return curve divided by its budget: the mean {label} over "
             f"training, the mean of the run's curve over {points} equal windows of [0, total_timesteps] (episodes "
             "binned by the step at which they end, as the figures bin them; a window's value is the mean return of "
             "the episodes ending in it, an empty window keeps the previous window's value, the windows before the "
             "first episode ended take the first value, that of the episodes played during them). "
             + ("Tasks in raw returns of different scales are not pooled: per task only. "
                if not pooled and len(tasks) > 1 else "")
             + "IQM and mean over runs with 95% stratified-bootstrap intervals; the final score is the one of the "
             "tables above.", ""]
    published = [arm for arm in matrices if arm.startswith("published:")]
    for why, arms in (("published scores have no training curve", published),
                      ("a run ended no episode", [arm for arm in matrices if arm not in auc and arm not in published])):
        if arms:
            lines += [f"No AUC for {', '.join(arms)}: {why}.", ""]
    if not auc:
        return lines[:-1]
    if pooled:
        agg = aggregate.aggregate(auc, reps=reps, seed=seed)
        lines += ["| arm | runs per task | " + " | ".join(f"{m} AUC" for m in AUC_METRICS) + " |",
                  "|---" * (len(AUC_METRICS) + 2) + "|"]
        lines += [f"| {arm} | {x.shape[0]} | " + " | ".join(fmt(agg[arm][m]) for m in AUC_METRICS) + " |"
                  for arm, x in auc.items()]
        lines.append("")
    lines += ["| task | arm | runs | " + " | ".join(f"{m} AUC" for m in AUC_METRICS) + " | min | max | mean final "
              "score |", "|---" * (len(AUC_METRICS) + 6) + "|"]
    for j, (t, column, agg) in enumerate(per_task_columns(auc, tasks, reps, seed)):
        for arm, x in column.items():
            lines.append(f"| {t} | {arm} | {x.shape[0]} | " + " | ".join(fmt(agg[arm][m]) for m in AUC_METRICS)
                         + f" | {x.min():.3f} | {x.max():.3f} | {matrices[arm][:, j].mean():.3f} |")
    pairs, skipped = {}, []
    for pair in compare:
        a, b = pair.split(",")
        if a in auc and b in auc:
            pairs[pair] = (auc[a], auc[b])
        elif a in matrices and b in matrices:
            skipped.append(pair)
    if skipped:
        lines += ["", f"Comparisons on AUC skipped (an arm has no AUC): {', '.join(skipped)}."]
    if not pairs:
        return lines
    keyed = {(t, k): (x[:, j:j + 1], y[:, j:j + 1]) for k, (x, y) in pairs.items() for j, t in enumerate(tasks)}
    if pooled:
        keyed.update({("all tasks (pooled)", k): xy for k, xy in pairs.items()})
    poi = aggregate.probability_of_improvement(keyed, reps=reps, seed=seed)
    lines += ["", f"Comparisons on AUC: probability of improvement (as above, on AUC) and the relative change of the "
              "mean AUC, a ratio of means (mean AUC of X / mean AUC of Y - 1, not a mean of per-run ratios; shown "
              "only when the mean AUC of Y is positive: the ratio of a negative mean is meaningless).",
              "", "| task | X, Y | P(X > Y) on AUC [95% CI] | mean AUC of X | mean AUC of Y | X / Y - 1 (ratio of "
              "means) |", "|---|---|---|---|---|---|"]
    for (t, k), p in poi.items():
        x, y = keyed[(t, k)]
        change = f"{100 * (x.mean() / y.mean() - 1):+.1f}%" if y.mean() > 0 else "—"
        lines.append(f"| {t} | {k} | {fmt(p)} | {x.mean():.3f} | {y.mean():.3f} | {change} |")
    return lines


# Config fields that name a run, place it or set how fast it runs, not what it computes: they may differ between
# arms that share a swept value (--sweep, --thc). Every other field of config.json's args matters, and so does the
# script (config.json's command[0]).
SWEEP_IGNORED = ("seed", "run_name", "output_dir", "exp_name", "env_id", "env_ids", "device", "torch_threads",
                 "xla_threads", "env_threads", "log_every", "save_model", "eval_checkpoint")


def parse_fields(text: str, option: str) -> tuple[str, ...]:
    """`batch_size` or `num_envs,num_steps` (--sweep, --thc) -> the config.json field names."""
    fields = tuple(f.strip() for f in text.split(","))
    if not all(fields) or len(set(fields)) != len(fields):
        raise SystemExit(f"error: {option} {text}: expected FIELD or FIELD,FIELD (config.json field names)")
    return fields


def sort_key(value):
    """Numbers in numeric order, then anything else by its text; a tuple (several fields) element by element."""
    if isinstance(value, tuple):
        return tuple(sort_key(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def show_value(value) -> str:
    return "(" + ", ".join(map(show_value, value)) + ")" if isinstance(value, tuple) else str(value)


def frozen(value):
    """A config value as a dict key (lists become tuples)."""
    return tuple(frozen(v) for v in value) if isinstance(value, list) else value


def sweep_values(used: dict, fields: tuple[str, ...], option: str) -> tuple[dict, list[str]]:
    """{arm: its value of `fields` (a tuple when several)}, read from each used run's config.json, and the other
    fields whose values differ between values of the sweep (set by the arms' flags or derived from the swept
    fields by resolve_args, e.g. PPO's batch_size from num_envs). A one-line SystemExit when a run has no readable
    config.json or lacks a field, when an arm's runs disagree on the value, or when two arms that share a value
    differ on a task in a field that matters (any but SWEEP_IGNORED): the sweep would then mix two settings."""
    name = ",".join(fields)
    value_of, setting = {}, {}  # arm -> value; (arm, task) -> {field: value} of the fields that matter
    for arm, rows in used.items():
        for r in rows:
            try:
                config = read_json(os.path.join(r["dir"], "config.json"))
                args = dict(config["args"])
            except (OSError, ValueError, KeyError, TypeError):
                raise SystemExit(f"error: {option} {name}: {r['run']} has no readable config.json with its args") \
                    from None
            missing = [f for f in fields if f not in args]
            if missing:
                close = difflib.get_close_matches(missing[0], list(args), n=3)
                raise SystemExit(f"error: {option} {name}: no field {missing[0]} in {r['run']}/config.json"
                                 + (f" (close: {', '.join(close)})" if close else ""))
            value = tuple(frozen(args[f]) for f in fields)
            value = value[0] if len(fields) == 1 else value
            if value_of.setdefault(arm, value) != value:
                raise SystemExit(f"error: {option} {name}: the runs of arm {arm} have different values "
                                 f"({show_value(value_of[arm])}, {show_value(value)})")
            args["script"] = os.path.basename(str((config.get("command") or [""])[0]))
            setting.setdefault((arm, r["env_id"]), {k: frozen(v) for k, v in args.items()
                                                    if k not in SWEEP_IGNORED and k not in fields})
    differing = set()
    for (arm, task), s in setting.items():
        for (other, task2), s2 in setting.items():
            if task2 != task or other <= arm:
                continue
            diff = sorted(k for k in set(s) | set(s2) if s.get(k, "—") != s2.get(k, "—"))
            if diff and value_of[arm] == value_of[other]:
                shown = ", ".join(f"{k} ({s.get(k, '—')} vs {s2.get(k, '—')})" for k in diff[:3])
                raise SystemExit(f"error: {option} {name}: arms {arm} and {other} share {name} = "
                                 f"{show_value(value_of[arm])} but differ on {task} in {shown}"
                                 + (" ..." if len(diff) > 3 else ""))
            differing.update(diff)
    return value_of, sorted(differing)


def value_matrices(matrices: dict, value_of: dict) -> tuple[dict, dict]:
    """{value: (runs, tasks) scores of every arm with that value, stacked}, {value: [arms]}, values sorted."""
    arms_of = defaultdict(list)
    for arm in matrices:
        if arm in value_of:
            arms_of[value_of[arm]].append(arm)
    order = sorted(arms_of, key=sort_key)
    return ({v: np.concatenate([matrices[a] for a in arms_of[v]]) for v in order}, {v: arms_of[v] for v in order})


def last_values(used: dict, keys: list[str]) -> dict[str, dict[tuple[str, str], list[float]]]:
    """{key: {(task, arm): [each run's last logged value of the key (highest step), for the runs that logged it]}}."""
    out = {key: defaultdict(list) for key in keys}
    for arm, rows in used.items():
        for r in rows:
            scalars = read_scalars(r["dir"])
            for key in keys:
                if scalars.get(key):
                    out[key][(r["env_id"], arm)].append(max(scalars[key], key=lambda e: e.step).value)
    return out


def powers_of_two(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(np.log2(v)).is_integer()
               for v in values)


def sweep_lines(fields, by_value, arms_of, differing, tasks, pooled, keys, used, value_of, label, reps, seed, h):
    """The "Sweep over FLAG" section: per value of the swept field(s), its arms and runs, and the IQM [95% CI] of
    the final score per task (and pooled over tasks when the scores are normalised); then per --keys key, the mean
    over runs [min, max] of each run's last logged value, per value and task. Returns (lines, {value: {task or
    "pooled": (IQM, low, high)}}, {key: {value: {task: (mean, min, max)}}}) for the figure."""
    name = ",".join(fields)
    iqm = {v: {} for v in by_value}
    for t, column, agg in per_task_columns(by_value, tasks, reps, seed):
        for v in by_value:
            iqm[v][t] = agg[v]["IQM"]
    if pooled:
        agg = aggregate.aggregate(by_value, reps=reps, seed=seed)
        for v in by_value:
            iqm[v]["pooled"] = agg[v]["IQM"]
    lines = [f"{h} Sweep over {name}", "",
             f"The arms differ in {name} (config.json). Per value: its arms, runs per task, and the IQM of the final "
             f"{label} over runs with a 95% stratified-bootstrap interval, per task"
             + (" and pooled over tasks" if pooled else "") + "."
             + (f" Other fields that differ between values (set by the arms or derived from {name}): "
                f"{', '.join(differing)}." if differing else " No other field differs between values."), "",
             f"| {name} | arms | runs per task | " + " | ".join(tasks)
             + (" | all tasks (pooled) |" if pooled else " |"),
             "|---" * (3 + len(tasks) + pooled) + "|"]
    for v, x in by_value.items():
        lines.append(f"| {show_value(v)} | {', '.join(arms_of[v])} | {x.shape[0]} | "
                     + " | ".join(fmt(iqm[v][t]) for t in tasks)
                     + (f" | {fmt(iqm[v]['pooled'])} |" if pooled else " |"))
    finals = {}
    if keys:
        final = last_values({a: rows for a, rows in used.items() if a in value_of}, list(keys))
        lines += ["", f"Logged keys against {name}: each run's last logged value (highest step); per cell the mean "
                  "over runs [min, max over runs] and the runs that logged the key out of the runs used.", ""]
        for key in keys:
            finals[key] = {v: {} for v in by_value}
            if not final[key]:
                lines += [f"{key}: logged by no run.", ""]
                continue
            lines += [f"`{key}`:", "", f"| {name} | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
            for v in by_value:
                cells = []
                for t in tasks:
                    x = np.array([y for a in arms_of[v] for y in final[key].get((t, a), [])])
                    n = sum(1 for a in arms_of[v] for r in used[a] if r["env_id"] == t)
                    if len(x):
                        finals[key][v][t] = (x.mean(), x.min(), x.max())
                    cells.append((f"{fmt((x.mean(), x.min(), x.max()))} " if len(x) else "— ")
                                 + f"({len(x)}/{n} runs)")
                lines.append(f"| {show_value(v)} | " + " | ".join(cells) + " |")
            lines.append("")
        lines = lines[:-1]
    return lines, iqm, finals


def sweep_figure(out, fields, iqm, finals, tasks, pooled, label, prefix) -> list[str]:
    """sweep_FLAG (FLAG's commas as "-"): one column per task (the pooled IQM first when pooled); first row the IQM
    of the final score with its 95% interval against the value, then one row per logged key with its runs' last
    values (mean, min-max bar). A log2 x axis when every value is a power of 2, else the values in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(iqm)
    columns = (["pooled"] if pooled else []) + list(tasks)
    rows = [("IQM " + label, {v: {c: iqm[v][c] for c in columns} for v in values})]
    rows += [(key, per_value) for key, per_value in finals.items() if any(per_value.values())]
    log2 = powers_of_two(values)
    xs = values if log2 else list(range(len(values)))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(4 * len(columns), 3 * len(rows)), squeeze=False)
    for row, (ylabel, per_value) in zip(axes, rows):
        for ax, c in zip(row, columns):
            points = [(x, per_value[v][c]) for x, v in zip(xs, values) if c in per_value[v]]
            if not points and c == "pooled":  # logged keys are per task
                ax.set_visible(False)
                continue
            if points:
                x, y = zip(*points)
                y = np.array(y, dtype=float)
                ax.errorbar(x, y[:, 0], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], marker="o", capsize=3)
            if log2:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [show_value(v) for v in values])
            ax.minorticks_off()
            ax.set_title("all tasks (pooled)" if c == "pooled" else c, fontsize="medium")
            ax.set_xlabel(",".join(fields))
        next(ax for ax in row if ax.get_visible()).set_ylabel(ylabel)
    fig.suptitle("IQM with 95% interval (first row); logged keys: mean and min-max over runs of the last value",
                 fontsize="medium")
    fig.tight_layout()
    paths = save(fig, out, prefix + "sweep_" + "-".join(fields))
    plt.close(fig)
    return paths


def thc_lines(fields, by_value, tasks, label, h) -> list[str]:
    """The "Hyper-parameter consistency" section: utils/thc.py's THC score over the group's tasks for the values
    of the field(s), with each value's spread and its rank and interval (mean +- std over runs) per task."""
    name = ",".join(fields)
    result = thc_score(by_value)
    k = len(by_value)
    lines = [f"{h} Hyper-parameter consistency (THC) of {name}", "",
             f"THC = {result.mean:.3f} ± {result.std:.3f} over {k} values and {len(tasks)} tasks (Obando-Ceron et al. "
             "2024; utils/thc.py, the official get_thc_metric). Per task the values are ranked by their interval "
             f"mean ± std of the final {label} over runs (ddof 0), overlapping intervals tied at the midpoint of "
             "their positions, 1 = best; a value's spread is the range of its rank over tasks divided by "
             f"k - 1 = {k - 1}; THC is the mean spread over values (± their standard deviation, ddof 1). "
             "0: every task ranks the values alike; 1: each value is best on some task and worst on another.", "",
             f"| {name} | spread | " + " | ".join(f"rank on {t} (interval)" for t in tasks) + " |",
             "|---" * (len(tasks) + 2) + "|"]
    for v in by_value:
        lines.append(f"| {show_value(v)} | {result.spread[v]:.3f} | " + " | ".join(
            f"{result.ranks[v][j]:g} ([{result.intervals[v][j, 0]:.3f}, {result.intervals[v][j, 1]:.3f}])"
            for j in range(len(tasks))) + " |")
    return lines


def section(rows, out, compare, reps, seed, points, make_figures, published, prefix="", depth=2, reach=None,
            reach_window=10, keys=(), auc=False, sweep=None, thc=None):
    """The report body for one task group: (markdown lines, excluded (row, reason) pairs, runs used). `sweep` and
    `thc`: config.json field names (sweep_lines, thc_lines), checked before anything is computed."""
    h = "#" * depth
    group = {r["arm"] for r in rows}
    usable_tasks = sorted({r["env_id"] for r in rows if r["excluded"] is None})
    normalise = bool(usable_tasks)
    for t in usable_tasks:
        try:
            scores.normalize(t, 0.0)
        except KeyError:
            normalise = False
    label = "normalised score" if normalise else "return"
    matrices, tasks, used, dropped = score_matrices(rows, normalise)
    excluded = [(r, r["excluded"]) for r in rows if r["excluded"]] + dropped
    extra, published_notes = published_matrices(list(published), tasks, used) if normalise else (
        {}, ["Published arms left out: scores are not normalised."] if published else [])
    matrices.update(extra)
    swept = {option: sweep_values(used, fields, option) for option, fields in (("--sweep", sweep), ("--thc", thc))
             if fields}
    if thc and (len(tasks) < 2 or len(set(swept["--thc"][0].values())) < 2):
        raise SystemExit(f"error: --thc {','.join(thc)}: THC needs at least 2 tasks and 2 values of "
                         f"{','.join(thc)} with usable runs; this group has {len(tasks)} task(s) and "
                         f"{len(set(swept['--thc'][0].values()))} value(s)")
    lines = [f"Tasks: {', '.join(tasks) or 'none'}. Scores: final evaluation return (training return where a run "
             f"has no evaluation), {'normalised (utils/scores.py)' if normalise else 'raw returns (not every task has a normalisation reference)'}.", ""]
    if not matrices:
        return lines, excluded, 0
    # Raw returns of tasks with different scales are not pooled into one aggregate: each task is reported alone
    per_task = not normalise and len(tasks) > 1
    # The optimality gap is the shortfall below a normalised score of 1; raw returns have no such target
    metrics = aggregate.METRICS if normalise else tuple(m for m in aggregate.METRICS if m != "Optimality Gap")
    if per_task:
        agg = None
        lines += per_task_aggregates(matrices, tasks, used, metrics, reps, seed, h)
    else:
        agg = aggregate.aggregate(matrices, reps=reps, seed=seed)
        lines += [f"{h} Aggregates", "", "| arm | runs per task | " + " | ".join(metrics) + " | mean SPS |",
                  "|---" * (len(metrics) + 3) + "|"]
        for arm, x in matrices.items():
            sps = [r.get("sps") for r in used.get(arm, []) if r.get("sps")]
            lines.append(f"| {arm} | {x.shape[0]} | " + " | ".join(fmt(agg[arm][m]) for m in metrics)
                         + (f" | {np.mean(sps):.0f} |" if sps else " | — |"))
    if not normalise:
        lines += ["", "No optimality gap: it measures the shortfall below a normalised score of 1."]
    if published_notes:
        lines += [""] + published_notes
    lines += ["", f"{h} Per task (mean over runs)", "", "| arm | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 1) + "|"]
    for arm, x in matrices.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in x.mean(axis=0)) + " |")
    pairs, poi = {}, {}
    for pair in compare:
        a, b = pair.split(",")
        if a in matrices and b in matrices:
            pairs[pair] = (matrices[a], matrices[b])
        elif all(arm in group or arm.startswith("published:") for arm in (a, b)):
            lines += ["", f"Comparison {pair} skipped: an arm has no usable runs."]
    if pairs and per_task:
        poi = aggregate.probability_of_improvement(
            {(t, k): (x[:, j:j + 1], y[:, j:j + 1]) for j, t in enumerate(tasks) for k, (x, y) in pairs.items()},
            reps=reps, seed=seed)
        lines += ["", f"{h} Probability of improvement per task", "",
                  "Per task, as the aggregates: raw returns of different tasks are not pooled.", "",
                  "| task | X, Y | P(X > Y) [95% CI] |", "|---|---|---|"]
        lines += [f"| {t} | {k} | {fmt(v)} |" for (t, k), v in poi.items()]
    elif pairs:
        poi = aggregate.probability_of_improvement(pairs, reps=reps, seed=seed)
        lines += ["", f"{h} Probability of improvement", "", "| X, Y | P(X > Y) [95% CI] |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in poi.items()]
    need_curves = auc or (make_figures and not per_task)
    curves, steps = curve_matrices(used, tasks, normalise, points) if need_curves else (None, None)
    if auc:
        lines += [""] + auc_lines(curves, matrices, tasks, compare, not per_task and len(tasks) > 1, label, points,
                                  reps, seed, h)
    if reach:
        lines += [""] + reach_lines(used, tasks, reach, reach_window, reps, seed, h)
    logged = key_curves(used, list(keys), points) if keys else None
    if logged:
        lines += [""] + key_lines(logged, list(used), tasks, h)
    written = []
    if sweep:
        value_of, differing = swept["--sweep"]
        by_value, arms_of = value_matrices(matrices, value_of)
        sweep_text, iqm, finals = sweep_lines(sweep, by_value, arms_of, differing, tasks, normalise and len(tasks) > 1,
                                              keys, used, value_of, label, reps, seed, h)
        lines += [""] + sweep_text
        if make_figures:
            written += sweep_figure(out, sweep, iqm, finals, tasks, normalise and len(tasks) > 1, label, prefix)
    if thc:
        lines += [""] + thc_lines(thc, value_matrices(matrices, swept["--thc"][0])[0], tasks, label, h)
    if make_figures:
        written = figures(out, matrices, agg, curves, steps, plasticity_curves(used, points), poi, label, prefix,
                          metrics, per_task=task_curves(used, tasks, points) if per_task else None, keys=logged,
                          tasks=tasks) + written
        lines += ["", f"{h} Figures", ""] + [f"- `{os.path.basename(p)}`" for p in written if p.endswith(".png")]
    return lines, excluded, sum(len(v) for v in used.values())


def report(suite_dir: str, out: str | None = None, compare: list[str] = (), reps: int = 2000, seed: int = 0,
           points: int = 10, make_figures: bool = True, published: list[str] = (), reach: dict | None = None,
           reach_window: int = 10, keys: list[str] | None = None, auc: bool = False, sweep: tuple | None = None,
           thc: tuple | None = None) -> str:
    """Write report.md (and figures) for a suite directory. Arms run on different task sets are reported in
    separate sections, one per task group (task_groups), each with its own aggregates, figures (file names
    prefixed g1_, g2_, ...) and comparisons; a comparison between arms of different groups is skipped with a note.
    `keys`: logged scalars reported per task (key_curves, key_lines, key_figure). `auc`: the area under each run's
    training curve (auc_lines). `sweep`, `thc`: config.json field names whose values the arms sweep (sweep_lines,
    sweep_figure, thc_lines)."""
    t0 = time.time()
    sweep = parse_fields(sweep, "--sweep") if isinstance(sweep, str) else sweep
    thc = parse_fields(thc, "--thc") if isinstance(thc, str) else thc
    out = out or suite_dir
    os.makedirs(out, exist_ok=True)
    rows = collect(os.path.join(suite_dir, "runs"))
    groups = task_groups(rows)
    body, excluded, n_used = [], [], 0
    group_of = {arm: k for k, arms in enumerate(groups) for arm in arms}
    for pair in compare:
        a, b = pair.split(",")
        missing = [arm for arm in (a, b) if arm not in group_of and not arm.startswith("published:")]
        if missing:
            body += [f"Comparison {pair} skipped: no runs of {', '.join(missing)}.", ""]
        elif a in group_of and b in group_of and group_of[a] != group_of[b]:
            body += [f"Comparison {pair} skipped: the two arms were run on different tasks.", ""]
    for k, arms in enumerate(groups or [[]]):
        group_rows = [r for r in rows if r["arm"] in arms]
        if len(groups) > 1:
            body += [f"## Group {k + 1}: {', '.join(arms)}", ""]
        lines, ex, n = section(group_rows, out, compare, reps, seed, points, make_figures, published,
                               prefix=f"g{k + 1}_" if len(groups) > 1 else "", depth=3 if len(groups) > 1 else 2,
                               reach=reach, reach_window=reach_window, keys=keys or (), auc=auc, sweep=sweep,
                               thc=thc)
        body += lines + [""]
        excluded += ex
        n_used += n
    lines = [f"# Benchmark report: `{os.path.basename(os.path.normpath(suite_dir))}`", "",
             f"Runs found: {len(rows)}; used: {n_used}; excluded: {len(excluded)}. "
             + (f"Arms were run on {len(groups)} different task sets: each set is reported on its own. "
                if len(groups) > 1 else "")
             + f"Intervals: 95% stratified bootstrap, {reps} repetitions, seed {seed} (rliable).", ""]
    return write_markdown(os.path.join(out, "report.md"), lines + body, excluded, t0)


def write_markdown(path: str, lines: list[str], excluded: list, t0: float) -> str:
    """Write a report's lines, then every excluded run with its reason and the build time; returns the path."""
    lines = lines + ["## Excluded runs", ""]
    lines += [f"- `{r['run']}`: {why}" for r, why in excluded] or ["None."]
    lines += ["", f"Report built in {time.time() - t0:.1f} s."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def suite_parser(doc: str, written: str) -> argparse.ArgumentParser:
    """The arguments every report command takes: the suite directory, --out, --compare, --reps, --seed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite_dir", help="a suite directory written by benchmark/launch.py (holds runs/)")
    parser.add_argument("--out", help=f"where {written} go (default: the suite directory)")
    parser.add_argument("--compare", nargs="*", default=[], help="pairs X,Y for probability of improvement")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (results are reproducible)")
    return parser


def check_suite_dir(suite_dir: str):
    if not os.path.isdir(os.path.join(suite_dir, "runs")):
        raise SystemExit(f"error: {suite_dir} has no runs/ folder (is it a suite directory?)")


def main():
    parser = suite_parser(__doc__, "report.md and the figures")
    parser.add_argument("--points", type=int, default=10, help="points of the sample-efficiency curves")
    parser.add_argument("--published", nargs="*", default=[], choices=PUBLISHED_AGENTS,
                        help="published Atari 100k runs to add as arms published:<AGENT> (when the protocol matches)")
    parser.add_argument("--reach", nargs="*", default=[],
                        help="RETURN (every task) or TASK=RETURN ...: report the steps each run takes to reach it")
    parser.add_argument("--reach-window", type=int, default=10,
                        help="training episodes averaged by --reach (the first this many - 1 never count alone)")
    parser.add_argument("--keys", nargs="+", default=[], metavar="KEY",
                        help="logged TensorBoard scalars (e.g. eval/episodic_return value/bias) to report per task: "
                             "a curve per arm and the last window's value over runs")
    parser.add_argument("--auc", action="store_true",
                        help="add the area under each run's training curve (mean return over its budget, --points "
                             "windows) per arm and task, with probability of improvement and relative change for "
                             "the --compare pairs")
    parser.add_argument("--sweep", metavar="FIELD[,FIELD]",
                        help="the config.json field(s) whose value the arms sweep (e.g. batch_size, or "
                             "num_envs,num_steps): IQM of the final score and the --keys' last values against it")
    parser.add_argument("--thc", metavar="FIELD[,FIELD]",
                        help="the THC score (hyper-parameter consistency across tasks) of the config.json field(s) "
                             "the arms sweep; needs >= 2 tasks and >= 2 values")
    args = parser.parse_args()
    check_suite_dir(args.suite_dir)
    if args.reach_window < 1:
        raise SystemExit("error: --reach-window must be >= 1")
    sweep = parse_fields(args.sweep, "--sweep") if args.sweep else None
    thc = parse_fields(args.thc, "--thc") if args.thc else None
    print(report(args.suite_dir, args.out, args.compare, args.reps, args.seed, args.points,
                 published=args.published, reach=parse_reach(args.reach), reach_window=args.reach_window,
                 keys=args.keys, auc=args.auc, sweep=sweep, thc=thc))


if __name__ == "__main__":
    main()
