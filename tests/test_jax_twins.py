"""What the two JAX twins (algos/dqn_jax.py, algos/ppo_jax.py) share with their torch bases and with each other
(docs/conventions.md, section 1): the same flags and defaults, resolved alike per family; no torch import; the
duplicated TensorBoard writer the same in both. Each twin's own mechanics are tested in its own test file."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os

import pytest

from helpers import ALGOS_DIR, load_script

TWINS = {"dqn_jax.py": "dqn.py", "ppo_jax.py": "ppo.py"}
# The documented differences of the flags (docs/conventions.md, section 1): XLA's threads for torch's, and no
# torch-deterministic switch (XLA on the CPU is deterministic).
ONLY_TORCH = {"torch_threads", "torch_deterministic"}
ONLY_JAX = {"xla_threads"}
# Tasks on which both resolve their defaults (one per family the twin supports).
FAMILY_TASKS = {"dqn_jax.py": ["CartPole-v1", "MinAtar/Breakout", "Breakout-v5"],
                "ppo_jax.py": ["CartPole-v1", "Pendulum-v1", "Breakout-v5"]}


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
