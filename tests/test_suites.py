"""Every suite file under benchmark/suites/ is launchable as written: it parses, its scripts exist, and every run's
command line is accepted by its script (tyro's parser, then the script's own checks of the flags against the
EnvPool tasks, without creating an environment). A typo in a cluster suite would otherwise surface only as 260
failed jobs."""

from __future__ import annotations

import glob
import os
import sys

import pytest


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.launch import SUITES, check_runs, load_suite  # noqa: E402

SUITE_NAMES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SUITES, "*.toml")))


def test_the_documented_suites_exist():
    for name in ("smoke", "atari100k", "atari-10m", "mujoco", "dmc", "continual"):
        assert name in SUITE_NAMES


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_every_run_of_the_suite_is_accepted_by_its_script(suite):
    name, runs = load_suite(suite)
    assert name == suite and runs
    assert len({r.name for r in runs}) == len(runs), "two runs share a run name"
    check_runs(suite, runs)  # the launcher's own check: tyro, then the script's resolve_args (SuiteError if not)
