"""The layering rule: kernels know nothing of PADD. A module under `kernels/` may import
`padd.kernels` (itself) but no other `padd.*` module; the stages never import Triton."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_kernels_import_no_padd_module_outside_padd_kernels():
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / "kernels").rglob("*.py"))
        for name in _imports(p)
        if (name == "padd" or name.startswith("padd.")) and not name.startswith("padd.kernels")
    ]
    assert not bad, bad


def test_stages_never_import_triton():
    stages = [ROOT / "padd" / d for d in ("decompress", "training", "pipeline", "data")]
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for d in stages
        for p in sorted(d.rglob("*.py"))
        for name in _imports(p)
        if name == "triton" or name.startswith("triton.") or ".triton" in name
    ]
    assert not bad, bad


def test_the_check_sees_a_violation(tmp_path):
    """The oracle for the scanner: a planted `from padd.training import x` is found."""
    planted = tmp_path / "k.py"
    planted.write_text("import torch\nfrom padd.training import trainer\nfrom padd.kernels import route\n")
    assert [n for n in _imports(planted) if n.startswith("padd.") and not n.startswith("padd.kernels")] == [
        "padd.training"
    ]
