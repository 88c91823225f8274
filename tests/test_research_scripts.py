"""Every research script imports: its `padd` imports still exist and it runs nothing on import.

The scripts under `research/scripts/` produced the research log's tables; they import padd's
internals, so a rename there would break them silently. Each is imported here under its own
module name (not `__main__`), which also checks that its work sits behind a `main()`."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "research" / "scripts").glob("*.py"))


def test_there_are_scripts():
    assert len(SCRIPTS) >= 7, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"research_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # raises if an import is gone or the module runs on import
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
