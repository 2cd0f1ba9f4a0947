"""Bad input, every script (docs/conventions.md, section 10): each bad flag or bad file gets one `error:` line on stderr
naming the flag, exit status 2, no traceback, and never a run directory that reads as a completed run.

The scripts are discovered (`algo_scripts()`), so a new script is covered the day it lands; its flags come from its
smoke arm (tests/script_budgets.py). The matrix:
- unknown env ids and env ids of a family the script cannot run (a discrete-action script given a continuous task and
  the reverse, an Atari-only script given a vector task);
- every integer flag at -1 (no count, budget, period or seed of these scripts is negative), and zero budgets;
- contradictory flags (a task sequence without --steps-per-task);
- an output directory that cannot be created;
- checkpoints: empty, random bytes, a pickle that safe loading refuses (the error must not advise
  `weights_only=False`), a foreign torch file, one of the script's own with a tensor of the wrong shape or trained on
  another task, and one written by another script of the same family (accepted exactly when the two networks have
  the same parameter names and shapes). The JAX twins (`*_jax.py`) write `model.msgpack` (flax's msgpack, nested
  parameter dicts named `Dense_0/kernel`) instead of `model.pt`: the same cases in that format.

The scripts run in this process through their `main()` (argv patched), so each case costs milliseconds to a second
instead of a subprocess's imports; the one-line contract is checked on what `main()` writes to stderr.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import typing

import numpy as np
import pytest
import torch

from helpers import algo_scripts, call_main, load_script, read_json
from script_budgets import TINY_ARGS

SCRIPTS = algo_scripts()

# What each family runs, by the script's name prefix: tasks it must refuse (with a word the error must contain).
# A new family fails test_every_script_has_a_family until it is added here.
FOREIGN_TASKS = {
    "dqn": [("Pendulum-v1", "discrete")],
    "bbf": [("Pendulum-v1", "Atari"), ("CartPole-v1", "Atari")],
    "sac": [("CartPole-v1", "continuous")],
    "ppo": [],  # discrete and continuous actions, vector and pixel observations: nothing to refuse by family
    "stream": [],  # stream_q.py refuses continuous actions, stream_ac.py pixels: tested in their own test files
    "cale": [("CartPole-v1", "Atari"), ("MinAtar/Breakout", "Atari"), ("HalfCheetah-v4", "Atari")],  # Atari only
    "dqn_jax": [("Pendulum-v1", "discrete")],
    "ppo_jax": [],  # as ppo.py: nothing to refuse by family
}


def family(name: str) -> str:
    if name.removesuffix(".py").endswith("_cale"):  # the continuous-Atari bases (sac_cale.py, ppo_cale.py)
        return "cale"
    if is_jax(name):  # each JAX twin is a family of its own: no other script reads its checkpoints
        return name.removesuffix(".py")
    return name.split("_")[0].removesuffix(".py")


def is_jax(name: str) -> bool:
    return name.removesuffix(".py").endswith("_jax")


def model_file(name: str) -> str:
    return "model.msgpack" if is_jax(name) else "model.pt"


def load_checkpoint(path: str) -> dict:
    """A --save-model checkpoint as a dict whose "model" maps "/"-joined parameter names to arrays or tensors."""
    if not str(path).endswith(".msgpack"):
        return torch.load(path, weights_only=True)
    from flax.serialization import msgpack_restore
    with open(path, "rb") as f:
        checkpoint = msgpack_restore(f.read())
    return dict(checkpoint, model=flatten(checkpoint["model"]))


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write `checkpoint` (as load_checkpoint returns it) in the format its file name says."""
    if not str(path).endswith(".msgpack"):
        torch.save(checkpoint, path)
        return
    from flax.serialization import msgpack_serialize
    model = checkpoint.get("model")
    with open(path, "wb") as f:
        f.write(msgpack_serialize(dict(checkpoint, model=unflatten(model)) if isinstance(model, dict) else checkpoint))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def tiny_args(name: str) -> list[str]:
    return [str(x) for x in TINY_ARGS[name]] + ["--xla-threads" if is_jax(name) else "--torch-threads", "1"]


def env_id_of(name: str) -> str:
    args = TINY_ARGS[name]
    return args[args.index("--env-id") + 1]


def assert_rejected(case: str, code: int, lines: list[str], fragments: tuple[str, ...], out_dir: str):
    """The contract for one bad input: exit 2, one `error:` line holding each fragment, no traceback, and no run
    directory under `out_dir` that reads as completed (a run directory that exists has status failed)."""
    assert code == 2, f"{case}: exit status {code}, stderr {lines}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{case}: expected one error line, got {lines}"
    for fragment in fragments:
        assert fragment in lines[0], f"{case}: {fragment!r} not in {lines[0]!r}"
    for summary_path in glob.glob(os.path.join(out_dir, "*", "summary.json")):
        summary = read_json(summary_path)
        assert summary["status"] == "failed" and summary.get("error"), f"{case}: {summary_path} says {summary}"
    assert not glob.glob(os.path.join(out_dir, "*", "model.*")), f"{case}: a model was saved"


def check_cases(run_case, cases) -> None:
    """Run every case (`run_case(k, *case)`) and report all that break the contract at once, not just the first."""
    broken = []
    for k, case in enumerate(cases):
        try:
            run_case(k, *case)
        except Exception as exc:  # an assertion, or a traceback the script let through
            broken.append(f"{case[0]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    assert not broken, f"{len(broken)} of {len(cases)} bad inputs broke the contract:\n" + "\n".join(broken)


def int_fields(module) -> list[str]:
    hints = typing.get_type_hints(module.Args)
    return [f.name for f in dataclasses.fields(module.Args)
            if int in (typing.get_args(hints[f.name]) or (hints[f.name],)) and hints[f.name] is not bool]


def test_every_script_has_a_family():
    missing = [name for name in SCRIPTS if family(name) not in FOREIGN_TASKS]
    assert not missing, f"add the family of {missing} to FOREIGN_TASKS in tests/test_bad_input.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_flags(name, tmp_path, capsys):
    module = load_script(name)
    base = tiny_args(name)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    cases = [("unknown env id", ["--env-id", "NoSuchEnv-v0"], ("NoSuchEnv-v0",))]
    cases += [(f"{task}, another family", ["--env-id", task], (task, word))
              for task, word in FOREIGN_TASKS[family(name)]]
    cases += [(f"{flag(field)} -1", [flag(field), -1], (flag(field),)) for field in int_fields(module)]
    cases += [(f"{flag(field)} 0", [flag(field), 0], (flag(field),)) for field in ("total_timesteps", "num_envs")]
    if "env_ids" in fields:
        cases.append(("a task sequence without --steps-per-task", ["--env-ids", env_id_of(name), env_id_of(name)],
                      ("--steps-per-task",)))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cases.append(("an output directory under a file", ["--output-dir", blocker / "runs"], ("--output-dir",)))

    def run_case(k, case, extra, fragments):
        out_dir = str(tmp_path / f"case{k}")
        code, lines = call_main(module, [*base, "--output-dir", out_dir, "--run-name", "bad", *extra], capsys)
        assert_rejected(f"{name} {case}", code, lines, fragments, out_dir)

    check_cases(run_case, cases)


# --- checkpoints -------------------------------------------------------------------------------------------------

_CHECKPOINTS: dict[str, str] = {}


def own_checkpoint(name: str, tmp_path_factory, capsys) -> str:
    """model.pt (model.msgpack for a JAX twin) of a smoke-budget run of `name` (one per script and test process)."""
    if name not in _CHECKPOINTS:
        out_dir = str(tmp_path_factory.mktemp(f"ckpt_{name[:-3]}"))
        code, lines = call_main(load_script(name), [*tiny_args(name), "--save-model", "--eval-episodes", 0,
                                                     "--metrics-every", 0, "--output-dir", out_dir,
                                                     "--run-name", "run"], capsys)
        assert code == 0, f"{name} smoke run with --save-model failed: {lines}"
        _CHECKPOINTS[name] = os.path.join(out_dir, "run", model_file(name))
    return _CHECKPOINTS[name]


def signature(path: str) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in load_checkpoint(path)["model"].items()}


class NotSafe:
    """An arbitrary class: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_checkpoints(name, tmp_path, tmp_path_factory, capsys):
    module = load_script(name)
    own = own_checkpoint(name, tmp_path_factory, capsys)
    checkpoint = load_checkpoint(own)
    assert checkpoint["script"] == name
    suffix = os.path.splitext(own)[1]

    files = {}
    files["empty"] = tmp_path / f"empty{suffix}"
    files["empty"].write_bytes(b"")
    files["random bytes"] = tmp_path / f"random{suffix}"
    files["random bytes"].write_bytes(os.urandom(4096))
    files["unsafe pickle"] = tmp_path / f"unsafe{suffix}"
    torch.save({"model": NotSafe()}, files["unsafe pickle"])  # a pickle: a JAX twin must refuse it as unreadable
    files["foreign torch file"] = tmp_path / f"foreign{suffix}"  # for a JAX twin, a foreign msgpack file
    save_checkpoint({"weights": torch.zeros(3) if suffix == ".pt" else np.zeros(3)}, files["foreign torch file"])
    key = next(k for k, v in checkpoint["model"].items() if v.ndim >= 1)
    wrong = np.zeros(checkpoint["model"][key].shape[0] + 1, np.float32)  # one more row than the network has
    wrong_shape = dict(checkpoint, model=dict(checkpoint["model"], **{key: torch.from_numpy(wrong) if suffix == ".pt"
                                                                       else wrong}))
    files["wrong shape"] = tmp_path / f"wrong_shape{suffix}"
    save_checkpoint(wrong_shape, files["wrong shape"])
    other_task = "Acrobot-v1" if env_id_of(name) != "Acrobot-v1" else "CartPole-v1"
    files["another task"] = tmp_path / f"other_task{suffix}"
    save_checkpoint(dict(checkpoint, args=dict(checkpoint["args"], env_id=other_task, env_ids=None)),
                    files["another task"])
    expected = {"empty": (), "random bytes": (), "unsafe pickle": (), "foreign torch file": (),
                "wrong shape": (key,), "another task": (other_task,)}

    def run_case(k, case, path):
        out_dir = str(tmp_path / f"case{k}")
        code, lines = call_main(module, [*tiny_args(name), "--eval-checkpoint", path, "--output-dir", out_dir,
                                         "--run-name", "eval"], capsys)
        assert_rejected(f"{name}, {case} checkpoint", code, lines, ("--eval-checkpoint", *expected[case]), out_dir)
        assert "weights_only" not in lines[0], f"{name}: the error advises unsafe loading: {lines[0]}"

    check_cases(run_case, list(files.items()))


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoint_of_a_sibling_script(name, tmp_path, tmp_path_factory, capsys):
    """A checkpoint of another script of the same family, trained on this script's smoke task: evaluated when the two
    networks have the same parameter names and shapes, else one line naming the script that wrote it or the flags
    that would build its network."""
    siblings = [other for other in SCRIPTS if other != name and family(other) == family(name)
                and env_id_of(other) == env_id_of(name)]
    if not siblings:
        pytest.skip(f"no other script of {name}'s family has a smoke arm on {env_id_of(name)}")
    other = siblings[(sorted(siblings + [name]).index(name)) % len(siblings)]  # spread the pairs over the family
    theirs = own_checkpoint(other, tmp_path_factory, capsys)
    ours = own_checkpoint(name, tmp_path_factory, capsys)
    out_dir = str(tmp_path / "runs")
    code, lines = call_main(load_script(name), [*tiny_args(name), "--eval-checkpoint", theirs, "--eval-episodes", 1,
                                                "--output-dir", out_dir, "--run-name", "eval"], capsys)
    if signature(theirs) == signature(ours):
        assert code == 0, f"{name} refused {other}'s checkpoint of the same network: {lines}"
        assert read_json(os.path.join(out_dir, "eval", "summary.json"))["status"] == "completed"
    else:
        # the line names the script that wrote the file, or (an intervention's own check) the flags that would match it
        assert_rejected(f"{name} given {other}'s checkpoint", code, lines, ("checkpoint",), out_dir)
        assert other in lines[0] or " --" in lines[0], f"{name}: {lines[0]!r} names neither {other} nor a flag"
