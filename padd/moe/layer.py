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

from padd.kernels import Routing, moe_ffn, route, routing_from_topk
from padd.kernels.grouped_gemm.activation import GatedActivation

__all__ = ["MoE"]

_SCORES = ("softmax", "sigmoid")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoE(nn.Module):
    """Top-k routed gated experts: `y_t = Σ_j w_tj · down_e(act(gate_e x_t, up_e x_t))` (+ shared).

    Args:
        hidden_size: H.
        intermediate_size: I, each expert's width.
        num_experts: E.
        top_k: K experts per token, 1 <= K <= E.
        score: "softmax" or "sigmoid" router scores.
        norm_topk_prob: renormalise the K weights to sum to 1.
        use_selection_bias: hold a `selection_bias [E]` fp32 buffer added to the logits for
            top-k *selection only* (auxiliary-loss-free balancing; weights stay unbiased).
        activation, limit, alpha, gate_up_interleaved: the experts' gated activation, as
            `padd.kernels.moe_ffn` takes them (default SwiGLU).
        routed_scaling_factor: multiplies the K weights after any renormalisation (DeepSeek-V3).
        n_group, topk_group: group-limited selection (DeepSeek-V3): experts form `n_group`
            groups, each scored by the sum of its two best (bias-added) scores; a token picks its
            top-k among the `topk_group` best groups only. None: no groups. With groups the
            selection bias is added to the scores for either score function (DeepSeek-V3's
            convention), not to the softmax logits as without them.
        shared_experts: an optional module run on every token and added to the output.
        shared_expert_gate: optional `Linear(H, 1)`; the shared output is scaled by its sigmoid.

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
        activation: str = "swiglu",
        limit: float | None = None,
        alpha: float | None = None,
        gate_up_interleaved: bool = False,
        routed_scaling_factor: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_config(hidden_size, intermediate_size, num_experts, top_k, score)
        _check_groups(num_experts, top_k, n_group, topk_group)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.norm_topk_prob = bool(norm_topk_prob)
        self.activation = GatedActivation(activation, limit, alpha, gate_up_interleaved)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.n_group, self.topk_group = n_group, topk_group
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
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
        routing = self._route(logits_TE)
        act = self.activation
        y_TH = moe_ffn(
            x_TH,
            self.gate_up_proj,
            self.down_proj,
            routing,
            activation=act.name,
            limit=act.limit,
            alpha=act.alpha,
            gate_up_interleaved=act.interleaved,
        )
        if self.shared_experts is not None:
            shared_TH = self.shared_experts(x_TH)
            if self.shared_expert_gate is not None:
                shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
            y_TH = y_TH + shared_TH
        self.last_router_logits = logits_TE
        self.last_routing = routing
        return y_TH.reshape(hidden_states.shape)

    def _route(self, logits_TE: torch.Tensor) -> Routing:
        if self.n_group is None:
            routing = route(
                logits_TE,
                self.top_k,
                score=self.score,
                selection_bias=self.selection_bias,
                renormalize=self.norm_topk_prob,
                return_scores=True,
            )
        else:
            routing = self._route_in_groups(logits_TE)
        if self.routed_scaling_factor != 1.0:
            routing.weights = routing.weights * self.routed_scaling_factor
        return routing

    def _route_in_groups(self, logits_TE: torch.Tensor) -> Routing:
        """DeepSeek-V3's group-limited top-k, in plain torch: pick among the best groups only."""
        logits_TE = logits_TE.float()
        scores_TE = logits_TE.softmax(-1) if self.score == "softmax" else logits_TE.sigmoid()
        choice_TE = scores_TE.detach()
        if self.selection_bias is not None:
            choice_TE = choice_TE + self.selection_bias
        tokens = choice_TE.shape[0]
        group_scores_TG = choice_TE.view(tokens, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        best_groups_TG = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, best_groups_TG, 1)
        expert_mask_TE = group_mask_TG.repeat_interleave(self.num_experts // self.n_group, dim=1)
        ids_TK = choice_TE.masked_fill(expert_mask_TE == 0, 0.0).topk(self.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        routing = routing_from_topk(ids_TK, weights_TK, self.num_experts)
        routing.scores = scores_TE
        return routing

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
        cls,
        block: nn.Module,
        *,
        routed_experts_only: bool = False,
        use_selection_bias: bool = False,
        verify: bool = True,
    ) -> MoE:
        """Wrap a transformers sparse MoE block, sharing its Parameters and buffers (no copy).

        The block needs a top-k router `block.gate` (`weight [E, H]`, `top_k`) and experts
        `block.experts` that padd runs fused in its own layout (`[E, 2I, H]` / `[E, H, I]`, any
        activation of `moe_ffn`, no biases). Its routing is read from the router's attributes
        (`e_score_correction_bias`, `routed_scaling_factor`, `n_group` / `topk_group`,
        `norm_topk_prob`) and the score function, softmax or sigmoid, is the one whose output
        equals the block's. Shared experts (`shared_experts` or `shared_expert`, with an
        optional `shared_expert_gate`) are held as they are and added to every token.

        Args:
            block: the transformers block (e.g. `model.model.layers[i].mlp`).
            routed_experts_only: leave the shared experts out (the result then differs from
                the block by exactly their output); verification is skipped.
            use_selection_bias: add a fresh zero `selection_bias [E]` buffer, for a block
                without a correction bias (Stage IV, `RoutingControl`).
            verify: run the block and the result on probe tokens (eval mode) and refuse unless
                they agree to 1e-4 of the output's scale. Leave it on: it is what makes "exact or
                refused" hold for routers padd has not seen.

        Raises:
            TypeError: not a sparse MoE block; NotImplementedError: one line saying what padd
            does not compute (layout, activation, routing).
        """
        from .experts_plan import plan_experts  # the experts plan needs nothing of this module

        name = type(block).__name__
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            raise TypeError(f"{name} is not a transformers sparse MoE block (needs .gate and .experts)")
        weight = getattr(gate, "weight", None)
        if not hasattr(gate, "top_k") or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                f"{name}.gate ({type(gate).__name__}) is not a transformers top-k router "
                "(weight [E, H], top_k)"
            )
        plan = plan_experts(experts)
        layout = plan.layout
        unsupported = [
            why
            for why, bad in (
                (f"its experts run padd's general path ({plan.why})", not plan.fused),
                ("its experts are stored transposed", layout.is_transposed),
                ("its experts have biases", layout.has_bias),
                ("its experts are sharded across ranks", layout.expert_parallel),
            )
            if bad
        ]
        if unsupported:
            raise NotImplementedError(
                f"padd.MoE.from_hf: {name}: {'; '.join(unsupported)}; run the model with "
                'experts_implementation="padd" instead'
            )
        shared, shared_gate = _shared_parts(block)
        if shared is not None and routed_experts_only:
            shared = shared_gate = None
        correction = getattr(gate, "e_score_correction_bias", None)
        if correction is not None and use_selection_bias:
            raise ValueError(f"{name} has a correction bias already: it is the selection bias")
        n_group = _int_attr(gate, block, ("n_group", "num_group"))
        topk_group = _int_attr(gate, block, ("topk_group",))
        if n_group is not None and (n_group <= 1 or topk_group is None or topk_group >= n_group):
            n_group = topk_group = None  # one group, or every group kept: plain top-k
        norm = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", None))
        act = plan.activation
        candidates = [
            dict(score=score, norm_topk_prob=norm_choice)
            for score in (("sigmoid", "softmax") if correction is not None else ("softmax", "sigmoid"))
            for norm_choice in ((bool(norm),) if norm is not None else (True, False))
        ]
        with torch.device("meta"):
            moe = cls(
                hidden_size=layout.hidden,
                intermediate_size=layout.inter,
                num_experts=layout.num_experts,
                top_k=int(gate.top_k),
                activation=act.name,
                limit=act.limit,
                alpha=act.alpha,
                gate_up_interleaved=act.interleaved,
                routed_scaling_factor=float(getattr(gate, "routed_scaling_factor", None) or 1.0),
                n_group=n_group,
                topk_group=topk_group,
                **candidates[0],
            )
        moe.gate.weight = weight
        moe.gate_up_proj = experts.gate_up_proj
        moe.down_proj = experts.down_proj
        moe.shared_experts, moe.shared_expert_gate = shared, shared_gate
        if correction is not None:
            moe.register_buffer("selection_bias", correction)
        elif use_selection_bias:
            moe.register_buffer(
                "selection_bias", torch.zeros(layout.num_experts, dtype=torch.float32, device=weight.device)
            )
        if not verify or routed_experts_only or use_selection_bias:
            return moe
        errors = []
        for candidate in candidates:  # score and normalisation are plain attributes: try each
            moe.score, moe.norm_topk_prob = candidate["score"], candidate["norm_topk_prob"]
            try:
                error = _relative_gap(block, moe)
            except NotImplementedError:  # already one line of its own
                raise
            except (ValueError, RuntimeError) as mismatch:  # e.g. a correction bias not of size E
                first_line = str(mismatch).splitlines()[0][:120]
                raise NotImplementedError(
                    f"padd.MoE.from_hf: {name} does not run as a padd.MoE "
                    f"({type(mismatch).__name__}: {first_line})"
                ) from None
            if error <= _VERIFY_TOLERANCE:
                return moe
            errors.append(f"{candidate['score']}: {error:.1e}")
        raise NotImplementedError(
            f"padd.MoE.from_hf: {name}'s output differs from every routing padd computes "
            f"(relative gap {', '.join(errors)}); its router or block forward is not one padd knows"
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"norm_topk_prob={self.norm_topk_prob}, use_selection_bias={self.use_selection_bias}, "
            f"activation={self.activation.name!r}"
        )


_VERIFY_TOLERANCE = 1e-4


def _shared_parts(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    gate = getattr(block, "shared_expert_gate", None)
    return (shared if isinstance(shared, nn.Module) else None), (
        gate if isinstance(gate, nn.Module) else None
    )


def _int_attr(gate: nn.Module, block: nn.Module, names: tuple[str, ...]) -> int | None:
    for owner in (gate, block, getattr(gate, "config", None)):
        for attr in names:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


@torch.no_grad()
def _relative_gap(block: nn.Module, moe: MoE) -> float:
    """`max |block(x) - moe(x)| / max |block(x)|` over probe tokens at two scales, in eval mode."""
    weight = moe.gate_up_proj
    if weight.is_meta:
        raise NotImplementedError(
            "padd.MoE.from_hf cannot verify a block on the meta device; pass verify=False"
        )
    generator = torch.Generator(device="cpu").manual_seed(0)
    was_training = block.training
    block.eval()
    try:
        worst = 0.0
        for scale in (1.0, 8.0):
            x = torch.randn(2, 16, moe.hidden_size, generator=generator) * scale
            x = x.to(device=weight.device, dtype=weight.dtype)
            try:
                want = block(x)
            except Exception as error:  # a block that needs more than hidden states (token ids, ...)
                raise NotImplementedError(
                    f"padd.MoE.from_hf: {type(block).__name__}'s forward does not run on hidden states "
                    f"alone ({type(error).__name__}), so padd cannot check it computes the same"
                ) from None
            want = want[0] if isinstance(want, tuple) else want
            got = moe(x)
            worst = max(
                worst,
                float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)),
            )
    finally:
        block.train(was_training)
    return worst


def _check_groups(num_experts: int, top_k: int, n_group: int | None, topk_group: int | None) -> None:
    if n_group is None and topk_group is None:
        return
    if n_group is None or topk_group is None:
        raise ValueError("n_group and topk_group go together")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must lie in [1, n_group={n_group}]")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(f"top_k={top_k} exceeds the experts of the topk_group={topk_group} groups kept")


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
