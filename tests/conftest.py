"""Fixtures shared by the test suite. Scripts are loaded by path with `load_script` (see helpers.py)."""

from __future__ import annotations

import os

import pytest

from helpers import ALGOS_DIR, REPO_ROOT, algo_scripts, load_script, script_path  # noqa: F401  (re-exported)


def pytest_configure(config):
    # Under pytest-xdist (`-n 2`, the README's test command) every worker and the scripts it starts get one OpenMP
    # thread, so two workers fill the two cores of the CI machine instead of four threads fighting over them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        import torch

        torch.set_num_threads(1)
    # gymnasium warns when EnvPool's float64 Box bounds are cast to float32: harmless, and it would flood the report
    config.addinivalue_line("filterwarnings", r"ignore:.*precision lowered by casting to float32:UserWarning")


@pytest.fixture(scope="session")
def dqn():
    """algos/dqn.py imported as a module."""
    return load_script("dqn")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Tests that run a script in process with `torch_threads=1` (one thread per run: two oversubscribe a busy 2-core
    machine) would leave this process at one thread; put its setting back after every test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
