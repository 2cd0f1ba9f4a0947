"""What the two JAX twins (algos/dqn_jax.py, algos/ppo_jax.py) share with their torch bases and with each other
(docs/conventions.md, section 1): the same flags and defaults, resolved alike per family; no torch import; the
duplicated TensorBoard writer the same in both. Each twin's own mechanics are tested in its own test file."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest

from helpers import ALGOS_DIR, load_script

TWINS = {"dqn_jax.py": "dqn.py", "ppo_jax.py": "ppo.py"}
# The documented differences of the flags (docs/conventions.md, section 1): XLA's threads for torch's, and no
# torch-deterministic switch (XLA on the CPU is deterministic).
ONLY_TORCH = {"torch_threads", "torch_deterministic"}
ONLY_JAX = {"xla_threads"}
# Tasks on which both resolve their defaults (one per family the twin supports).
FAMILY_TASKS = {"dqn_jax.py": ["CartPole-v1", "MinAtar/Breakout", "Breakout-v5"],
                "ppo_jax.py": ["CartPole-v1", "Pendulum-v1", "Breakout-v5", "MinAtar/Breakout"]}


def fields(module) -> dict:
    return {f.name: f for f in dataclasses.fields(module.Args)}


@pytest.mark.parametrize("twin", TWINS)
def test_same_flags_and_defaults_as_the_torch_script(twin):
    jax_args, torch_args = fields(load_script(twin)), fields(load_script(TWINS[twin]))
    assert set(torch_args) - set(jax_args) == ONLY_TORCH, f"{twin} lacks {set(torch_args) - set(jax_args) - ONLY_TORCH}"
    assert set(jax_args) - set(torch_args) == ONLY_JAX, f"{twin} adds {set(jax_args) - set(torch_args) - ONLY_JAX}"
    for name in set(jax_args) & set(torch_args) - {"exp_name"}:
        a, b = jax_args[name], torch_args[name]
        default_a = a.default_factory() if a.default is dataclasses.MISSING else a.default
        default_b = b.default_factory() if b.default is dataclasses.MISSING else b.default
        assert default_a == default_b, f"--{name}: {twin} {default_a!r}, {TWINS[twin]} {default_b!r}"


@pytest.mark.parametrize("twin", TWINS)
def test_defaults_resolve_alike_per_family(twin):
    jax_module, torch_module = load_script(twin), load_script(TWINS[twin])
    for env_id in FAMILY_TASKS[twin]:
        resolved = [resolved_args(m, env_id) for m in (jax_module, torch_module)]
        common = set(resolved[0]) & set(resolved[1]) - {"exp_name"}
        differ = {k: (resolved[0][k], resolved[1][k]) for k in common if resolved[0][k] != resolved[1][k]}
        assert not differ, f"{twin} vs {TWINS[twin]} on {env_id}: {differ}"


def resolved_args(module, env_id: str) -> dict:
    """The flags after `resolve_args` filled in the family defaults (it fills them in place), with the family."""
    args = module.Args(env_id=env_id)
    _, family = module.resolve_args(args)
    return dict(dataclasses.asdict(args), family=family)


@pytest.mark.parametrize("twin", TWINS)
def test_no_torch_import(twin):
    with open(os.path.join(ALGOS_DIR, twin)) as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {"jax", "flax", "optax"} <= imported, imported
    assert "torch" not in imported, f"{twin} imports torch"


def test_the_tensorboard_writer_is_one_copy():
    """Duplicated by design (standalone scripts); the copies must not drift apart."""
    sources = {twin: inspect.getsource(load_script(twin).SummaryWriter) for twin in TWINS}
    assert len(set(sources.values())) == 1, "the SummaryWriter classes of the JAX twins differ"


def test_start_jax_is_one_copy():
    sources = {twin: inspect.getsource(load_script(twin).start_jax) for twin in TWINS}
    normalised = {re.sub(r"docs/\w+\.md, detail \d+", "DOCS", source) for source in sources.values()}
    assert len(normalised) == 1, "start_jax differs between the JAX twins"


PROBE = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("twin", sys.argv[1])
twin = importlib.util.module_from_spec(spec)
sys.modules["twin"] = twin
spec.loader.exec_module(twin)
allowed = os.sched_getaffinity(0)
twin.start_jax("cpu", int(sys.argv[2]))
tasks = os.listdir("/proc/self/task")
restored = all(os.sched_getaffinity(int(t)) == allowed for t in tasks)
print(len(tasks), restored)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 CPUs to see XLA's pool shrink")
def test_xla_threads_size_the_pool_and_give_the_cpus_back():
    """`--xla-threads 1` gives XLA a smaller CPU pool than its default (one thread per CPU), and afterwards every
    thread of the process may run on every CPU again (docs/ppo_jax.md, detail 9)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
    counts = {}
    for threads in (0, 1):
        proc = subprocess.run([sys.executable, "-c", PROBE, os.path.join(ALGOS_DIR, "ppo_jax.py"), str(threads)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        count, restored = proc.stdout.split()
        assert restored == "True", f"--xla-threads {threads}: a thread kept a narrowed CPU set"
        counts[threads] = int(count)
    assert counts[1] < counts[0], f"threads after start: {counts} (XLA's pool did not shrink)"
