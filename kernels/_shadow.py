"""Keep this folder from standing in for the hub `kernels` package (see `__init__`)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over_to_installed_kernels() -> None:
    """Replace `sys.modules["kernels"]` (this folder, found through the repository root on
    sys.path) with the installed hub `kernels` package, or raise ModuleNotFoundError when none
    is installed. Python's import returns whatever `sys.modules` holds once the module has run,
    so `import kernels` then gives the real package."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is padd.kernels)", name="kernels"
        )
    sys.modules.pop(__name__, None)  # this helper, imported as `kernels._shadow`: not the hub's
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
