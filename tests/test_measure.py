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


def test_against_another_of_our_scripts(tmp_path):
    """--against: the baseline side is another of our scripts with its own extra flags, interleaved with ours."""
    out = tmp_path / "out"
    proc = run_measure(tmp_path, "--script", "ppo_simplicial.py", "--against", "ppo.py", "--against-args",
                       "--num-envs 2 --num-steps 64 --metrics-every 0", "--env-id", "CartPole-v1",
                       "--total-timesteps", 256, "--repeats", 1, "--threads", 1, "--output-dir", out, "--",
                       "--num-envs", 2, "--num-steps", 64, "--metrics-every", 0, "--sem-placement", "actor")
    assert proc.returncode == 0, describe(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [(r["side"], r["script"]) for r in runs] == [("ours", "algos/ppo_simplicial.py"), ("against", "algos/ppo.py")]
    assert runs[0]["command"][-2:] == ["--sem-placement", "actor"] and "--sem-placement" not in runs[1]["command"]
    assert runs[1]["command"][-6:] == ["--num-envs", "2", "--num-steps", "64", "--metrics-every", "0"]
    for r in runs:
        assert r["exit_status"] == 0 and r["global_step"] == 256 and r["sps"] > 0
        run_dir = r["command"][r["command"].index("--run-name") + 1]
        assert os.path.isfile(out / run_dir / "summary.json")
    assert runs[0]["command"][runs[0]["command"].index("--run-name") + 1] != run_dir
    assert summary["ours_runs_ok"] == 1 and summary["against_runs_ok"] == 1 and "cleanrl_runs_ok" not in summary
    assert summary["sps_ratio"] == round(summary["ours_median_sps"] / summary["against_median_sps"], 2)


def test_two_baselines_are_rejected(tmp_path):
    fake = tmp_path / "fake_cleanrl.py"
    fake.write_text(FAKE_CLEANRL)
    proc = run_measure(tmp_path, "--script", "ppo.py", "--against", "ppo.py", "--cleanrl-script", fake,
                       "--env-id", "CartPole-v1", "--total-timesteps", 256)
    assert proc.returncode != 0 and "not both" in proc.stderr and proc.stdout == ""


def test_unknown_script_is_rejected(tmp_path):
    proc = run_measure(tmp_path, "--script", "nope.py", "--env-id", "CartPole-v1", "--total-timesteps", 256)
    assert proc.returncode != 0 and "--script must be one of" in proc.stderr and proc.stdout == ""


def test_roofline_flop_counts_match_the_layer_arithmetic():
    """FLOPs per env step of PPO on CartPole at CleanRL's settings, by hand: actor 4-64-64-2 and critic 4-64-64-1.
    Forward: 2 x (multiply-adds of every layer). Backward: a weight gradient for every layer (as many FLOPs as the
    forward) and an input gradient for every layer but the first (the observations need none). One forward per env
    step while acting, and 4 epochs of forward + backward per sample."""
    sys.path.insert(0, REPO_ROOT)
    from benchmark.measure import ROOFLINE_CASES, flops_per_env_step

    forward = 2 * (4 * 64 + 64 * 64 + 64 * 2 + 4 * 64 + 64 * 64 + 64 * 1)
    input_grads = 2 * (64 * 64 + 64 * 2 + 64 * 64 + 64 * 1)
    assert flops_per_env_step(ROOFLINE_CASES["ppo-cartpole"]) == forward + 4 * (2 * forward + input_grads)
    # SAC at batch 256: critic update (actor + 2 target critics forward; 2 critics forward + backward without the
    # input gradient) plus actor update (actor forward, 2 critics forward and backward incl. the action gradient
    # and, as in CleanRL, their weight gradients; actor backward) plus the alpha loss's actor forward
    q = 2 * (23 * 256 + 256 * 256 + 256 * 1)
    q_in = 2 * (256 * 256 + 256 * 1) + 2 * 256 * 23  # input gradients down to the (obs, action) input
    pi = 2 * (17 * 256 + 256 * 256 + 256 * 6 * 2)
    pi_in = 2 * (256 * 256 + 256 * 6 * 2)
    critic = pi + 2 * q + 2 * (q + q + (q_in - 2 * 256 * 23))
    actor = pi + 2 * (q + q + q_in) + (pi + pi_in) + pi
    assert flops_per_env_step(ROOFLINE_CASES["sac-halfcheetah"]) == 256 * (critic + actor)


def test_roofline_prints_what_a_target_asks():
    proc = subprocess.run([sys.executable, "-m", "benchmark.measure", "roofline", "--threads", "1", "--cases",
                           "ppo-cartpole", "--baseline-sps", "ppo-cartpole=100000", "--speedup", "3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    peak, row = (json.loads(line) for line in proc.stdout.splitlines())
    assert peak["gemm_fp32_gflops"] > 0 and peak["threads"] == 1
    assert row["case"] == "ppo-cartpole" and row["target_sps"] == 300000
    assert row["target_gflops"] == round(300000 * row["flops_per_env_step"] / 1e9, 1)
    ratio = row["target_gflops"] / peak["gemm_fp32_gflops"]  # both rounded: compare to within their rounding
    assert abs(row["target_fraction_of_gemm_peak"] - ratio) <= 0.01 + 0.002 * ratio
