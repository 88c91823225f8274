"""Fused top-k routing: `route(router_logits, top_k, ...)` -> `Routing`.

Layout: metadata.py (the `Routing` result and `routing_metadata`), reference.py (PyTorch forward
and backward), triton.py (kernels and launchers), op.py (the `torch.library` custom ops),
api.py (the public functions and their validation).
"""

from .api import route, routing_from_topk
from .metadata import Routing, routing_metadata
from .reference import route_reference

__all__ = ["Routing", "route", "route_reference", "routing_from_topk", "routing_metadata"]
