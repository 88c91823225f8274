"""Packaging: `kernels/` ships as `padd.kernels`, never as a top-level `kernels` module."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_folders() -> set[str]:
    names = set()
    for root, prefix in ((ROOT / "padd", "padd"), (ROOT / "kernels", "padd.kernels")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            names.add(".".join((prefix, *rel)))
    return names


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = _package_folders() - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_kernels_folder_is_padd_kernels():
    import padd.kernels

    assert Path(padd.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_running_from_repo_root_does_not_shadow_the_hub_kernels_package():
    # From the repo root `kernels/` is importable as a top-level module. transformers' probe for
    # the hub `kernels` package must still say "absent", and padd must still import cleanly
    # (no custom op registered twice).
    code = (
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import kernels, padd, padd.kernels\n"
        "print(is_kernels_available(), hasattr(kernels, 'route'), hasattr(padd.kernels, 'route'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]
