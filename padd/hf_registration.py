"""`import padd` makes `experts_implementation="padd"` valid in transformers without importing it.

Importing transformers takes seconds and pulls in yaml, tqdm and more, and `import padd.kernels`
(which runs `padd/__init__.py` first) must not pay for that. So `import padd` registers at once
only when transformers is already imported; otherwise it puts a finder on `sys.meta_path` that
registers right after `transformers.modeling_utils` has loaded. Every model is built through that
module (`PreTrainedModel`, which checks the experts implementation against the registry), so the
registration is in place before any model can name "padd".
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["TRIGGER", "register_with_transformers"]

TRIGGER = "transformers.modeling_utils"


def register_with_transformers() -> None:
    """Register padd's experts now if transformers is imported, else once it loads (idempotent)."""
    if "transformers" in sys.modules:  # its cost is paid already
        _register()
    elif not any(isinstance(f, _RegisterAfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoad())


def _register() -> None:
    importing = sys.modules.get("padd.moe.hf_experts")
    if importing is not None and not hasattr(importing, "register"):
        # `padd.moe.hf_experts` is what is loading transformers; `padd.moe`'s `__init__` registers
        # as soon as that module is whole.
        return
    from padd.moe import hf_experts  # imports transformers

    hf_experts.register()


class _RegisterAfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for `TRIGGER` it takes the spec the other finders give and wraps its
    loader so that the registration runs once the module has executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is None:
            return None
        spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterLoad) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader, as if this wrapper had never been there.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:  # one registration is enough
            sys.meta_path.remove(self._finder)
        _register()
