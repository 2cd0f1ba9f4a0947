"""Launch a grid of runs (scripts x env ids x seeds, with per-arm flags) locally, resumably.

    python -m benchmark.launch --suite smoke                 # benchmark/suites/smoke.toml
    python -m benchmark.launch --suite quick --workers 2 --threads-per-run 1
    python -m benchmark.launch --suite smoke --dry-run       # print the commands
    python -m benchmark.launch --suite atari100k --executor slurm --slurm-partition gpu --slurm-gpus-per-node 1 \
        --slurm-time 720 --slurm-setup "source .venv/bin/activate"   # one Slurm array job, through submitit

Layout under --output-dir (default `benchmarks/`): `<suite>/runs/<run_name>/` (what each script writes),
`<suite>/logs/<run_name>.attempt<k>.log` (stdout and stderr of each attempt), `<suite>/manifest.jsonl` (one line
per attempt start and end: command, arm, env id, seed, code version, status, exit status, attempts, log tail).

Before anything runs, the whole suite is checked (unknown scripts or keys, duplicate arm names, empty seed lists, then
each distinct command line through its script's parser and flag checks): a bad suite is one line and exit status 2.

Guarantees: a run whose summary.json says completed is never re-run or counted twice; a run killed mid-way
(SIGKILL, OOM, node loss: no summary.json) is retried up to --max-attempts times, then reported as failed with
its exit status and the tail of its log; a diverged run is final (it would diverge again). The previous attempt's
files are moved aside, never mixed with a new attempt's. Children die with the launcher (Linux parent-death
signal), so the launcher can be killed and restarted at any time: the restart re-runs what was not completed, reports
and re-runs a run whose summary.json is unreadable, and writes the end record (marked `reconciled`) of a run that
finished while the launcher was being killed.

On Slurm (`--executor slurm`, through submitit) each array task runs its runs with the same attempt loop on the
node and writes the same manifest (a shared filesystem is assumed). The manifest also records which job each run
was submitted as; a restart asks `squeue` which of those jobs are still queued or running and never submits a run
that is in flight. `--executor submitit-local` runs the same job function through submitit's local executor.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import ctypes
import json
import os
import shlex
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
    sequence: list[str] = field(default_factory=list)  # a task sequence (env_id is then its label)

    @property
    def name(self) -> str:  # a path component: MinAtar's 'MinAtar/Breakout' becomes 'MinAtar-Breakout'
        return f"{self.arm}__{self.env_id.replace('/', '-')}__s{self.seed}"

    def command(self, runs_dir: str) -> list[str]:
        path = self.script if os.path.isabs(self.script) else script_path(self.script)
        tasks = ["--env-ids", *self.sequence] if self.sequence else ["--env-id", self.env_id]
        return [sys.executable, path, *tasks, "--seed", str(self.seed), *self.flags,
                "--output-dir", runs_dir, "--run-name", self.name]


class SuiteError(Exception):
    """A suite file that cannot run as written: reported as one line with exit status 2 before anything runs."""


ARM_KEYS = {"name", "script", "env_ids", "sequences", "flags", "seeds"}
SUITE_KEYS = {"name", "description", "seeds", "arms"}


def load_suite(name_or_path: str) -> tuple[str, list[Run]]:
    """A suite file: `seeds = [...]` and `[[arms]]` tables with `name`, `script`, `env_ids` and/or `sequences`
    (`{label = [env ids]}`: task sequences, run with `--env-ids`, named by their label) and optional `flags` and
    `seeds` (overriding the suite's). Returns (suite name, runs in launch order). Raises SuiteError on a file that
    cannot run as written (the checks that need no script; `check_runs` asks the scripts about their flags)."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(SUITES, name_or_path + ".toml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(SUITES) if f.endswith(".toml"))
        raise SuiteError(f"no suite {name_or_path!r} (known: {', '.join(known)})")
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(spec) - SUITE_KEYS)
    if unknown or not spec.get("arms") or not isinstance(spec["arms"], list):
        raise SuiteError(f"{path}: needs [[arms]] tables and no keys but {sorted(SUITE_KEYS)} "
                         f"(got {unknown or 'no arms'})")
    runs, names = [], set()
    for arm in spec["arms"]:
        where = f"{path}: arm {arm.get('name', len(names) + 1)!r}"
        unknown = sorted(set(arm) - ARM_KEYS)
        if unknown or not isinstance(arm.get("name"), str) or not isinstance(arm.get("script"), str):
            raise SuiteError(f"{where}: needs a name and a script, and no keys but {sorted(ARM_KEYS)} "
                             f"(got {unknown or sorted(arm)})")
        if arm["name"] in names:
            raise SuiteError(f"{path}: arm name {arm['name']!r} appears twice")
        names.add(arm["name"])
        if not os.path.isfile(arm["script"] if os.path.isabs(arm["script"]) else script_path(arm["script"])):
            raise SuiteError(f"{where}: no script {arm['script']!r} in algos/")
        tasks = [(env_id, []) for env_id in arm.get("env_ids", [])] + list(arm.get("sequences", {}).items())
        bad = [label for label, seq in tasks if "__" in label or ("/" in label and seq)] + \
            [k for k in ("name",) if "__" in arm["name"]]
        if bad or not tasks:
            raise SuiteError(f"{where}: needs env_ids or sequences, and names without '__' (sequence labels also "
                             f"without '/') (got {bad or 'no tasks'})")
        seeds = arm.get("seeds", spec.get("seeds", [1]))
        if not isinstance(seeds, list) or not seeds or not all(type(x) is int and x >= 0 for x in seeds):
            raise SuiteError(f"{where}: needs a non-empty list of seeds >= 0 (got {seeds!r})")
        if not all(isinstance(x, (str, int, float, bool)) for x in arm.get("flags", [])):
            raise SuiteError(f"{where}: flags must be a list of strings and numbers (got {arm['flags']!r})")
        for seed in seeds:
            for label, sequence in tasks:
                runs.append(Run(arm["name"], arm["script"], label, int(seed), [str(x) for x in arm.get("flags", [])],
                                [str(x) for x in sequence]))
    return spec.get("name", os.path.basename(path)[:-5]), runs


def tyro_message(text: str) -> str:
    """The message inside tyro's boxed parse error, as one line."""
    body, inside = [], False
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith("---"):
            if inside:
                break
            inside = True
        elif inside and line:
            body.append(line)
        elif inside:
            break
    return " ".join(body) or text.strip().replace("\n", " ")[:300]


def check_runs(suite_path: str, runs: list[Run]):
    """Each distinct command line of the suite through its script's own parser and flag checks (tyro, then the
    script's resolve_args: no environment is created, nothing is written), so a typo or a missing flag value is one
    line before anything runs, not one failed run per seed. Scripts without the conventions' Args and resolve_args
    (a user's own script) are left to fail at run time. `--device cuda` is checked as cpu: the launching machine
    need not be the one with the GPU."""
    with _cached_make_spec():
        _check_runs(suite_path, runs)


_SPECS: dict = {}  # (task id, make_spec options) -> EnvPool spec, kept for the process (tests check many suites)


@contextlib.contextmanager
def _cached_make_spec():
    """While suites are checked, EnvPool's make_spec (about 0.25 s a call; the scripts' resolve_args ask for one
    spec per task, some twice, and a 60-game suite names 60 tasks) answers each (task, options) once per process.
    Specs are only read there."""
    try:
        import envpool
    except ImportError:
        yield
        return
    original = envpool.make_spec

    def make_spec(task_id, **kwargs):
        key = (task_id, tuple(sorted(kwargs.items())))
        if key not in _SPECS:
            _SPECS[key] = original(task_id, **kwargs)
        return _SPECS[key]

    envpool.make_spec = make_spec
    try:
        yield
    finally:
        envpool.make_spec = original


def _check_runs(suite_path: str, runs: list[Run]):
    import copy
    import io

    import tyro

    from utils.scripts import load_script

    checked, parsed = set(), {}
    for run in runs:
        key = (run.script, run.env_id, tuple(run.flags), tuple(run.sequence))
        path = run.command("/unused")[1]
        if key in checked:
            continue
        checked.add(key)
        with open(path) as f:
            source = f.read()
        if "\nclass Args" not in source or "\ndef resolve_args(" not in source:
            continue
        module = load_script(path)
        where = f"{suite_path}: arm {run.arm!r} ({os.path.basename(path)} on {run.env_id})"
        # tyro parses each (script, flags, sequence) once (building its parser takes a while), and a
        # str --env-id cannot fail to parse, so the other env ids of an arm reuse a copy with env_id replaced
        parse_key = (path, tuple(run.flags), tuple(run.sequence))
        if parse_key not in parsed:
            captured = io.StringIO()
            try:
                with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
                    parsed[parse_key] = tyro.cli(module.Args, args=run.command("/unused")[2:])
            except SystemExit:
                raise SuiteError(f"{where}: {tyro_message(captured.getvalue())}") from None
        args = copy.deepcopy(parsed[parse_key])
        if not run.sequence:
            args.env_id = run.env_id
        if getattr(args, "device", None) == "cuda":
            args.device = "cpu"
        try:
            module.resolve_args(args)
        except module.UserError as err:
            raise SuiteError(f"{where}: {err}") from None


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

    def history(self) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
        """Per run name: attempts started so far, the last recorded status, and the job it was last submitted as
        (Slurm / submitit executors). A torn last line from a killed launcher is ignored; an attempt without an end
        record is `killed` (with the launcher, or still running on a cluster: see `in_flight`); a submission
        without a start yet is `submitted`."""
        counts: dict[str, int] = {}
        last: dict[str, str] = {}
        jobs: dict[str, str] = {}
        started_jobs: set[tuple[str, str]] = set()
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    run, event = record.get("run"), record.get("event")
                    if event == "start":
                        counts[run] = counts.get(run, 0) + 1
                        last[run] = "killed"
                        if record.get("job_id"):
                            started_jobs.add((run, record["job_id"]))
                    elif event == "end":
                        last[run] = record["status"]
                    elif event == "submit":
                        jobs[run] = record["job_id"]
                        # a fast job can start (or finish) before the launcher writes its submit record
                        if (run, record["job_id"]) not in started_jobs:
                            last[run] = "submitted"
        return counts, last, jobs


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


def attempt(run: Run, suite_dir: str, k: int, manifest: Manifest, threads: int, version: str | None,
            job_id: str | None = None) -> str:
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
    if job_id:
        base["job_id"] = job_id
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


def run_attempts(run: Run, suite_dir: str, manifest: Manifest, threads: int, version: str | None, max_attempts: int,
                 next_attempt, job_id: str | None = None) -> str:
    """Attempts of one run until one is final or `max_attempts` have started; `next_attempt()` returns the next
    attempt number (counted across launches)."""
    status = "failed"
    while True:
        k = next_attempt()
        if k > max_attempts:
            break
        status = attempt(run, suite_dir, k, manifest, threads, version, job_id)
        if status in FINAL:
            break
        print(f"  {run.name}: attempt {k} {status}" + (", retrying" if k < max_attempts else ", giving up"),
              flush=True)
    return status


def run_job(runs: list[Run], suite_dir: str, threads: int, version: str | None, max_attempts: int) -> dict[str, str]:
    """What one Slurm (or submitit-local) job runs: its runs one after the other, each with the attempt loop of the
    local executor, recording in the suite's manifest (the attempt count is read from it, so attempts made by
    earlier jobs count)."""
    try:
        import submitit
        job_id = submitit.JobEnvironment().job_id
    except (ImportError, RuntimeError):
        job_id = None
    manifest = Manifest(os.path.join(suite_dir, "manifest.jsonl"))
    results = {}
    for run in runs:
        if read_status(os.path.join(suite_dir, "runs", run.name)) in FINAL:  # e.g. a requeued job
            results[run.name] = read_status(os.path.join(suite_dir, "runs", run.name))
            continue
        counts = manifest.history()[0]
        attempts = iter(range(counts.get(run.name, 0) + 1, max_attempts + 2))
        results[run.name] = run_attempts(run, suite_dir, manifest, threads, version, max_attempts,
                                         lambda: next(attempts), job_id)
    return results


def active_jobs(executor: str, job_ids: set[str]) -> set[str]:
    """Which of these jobs are still queued or running. Slurm: asks `squeue` (one line per array task); submitit's
    local executor: job ids are process ids. Fails with a clear error rather than guess: a wrong guess would
    submit a run twice."""
    if not job_ids:
        return set()
    if executor == "submitit-local":
        alive = set()
        for job_id in job_ids:
            try:
                os.kill(int(job_id), 0)
                alive.add(job_id)
            except (OSError, ValueError):
                pass
        return alive
    base_ids = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", "--jobs=" + ",".join(base_ids)],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise SystemExit(f"error: cannot ask squeue which submitted runs are still queued or running ({e})")
    if out.returncode != 0 and "Invalid job id" not in out.stderr:  # squeue errors on ids it no longer knows
        raise SystemExit(f"error: squeue failed ({out.stderr.strip() or out.returncode}); cannot tell which "
                         "submitted runs are still queued or running")
    queued = set(out.stdout.split())
    return {j for j in job_ids if j in queued or j.split("_")[0] in queued}


def plan(runs: list[Run], suite_dir: str, manifest: Manifest, max_attempts: int, executor: str):
    """Split the suite's runs into final ones ({name: status}), runs in flight on a cluster ({name: job id}) and
    runs to (re)start now. A run directory whose summary.json cannot be read is reported and re-run, never counted.
    A final run whose attempt has no end record (the launcher was killed after the run finished and before it
    wrote the record) gets one now, marked `reconciled`, so the manifest does not read as a killed run."""
    started, last_status, jobs = manifest.history()
    final, in_flight, todo = {}, {}, []
    unfinished, unrecorded = {}, []
    for run in runs:
        run_dir = os.path.join(suite_dir, "runs", run.name)
        status = read_status(run_dir)
        if status in FINAL:
            final[run.name] = status
            if last_status.get(run.name) == "killed":
                unrecorded.append(run)
        elif last_status.get(run.name) in ("submitted", "killed") and run.name in jobs:
            unfinished[run.name] = jobs[run.name]
        if status is None and os.path.exists(os.path.join(run_dir, "summary.json")):
            print(f"  {run.name}: summary.json is unreadable (a torn or corrupt file): not counted, run again",
                  flush=True)
    job_ids = set(unfinished.values()) | {jobs[r.name] for r in unrecorded if r.name in jobs}
    alive = active_jobs(executor, job_ids) if executor != "local" else set()
    for run in unrecorded:
        if jobs.get(run.name) not in alive:  # a job still alive writes its own end record
            manifest.append({"event": "end", "run": run.name, "arm": run.arm, "env_id": run.env_id,
                             "seed": run.seed, "attempt": started.get(run.name, 1), "status": final[run.name],
                             "exit_status": None, "reconciled": True})
    for run in runs:
        if run.name in final:
            continue
        if unfinished.get(run.name) in alive:
            in_flight[run.name] = unfinished[run.name]
        elif started.get(run.name, 0) >= max_attempts:  # out of attempts: report how the last one ended
            final[run.name] = last_status.get(run.name, "failed")
        else:
            todo.append(run)
    return final, in_flight, todo


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 64
    runs_per_job: int = 1
    setup: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


def make_executor(executor: str, folder: str, slurm: SlurmOptions, threads: int, suite_name: str):
    import submitit

    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=slurm.time_min)
        return ex
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SystemExit("error: --executor slurm needs Slurm's sbatch and srun on PATH (run it on a login node)")
    ex = submitit.SlurmExecutor(folder=folder)
    params = dict(job_name=f"bench-{suite_name}", time=slurm.time_min, cpus_per_task=slurm.cpus_per_task or
                  max(1, threads), array_parallelism=slurm.array_parallelism, use_srun=False,
                  setup=[f"cd {shlex.quote(ROOT)}", *slurm.setup], stderr_to_stdout=True)
    if slurm.partition:
        params["partition"] = slurm.partition
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:
        params["mem"] = f"{int(slurm.mem_gb * 1024)}MB"
    if slurm.extra:
        params["additional_parameters"] = dict(slurm.extra)
    ex.update_parameters(**params)
    return ex


def submit(todo: list[Run], suite_dir: str, manifest: Manifest, executor: str, slurm: SlurmOptions, threads: int,
           max_attempts: int, version: str | None, suite_name: str, chunks: int | None = None) -> list:
    """Submit the runs as one array job (`runs_per_job` runs per array task, or `chunks` tasks) and record the job
    of every run in the manifest."""
    ex = make_executor(executor, os.path.join(suite_dir, "jobs"), slurm, threads, suite_name)
    per_job = max(1, -(-len(todo) // chunks)) if chunks else max(1, slurm.runs_per_job)
    groups = [todo[i:i + per_job] for i in range(0, len(todo), per_job)]
    jobs = ex.map_array(run_job, groups, [suite_dir] * len(groups), [threads] * len(groups),
                        [version] * len(groups), [max_attempts] * len(groups))
    for job, group in zip(jobs, groups):
        for run in group:
            manifest.append({"event": "submit", "run": run.name, "arm": run.arm, "env_id": run.env_id,
                             "seed": run.seed, "executor": executor, "job_id": str(job.job_id)})
    print(f"submitted {len(todo)} runs as {len(jobs)} {executor} job(s): "
          f"{', '.join(str(j.job_id) for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}", flush=True)
    return jobs


def launch(suite: str, output_dir: str, workers: int, threads: int, max_attempts: int, dry_run: bool = False,
           progress_every: float = 10.0, executor: str = "local", slurm: SlurmOptions | None = None,
           wait: bool = True) -> dict[str, str]:
    """Run (or submit) every run of the suite that is not completed and not in flight; returns {run name: status}
    (runs still queued or running on a cluster are `submitted`)."""
    name, runs = load_suite(suite)
    check_runs(suite, runs)
    suite_dir = os.path.join(output_dir, name)
    if dry_run:
        for run in runs:
            print(" ".join(run.command(os.path.join(suite_dir, "runs"))))
        return {}
    for sub in ("runs", "logs", "attempts"):
        os.makedirs(os.path.join(suite_dir, sub), exist_ok=True)
    manifest = Manifest(os.path.join(suite_dir, "manifest.jsonl"))
    version = code_version()
    results, in_flight, todo = plan(runs, suite_dir, manifest, max_attempts, executor)
    print(f"{name}: {len(runs)} runs, {len(results)} already final, {len(in_flight)} in flight, "
          f"{len(todo)} to run", flush=True)
    if executor != "local":
        if todo:
            submit(todo, suite_dir, manifest, executor, slurm or SlurmOptions(), threads, max_attempts, version,
                   name, chunks=workers if executor == "submitit-local" else None)
        return watch(runs, suite_dir, manifest, max_attempts, executor, wait, progress_every)

    started = manifest.history()[0]
    lock = threading.Lock()
    t0, durations = time.time(), []

    def work(run: Run) -> str:
        def next_attempt() -> int:
            with lock:
                started[run.name] = started.get(run.name, 0) + 1
                return started[run.name]

        t = time.time()
        status = run_attempts(run, suite_dir, manifest, threads, version, max_attempts, next_attempt)
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
    report_unfinished(results, suite_dir)
    return results


def watch(runs: list[Run], suite_dir: str, manifest: Manifest, max_attempts: int, executor: str, wait: bool,
          every: float) -> dict[str, str]:
    """Progress of submitted runs, read from the run directories, the manifest and the queue; with `wait`, until
    nothing is in flight."""
    t0 = time.time()
    while True:
        final, in_flight, todo = plan(runs, suite_dir, manifest, max_attempts, executor)
        last = manifest.history()[1]
        running = sum(1 for r in in_flight if last.get(r) == "killed")  # started, no end record yet
        done = sum(1 for s in final.values() if s == "completed")
        print(f"[{time.time() - t0:6.0f}s] done {done}, failed {len(final) - done}, running {running}, "
              f"queued {len(in_flight) - running}, to resubmit {len(todo)}", flush=True)
        if not wait or not in_flight:
            break
        time.sleep(every)
    results = {**final, **{r: "submitted" for r in in_flight}}
    for run in todo:  # out of the queue without a final status, attempts left: the next launch resubmits it
        results[run.name] = manifest.history()[1].get(run.name, "lost")
    report_unfinished(results, suite_dir)
    if in_flight:
        print(f"{len(in_flight)} runs still queued or running: run the same command again to see progress "
              "(or add --wait)")
    return results


def report_unfinished(results: dict[str, str], suite_dir: str):
    for run_name, status in sorted(results.items()):
        if status not in ("completed", "submitted"):
            print(f"  not completed: {run_name}: {status} (logs in {os.path.join(suite_dir, 'logs')})")


def key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="a name under benchmark/suites/ or a path to a .toml file")
    parser.add_argument("--output-dir", default="benchmarks")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="parallel runs (local); parallel jobs (submitit-local)")
    parser.add_argument("--threads-per-run", type=int, default=1, help="OMP/MKL threads per run (0: unset)")
    parser.add_argument("--max-attempts", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                        help="local worker pool; a Slurm array job through submitit; submitit's local executor")
    slurm = parser.add_argument_group("Slurm (--executor slurm)")
    slurm.add_argument("--slurm-partition")
    slurm.add_argument("--slurm-time", type=int, default=60, help="time limit per job in minutes")
    slurm.add_argument("--slurm-gpus-per-node", type=int, default=0)
    slurm.add_argument("--slurm-cpus-per-task", type=int, help="default: --threads-per-run")
    slurm.add_argument("--slurm-mem-gb", type=float)
    slurm.add_argument("--slurm-array-parallelism", type=int, default=64, help="array tasks running at once")
    slurm.add_argument("--slurm-runs-per-job", type=int, default=1, help="runs done one after another per task")
    slurm.add_argument("--slurm-setup", action="append", default=[],
                       help="shell line run in the job before the runs (repeatable), e.g. 'source .venv/bin/activate'")
    slurm.add_argument("--slurm-extra", action="append", default=[], type=key_value,
                       help="any other sbatch option as KEY=VALUE (repeatable), e.g. account=myproject, qos=high")
    slurm.add_argument("--wait", action="store_true", help="stay until no submitted run is queued or running")
    slurm.add_argument("--poll", type=float, default=60.0, help="seconds between progress lines with --wait")
    args = parser.parse_args()
    if args.max_attempts < 1 or args.workers < 1 or args.threads_per_run < 0:
        parser.error("need --max-attempts >= 1, --workers >= 1 and --threads-per-run >= 0")
    options = SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus_per_node, args.slurm_cpus_per_task,
                           args.slurm_mem_gb, args.slurm_array_parallelism, args.slurm_runs_per_job,
                           args.slurm_setup, dict(args.slurm_extra))
    wait = args.wait or args.executor == "submitit-local"
    every = args.poll if args.executor == "slurm" else 2.0 if args.executor == "submitit-local" else 10.0
    try:
        results = launch(args.suite, args.output_dir, args.workers, args.threads_per_run, args.max_attempts,
                         args.dry_run, every, args.executor, options, wait)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if any(s not in ("completed", "submitted") for s in results.values()) else 0)


if __name__ == "__main__":
    main()
