"""benchmark/measure.py: runs a script of algos/ and a CleanRL stand-in interleaved and prints one JSON line per run
plus a summary. No timing assertions (conventions, section 7): only what is printed and in which order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT, assert_one_line_error, describe

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
    # DQN on CartPole at dqn.py's defaults: the 4-120-84-2 MLP, one greedy forward per step, and every 10th step
    # an update of batch 128 (the target network's forward, the online network's forward and backward)
    mlp = 2 * (4 * 120 + 120 * 84 + 84 * 2)
    mlp_in = 2 * (120 * 84 + 84 * 2)
    assert flops_per_env_step(ROOFLINE_CASES["dqn-cartpole"]) == mlp + round(0.1 * 128 * (mlp + 2 * mlp + mlp_in))


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


FAKE_OURS = """import argparse, json, os
p = argparse.ArgumentParser()
for flag in ("--env-id", "--total-timesteps", "--eval-episodes", "--output-dir", "--run-name"):
    p.add_argument(flag)
args = p.parse_args()
os.makedirs(os.path.join(args.output_dir, args.run_name))
with open(os.path.join(args.output_dir, args.run_name, "summary.json"), "w") as f:
    json.dump({"sps": 7, "global_step": int(args.total_timesteps)}, f)
"""


def test_env_id_with_a_slash_names_runs_without_a_subdirectory(tmp_path):
    """MinAtar/Breakout: the run name (and its log file) replaces the slash instead of pointing into a folder."""
    ours, fake = tmp_path / "fake_ours.py", tmp_path / "fake_cleanrl.py"
    ours.write_text(FAKE_OURS)
    fake.write_text(FAKE_CLEANRL)
    out = tmp_path / "out"
    proc = run_measure(tmp_path, "--script", ours, "--env-id", "MinAtar/Breakout", "--total-timesteps", 10,
                       "--repeats", 1, "--cleanrl-script", fake, "--output-dir", out)
    assert proc.returncode == 0, describe(proc)
    ours_row, cleanrl_row, summary = (json.loads(line) for line in proc.stdout.splitlines())
    name = ours_row["command"][ours_row["command"].index("--run-name") + 1]
    assert name.startswith("ours_fake_ours_MinAtar-Breakout_r0_") and os.path.isfile(out / (name + ".log"))
    assert ours_row["sps"] == 7 and cleanrl_row["sps"] == 42 and cleanrl_row["command"][3] == "MinAtar/Breakout"


# A stand-in for MinAtar's examples/dqn.py (GPL: never in this repository), with the names the peer runner uses.
FAKE_MINATAR_PEER = """import os
NUM_FRAMES = 5000000
STEP_SIZE = 0.00025
BATCH_SIZE = 32
END_EPSILON = 0.1


class Environment:
    def __init__(self, env_name):
        self.env_name = env_name


def dqn(env, replay_off, target_off, output_file_name, store_intermediate_result=False, load_path=None,
        step_size=STEP_SIZE):
    assert os.path.isdir(os.path.dirname(output_file_name)), output_file_name
    print("called", env.env_name, replay_off, target_off, output_file_name, store_intermediate_result, load_path,
          step_size, NUM_FRAMES)


if __name__ == "__main__":
    raise SystemExit("the peer's main must not run")
"""


def run_minatar_peer(*flags):
    return subprocess.run([sys.executable, "benchmark/peers/minatar_dqn.py", *map(str, flags)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_minatar_peer_runner_calls_the_peer_once_with_only_num_frames_changed(tmp_path):
    """benchmark/peers/minatar_dqn.py: loads the peer without its main, sets NUM_FRAMES, builds the env under the
    minatar game name, calls dqn() as the peer's main does (output into a temporary directory, removed after), and
    ends with a JSON line and an `SPS:` line."""
    fake = tmp_path / "examples_dqn.py"
    fake.write_text(FAKE_MINATAR_PEER)
    proc = run_minatar_peer("--peer-file", fake, "--env-id", "MinAtar/SpaceInvaders", "--total-timesteps", 1234)
    assert proc.returncode == 0, describe(proc)
    called, info, sps = proc.stdout.splitlines()
    _, game, replay_off, target_off, output, save, load, step_size, frames = called.split()
    assert (game, replay_off, target_off, save, load, step_size, frames) == (
        "space_invaders", "False", "False", "False", "None", "0.00025", "1234")
    assert os.path.basename(output) == "space_invaders" and not os.path.exists(os.path.dirname(output))
    info = json.loads(info)
    assert info["frames"] == 1234 and info["game"] == "space_invaders" and info["seconds"] >= 0
    assert info["hyperparameters"] == {"NUM_FRAMES": 1234, "STEP_SIZE": 0.00025, "BATCH_SIZE": 32, "END_EPSILON": 0.1}
    assert sps.startswith("SPS: ") and int(sps[len("SPS: "):]) > 0  # the last line, which measure.py reads


def test_minatar_peer_runner_rejects_bad_input_in_one_line(tmp_path):
    proc = run_minatar_peer("--peer-file", tmp_path / "x.py", "--env-id", "MinAtar/Pong", "--total-timesteps", 10)
    assert_one_line_error(proc, "unknown env id 'MinAtar/Pong'", "MinAtar/SpaceInvaders")
    proc = run_minatar_peer("--env-id", "MinAtar/Breakout", "--total-timesteps", 10)
    assert_one_line_error(proc, "--peer-file is required")
    proc = run_minatar_peer("--peer-file", tmp_path / "x.py", "--env-id", "MinAtar/Breakout", "--total-timesteps", 10)
    assert_one_line_error(proc, "does not exist")
    (tmp_path / "other.py").write_text("X = 1\n")
    proc = run_minatar_peer("--peer-file", tmp_path / "other.py", "--env-id", "MinAtar/Breakout", "--total-timesteps",
                            10)
    assert_one_line_error(proc, "does not look like MinAtar's examples/dqn.py", "dqn, NUM_FRAMES")


def test_measure_dqn_minatar_breakdown_and_replay_memory_run():
    """The MinAtar breakdown times its three parts and the Atari replay-memory command still builds its buffer
    (both load algos/dqn.py; a renamed argument there would break them)."""
    import json
    import subprocess
    import sys

    from helpers import REPO_ROOT

    script = os.path.join(REPO_ROOT, "benchmark", "measure_dqn.py")
    proc = subprocess.run([sys.executable, script, "minatar-breakdown", "--fill", "300", "--calls", "5",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["obs_shape"] == [4, 10, 10]
    assert all(out[k] > 0 for k in ("env_step_and_replay_add_us", "greedy_forward_us", "update_us"))
    assert 30 < out["update_mflop"] < 60  # hand count: ~11 MFLOP per forward of 32 grids, 2 forwards + backward
    proc = subprocess.run([sys.executable, script, "minatar-random", "--episodes", "3", "3", "1", "3", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["env_id"] for r in rows] == ["MinAtar/Asterix", "MinAtar/Breakout", "MinAtar/Freeway",
                                           "MinAtar/Seaquest", "MinAtar/SpaceInvaders"]
    assert [r["episodes"] for r in rows] == [3, 3, 1, 3, 3] and all(r["mean_return"] >= 0 for r in rows)
    proc = subprocess.run([sys.executable, script, "replay-memory", "--capacity", "2000"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["capacity"] == 2000
