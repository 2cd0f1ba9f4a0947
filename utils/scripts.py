"""Finding and importing the standalone scripts of algos/ (algos/ is deliberately not a package)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = os.path.join(ROOT, "algos")
_LOADED: dict[str, ModuleType] = {}


def script_path(name: str) -> str:
    """Path of algos/<name>.py (name with or without the .py suffix)."""
    return os.path.join(ALGOS, name if name.endswith(".py") else name + ".py")


def algo_scripts() -> list[str]:
    """File names ("dqn.py", ...) of every script in algos/, sorted."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ALGOS, "*.py")))


def load_script(name: str) -> ModuleType:
    """Import algos/<name>.py as module `algos_<name>` (cached). The module is registered in sys.modules, which
    dataclasses need to resolve the postponed annotations of a script's Args."""
    name = os.path.basename(script_path(name))[: -len(".py")]
    if name not in _LOADED:
        module_name = f"algos_{name}"
        spec = importlib.util.spec_from_file_location(module_name, script_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _LOADED[name] = module
    return _LOADED[name]
