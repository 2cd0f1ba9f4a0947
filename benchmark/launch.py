"""Launch a grid of runs (scripts x env ids x seeds, with per-arm flags) locally, resumably.

    python -m benchmark.launch --suite smoke                 # benchmark/suites/smoke.toml
    python -m benchmark.launch --suite quick --workers 2 --threads-per-run 1
    python -m benchmark.launch --suite smoke --dry-run       # print the commands

Layout under --output-dir (default `benchmarks/`): `<suite>/runs/<run_name>/` (what each script writes),
`<suite>/logs/<run_name>.attempt<k>.log` (stdout and stderr of each attempt), `<suite>/manifest.jsonl` (one line
per attempt start and end: command, arm, env id, seed, code version, status, exit status, attempts, log tail).

Guarantees: a run whose summary.json says completed is never re-run or counted twice; a run killed mid-way
(SIGKILL, OOM, node loss: no summary.json) is retried up to --max-attempts times, then reported as failed with
its exit status and the tail of its log; a diverged run is final (it would diverge again). The previous attempt's
files are moved aside, never mixed with a new attempt's. Children die with the launcher (Linux parent-death
signal), so the launcher can be killed and restarted at any time: the restart re-runs what was not completed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.scripts import ROOT, script_path  # noqa: E402

SUITES = os.path.join(ROOT, "benchmark", "suites")
FINAL = ("completed", "diverged")


@dataclass
class Run:
    arm: str
    script: str
    env_id: str
    seed: int
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.arm}__{self.env_id}__s{self.seed}"

    def command(self, runs_dir: str) -> list[str]:
        path = self.script if os.path.isabs(self.script) else script_path(self.script)
        return [sys.executable, path, "--env-id", self.env_id, "--seed", str(self.seed), *self.flags,
                "--output-dir", runs_dir, "--run-name", self.name]


def load_suite(name_or_path: str) -> tuple[str, list[Run]]:
    """A suite file: `seeds = [...]` and `[[arms]]` tables with `name`, `script`, `env_ids` and optional `flags`
    and `seeds` (overriding the suite's). Returns (suite name, runs in launch order)."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(SUITES, name_or_path + ".toml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(SUITES) if f.endswith(".toml"))
        raise SystemExit(f"error: no suite {name_or_path!r} (known: {', '.join(known)})")
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    runs, names = [], set()
    for arm in spec["arms"]:
        if arm["name"] in names:
            raise SystemExit(f"error: {path}: arm name {arm['name']!r} appears twice")
        names.add(arm["name"])
        for seed in arm.get("seeds", spec.get("seeds", [1])):
            for env_id in arm["env_ids"]:
                runs.append(Run(arm["name"], arm["script"], env_id, int(seed), [str(x) for x in arm.get("flags", [])]))
    return spec.get("name", os.path.basename(path)[:-5]), runs


def read_status(run_dir: str) -> str | None:
    """The status in a run's summary.json, or None when it is missing or unreadable (a killed or corrupt run)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def code_version() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Manifest:
    """Append-only JSON lines, one write per line (O_APPEND), so concurrent workers never interleave records."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def append(self, record: dict):
        line = json.dumps({"time": time.time(), **record}) + "\n"
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def history(self) -> tuple[dict[str, int], dict[str, str]]:
        """Attempts started so far and the last recorded status, per run name (a torn last line from a killed
        launcher is ignored; an attempt without an end record was killed with the launcher)."""
        counts: dict[str, int] = {}
        last: dict[str, str] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("event") == "start":
                        counts[record["run"]] = counts.get(record["run"], 0) + 1
                        last[record["run"]] = "killed"
                    elif record.get("event") == "end":
                        last[record["run"]] = record["status"]
        return counts, last


def _die_with_parent():
    """Runs in the child before exec: ask Linux to SIGKILL it when the launcher dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def attempt(run: Run, suite_dir: str, k: int, manifest: Manifest, threads: int, version: str | None) -> str:
    """One attempt of one run; returns its status (completed, diverged, failed, killed)."""
    runs_dir, logs_dir = os.path.join(suite_dir, "runs"), os.path.join(suite_dir, "logs")
    run_dir = os.path.join(runs_dir, run.name)
    if os.path.exists(run_dir):  # files of an earlier, unfinished attempt: keep them aside, never mix them in
        shutil.move(run_dir, os.path.join(suite_dir, "attempts", f"{run.name}.before_attempt{k}"))
    cmd = run.command(runs_dir)
    log_path = os.path.join(logs_dir, f"{run.name}.attempt{k}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    base = {"run": run.name, "arm": run.arm, "env_id": run.env_id, "seed": run.seed, "attempt": k}
    manifest.append({"event": "start", **base, "command": cmd, "code_version": version})
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                              preexec_fn=_die_with_parent)
    status = read_status(run_dir)
    if status not in FINAL:
        status = "killed" if proc.returncode < 0 else "failed"  # negative: ended by a signal (SIGKILL, OOM)
    record = {"event": "end", **base, "status": status, "exit_status": proc.returncode,
              "wall_time_s": round(time.time() - start, 1)}
    if status not in FINAL:
        record["log_tail"] = tail(log_path)
    manifest.append(record)
    return status


def launch(suite: str, output_dir: str, workers: int, threads: int, max_attempts: int, dry_run: bool = False,
           progress_every: float = 10.0) -> dict[str, str]:
    """Run every run of the suite that is not completed; returns {run name: final status}."""
    name, runs = load_suite(suite)
    suite_dir = os.path.join(output_dir, name)
    if dry_run:
        for run in runs:
            print(" ".join(run.command(os.path.join(suite_dir, "runs"))))
        return {}
    for sub in ("runs", "logs", "attempts"):
        os.makedirs(os.path.join(suite_dir, sub), exist_ok=True)
    manifest = Manifest(os.path.join(suite_dir, "manifest.jsonl"))
    started, last_status = manifest.history()
    version = code_version()
    results: dict[str, str] = {}
    todo = []
    for run in runs:
        status = read_status(os.path.join(suite_dir, "runs", run.name))
        if status in FINAL:
            results[run.name] = status
        elif started.get(run.name, 0) >= max_attempts:  # out of attempts: report how the last one ended
            results[run.name] = last_status.get(run.name, "failed")
        else:
            todo.append(run)
    print(f"{name}: {len(runs)} runs, {len(results)} already final, {len(todo)} to run")
    lock = threading.Lock()
    t0, durations = time.time(), []

    def work(run: Run) -> str:
        status = "failed"
        while started.get(run.name, 0) < max_attempts:
            with lock:
                started[run.name] = started.get(run.name, 0) + 1
                k = started[run.name]
            t = time.time()
            status = attempt(run, suite_dir, k, manifest, threads, version)
            if status in FINAL:
                break
            print(f"  {run.name}: attempt {k} {status}" + (", retrying" if k < max_attempts else ", giving up"))
        with lock:
            results[run.name] = status
            durations.append(time.time() - t)
        return status

    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(work, run) for run in todo]
        while pending:
            finished, _ = futures.wait(pending, timeout=progress_every)
            done = sum(1 for s in results.values() if s == "completed")
            bad = sum(1 for s in results.values() if s not in ("completed",))
            left = len(runs) - len(results)
            eta = f"{sum(durations) / len(durations) * left / workers:.0f}s" if durations else "?"
            print(f"[{time.time() - t0:6.0f}s] done {done}, failed {bad}, running {min(workers, left)}, "
                  f"pending {max(0, left - workers)}, ETA {eta}", flush=True)
            if len(finished) == len(pending):
                break
        for fut in pending:
            fut.result()  # re-raise a launcher bug instead of losing it
    failed = {k: v for k, v in results.items() if v != "completed"}
    for run_name, status in sorted(failed.items()):
        print(f"  not completed: {run_name}: {status} (logs in {os.path.join(suite_dir, 'logs')})")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="a name under benchmark/suites/ or a path to a .toml file")
    parser.add_argument("--output-dir", default="benchmarks")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--threads-per-run", type=int, default=1, help="OMP/MKL threads per run (0: unset)")
    parser.add_argument("--max-attempts", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    results = launch(args.suite, args.output_dir, args.workers, args.threads_per_run, args.max_attempts,
                     args.dry_run)
    sys.exit(1 if any(s != "completed" for s in results.values()) else 0)


if __name__ == "__main__":
    main()
