"""Tiny budgets for running every script in algos/ end to end (tests/test_standalone.py), taken from the `smoke`
suite (benchmark/suites/smoke.toml), so the harness's smoke suite and the standalone test cannot drift apart:
the first arm of each script there gives `--env-id <its first env id>` plus its flags. A script without an arm
in the smoke suite has no entry, and test_standalone.py fails until one is added."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.launch import load_suite  # noqa: E402

TINY_ARGS: dict[str, list[str]] = {}
for _run in load_suite("smoke")[1]:
    TINY_ARGS.setdefault(os.path.basename(_run.script), ["--env-id", _run.env_id, *_run.flags])
