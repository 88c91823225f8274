"""`padd.MoE`: a drop-in sparse MoE layer (router + SwiGLU experts) on padd's kernels.

Shape legend: T tokens (all leading dims flattened), H hidden, I expert width, E experts,
K = top_k.

Parameters use transformers' fused-experts layout so HF weights are shared, never copied:
`gate.weight [E, H]`, `gate_up_proj [E, 2I, H]` (gate rows, then up rows), `down_proj [E, H, I]`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from padd.kernels import Routing, moe_ffn, route

from .experts_layout import check_fused_swiglu

__all__ = ["MoE"]

_SCORES = ("softmax", "sigmoid")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts: `y_t = Σ_j w_tj · down_e(silu(gate_e x_t) * up_e x_t)`.

    Args:
        hidden_size: H.
        intermediate_size: I, each expert's width.
        num_experts: E.
        top_k: K experts per token, 1 <= K <= E.
        score: "softmax" or "sigmoid" router scores.
        norm_topk_prob: renormalise the K weights to sum to 1.
        use_selection_bias: hold a `selection_bias [E]` fp32 buffer added to the logits for
            top-k *selection only* (auxiliary-loss-free balancing; weights stay unbiased).

    After each forward: `last_router_logits [T, E]`, `last_routing` (a `padd.kernels.Routing`
    with scores), and the properties `aux_loss` (Switch-style `E · Σ f_i · P_i`) and `z_loss`
    (`mean_t logsumexp(z_t)²`), all differentiable with respect to the router.

    Example:
        >>> moe = MoE(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2)
        >>> y = moe(torch.randn(2, 5, 64))  # [2, 5, 64]
        >>> loss = y.square().mean() + 0.01 * moe.aux_loss
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        score: str = "softmax",
        norm_topk_prob: bool = True,
        use_selection_bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_config(hidden_size, intermediate_size, num_experts, top_k, score)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.norm_topk_prob = bool(norm_topk_prob)
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        bias_E = torch.zeros(num_experts, dtype=torch.float32, device=device) if use_selection_bias else None
        self.register_buffer("selection_bias", bias_E)
        self.last_router_logits: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.reset_parameters()

    @property
    def use_selection_bias(self) -> bool:
        return self.selection_bias is not None

    def reset_parameters(self) -> None:
        """nn.Linear-style init: uniform(±1/sqrt(fan_in)) for the router and both projections."""
        if self.gate_up_proj.is_meta:
            return
        self.gate.reset_parameters()
        bound_in, bound_mid = 1.0 / math.sqrt(self.hidden_size), 1.0 / math.sqrt(self.intermediate_size)
        with torch.no_grad():
            self.gate_up_proj.uniform_(-bound_in, bound_in)
            self.down_proj.uniform_(-bound_mid, bound_mid)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` -> `[..., H]` in the input's dtype."""
        self._check_input(hidden_states)
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        logits_TE = self.gate(x_TH)
        routing = route(
            logits_TE,
            self.top_k,
            score=self.score,
            selection_bias=self.selection_bias,
            renormalize=self.norm_topk_prob,
            return_scores=True,
        )
        y_TH = moe_ffn(x_TH, self.gate_up_proj, self.down_proj, routing)
        self.last_router_logits = logits_TE
        self.last_routing = routing
        return y_TH.reshape(hidden_states.shape)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Switch-style load-balancing loss `E · Σ_i f_i · P_i` of the last forward."""
        return self._require_last().aux_loss()

    @property
    def z_loss(self) -> torch.Tensor:
        """Router z-loss `mean_t logsumexp(z_t)²` of the last forward (any score function)."""
        routing = self._require_last()
        if routing.logsumexp is not None:
            return routing.z_loss()
        # Sigmoid routing: route() computes no logsumexp, the z-loss is still defined on the logits.
        lse_T = torch.logsumexp(self.last_router_logits.float(), dim=-1)
        return lse_T.square().mean() if lse_T.numel() else lse_T.sum() * 0.0

    def _require_last(self) -> Routing:
        if self.last_routing is None:
            raise RuntimeError("no forward has run yet: aux_loss and z_loss describe the last call")
        return self.last_routing

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE input must be [..., H={self.hidden_size}], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"MoE input must be fp32, bf16 or fp16, got {x.dtype}")
        if x.dtype != self.gate_up_proj.dtype:
            raise TypeError(
                f"MoE input dtype {x.dtype} != parameter dtype {self.gate_up_proj.dtype}; cast one of them"
            )

    @classmethod
    def from_hf(
        cls, block: nn.Module, *, routed_experts_only: bool = False, use_selection_bias: bool = False
    ) -> MoE:
        """Wrap a transformers sparse MoE block's weights, sharing its Parameters (no copy).

        Supports Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE blocks (`block.gate` a `*TopKRouter`,
        `block.experts` in the fused SwiGLU layout). Qwen2-MoE's sigmoid-gated shared expert is
        not part of `padd.MoE`: such a block raises unless `routed_experts_only=True`, in which
        case the result computes the routed experts only (add the shared expert yourself).
        Mixtral's training-time router jitter is not reproduced. `use_selection_bias` adds a fresh
        zero `selection_bias [E]` buffer (the block itself has none).
        """
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            raise TypeError(
                f"{type(block).__name__} is not a transformers sparse MoE block (needs .gate and .experts)"
            )
        if not hasattr(gate, "top_k") or getattr(gate, "weight", None) is None:
            raise TypeError(f"{type(gate).__name__} is not a transformers top-k router")
        num_experts, inter, hidden = check_fused_swiglu(experts)
        if hasattr(block, "shared_expert") and not routed_experts_only:
            raise ValueError(
                f"{type(block).__name__} has a shared expert, which padd.MoE does not compute; "
                "pass routed_experts_only=True to wrap the routed experts alone"
            )
        with torch.device("meta"):
            moe = cls(
                hidden_size=hidden,
                intermediate_size=inter,
                num_experts=num_experts,
                top_k=int(gate.top_k),
                # Mixtral's router has no flag and always renormalises.
                norm_topk_prob=bool(getattr(gate, "norm_topk_prob", True)),
            )
        moe.gate.weight = gate.weight
        moe.gate_up_proj = experts.gate_up_proj
        moe.down_proj = experts.down_proj
        if use_selection_bias:
            bias_E = torch.zeros(num_experts, dtype=torch.float32, device=experts.gate_up_proj.device)
            moe.register_buffer("selection_bias", bias_E)
        return moe

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"norm_topk_prob={self.norm_topk_prob}, use_selection_bias={self.use_selection_bias}"
        )


def _check_config(hidden: int, inter: int, num_experts: int, top_k: int, score: str) -> None:
    for name, value in (
        ("hidden_size", hidden),
        ("intermediate_size", inter),
        ("num_experts", num_experts),
        ("top_k", top_k),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
