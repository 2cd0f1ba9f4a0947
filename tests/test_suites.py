"""Every suite file under benchmark/suites/ is launchable as written: it parses, its scripts exist, and every run's
command line is accepted by its script (tyro's parser, then the script's own checks of the flags against the
EnvPool tasks, without creating an environment). A typo in a cluster suite would otherwise surface only as 260
failed jobs."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from helpers import load_script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.launch import SUITES, load_suite  # noqa: E402

SUITE_NAMES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SUITES, "*.toml")))


def test_the_documented_suites_exist():
    for name in ("smoke", "atari100k", "atari-10m", "mujoco", "dmc", "continual"):
        assert name in SUITE_NAMES


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_every_run_of_the_suite_is_accepted_by_its_script(suite):
    import tyro

    name, runs = load_suite(suite)
    assert name == suite and runs
    assert len({r.name for r in runs}) == len(runs), "two runs share a run name"
    checked, modules = set(), {}
    for run in runs:
        argv = run.command("/tmp/unused")[2:]  # drop the interpreter and the script path
        key = (run.script, run.env_id, tuple(run.flags), tuple(run.sequence))
        if key in checked:  # the same run but for its seed
            continue
        checked.add(key)
        if run.script not in modules:
            modules[run.script] = load_script(run.script)
        module = modules[run.script]
        args = tyro.cli(module.Args, args=argv)
        module.resolve_args(args)  # raises the script's UserError on a flag/task mismatch
