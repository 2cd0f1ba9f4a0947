"""benchmark/measure.py: runs a script of algos/ and a CleanRL stand-in interleaved and prints one JSON line per run
plus a summary. No timing assertions (conventions, section 7): only what is printed and in which order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT, describe

FAKE_CLEANRL = """import sys
print("argv", sys.argv[1:])
print("SPS: 10")
print("SPS: 42")
"""


def run_measure(tmp_path, *flags):
    return subprocess.run([sys.executable, "-m", "benchmark.measure", "sps", *map(str, flags)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_interleaved_runs_and_json_lines(tmp_path):
    fake = tmp_path / "fake_cleanrl.py"
    fake.write_text(FAKE_CLEANRL)
    out = tmp_path / "out"
    proc = run_measure(tmp_path, "--script", "ppo.py", "--env-id", "CartPole-v1", "--total-timesteps", 256,
                       "--repeats", 2, "--threads", 1, "--cleanrl-script", fake, "--cleanrl-args", "--seed 7",
                       "--output-dir", out, "--", "--num-envs", 2, "--num-steps", 64, "--metrics-every", 0)
    assert proc.returncode == 0, describe(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [(r["side"], r["repeat"]) for r in runs] == [("ours", 0), ("cleanrl", 0), ("ours", 1), ("cleanrl", 1)]
    for r in runs:
        assert r["exit_status"] == 0 and r["wall_s"] > 0 and r["env_id"] == "CartPole-v1" and r["threads"] == 1
        assert r["total_timesteps"] == 256
        assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3
    ours = [r for r in runs if r["side"] == "ours"]
    for r in ours:
        assert r["script"] == "algos/ppo.py" and r["global_step"] == 256 and r["sps"] > 0
        assert r["command"][-6:] == ["--num-envs", "2", "--num-steps", "64", "--metrics-every", "0"]
        assert "--eval-episodes" in r["command"]
        run_dir = r["command"][r["command"].index("--run-name") + 1]
        assert os.path.isfile(out / run_dir / "summary.json")
    assert ours[0]["command"] != ours[1]["command"]  # each repetition has its own run directory
    for r in runs[1::2]:
        assert r["sps"] == 42  # CleanRL's last printed SPS line
        assert r["command"][1:] == [str(fake), "--env-id", "CartPole-v1", "--total-timesteps", "256", "--seed", "7"]
    assert summary["summary"] is True and summary["ours_runs_ok"] == 2 and summary["cleanrl_runs_ok"] == 2
    assert summary["cleanrl_median_sps"] == 42
    assert summary["sps_ratio"] == round(summary["ours_median_sps"] / 42, 2)
    assert os.path.isdir(out / "cleanrl")  # CleanRL's working directory (its runs/ go there)


def test_unknown_script_is_rejected(tmp_path):
    proc = run_measure(tmp_path, "--script", "nope.py", "--env-id", "CartPole-v1", "--total-timesteps", 256)
    assert proc.returncode != 0 and "--script must be one of" in proc.stderr and proc.stdout == ""
