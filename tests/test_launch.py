"""benchmark/launch.py: grid expansion, resume, retries, and fault injection (SIGKILLed runs, a killed launcher,
corrupt summaries). Runs are a small fake script that follows the output conventions, so these tests take seconds;
the real smoke suite runs at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import launch  # noqa: E402

FAKE = textwrap.dedent('''
    """Fake training script: writes runs/<name>/summary.json like algos/ scripts; behaviour per --mode."""
    import argparse, json, os, signal, time
    p = argparse.ArgumentParser()
    for flag in ("--env-id", "--output-dir", "--run-name", "--mode", "--counter-dir"):
        p.add_argument(flag)
    p.add_argument("--seed", type=int)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args()
    os.makedirs(a.counter_dir, exist_ok=True)
    counter = os.path.join(a.counter_dir, a.run_name)
    calls = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(calls))  # how many times this run was executed
    run_dir = os.path.join(a.output_dir, a.run_name)
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "partial.txt"), "w").write(f"call {calls}")
    print(f"run {a.run_name} call {calls}")
    time.sleep(a.sleep)
    if a.mode == "kill_once" and calls == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if a.mode == "always_kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if a.mode == "crash":
        raise RuntimeError("boom: a bug in the script")
    status = "diverged" if a.mode == "diverge" else "completed"
    json.dump({"status": status, "call": calls}, open(os.path.join(run_dir, "summary.json"), "w"))
    raise SystemExit(3 if status == "diverged" else 0)
''')


def make_suite(tmp_path, arms: list[tuple[str, str, float]], seeds=(1, 2)):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    lines = [f'name = "t"\nseeds = {list(seeds)}\n']
    for name, mode, sleep in arms:
        lines.append(textwrap.dedent(f'''
            [[arms]]
            name = "{name}"
            script = "{script}"
            env_ids = ["EnvA-v0", "EnvB-v0"]
            flags = ["--mode", "{mode}", "--counter-dir", "{tmp_path / 'calls'}", "--sleep", "{sleep}"]
            '''))
    path = tmp_path / "suite.toml"
    path.write_text("".join(lines))
    return str(path)


def calls(tmp_path, run: str) -> int:
    path = tmp_path / "calls" / run
    return int(path.read_text()) if path.exists() else 0


def manifest(out) -> list[dict]:
    with open(os.path.join(out, "t", "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grid_expansion(tmp_path):
    suite = make_suite(tmp_path, [("base", "ok", 0), ("method", "ok", 0)], seeds=(1, 2, 3))
    name, runs = launch.load_suite(suite)
    assert name == "t" and len(runs) == 2 * 2 * 3
    assert len({r.name for r in runs}) == len(runs)
    cmd = runs[0].command("/out")
    assert cmd[cmd.index("--run-name") + 1] == runs[0].name and cmd[cmd.index("--output-dir") + 1] == "/out"


def test_resume_never_reruns_completed_runs(tmp_path):
    suite, out = make_suite(tmp_path, [("base", "ok", 0)]), str(tmp_path / "out")
    first = launch.launch(suite, out, workers=2, threads=1, max_attempts=2, progress_every=0.2)
    assert set(first.values()) == {"completed"} and len(first) == 4
    second = launch.launch(suite, out, workers=2, threads=1, max_attempts=2, progress_every=0.2)
    assert second == first
    assert all(calls(tmp_path, run) == 1 for run in first)
    assert sum(r["event"] == "start" for r in manifest(out)) == 4


def test_killed_run_is_retried_and_failures_are_reported(tmp_path):
    suite = make_suite(tmp_path, [("flaky", "kill_once", 0), ("dead", "always_kill", 0), ("bug", "crash", 0),
                                  ("div", "diverge", 0)], seeds=(1,))
    out = str(tmp_path / "out")
    results = launch.launch(suite, out, workers=2, threads=1, max_attempts=3, progress_every=0.2)
    assert results["flaky__EnvA-v0__s1"] == "completed" and calls(tmp_path, "flaky__EnvA-v0__s1") == 2
    assert results["dead__EnvA-v0__s1"] == "killed" and calls(tmp_path, "dead__EnvA-v0__s1") == 3
    assert results["bug__EnvA-v0__s1"] == "failed" and calls(tmp_path, "bug__EnvA-v0__s1") == 3
    assert results["div__EnvA-v0__s1"] == "diverged" and calls(tmp_path, "div__EnvA-v0__s1") == 1  # final
    ends = [r for r in manifest(out) if r["event"] == "end"]
    dead = [r for r in ends if r["run"] == "dead__EnvA-v0__s1"]
    assert [r["attempt"] for r in dead] == [1, 2, 3] and all(r["exit_status"] == -signal.SIGKILL for r in dead)
    bug = [r for r in ends if r["run"] == "bug__EnvA-v0__s1"][-1]
    assert bug["exit_status"] == 1 and "boom: a bug in the script" in bug["log_tail"]
    # the completed retry's directory holds only the second attempt's files; the first attempt's are kept aside
    run_dir = os.path.join(out, "t", "runs", "flaky__EnvA-v0__s1")
    assert open(os.path.join(run_dir, "partial.txt")).read() == "call 2"
    assert os.path.exists(os.path.join(out, "t", "attempts", "flaky__EnvA-v0__s1.before_attempt2"))
    # a relaunch runs nothing: every run is final or out of attempts
    again = launch.launch(suite, out, workers=2, threads=1, max_attempts=3, progress_every=0.2)
    assert again == results and calls(tmp_path, "dead__EnvA-v0__s1") == 3


def test_corrupt_summary_is_rerun(tmp_path, capsys):
    suite, out = make_suite(tmp_path, [("base", "ok", 0)], seeds=(1,)), str(tmp_path / "out")
    launch.launch(suite, out, workers=1, threads=1, max_attempts=3, progress_every=0.2)
    summary = os.path.join(out, "t", "runs", "base__EnvA-v0__s1", "summary.json")
    with open(summary, "w") as f:
        f.write('{"status": "compl')  # torn write
    results = launch.launch(suite, out, workers=1, threads=1, max_attempts=3, progress_every=0.2)
    assert results["base__EnvA-v0__s1"] == "completed"
    assert calls(tmp_path, "base__EnvA-v0__s1") == 2 and calls(tmp_path, "base__EnvB-v0__s1") == 1
    assert "base__EnvA-v0__s1: summary.json is unreadable" in capsys.readouterr().out


def test_launcher_killed_and_restarted(tmp_path):
    """SIGKILL the launcher while runs are in flight: its children die with it; a restart completes the rest,
    and no run that had completed is executed again."""
    suite, out = make_suite(tmp_path, [("slow", "ok", 1.5)], seeds=(1, 2, 3)), str(tmp_path / "out")
    cmd = [sys.executable, "-m", "benchmark.launch", "--suite", suite, "--output-dir", out, "--workers", "2",
           "--max-attempts", "3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_dir = os.path.join(out, "t", "runs")
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until at least one run completed and others are in flight
        done = [d for d in os.listdir(runs_dir)] if os.path.isdir(runs_dir) else []
        if any(launch.read_status(os.path.join(runs_dir, d)) == "completed" for d in done):
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    completed_before = {d for d in os.listdir(runs_dir) if launch.read_status(os.path.join(runs_dir, d)) == "completed"}
    assert completed_before and len(completed_before) < 6
    results = launch.launch(suite, out, workers=2, threads=1, max_attempts=3, progress_every=0.2)
    assert len(results) == 6 and set(results.values()) == {"completed"}
    for run in completed_before:
        assert calls(tmp_path, run) == 1, f"{run} completed before the kill and was executed again"


def test_unknown_suite_is_a_one_line_error():
    with pytest.raises(launch.SuiteError, match="no suite"):
        launch.load_suite("no-such-suite")


def test_launcher_killed_between_a_run_and_its_end_record(tmp_path):
    """Killed with -9 just after a run finished: the run is complete on disk but its attempt has no end record. The
    relaunch does not run it again and writes the missing end record, marked reconciled, so the manifest does not
    read as a killed run."""
    suite, out = make_suite(tmp_path, [("base", "ok", 0)], seeds=(1,)), str(tmp_path / "out")
    launch.launch(suite, out, workers=1, threads=1, max_attempts=2, progress_every=0.2)
    records = manifest(out)
    lost = next(r for r in records if r["event"] == "end" and r["run"] == "base__EnvA-v0__s1")
    with open(os.path.join(out, "t", "manifest.jsonl"), "w") as f:  # the state the kill leaves behind
        f.writelines(json.dumps(r) + "\n" for r in records if r is not lost)
    path = os.path.join(out, "t", "manifest.jsonl")
    assert launch.Manifest(path).history()[1]["base__EnvA-v0__s1"] == "killed"
    results = launch.launch(suite, out, workers=1, threads=1, max_attempts=2, progress_every=0.2)
    assert results == {"base__EnvA-v0__s1": "completed", "base__EnvB-v0__s1": "completed"}
    assert calls(tmp_path, "base__EnvA-v0__s1") == 1
    ends = [r for r in manifest(out) if r["event"] == "end" and r["run"] == "base__EnvA-v0__s1"]
    assert len(ends) == 1 and ends[0]["reconciled"] and ends[0]["status"] == "completed" and ends[0]["attempt"] == 1
    assert launch.Manifest(path).history()[1]["base__EnvA-v0__s1"] == "completed"
    launch.launch(suite, out, workers=1, threads=1, max_attempts=2, progress_every=0.2)
    assert len(manifest(out)) == len(records)  # nothing more: reconciled once, nothing re-run


BAD_SUITES = {
    "an unknown script": ('[[arms]]\nname = "a"\nscript = "dqn_nosuch.py"\nenv_ids = ["CartPole-v1"]\n',
                          "dqn_nosuch.py"),
    "a flag without its value": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\n'
                                 'flags = ["--learning-rate"]\n', "--learning-rate"),
    "a flag the script lacks": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\n'
                                'flags = ["--no-such-flag", "1"]\n', "--no-such-flag"),
    "a flag the script's checks refuse": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\n'
                                          'flags = ["--batch-size", "0"]\n', "--batch-size"),
    # the arm's flags are parsed once and reused for its other env ids: each env id is still checked on its own
    "a bad second env id": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1", "Pendulum-v1"]\n',
                            "Pendulum-v1"),
    "duplicate arm names": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\n' * 2, "twice"),
    "an empty seed list": ('seeds = []\n[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\n',
                           "seeds"),
    "a misspelt key": ('[[arms]]\nname = "a"\nscript = "dqn.py"\nenv_ids = ["CartPole-v1"]\nflag = ["--seed"]\n',
                       "flag"),
    "broken TOML": ('[[arms]]\nname = "a\n', "TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suite_is_one_line_before_anything_runs(case, tmp_path):
    text, fragment = BAD_SUITES[case]
    suite = tmp_path / "bad.toml"
    suite.write_text('name = "bad"\n' + text)
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmark.launch", "--suite", str(suite), "--output-dir", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (proc.returncode, proc.stderr)
    assert fragment in lines[0], lines[0]
    assert not out.exists(), "the launcher created its output before refusing the suite"


def test_smoke_suite_end_to_end(tmp_path):
    """The real `smoke` suite (every script, a few hundred steps) through the launcher."""
    results = launch.launch("smoke", str(tmp_path), workers=2, threads=1, max_attempts=1, progress_every=5)
    assert results and set(results.values()) == {"completed"}, results
