"""Shared helpers for the test suite (imported by conftest.py and the test modules).

The scripts in algos/ are standalone files, not a package, so they are loaded by path.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runs import read_csv, read_json  # noqa: E402,F401  (re-exported for the tests)
from utils.runs import read_scalars as read_scalar_events  # noqa: E402
from utils.scripts import ALGOS as ALGOS_DIR  # noqa: E402,F401
from utils.scripts import ROOT as REPO_ROOT  # noqa: E402,F401
from utils.scripts import algo_scripts, load_script, script_path  # noqa: E402,F401


def run_script(script: str, args: list[str], cwd: str, env: dict | None = None, timeout: float = 300):
    """Run `python <script> <args>` as a subprocess with this interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


_WARNING_LINE = re.compile(r"^.*:\d+: \w*Warning: ")


def stderr_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines without Python warnings (a `file:line: XWarning: msg` line plus the indented source
    line that follows it; gymnasium emits harmless "Box precision lowered" ones)."""
    out, skip_source = [], False
    for line in stderr.splitlines():
        if _WARNING_LINE.match(line):
            skip_source = True
            continue
        if skip_source and line.startswith((" ", "\t")):
            skip_source = False
            continue
        skip_source = False
        if line.strip():
            out.append(line)
    return out


def describe(proc) -> str:
    """A failure message showing what a subprocess printed."""
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run directory: tag -> [(step, value), ...]."""
    events = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {run_dir}"
    return {tag: [(e.step, e.value) for e in evs] for tag, evs in read_scalar_events(run_dir).items()}


def assert_one_line_error(proc, *fragments: str) -> str:
    """A bad-input failure: exit status 2, no traceback, exactly one `error: ...` line holding every fragment."""
    assert proc.returncode == 2, describe(proc)  # UserError: exit status 2
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_seed_determinism(run, tmp_path, *flags) -> dict[str, str]:
    """Three runs through `run(tmp_path, name, *flags, "--seed", seed)`, seeds 5, 5 and 6: the two seed-5 runs write
    byte-identical episodes.csv, the seed-6 run a different one. Returns {name: run directory}."""
    runs, dirs = {}, {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        proc = run(tmp_path, name, *flags, "--seed", seed)
        assert proc.returncode == 0, describe(proc)
        dirs[name] = os.path.join(str(tmp_path), name)
        with open(os.path.join(dirs[name], "episodes.csv"), "rb") as f:
            runs[name] = f.read()
        assert read_json(os.path.join(dirs[name], "summary.json"))["num_updates"] > 0
    assert runs["a"].count(b"\n") > 10
    assert runs["a"] == runs["b"], "two runs with the same seed wrote different episodes.csv"
    assert runs["a"] != runs["c"], "runs with different seeds wrote the same episodes.csv"
    return dirs


def assert_diverged_cleanly(proc, run_dir: str) -> dict:
    """A non-finite loss: exit status 3, no traceback, one `error:` line, summary status "diverged" with a
    "non-finite" error. Returns the summary."""
    assert proc.returncode == 3, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "diverged", summary
    assert "non-finite" in summary["error"]
    return summary


def run_in_process(module, out_dir, name: str, env_id: str, settings: dict, **changes) -> str:
    """Run a script's `run()` in this process (a subprocess costs ~6 s of imports) on the CPU with one torch thread:
    `Args(env_id=env_id, **settings, **changes)`, outputs in `<out_dir>/<name>`. Returns that run directory. The
    conftest.py fixture `restore_torch_threads` puts the test process's thread count back afterwards."""
    args = module.Args(env_id=env_id, **{**settings, **changes}, device="cpu", torch_threads=1,
                       output_dir=str(out_dir), run_name=name)
    module.run(args)
    return os.path.join(str(out_dir), name)


# The DQN family's smoke settings (benchmark/suites/smoke.toml's dqn, dqn_minatar and dqn_atari arms), shared by the
# in-process runs of tests/test_dqn_gap.py, test_dqn_softmoe.py, test_dqn_pruning.py and test_dqn_rigl.py.
DQN_SMOKE = {
    "CartPole-v1": dict(total_timesteps=600, learning_starts=200, buffer_size=1000, batch_size=32, eval_episodes=2,
                        metrics_every=10, log_every=10),
    "MinAtar/Breakout": dict(total_timesteps=400, learning_starts=200, buffer_size=1000, batch_size=32,
                             eval_episodes=1, metrics_every=10),
    "Breakout-v5": dict(total_timesteps=400, num_envs=2, learning_starts=200, buffer_size=2000, max_episode_steps=100,
                        eval_episodes=1, metrics_every=10, metrics_batch_size=64),
}


def run_dqn_smoke(module, out_dir, name: str, env_id: str, **changes) -> str:
    """`run_in_process` with the DQN family's smoke settings for `env_id` (DQN_SMOKE), changed by `changes`."""
    return run_in_process(module, out_dir, name, env_id, DQN_SMOKE[env_id], **changes)


# A tiny in-process SAC run (Hopper-v4, 300 steps learning from step 100), shared by tests/test_sac_reset.py,
# tests/test_sac_regrama.py and tests/test_sac_optimistic.py.
SAC_FLAGS = dict(env_id="Hopper-v4", total_timesteps=300, learning_starts=100, buffer_size=1000, batch_size=32,
                 device="cpu", log_every=10, eval_episodes=0, seed=4, torch_threads=1)


def run_sac_in_process(module, tmp_path, name: str, **flags) -> tuple[bytes, str, dict]:
    """`module.run(Args(**SAC_FLAGS, **flags))` into `<tmp_path>/<name>`; asserts it completed and returns (its
    episodes.csv bytes, the run directory, the summary)."""
    args = module.Args(**{**SAC_FLAGS, "output_dir": str(tmp_path), "run_name": name, **flags})
    summary = module.run(args)
    assert summary["status"] == "completed", summary
    run_dir = os.path.join(str(tmp_path), name)
    with open(os.path.join(run_dir, "episodes.csv"), "rb") as f:
        return f.read(), run_dir, summary


def assert_same_run(base_dir: str, ours_dir: str, what: str, min_lines: int = 10,
                    keys=("num_updates", "num_episodes", "final_train_return", "eval_returns")):
    """A switched-off intervention is its base script: byte-identical episodes.csv (with more than `min_lines`
    episodes, so the comparison is not vacuous) and the same summary.json `keys`. `what` names the run in the
    failure message, e.g. "dqn_reset.py --reset-period 0"."""
    with open(os.path.join(base_dir, "episodes.csv"), "rb") as a:
        expected = a.read()
    with open(os.path.join(ours_dir, "episodes.csv"), "rb") as b:
        got = b.read()
    assert expected.count(b"\n") > min_lines
    assert got == expected, f"{what} wrote another episodes.csv than its base script"
    base_summary = read_json(os.path.join(base_dir, "summary.json"))
    summary = read_json(os.path.join(ours_dir, "summary.json"))
    for key in keys:
        assert summary[key] == base_summary[key], key


def call_main(module, argv: list[str], capsys) -> tuple[int, list[str]]:
    """`module.main()` with `argv` as the command line, in this process (a subprocess costs ~6 s of imports);
    returns (exit status, non-empty stderr lines without Python warnings, as stderr_lines)."""
    capsys.readouterr()
    saved, sys.argv = sys.argv, [module.__file__, *map(str, argv)]
    try:
        module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return code, stderr_lines(capsys.readouterr().err)


def synthetic_rollout(seed: int, num_steps: int = 40, num_envs: int = 4):
    """A synthetic PPO rollout (test_ppo_units.py, test_ppo_jax.py) with EnvPool's next-step auto-reset: after every
    done step comes an invalid step with reward 0. Env 0 starts with an auto-reset step (the previous rollout ended
    with a done). Returns (rewards, values, next_value, terminated, done, valid)."""
    rng = np.random.default_rng(seed)
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)
    terminated = np.zeros((num_steps, num_envs), dtype=np.float32)
    done = np.zeros((num_steps, num_envs), dtype=np.float32)
    valid = np.zeros((num_steps, num_envs), dtype=bool)
    for e in range(num_envs):
        prev_done = e == 0
        for t in range(num_steps):
            valid[t, e] = not prev_done
            if valid[t, e]:
                rewards[t, e] = rng.normal()
                done[t, e] = rng.random() < 0.2
                terminated[t, e] = done[t, e] and rng.random() < 0.5
            prev_done = bool(done[t, e])
    values = rng.normal(size=(num_steps, num_envs)).astype(np.float32)
    next_value = rng.normal(size=num_envs).astype(np.float32)
    assert done.sum() > 5 and (done - terminated).sum() > 2 and terminated.sum() > 2  # all cases present
    return rewards, values, next_value, terminated, done, valid
