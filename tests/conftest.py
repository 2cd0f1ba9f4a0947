"""Fixtures shared by the test suite. Scripts are loaded by path with `load_script` (see helpers.py)."""

from __future__ import annotations

import pytest

from helpers import ALGOS_DIR, REPO_ROOT, algo_scripts, load_script, script_path  # noqa: F401  (re-exported)


def pytest_configure(config):
    # gymnasium warns when EnvPool's float64 Box bounds are cast to float32: harmless, and it would flood the report
    config.addinivalue_line("filterwarnings", r"ignore:.*precision lowered by casting to float32:UserWarning")


@pytest.fixture(scope="session")
def dqn():
    """algos/dqn.py imported as a module."""
    return load_script("dqn")
