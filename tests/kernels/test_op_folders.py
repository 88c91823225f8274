"""The op-folder template of `kernels/` (issue #11): reference.py, triton.py, op.py, api.py and an
`__init__.py` of re-exports only, with no import cycles, and references that take the same
keywords as their public functions.

Checked on every op folder (OP_FOLDERS).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from padd.kernels.grouped_gemm import moe_ffn, moe_ffn_reference
from padd.kernels.kd_loss import (
    fused_linear_kd_loss,
    fused_linear_kd_loss_reference,
    kd_loss,
    kd_loss_reference,
)
from padd.kernels.routing import route, route_reference

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
OP_FOLDERS = ("routing", "kd_loss", "grouped_gemm")
# The only import a function body may make: the Triton module, on first use, so that the
# reference path works where `import triton` fails (never to dodge a cycle).
LAZY_OK = {"triton"}
TORCH_LIBRARY_CALLS = {"custom_op", "register_fake", "register_autograd", "register_flop_formula"}


def _tree(folder: str, module: str) -> ast.Module:
    path = KERNELS / folder / f"{module}.py"
    return ast.parse(path.read_text(), filename=str(path))


def _modules(folder: str) -> list[str]:
    return sorted(p.stem for p in (KERNELS / folder).glob("*.py"))


def _sibling_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(sibling module, inside a function?) for each `from . import x` / `from .x import ...`."""
    in_function = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(name.split(".")[0], id(node) in in_function) for name in names]
    return found


@pytest.mark.parametrize("folder", OP_FOLDERS)
def test_folder_has_the_template_files(folder):
    assert {"__init__", "reference", "triton", "op", "api"} <= set(_modules(folder))


@pytest.mark.parametrize("folder", OP_FOLDERS)
def test_init_only_reexports(folder):
    tree = _tree(folder, "__init__")
    imported = set()
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {a.asname or a.name for a in node.names}
            continue
        targets = [getattr(t, "id", None) for t in node.targets] if isinstance(node, ast.Assign) else []
        assert targets == ["__all__"], f"__init__.py line {node.lineno}: only imports and __all__ belong here"
        exported = ast.literal_eval(node.value)
    assert sorted(exported) == sorted(imported)


@pytest.mark.parametrize("folder", OP_FOLDERS)
def test_no_import_cycle_and_no_function_level_imports(folder):
    graph = {}
    for module in _modules(folder):
        imports = _sibling_imports(_tree(folder, module))
        lazy = {name for name, in_fn in imports if in_fn} - LAZY_OK
        assert not lazy, f"kernels/{folder}/{module}.py imports {lazy} inside a function"
        graph[module] = {name for name, _ in imports if name in set(_modules(folder))}
    # Depth-first search for a back edge.
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("folder", OP_FOLDERS)
def test_custom_ops_are_registered_in_op_py_only(folder):
    for module in _modules(folder):
        calls = {
            node.attr if isinstance(node, ast.Attribute) else node.id
            for node in ast.walk(_tree(folder, module))
            if isinstance(node, (ast.Attribute, ast.Name))
        } & TORCH_LIBRARY_CALLS
        assert module == "op" or not calls, f"kernels/{folder}/{module}.py uses {calls}"
    assert "custom_op" in {n.attr for n in ast.walk(_tree(folder, "op")) if isinstance(n, ast.Attribute)}


def _parameters(fn, drop=()):
    """(positional parameters in order, keyword-only parameters by name), with their defaults."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in drop]
    positional = [(p.name, p.kind, p.default) for p in params if p.kind != p.KEYWORD_ONLY]
    keyword = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
    return positional, keyword


@pytest.mark.parametrize(
    ("public", "reference", "knobs"),
    [
        (route, route_reference, {"backend"}),
        (moe_ffn, moe_ffn_reference, {"backend"}),
        (kd_loss, kd_loss_reference, {"backend", "check_nan"}),
        (fused_linear_kd_loss, fused_linear_kd_loss_reference, {"backend", "check_nan", "chunk_size"}),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_reference_takes_the_public_keywords(public, reference, knobs):
    """Same names, kinds and defaults, less the public function's implementation knobs."""
    assert _parameters(reference) == _parameters(public, drop=knobs)
