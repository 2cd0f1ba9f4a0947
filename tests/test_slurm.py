"""benchmark/launch.py on Slurm without a cluster: a fake `sbatch` and `squeue` on PATH (tests/fake_slurm/) that
record each submitted script and run its array tasks in the background like a node would, and submitit's local
executor. Checks the sbatch options, one run per array task through submitit, the manifest's job records,
retries inside a job, resume, a lost node, and that a run still queued or running is never submitted twice."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

from test_launch import calls, make_suite, manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_SLURM = os.path.join(ROOT, "tests", "fake_slurm")


def launcher(suite: str, out: str, state, *flags: str, timeout: float = 120):
    env = dict(os.environ, PATH=FAKE_SLURM + os.pathsep + os.environ["PATH"], FAKE_SLURM_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "benchmark.launch", "--suite", suite, "--output-dir", out, *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def submitted(state) -> list[str]:
    return sorted(glob.glob(os.path.join(state, "submitted", "*.sh")))


def wait_until(predicate, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_slurm_array_job_through_fake_sbatch(tmp_path):
    suite = make_suite(tmp_path, [("base", "ok", 0), ("flaky", "kill_once", 0)])
    out, state = str(tmp_path / "out"), tmp_path / "slurm"
    proc = launcher(suite, out, state, "--executor", "slurm", "--wait", "--poll", "0.5", "--max-attempts", "2",
                    "--slurm-partition", "debug", "--slurm-time", "30", "--slurm-gpus-per-node", "1",
                    "--slurm-array-parallelism", "3", "--slurm-extra", "account=proj", "--slurm-setup",
                    "export FROM_SETUP=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scripts = submitted(state)
    assert len(scripts) == 1, "one array job for the whole grid"
    text = open(scripts[0]).read()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --array=0-7%3", "#SBATCH --account=proj", "#SBATCH --cpus-per-task=1",
                 "export FROM_SETUP=1", f"cd {ROOT}"):
        assert line in text, f"{line!r} missing from the sbatch script:\n{text}"
    records = manifest(out)
    runs = {r["run"] for r in records if r["event"] == "submit"}
    assert len(runs) == 8
    job = records[[r["event"] for r in records].index("submit")]["job_id"].split("_")[0]
    # every run ran inside its own array task and says so in the manifest
    starts = [r for r in records if r["event"] == "start"]
    assert all(r["job_id"].startswith(job + "_") for r in starts)
    assert len({r["job_id"] for r in starts}) == 8
    for run in runs:
        assert calls(tmp_path, run) == (2 if run.startswith("flaky") else 1)  # killed once, retried in the job
        assert json.load(open(os.path.join(out, "t", "runs", run, "summary.json")))["status"] == "completed"
    # resume: nothing left to do, nothing submitted
    again = launcher(suite, out, state, "--executor", "slurm")
    assert again.returncode == 0 and "8 already final, 0 in flight, 0 to run" in again.stdout, again.stdout
    assert len(submitted(state)) == 1


def test_in_flight_runs_are_not_resubmitted_and_a_lost_node_is_retried(tmp_path):
    # 6 s runs: the node must be lost while they still run, after two launcher calls (on a machine loaded by CI and a
    # suite together, 3 s runs had finished by then once: no queue entry left to kill)
    suite = make_suite(tmp_path, [("slow", "ok", 6.0)], seeds=(1,))
    out, state = str(tmp_path / "out"), tmp_path / "slurm"
    first = launcher(suite, out, state, "--executor", "slurm", "--max-attempts", "2")  # no --wait: returns at once
    assert first.returncode == 0 and "submitted 2 runs" in first.stdout, first.stdout + first.stderr
    assert wait_until(lambda: sum(r["event"] == "start" for r in manifest(out)) == 2)
    # the manifest's start record comes before the script counts its call: on a loaded machine the kill below could
    # otherwise land in between, and that run would be called once in all (seen once in .ci/run)
    assert wait_until(lambda: all(calls(tmp_path, run) == 1 for run in ("slow__EnvA-v0__s1", "slow__EnvB-v0__s1")))
    second = launcher(suite, out, state, "--executor", "slurm", "--max-attempts", "2")
    assert "0 to run" in second.stdout and "2 in flight" in second.stdout, second.stdout + second.stderr
    assert len(submitted(state)) == 1
    # the node is lost: the fake Slurm runner and everything under it are SIGKILLed mid-run
    runner = int(open(glob.glob(os.path.join(state, "queue", "*"))[0]).read())
    os.killpg(runner, signal.SIGKILL)
    assert wait_until(lambda: subprocess.run(["pgrep", "-g", str(runner)], capture_output=True).returncode != 0)
    third = launcher(suite, out, state, "--executor", "slurm", "--max-attempts", "2", "--wait", "--poll", "0.5")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "2 to run" in third.stdout and len(submitted(state)) == 2
    for run in ("slow__EnvA-v0__s1", "slow__EnvB-v0__s1"):
        assert calls(tmp_path, run) == 2
        attempts = [r["attempt"] for r in manifest(out) if r["event"] == "start" and r["run"] == run]
        assert attempts == [1, 2]  # the lost attempt counts
    # out of attempts after another loss: reported, not resubmitted
    fourth = launcher(suite, out, state, "--executor", "slurm", "--max-attempts", "2")
    assert "2 already final" in fourth.stdout and len(submitted(state)) == 2


def test_submitit_local_executor(tmp_path):
    suite = make_suite(tmp_path, [("base", "ok", 0), ("div", "diverge", 0)], seeds=(1,))
    out = str(tmp_path / "out")
    proc = launcher(suite, out, tmp_path / "unused", "--executor", "submitit-local", "--workers", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a diverged run is not completed: exit status 1
    assert "not completed: div__EnvA-v0__s1: diverged" in proc.stdout
    records = manifest(out)
    jobs = {r["job_id"] for r in records if r["event"] == "submit"}
    assert len(jobs) == 2  # 4 runs packed into --workers jobs
    assert {r["job_id"] for r in records if r["event"] == "start"} == jobs
    assert all(calls(tmp_path, run) == 1 for run in {r["run"] for r in records if r["event"] == "submit"})
    again = launcher(suite, out, tmp_path / "unused", "--executor", "submitit-local", "--workers", "2")
    assert "4 already final" in again.stdout and sum(r["event"] == "start" for r in manifest(out)) == 4
