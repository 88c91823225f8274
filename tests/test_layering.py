"""The layering rules: kernels know nothing of PADD. A module under `kernels/` may import
`padd.kernels` (itself) but no other `padd.*` module; the stages never import Triton. No module of
the package (`padd/**`, and `kernels/**` installed as `padd.kernels`) is part of an import cycle,
counting imports inside functions; nothing below the program (`padd/pipeline/*.py`,
`padd/cli.py`) imports it."""

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


# ---- no import cycle anywhere in the package ----------------------------------------------------

PROGRAM = ("padd/pipeline", "padd/cli.py")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] == "kernels":  # the folder `kernels/` is installed as `padd.kernels` (pyproject)
        parts = ("padd", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """The modules of `known` that `path` imports anywhere (top level, in functions, under
    `if TYPE_CHECKING`): `from padd.pipeline import run` names the module `padd.pipeline.run`,
    `from padd.moe import MoE` the package `padd.moe`."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the module `pkg.sub` (its package only as every module
            # imports its parents); `from pkg import name` needs `pkg` itself, its `__init__`.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` also imports `a.b` and `a`: keep the longest known prefix
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph(files: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the modules (among `files`) it imports."""
    known = {_module_name(p, root) for p in files}
    return {_module_name(p, root): _imported_modules(p, known, root) - {_module_name(p, root)} for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (`[a, b, ..., a]`), or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _program_files() -> list[Path]:
    return [p for entry in PROGRAM for p in sorted((ROOT / entry).glob("*.py")) or [ROOT / entry]]


def _package_files() -> list[Path]:
    """Every module of the installed package: `padd/**` and `kernels/**` (as `padd.kernels`)."""
    return sorted((ROOT / "padd").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def test_package_modules_import_each_other_without_a_cycle():
    graph = import_graph(_package_files())
    assert {"padd", "padd.cli", "padd.kernels", "padd.kernels.routing", "padd.data.jsonl"} <= set(graph)
    # the graph sees real edges: top level, inside a function, relative, and into `padd.kernels`
    assert "padd.pipeline.run_dir" in graph["padd.pipeline.run"]
    assert "padd.data.gsm8k" in graph["padd.data.jsonl"]
    assert "padd.moe.routers" in graph["padd.moe.router_groups"]
    assert "padd.kernels" in graph["padd.moe.routing_control"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_lower_layers_never_import_the_program():
    """No cycle can pass through the rest of `padd` either: below the program, nothing imports it
    (`padd/__main__.py` is the command itself)."""
    program = {_module_name(p) for p in _program_files()}
    others = [
        p
        for p in sorted((ROOT / "padd").rglob("*.py"))
        if _module_name(p) not in program and p.name != "__main__.py"
    ]
    known = program | {_module_name(p) for p in others}
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in others
        for name in sorted(_imported_modules(p, known) & program)
    ]
    assert not bad, bad


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The oracle for the cycle check: a planted cycle through a function-level import, a
    `from package import module` and a relative import is found; a chain is not a cycle."""
    pkg = tmp_path / "padd" / "pipeline"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from padd.pipeline.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from padd.pipeline import c\n")
    (pkg / "c.py").write_text("import os\n")
    files = sorted(pkg.glob("*.py"))
    assert find_cycle(import_graph(files, tmp_path)) is None
    (pkg / "c.py").write_text("from . import a\n")
    cycle = find_cycle(import_graph(files, tmp_path))
    assert cycle == ["padd.pipeline.a", "padd.pipeline.b", "padd.pipeline.c", "padd.pipeline.a"]


def test_the_cycle_check_tells_a_submodule_from_a_package_attribute(tmp_path):
    """`from . import sub` in a package's module is an edge to `sub` alone (the package is its
    parent, imported first anyway); `from package import name` is an edge to the package."""
    pkg = tmp_path / "padd" / "moe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .layer import MoE\n")
    (pkg / "layer.py").write_text("from . import ops\nMoE = 1\n")
    (pkg / "ops.py").write_text("")
    files = sorted(pkg.glob("*.py"))
    assert import_graph(files, tmp_path)["padd.moe.layer"] == {"padd.moe.ops"}
    assert find_cycle(import_graph(files, tmp_path)) is None
    (pkg / "ops.py").write_text("def f():\n    from padd.moe import MoE\n")
    cycle = find_cycle(import_graph(files, tmp_path))
    assert cycle == ["padd.moe", "padd.moe.layer", "padd.moe.ops", "padd.moe"]
