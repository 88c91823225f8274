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


def _import_kernels_from(cwd: Path) -> tuple[int, str]:
    """`import kernels` (then padd) in a fresh interpreter started in `cwd`: exit code and what
    `kernels` turned out to be (its file, or the ImportError)."""
    code = (
        "try:\n"
        "    import kernels\n"
        "    print('found', kernels.__file__)\n"
        "except ImportError as e:\n"
        "    print('absent', type(e).__name__)\n"
        "import padd, padd.kernels\n"
        "assert hasattr(padd.kernels, 'route')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout.strip() or out.stderr


def test_running_from_repo_root_does_not_shadow_the_hub_kernels_package(tmp_path):
    # `python -c` / `python -m` from the repo root put it first on sys.path, where kernels/ looks
    # like a top-level `kernels`: the hub package transformers (>= 5.25) imports. The oracle is
    # the same interpreter started elsewhere: from the root, `import kernels` must give the same
    # answer (the installed package, or not found), and padd must import cleanly.
    elsewhere = _import_kernels_from(tmp_path)
    from_root = _import_kernels_from(ROOT)
    assert elsewhere[0] == 0, elsewhere[1]
    assert from_root == elsewhere
    assert str(ROOT / "kernels") not in from_root[1]
