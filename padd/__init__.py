"""padd: Path-Aligned Decompression Distillation, a dense LLM into an MoE student at equal FLOPs.

`import padd` registers `experts_implementation="padd"` in transformers (see `padd.moe`), at once
when transformers is imported, else as soon as it loads (`padd.hf_registration`). Everything else
is imported on first use (`padd.MoE`, `padd.decompress`, ...), so `import padd.kernels` stays light:
no transformers, yaml, tqdm, matplotlib or training program.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hf_registration import register_with_transformers

if TYPE_CHECKING:
    from . import decompress, flops
    from .moe import MoE, RoutingControl

__version__ = "0.1.0"

__all__ = ["MoE", "RoutingControl", "__version__", "decompress", "flops"]

# public name -> the module that defines it (a submodule stands for itself)
_LAZY = {"MoE": ".moe", "RoutingControl": ".moe", "decompress": ".decompress", "flops": ".flops"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


register_with_transformers()
