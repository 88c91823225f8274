"""The public grouped expert FFN, `moe_ffn(x, gate_up_proj, down_proj, routing)` -> `[T, H]`,
with its input validation (gated activations, and non-gated ones whose first weight is the up
projection `[E, I, H]` alone).

`backend="auto"` and `"triton"` go through the `padd::moe_ffn` custom op (op.py), which runs the
Triton kernels (triton.py) on CUDA and the PyTorch reference (reference.py) on CPU. The Triton
kernels fuse every activation, the interleaved gate/up layout and the optional expert biases (in
the GEMM epilogues, their gradients by a deterministic per-expert sum), so GPT-OSS's experts run
fully fused on a GPU.
"""

from __future__ import annotations

import torch

from .._dispatch import call_reference_directly, cpu_eager, resolve_backend
from ..routing.metadata import Routing
from .activation import GatedActivation
from .op import MoeFfnCPU, moe_ffn_op_from_routing
from .reference import moe_ffn_reference

__all__ = ["moe_ffn"]


def moe_ffn(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    *,
    activation: str = "swiglu",
    limit: float | None = None,
    alpha: float | None = None,
    gate_up_interleaved: bool = False,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    backend: str = "auto",
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> torch.Tensor:
    """Routed experts, `Σ_j w_tj · down_e(act(gate_up_e x_t))`; SwiGLU by default.

    Args:
        x: `[T, H]` token activations.
        gate_up_proj: the experts' first weight. For a gated activation `[E, 2I, H]`,
            transformers' fused layout (gate rows, then up rows). For a non-gated activation
            ("relu2", "relu", "silu", "gelu") the up projection alone, `[E, I, H]` (transformers'
            `up_proj` of experts with `has_gate=False`). A transposed view of an `[E, H, ·]`
            tensor is fine (it is never copied).
        down_proj: `[E, H, I]` (or a transposed view of `[E, I, H]`).
        routing: the `Routing` of these T tokens (from `route` or `routing_from_topk`).
        activation: "swiglu" (`silu(g)·u`), "swiglu_limit" (`silu(min(g, L))·clamp(u, ±L)`),
            "swiglu_limit_post" (`min(silu(g), L)·clamp(u, ±L)`), "gpt_oss"
            (`(clamp(u, ±L) + 1)·g'σ(α·g')`, `g' = min(g, L)`) or "swiglu_softcap"
            (`c_g·tanh(g/c_g)·σ(g)·c_u·tanh(u/c_u)`, Inkling2), or with no gate "relu2"
            (`relu(u)²`, Nemotron-H, Ergo), "relu", "silu" or "gelu" (erf) of the up
            projection `u`; see `activation.py`.
        limit: the clamp bound L of the limited activations (None: no clamp).
        alpha: α of "gpt_oss".
        gate_up_interleaved: gate and up rows of `gate_up_proj` alternate (GPT-OSS) instead
            of the gate half then the up half (gated activations only).
        gate_up_bias: optional `[E, 2I]` (`[E, I]` non-gated) bias of the gate/up projection
            (same row layout).
        down_bias: optional `[E, H]` bias of the down projection.
        backend: "auto" (the custom op: Triton on CUDA, the reference otherwise), "triton"
            (force the kernels; on CPU only under `TRITON_INTERPRET=1`) or "reference" (the
            plain PyTorch function, differentiated by autograd).
        gate_softcap: c_g of "swiglu_softcap", the soft cap of the linear gate factor
            (`c_g·tanh(g/c_g)`; the sigmoid sees the raw gate): Inkling2's `mlp_gate_softcap`.
            Required (finite, > 0) for that activation, None for every other.
        up_softcap: c_u of "swiglu_softcap", the soft cap of the up half (`c_u·tanh(u/c_u)`):
            Inkling2's `mlp_up_softcap`. Required (finite, > 0) for that activation, None otherwise.

    Returns:
        `[T, H]` in x's dtype (the autocast dtype under `torch.autocast`). Differentiable in
        x, both weights, the biases and `routing.weights`; deterministic (each token's K slots
        are summed in slot order, no atomics).

    Example:
        >>> from padd.kernels import routing_from_topk
        >>> x, w13, w2 = torch.randn(3, 8), torch.randn(4, 2 * 16, 8), torch.randn(4, 8, 16)
        >>> r = routing_from_topk(torch.tensor([[0, 2], [2, 3], [1, 0]]), torch.full((3, 2), 0.5), 4)
        >>> moe_ffn(x, w13, w2, r).shape
        torch.Size([3, 8])
    """
    _check_types(x, gate_up_proj, down_proj, routing)
    act = GatedActivation(activation, limit, alpha, gate_up_interleaved, gate_softcap, up_softcap)
    x, gate_up_proj, down_proj = _autocast(x, gate_up_proj, down_proj)
    _check_moe_inputs(x, gate_up_proj, down_proj, routing, act.gated)
    _check_biases(gate_up_bias, down_bias, gate_up_proj, x)
    biases = (gate_up_bias, down_bias)
    options = dict(
        activation=activation,
        limit=limit,
        alpha=alpha,
        gate_up_interleaved=gate_up_interleaved,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        gate_softcap=gate_softcap,
        up_softcap=up_softcap,
    )
    if backend == "reference":
        return moe_ffn_reference(x, gate_up_proj, down_proj, routing, **options)
    resolved = resolve_backend(backend, x, gate_up_proj, down_proj)
    if call_reference_directly(resolved, x, gate_up_proj, down_proj, routing.weights, *biases):
        return moe_ffn_reference(x, gate_up_proj, down_proj, routing, **options)
    if cpu_eager(resolved, x, gate_up_proj, down_proj, routing.weights, *biases):
        # The ops' reference forward and backward without their dispatch (see MoeFfnCPU).
        return MoeFfnCPU.apply(x, gate_up_proj, down_proj, routing.weights, routing, act, *biases)
    return moe_ffn_op_from_routing(
        x,
        gate_up_proj,
        down_proj,
        routing,
        activation=act,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        use_triton=resolved == "triton",
    )


def _check_biases(
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, w13: torch.Tensor, x: torch.Tensor
) -> None:
    num_experts, two_inter, hidden = w13.shape
    for name, bias, shape in (
        ("gate_up_bias", gate_up_bias, (num_experts, two_inter)),
        ("down_bias", down_bias, (num_experts, hidden)),
    ):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{name} is on {bias.device}, x on {x.device}")


def _check_types(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> None:
    for name, t in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a padd.kernels.Routing, got {type(routing).__name__}")


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under `torch.autocast`, compute in its dtype like `F.linear` does (e.g. fp32 master weights)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors
    )


def _check_moe_inputs(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing, gated: bool = True
) -> None:
    _check_weight_shapes(x, w13, w2, gated)
    for name, t in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(
            f"x, gate_up_proj and down_proj must share a dtype; got {x.dtype}, {w13.dtype}, {w2.dtype}"
        )
    _check_routing(routing, x, w13.shape[0])


def _check_weight_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, gated: bool = True) -> None:
    first = "[E, 2I, H]" if gated else "[E, I, H] (the up projection: the activation has no gate)"
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"gate_up_proj must be {first} and down_proj [E, H, I]; "
            f"got {tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    num_experts, width, hidden = w13.shape
    if gated and (width % 2 or width == 0):
        raise ValueError(f"gate_up_proj's second dim must be 2·I (even, > 0), got {width}")
    if width == 0:
        raise ValueError("gate_up_proj's second dim (I) must be > 0")
    if hidden != x.shape[1]:
        raise ValueError(f"gate_up_proj hidden size {hidden} != x hidden size {x.shape[1]}")
    inter = width // 2 if gated else width
    if w2.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"down_proj must be [E, H, I]=({num_experts}, {hidden}, {inter}) for gate_up_proj {first} "
            f"{tuple(w13.shape)}, got {tuple(w2.shape)}"
        )


def _check_routing(routing: Routing, x: torch.Tensor, num_experts: int) -> None:
    if routing.num_experts != num_experts:
        raise ValueError(f"routing was built for {routing.num_experts} experts, weights hold {num_experts}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing covers {routing.num_tokens} tokens, x has {x.shape[0]}")
    num_slots = routing.num_tokens * routing.top_k
    expected = {
        "weights": (routing.weights, tuple(routing.expert_ids.shape)),
        "tokens_per_expert": (routing.tokens_per_expert, (num_experts,)),
        "expert_offsets": (routing.expert_offsets, (num_experts + 1,)),
        "sort_order": (routing.sort_order, (num_slots,)),
        "inverse_order": (routing.inverse_order, (num_slots,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"routing.{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"routing.{name} is on {t.device}, x on {x.device}")
    if not routing.weights.is_floating_point():
        raise TypeError(f"routing.weights must be floating point, got {routing.weights.dtype}")
    for name in ("expert_ids", "tokens_per_expert", "expert_offsets", "sort_order", "inverse_order"):
        t = getattr(routing, name)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"routing.{name} must be int32 or int64, got {t.dtype}")
