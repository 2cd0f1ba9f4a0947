"""Every script in algos/ is standalone: it runs when copied alone into an empty directory, and imports nothing from
the repository (utils/, benchmark/, algos/, tests/)."""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ALGOS_DIR, REPO_ROOT, algo_scripts, describe, read_json, run_script
from utils.runs import read_flags
from script_budgets import TINY_ARGS

SCRIPTS = algo_scripts()
FORBIDDEN_IMPORTS = {"utils", "benchmark", "algos", "tests"}


def repo_top_level_names() -> set[str]:
    """Names under which something of this repository could be imported: its top-level packages/folders holding
    Python files, its top-level modules, and the installed distribution's name."""
    names = {"interventions"} | FORBIDDEN_IMPORTS
    for entry in os.listdir(REPO_ROOT):
        path = os.path.join(REPO_ROOT, entry)
        if entry.startswith("."):
            continue
        if os.path.isdir(path) and glob.glob(os.path.join(path, "*.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[: -len(".py")])
    return names


def isolated_env(site_dir: str) -> dict:
    """Environment for a standalone run: no PYTHONPATH from the caller and an import blocker for the repository.

    The repository is pip-installed in editable mode in the dev environment, which makes `utils` and `benchmark`
    importable from any directory; a sitecustomize.py in `site_dir` (the only PYTHONPATH entry) refuses those
    imports, so the run really sees only the copied file and the installed third-party packages."""
    os.makedirs(site_dir, exist_ok=True)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
        f.write(textwrap.dedent(f"""
            import sys

            BLOCKED = {sorted(repo_top_level_names())!r}

            class _RepoBlocker:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in BLOCKED:
                        raise ModuleNotFoundError(f"standalone test: {{name!r}} belongs to the repository", name=name)
                    return None

            sys.meta_path.insert(0, _RepoBlocker())
            """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env["PYTHONPATH"] = site_dir
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_alone(name, tmp_path):
    if name not in TINY_ARGS:
        pytest.fail(f"algos/{name} has no arm in benchmark/suites/smoke.toml (the source of tests/script_budgets.py): add one with "
                    f"flags for a run of a few hundred steps that reaches the learning updates")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(ALGOS_DIR, name), work / name)
    assert sorted(os.listdir(work)) == [name]
    env = isolated_env(str(tmp_path / "site"))

    # The isolation is real: from the run directory, the repository's packages cannot be imported.
    probe = subprocess.run([sys.executable, "-c", "import utils"], cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, describe(probe)

    proc = run_script(name, [*TINY_ARGS[name], "--output-dir", str(work / "runs")], cwd=str(work), env=env)
    assert proc.returncode == 0, describe(proc)
    summaries = glob.glob(str(work / "runs" / "*" / "summary.json"))
    assert len(summaries) == 1, f"expected one run directory with a summary.json, found {summaries}"
    assert read_json(summaries[0])["status"] == "completed"
    # the harness reads a run's flags from config.json's `args` (benchmark/report.py, benchmark/continual.py)
    flags = read_flags(os.path.dirname(summaries[0]))
    assert flags["env_id"] == TINY_ARGS[name][TINY_ARGS[name].index("--env-id") + 1]
    assert isinstance(flags["total_timesteps"], int) and flags["total_timesteps"] > 0


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import statement; relative imports are reported as '.'."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." if node.level else node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_nothing_from_the_repo(name):
    imports = imported_modules(os.path.join(ALGOS_DIR, name))
    assert imports, "parsing found no imports at all: the check would be vacuous"
    bad = [(line, mod) for line, mod in imports if mod in FORBIDDEN_IMPORTS or mod == "."]
    assert not bad, f"algos/{name} imports repository code (scripts must stay standalone): {bad}"


def test_there_are_scripts():
    assert SCRIPTS, f"no scripts found in {ALGOS_DIR}"


@pytest.mark.parametrize("name", ["dqn.py", "ppo.py"])
def test_minatar_runs_alone(name, tmp_path):
    """The MinAtar family (the `minatar` package through MinAtarVecEnv) also runs from a copy of the script alone,
    with the smoke suite's MinAtar arm of that script."""
    from benchmark.launch import load_suite

    arm = next(r for r in load_suite("smoke")[1] if r.script == name and r.env_id.startswith("MinAtar/"))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(ALGOS_DIR, name), work / name)
    env = isolated_env(str(tmp_path / "site"))
    proc = run_script(name, ["--env-id", arm.env_id, *arm.flags, "--output-dir", str(work / "runs")], cwd=str(work),
                      env=env)
    assert proc.returncode == 0, describe(proc)
    summaries = glob.glob(str(work / "runs" / "*" / "summary.json"))
    assert len(summaries) == 1 and read_json(summaries[0])["status"] == "completed"
    assert read_json(os.path.join(os.path.dirname(summaries[0]), "config.json"))["family"] == "minatar"
