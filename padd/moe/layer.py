"""`padd.MoE`: a drop-in sparse MoE layer (router + experts) on padd's kernels.

Shape legend: T tokens (all leading dims flattened), H hidden, I expert width, E experts,
K = top_k.

Parameters use transformers' fused-experts layout so HF weights are shared, never copied:
`gate.weight [E, H]`, `gate_up_proj [E, 2I, H]` (gate rows, then up rows), `down_proj [E, H, I]`;
with `transposed=True` transformers' `is_transposed` layout (`[E, H, 2I]` / `[E, I, H]`, GPT-OSS,
Aria), and with `expert_bias=True` the biases `gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]`.
With a non-gated activation ("relu2", "relu", "silu", "gelu": Nemotron-H, Ergo) the first weight
is the up projection alone, named as transformers names it for experts with `has_gate=False`:
`up_proj [E, I, H]` (`[E, H, I]` transposed) and `up_proj_bias [E, I]`; there is no
`gate_up_proj` then.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from padd.kernels import Routing, moe_ffn, route, routing_from_topk
from padd.kernels.grouped_gemm.activation import GatedActivation

__all__ = ["MoE"]

_SCORES = ("softmax", "sigmoid")
_BIAS_PLACES = ("logits", "scores")
_GROUP_SCORES = ("top2_sum", "max")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoE(nn.Module):
    """Top-k routed experts: `y_t = Σ_j w_tj · down_e(act(gate_e x_t, up_e x_t))` (+ shared), or
    `Σ_j w_tj · down_e(act(up_e x_t))` for a non-gated activation.

    Args:
        hidden_size: H.
        intermediate_size: I, each expert's width.
        num_experts: E.
        top_k: K experts per token, 1 <= K <= E.
        score: "softmax" or "sigmoid" router scores.
        norm_topk_prob: renormalise the K weights to sum to 1 (a softmax taken over the K selected
            logits only, as GPT-OSS, Granite-MoE or Aria compute it, is exactly this).
        use_selection_bias: hold a `selection_bias [E]` fp32 buffer (`[E + Z]` with
            zero-computation experts) added for top-k *selection only* (auxiliary-loss-free
            balancing; weights stay unbiased).
        selection_bias_on: where the selection bias is added: "logits" or "scores" (the
            softmax probabilities or sigmoid scores). None: the usual convention, the logits for
            softmax without groups and the scores otherwise (DeepSeek-V3). Ernie-4.5 and
            LongCat add it to softmax probabilities, Kolibri to sigmoid logits.
        router_bias: the router is `Linear(H, E)` with a bias (GPT-OSS), added to the logits.
        router_logit_softcap: c > 0: logits become `c · tanh(logits / c)` before scoring
            (Laguna's `router_logit_softcapping`). None: no cap.
        activation, limit, alpha, gate_up_interleaved, gate_softcap, up_softcap: the experts'
            activation, as `padd.kernels.moe_ffn` takes them (default SwiGLU; "gpt_oss" with
            interleaved gate/up rows for GPT-OSS; "swiglu_softcap" with both soft caps for
            Inkling2). A gated activation ("swiglu", "swiglu_limit", "swiglu_limit_post",
            "gpt_oss", "swiglu_softcap") gives the first weight `gate_up_proj [E, 2I, H]`; a
            non-gated one ("relu2" `relu(u)²` for Nemotron-H and Ergo, "relu", "silu", "gelu";
            no limit, alpha or interleaving) gives `up_proj [E, I, H]` instead.
        transposed: store the expert weights as transformers' `is_transposed` experts do,
            `gate_up_proj [E, H, 2I]` (`up_proj [E, H, I]`) and `down_proj [E, I, H]` (GPT-OSS,
            Aria, Ergo); the kernels read them through transposed views, never a copy.
        expert_bias: hold `gate_up_proj_bias [E, 2I]` (same row layout as the gate/up rows;
            `up_proj_bias [E, I]` non-gated) and `down_proj_bias [E, H]`, added after each
            projection (GPT-OSS).
        routed_scaling_factor: multiplies the K weights after any renormalisation (DeepSeek-V3).
        n_group, topk_group: group-limited selection: experts form `n_group` groups of
            consecutive ids, each scored by `group_score`; a token picks its top-k among the
            `topk_group` best groups only. None: no groups.
        group_score: how a group is scored from its experts' (bias-added) selection keys:
            "top2_sum" (the sum of its two best, DeepSeek-V3's `noaux_tc`) or "max" (DeepSeek-V2's
            `group_limited_greedy`).
        shared_experts: an optional module run on every token and added to the output.
        shared_expert_gate: optional `Linear(H, 1)`; the shared output is scaled by its sigmoid.
        output_norm: an optional module applied to the layer's output (routed plus shared
            experts), as A.X-K1's `post_mlp_layernorm`.
        num_zero_experts: Z zero-computation experts (LongCat-Flash): the router scores E + Z
            slots, and a token's pick of slot E + j adds `w · x` (its input, weighted) instead of
            an expert's output. The selection bias then has E + Z entries; no groups.

    After each forward: `last_router_logits [T, E]` (`[T, E + Z]`), `last_routing` (a
    `padd.kernels.Routing` with scores, over the E + Z slots), and the properties `aux_loss`
    (Switch-style `E · Σ f_i · P_i`) and `z_loss` (`mean_t logsumexp(z_t)²`), all
    differentiable with respect to the router.

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
        selection_bias_on: str | None = None,
        router_bias: bool = False,
        router_logit_softcap: float | None = None,
        activation: str = "swiglu",
        limit: float | None = None,
        alpha: float | None = None,
        gate_up_interleaved: bool = False,
        gate_softcap: float | None = None,
        up_softcap: float | None = None,
        transposed: bool = False,
        expert_bias: bool = False,
        routed_scaling_factor: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        group_score: str = "top2_sum",
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        output_norm: nn.Module | None = None,
        num_zero_experts: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_config(hidden_size, intermediate_size, num_experts, top_k, score)
        _check_groups(num_experts, top_k, n_group, topk_group)
        _check_zero_experts(num_zero_experts, n_group)
        _check_routing_options(
            selection_bias_on, router_logit_softcap, group_score, n_group, routed_scaling_factor
        )
        for flag, value in (
            ("router_bias", router_bias),
            ("transposed", transposed),
            ("expert_bias", expert_bias),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.norm_topk_prob = bool(norm_topk_prob)
        self.selection_bias_on = selection_bias_on
        self.router_logit_softcap = None if router_logit_softcap is None else float(router_logit_softcap)
        # Validates activation, limit, alpha, gate_up_interleaved and the soft caps, naming the argument.
        self.activation = GatedActivation(
            activation, limit, alpha, gate_up_interleaved, gate_softcap, up_softcap
        )
        self.transposed = transposed
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        self.output_norm = output_norm
        self.num_zero_experts = num_zero_experts
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, self.num_slots, bias=router_bias, **factory)
        E, H, I = num_experts, hidden_size, intermediate_size
        W = self.activation.width(I)  # 2I gated (gate rows, up rows), I non-gated (up rows)
        first_shape, down_shape = ((E, H, W), (E, I, H)) if transposed else ((E, W, H), (E, H, I))
        first, first_bias = self._first_names()
        self.register_parameter(first, nn.Parameter(torch.empty(first_shape, **factory)))
        self.down_proj = nn.Parameter(torch.empty(down_shape, **factory))
        if expert_bias:
            self.register_parameter(first_bias, nn.Parameter(torch.empty(E, W, **factory)))
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, **factory))
        else:
            self.register_parameter(first_bias, None)
            self.register_parameter("down_proj_bias", None)
        bias_S = None
        if use_selection_bias:  # one entry per slot the router scores (E + Z)
            bias_S = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
        self.register_buffer("selection_bias", bias_S)
        self.last_router_logits: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        """What the router scores: the E experts, then the Z zero-computation experts."""
        return self.num_experts + self.num_zero_experts

    @property
    def use_selection_bias(self) -> bool:
        return self.selection_bias is not None

    @property
    def gated(self) -> bool:
        """The experts' first weight is `gate_up_proj` (gate and up rows); else `up_proj` alone."""
        return self.activation.gated

    def _first_names(self) -> tuple[str, str]:
        """Attribute names of the first projection and its bias: gate/up, or up when non-gated."""
        return ("gate_up_proj", "gate_up_proj_bias") if self.activation.gated else ("up_proj", "up_proj_bias")

    def first_proj(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """`(gate_up_proj, gate_up_proj_bias)`, or `(up_proj, up_proj_bias)` when non-gated, as
        stored (not transposed)."""
        first, first_bias = self._first_names()
        return getattr(self, first), getattr(self, first_bias)

    def reset_parameters(self) -> None:
        """nn.Linear-style init: uniform(±1/sqrt(fan_in)) for the router and both projections;
        expert biases start at zero."""
        first, first_bias = self.first_proj()
        if first.is_meta:
            return
        self.gate.reset_parameters()
        bound_in, bound_mid = 1.0 / math.sqrt(self.hidden_size), 1.0 / math.sqrt(self.intermediate_size)
        with torch.no_grad():
            first.uniform_(-bound_in, bound_in)
            self.down_proj.uniform_(-bound_mid, bound_mid)
            for bias in (first_bias, self.down_proj_bias):
                if bias is not None:
                    bias.zero_()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gate_up [E, 2I, H] or up [E, I, H], down [E, H, I])` as `moe_ffn` takes them (views
        when transposed)."""
        first = self.first_proj()[0]
        if self.transposed:
            return first.transpose(1, 2), self.down_proj.transpose(1, 2)
        return first, self.down_proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` -> `[..., H]` in the input's dtype."""
        self._check_input(hidden_states)
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        logits_TE = self.gate(x_TH)
        routing = self._route(logits_TE)
        experts_routing, identity_T1 = self._split_zero_experts(routing)
        act = self.activation
        gate_up, down = self.expert_weights()
        y_TH = moe_ffn(
            x_TH,
            gate_up,
            down,
            experts_routing,
            activation=act.name,
            limit=act.limit,
            alpha=act.alpha,
            gate_up_interleaved=act.interleaved,
            gate_softcap=act.gate_softcap,
            up_softcap=act.up_softcap,
            gate_up_bias=self.first_proj()[1],
            down_bias=self.down_proj_bias,
        )
        if identity_T1 is not None:
            y_TH = y_TH + (x_TH * identity_T1).to(y_TH.dtype)
        if self.shared_experts is not None:
            shared_TH = self.shared_experts(x_TH)
            if self.shared_expert_gate is not None:
                shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
            y_TH = y_TH + shared_TH
        if self.output_norm is not None:
            y_TH = self.output_norm(y_TH)
        self.last_router_logits = logits_TE
        self.last_routing = routing
        return y_TH.reshape(hidden_states.shape)

    def _split_zero_experts(self, routing: Routing) -> tuple[Routing, torch.Tensor | None]:
        """`(the routing the experts run, the weight of the input per token [T, 1] or None)`.

        A pick of a zero-computation slot adds its weight to the token's identity weight and
        becomes a pick of a real expert with weight 0 (the one LongCat-Flash maps it to, spreading
        them over the experts), so every token keeps K slots for the grouped GEMMs and the
        output is the block's: an expert's output times 0 adds nothing (for finite outputs, as in
        the block itself)."""
        if not self.num_zero_experts:
            return routing, None
        E, Z = self.num_experts, self.num_zero_experts
        ids_TK, w_TK = routing.expert_ids, routing.weights
        zero_TK = ids_TK >= E
        identity_T1 = w_TK.masked_fill(~zero_TK, 0.0).sum(dim=-1, keepdim=True)
        stand_in_TK = torch.where(zero_TK, (ids_TK - E) * E // Z, ids_TK)
        return routing_from_topk(stand_in_TK, w_TK.masked_fill(zero_TK, 0.0), E), identity_T1

    def _bias_on_logits(self) -> bool:
        if self.selection_bias_on is not None:
            return self.selection_bias_on == "logits"
        return self.score == "softmax" and self.n_group is None

    def _route(self, logits_TE: torch.Tensor) -> Routing:
        # `route` (the custom op) selects on logits + bias for softmax and scores + bias for sigmoid.
        conventional = self.selection_bias is None or self._bias_on_logits() == (self.score == "softmax")
        if self.n_group is None and self.router_logit_softcap is None and conventional:
            routing = route(
                logits_TE,
                self.top_k,
                score=self.score,
                selection_bias=self.selection_bias,
                renormalize=self.norm_topk_prob,
                return_scores=True,
            )
        else:
            routing = self._route_in_torch(logits_TE)
        if self.routed_scaling_factor != 1.0:
            routing.weights = routing.weights * self.routed_scaling_factor
        return routing

    def _route_in_torch(self, logits_TE: torch.Tensor) -> Routing:
        """Soft cap, bias on the logits or the scores, group-limited top-k, in plain torch."""
        logits_TE = logits_TE.float()
        if self.router_logit_softcap is not None:
            cap = self.router_logit_softcap
            logits_TE = torch.tanh(logits_TE / cap) * cap
        scores_TE = logits_TE.softmax(-1) if self.score == "softmax" else logits_TE.sigmoid()
        on_logits = self._bias_on_logits()
        choice_TE = (logits_TE if on_logits else scores_TE).detach()
        if self.selection_bias is not None:
            choice_TE = choice_TE + self.selection_bias.float()
        if self.n_group is not None:
            tokens = choice_TE.shape[0]
            grouped_TGN = choice_TE.view(tokens, self.n_group, -1)
            if self.group_score == "max":
                group_scores_TG = grouped_TGN.amax(dim=-1)
            else:
                group_scores_TG = grouped_TGN.topk(min(2, grouped_TGN.shape[-1]), dim=-1)[0].sum(dim=-1)
            best_groups_TG = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
            keep_TE = keep_TG.repeat_interleave(self.num_slots // self.n_group, dim=1)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        ids_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        routing = routing_from_topk(ids_TK, weights_TK, self.num_slots)
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
        dtype = self.down_proj.dtype
        if x.dtype != dtype:
            raise TypeError(f"MoE input dtype {x.dtype} != parameter dtype {dtype}; cast one of them")

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

        The block needs a linear top-k router (`block.gate` or `block.router`, holding a
        `[E, H]` weight itself or in its one `Linear` child, an optional `[E]` bias, and
        `top_k`) and experts `block.experts` that padd runs fused: any activation of `moe_ffn`
        (gated, or non-gated with an `up_proj` as Nemotron-H's relu²), transformers' plain or
        transposed layout, with or without biases. The routing is read
        from the router's and the block's attributes (a correction bias `e_score_correction_bias`
        or `expert_bias`, `routed_scaling_factor` / `router_scaling_factor` / `route_scale`,
        `n_group` / `topk_group` / `topk_method`, `norm_topk_prob`,
        `router_logit_softcapping`); the score function (softmax or sigmoid), the normalisation
        when no attribute says, and where the correction bias is added (logits or scores) are
        the ones whose output equals the block's. Shared experts (`shared_experts`,
        `shared_expert` or `shared_mlp`, with an optional `shared_expert_gate`) are held as they
        are and added to every token. One other module of the block with only `[H]` parameters (a
        norm, as A.X-K1's `post_mlp_layernorm`) is held as `output_norm` when verification shows
        the block applies it to its output.

        A router that scores Z slots beyond the E experts is taken as LongCat-Flash's
        zero-computation experts (`num_zero_experts`) when verification shows the block computes
        them so.

        Refused, with one line naming the block: a forward that takes more than hidden states
        (token ids, state from another layer), a router that is not linear or scores slots
        beyond the E experts that are not zero-computation experts (or cannot be verified to
        be), experts padd runs only through its general path (an activation it does not fuse, a
        norm after each expert) or sharded across ranks, experts that compute more than their
        projections (Ergo's per-route norm in their own forward), a block with modules padd has
        no place for (latent projections, a norm applied elsewhere than to the output, any norm
        when `verify` is off or with `routed_experts_only`), and any block whose output padd
        does not reproduce.

        Args:
            block: the transformers block (e.g. `model.model.layers[i].mlp`).
            routed_experts_only: leave the shared experts out (the result then differs from
                the block by exactly their output); verified with them, then dropped.
            use_selection_bias: add a fresh zero `selection_bias [E]` buffer, for a block
                without a correction bias (Stage IV, `RoutingControl`).
            verify: run the block and the result on probe tokens (eval mode) and refuse unless
                they agree to 1e-4 of the output's scale, with the block's correction bias as it
                is and perturbed (so that where it is added is checked too). Leave it on: it is
                what makes "exact or refused" hold for routers padd has not seen.

        Raises:
            TypeError: not a sparse MoE block; NotImplementedError: one line saying what padd
            does not compute (layout, activation, routing); ValueError: `use_selection_bias` on a
            block that has a correction bias.
        """
        from .experts_plan import is_experts_module, plan_experts  # needs nothing of this module

        name = type(block).__name__
        experts = getattr(block, "experts", None)
        router_name, router = _find_router(block)
        if router is None or not isinstance(experts, nn.Module) or not is_experts_module(experts):
            raise TypeError(
                f"{name} is not a transformers sparse MoE block (needs a `gate` or `router` and "
                "@use_experts_implementation `experts`)"
            )

        def refuse(what: str) -> NotImplementedError:
            return NotImplementedError(f"padd.MoE.from_hf: {name}: {what}")

        extra_inputs = _extra_forward_inputs(block)
        if extra_inputs:
            raise refuse(
                f"its forward takes more than hidden states ({', '.join(extra_inputs)}); padd routes "
                "on hidden states alone"
            )
        try:
            plan = plan_experts(experts)
        except NotImplementedError as error:
            raise refuse(str(error)) from None
        layout = plan.layout
        if not plan.fused:
            raise refuse(
                f"its experts run padd's general path ({plan.why}); run the model with "
                'experts_implementation="padd" instead'
            )
        extras = _experts_extras(experts)
        if extras:
            raise refuse(
                f"its experts {type(experts).__name__} compute more than routed projections "
                f"({extras}) and padd.MoE has no place for it; "
                'run the model with experts_implementation="padd" instead'
            )
        if layout.expert_parallel:
            raise refuse("its experts are sharded across ranks")
        num_experts = layout.num_experts
        # Modules beyond router, experts and shared experts first (Nemotron-H's latent
        # projections also make the router's width differ from the experts').
        shared, shared_gate = _shared_parts(block)
        owned = {router_name, "experts"} | {
            n for n, m in block.named_children() if m is shared or m is shared_gate
        }
        strangers = [
            n
            for n, m in block.named_children()
            if n not in owned and any(True for _ in m.parameters()) | any(True for _ in m.buffers())
        ]
        output_norm = None
        if strangers:
            candidate = getattr(block, strangers[0]) if len(strangers) == 1 else None
            # A norm is held only where verification can show the block applies it to its
            # output, and the output keeps the shared experts it normalises together with.
            if not (verify and not routed_experts_only and _is_output_norm_like(candidate, layout.hidden)):
                raise refuse(f"padd.MoE has no place for its {', '.join(strangers)}")
            output_norm = candidate
        linear = _router_linear(router, layout.hidden)
        if linear is None:
            raise refuse(
                f"its router {router_name} ({type(router).__name__}) is not linear (no [E, H] weight "
                "of its own or in one Linear child)"
            )
        weight, router_bias = linear
        num_slots = weight.shape[0]
        extra_slots = (
            f"its router scores {num_slots} slots for {num_experts} experts "
            "(zero-computation or shared-expert slots)"
        )
        # Slots beyond the experts are taken as zero-computation experts (LongCat-Flash) only where
        # verification can show the block computes them so.
        if num_slots < num_experts or (num_slots > num_experts and not verify):
            raise refuse(extra_slots)
        num_zero = num_slots - num_experts
        top_k = _int_attr(router, block, ("top_k",))
        if top_k is None or not 1 <= top_k <= num_experts:
            raise refuse(f"its router {router_name} has no top_k in [1, {num_experts}]")
        correction = _correction_bias(router, block)
        if correction is not None and correction.numel() != num_slots:
            entries = f"its correction bias has {correction.numel()} entries for {num_slots} slots"
            raise refuse(f"{extra_slots}; {entries}" if num_zero else entries)
        if correction is not None:
            correction = correction.view(num_slots)
            if use_selection_bias:
                raise ValueError(f"{name} has a correction bias already: it is the selection bias")
        topk_method = _first_attr((router, block), ("topk_method",), str)
        n_group = _int_attr(router, block, ("n_group", "num_group"))
        topk_group = _int_attr(router, block, ("topk_group",))
        if topk_method == "greedy" or (
            n_group is not None and (n_group <= 1 or topk_group is None or topk_group >= n_group)
        ):
            n_group = topk_group = None  # plain top-k, one group, or every group kept
        if num_zero and n_group is not None:
            raise refuse(extra_slots)
        group_score = "max" if topk_method == "group_limited_greedy" else "top2_sum"
        scale = 1.0
        for owner in (router, block):  # a router scales its weights, or a block its routed output
            value = _first_attr((owner,), _SCALE_NAMES, float)
            scale *= 1.0 if value is None else value
        softcap = _first_attr((router, block), ("router_logit_softcapping",), float)
        norm = getattr(router, "norm_topk_prob", getattr(block, "norm_topk_prob", None))
        act = plan.activation
        scores = ("sigmoid", "softmax") if correction is not None else ("softmax", "sigmoid")
        candidates = [
            dict(score=score, norm_topk_prob=norm_choice, selection_bias_on=place)
            for score in scores
            for norm_choice in ((bool(norm),) if isinstance(norm, bool) else (True, False))
            for place in (
                (("scores", "logits") if score == "sigmoid" or n_group is not None else ("logits", "scores"))
                if correction is not None and n_group is None
                else (None,)
            )
        ]
        gate_up_bias, down_bias = layout.biases(experts)
        with torch.device("meta"):
            moe = cls(
                hidden_size=layout.hidden,
                intermediate_size=layout.inter,
                num_experts=num_experts,
                top_k=top_k,
                router_bias=router_bias is not None,
                router_logit_softcap=softcap if softcap is not None and softcap > 0 else None,
                activation=act.name,
                limit=act.limit,
                alpha=act.alpha,
                gate_up_interleaved=act.interleaved,
                gate_softcap=act.gate_softcap,
                up_softcap=act.up_softcap,
                transposed=layout.is_transposed,
                expert_bias=gate_up_bias is not None,
                routed_scaling_factor=scale,
                n_group=n_group,
                topk_group=topk_group,
                group_score=group_score,
                num_zero_experts=num_zero,
                **candidates[0],
            )
        moe.gate.weight = weight
        if router_bias is not None:
            moe.gate.bias = router_bias
        first, first_bias = moe._first_names()  # the experts' own names: gate_up_proj or up_proj
        setattr(moe, first, getattr(experts, first))
        moe.down_proj = experts.down_proj
        if gate_up_bias is not None:
            setattr(moe, first_bias, gate_up_bias)
            moe.down_proj_bias = down_bias
        moe.shared_experts, moe.shared_expert_gate = shared, shared_gate
        moe.output_norm = output_norm
        if correction is not None:
            moe.register_buffer("selection_bias", correction)
        if verify:
            try:
                _choose_verified(block, moe, candidates, refuse)
            except NotImplementedError as failure:
                # What padd took on trust for verification to confirm is what the refusal names.
                guesses = [extra_slots] if num_zero else []
                if output_norm is not None:
                    guesses.append(f"padd.MoE has no place for its {strangers[0]}")
                if not guesses:
                    raise
                why = str(failure).split(": ", 2)[-1]
                raise refuse(f"{'; '.join(guesses)}: taken as padd computes it, {why}") from None
        if routed_experts_only:
            moe.shared_experts = moe.shared_expert_gate = None
        if use_selection_bias:
            moe.register_buffer(
                "selection_bias", torch.zeros(num_slots, dtype=torch.float32, device=weight.device)
            )
        return moe

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"norm_topk_prob={self.norm_topk_prob}, use_selection_bias={self.use_selection_bias}, "
            f"activation={self.activation.name!r}, transposed={self.transposed}, "
            f"expert_bias={self.down_proj_bias is not None}"
            + (f", num_zero_experts={self.num_zero_experts}" if self.num_zero_experts else "")
        )


_VERIFY_TOLERANCE = 1e-4
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
_CORRECTION_NAMES = ("e_score_correction_bias", "expert_bias")
_SCALE_NAMES = ("routed_scaling_factor", "router_scaling_factor", "route_scale")


def _is_output_norm_like(module: nn.Module | None, hidden: int) -> bool:
    """A module that can only be a per-position norm of `[.., H]` states: parameters (at least one),
    all `[H]`, and no children (A.X-K1's `post_mlp_layernorm`, an RMSNorm or a LayerNorm)."""
    if module is None or any(True for _ in module.children()):
        return False
    params = list(module.parameters())
    return bool(params) and all(tuple(p.shape) == (hidden,) for p in params)


def _find_router(block: nn.Module) -> tuple[str, nn.Module | None]:
    for attr in _ROUTER_NAMES:
        router = getattr(block, attr, None)
        if isinstance(router, nn.Module):
            return attr, router
    return _ROUTER_NAMES[0], None


def _router_linear(router: nn.Module, hidden: int) -> tuple[nn.Parameter, nn.Parameter | None] | None:
    """`(weight [R, H], bias [R] or None)` of a linear router: its own, or its one Linear child's."""
    owners = [router]
    if not isinstance(getattr(router, "weight", None), nn.Parameter):
        owners = [m for m in router.children() if isinstance(m, nn.Linear)]
    if len(owners) != 1:
        return None
    weight, bias = getattr(owners[0], "weight", None), getattr(owners[0], "bias", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or weight.shape[1] != hidden:
        return None
    bias_ok = isinstance(bias, nn.Parameter) and tuple(bias.shape) == (weight.shape[0],)
    return weight, (bias if bias_ok else None)


def _correction_bias(router: nn.Module, block: nn.Module) -> torch.Tensor | None:
    """A selection-only bias on the router, the block, or a parameter-only child of the router
    (Ernie-4.5's `moe_statics`)."""
    owners = [router, block, *(m for m in router.children() if not isinstance(m, nn.Linear))]
    for owner in owners:
        for attr in _CORRECTION_NAMES:
            value = getattr(owner, attr, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    return None


def _experts_extras(experts: nn.Module) -> str:
    """What an experts module computes beyond its projections, or "": submodules holding
    parameters or buffers (Ergo's per-route `post_expert_norm`), or a class `forward` that wraps
    the one transformers dispatches (which padd replaces) in more compute of its own."""
    holders = [
        n
        for n, m in experts.named_children()
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers())
    ]
    forward = getattr(type(experts), "forward", None)
    # The dispatcher copies the wrapped forward's name (functools.wraps), not its code's.
    code = getattr(forward, "__code__", None)
    dispatched = "use_experts_implementation" in getattr(code, "co_qualname", "")
    what = [f"its {n}" for n in holders]
    if not dispatched:
        what.append(f"a forward of its own, {getattr(forward, '__qualname__', '?')}")
    return ", ".join(what)


def _first_attr(owners: tuple, names: tuple[str, ...], kind: type) -> float | str | None:
    for owner in owners:
        for attr in names:
            value = getattr(owner, attr, None)
            if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if kind is str and isinstance(value, str):
                return value
    return None


def _extra_forward_inputs(block: nn.Module) -> list[str]:
    """Parameters of `block.forward` after the hidden states (ignoring `*args` / `**kwargs`)."""
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in params[1:] if p.kind not in positional]


def _shared_parts(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    shared = next(
        (m for m in (getattr(block, n, None) for n in _SHARED_NAMES) if isinstance(m, nn.Module)), None
    )
    gate = getattr(block, "shared_expert_gate", None)
    return shared, (gate if isinstance(gate, nn.Module) else None)


def _int_attr(gate: nn.Module, block: nn.Module, names: tuple[str, ...]) -> int | None:
    for owner in (gate, block, getattr(gate, "config", None)):
        for attr in names:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _choose_verified(block: nn.Module, moe: MoE, candidates: list[dict], refuse) -> None:
    """Set on `moe` the first routing candidate whose output equals the block's, or raise."""
    errors = []
    for candidate in candidates:  # score, normalisation and bias place are plain attributes
        moe.score = candidate["score"]
        moe.norm_topk_prob = candidate["norm_topk_prob"]
        moe.selection_bias_on = candidate["selection_bias_on"]
        try:
            error = _relative_gap(block, moe)
            if error <= _VERIFY_TOLERANCE and moe.selection_bias is not None:
                error = max(error, _gap_with_perturbed_bias(block, moe))
        except NotImplementedError as why:  # already one line of its own
            raise refuse(str(why)) from None
        except (ValueError, RuntimeError, TypeError) as mismatch:
            first_line = (str(mismatch).splitlines() or [""])[0][:120]
            raise refuse(f"it does not run as a padd.MoE ({type(mismatch).__name__}: {first_line})") from None
        if error <= _VERIFY_TOLERANCE:
            return
        place = f"/{candidate['selection_bias_on']}" if candidate["selection_bias_on"] else ""
        errors.append(f"{candidate['score']}{place}: {error:.1e}")
    raise refuse(
        f"its output differs from every routing padd computes (relative gap {', '.join(errors)}); "
        "its router or block forward is not one padd knows"
    )


@torch.no_grad()
def _gap_with_perturbed_bias(block: nn.Module, moe: MoE) -> float:
    """`_relative_gap` with the shared correction bias moved by N(0, 0.1²) (restored after), so
    that a bias of zeros (a fresh checkpoint) cannot hide where the block adds it."""
    bias = moe.selection_bias
    saved = bias.clone()
    generator = torch.Generator(device="cpu").manual_seed(1)
    try:
        noise = torch.randn(bias.shape, generator=generator) * 0.1
        bias.add_(noise.to(device=bias.device, dtype=bias.dtype))
        return _relative_gap(block, moe)
    finally:
        bias.copy_(saved)


@torch.no_grad()
def _relative_gap(block: nn.Module, moe: MoE) -> float:
    """`max |block(x) - moe(x)| / max |block(x)|` over probe tokens at two scales, in eval mode."""
    weight = moe.down_proj
    if weight.is_meta:
        raise NotImplementedError("it is on the meta device, where padd cannot verify it; pass verify=False")
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
            except Exception as error:  # a block that needs more than hidden states
                raise NotImplementedError(
                    f"its forward does not run on hidden states alone ({type(error).__name__}), so "
                    "padd cannot check it computes the same"
                ) from None
            want = want[0] if isinstance(want, tuple) else want
            if not isinstance(want, torch.Tensor) or want.shape != x.shape:
                shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
                raise NotImplementedError(
                    f"its forward returns {shape}, not the input's shape {tuple(x.shape)}"
                )
            got = moe(x)
            worst = max(
                worst,
                float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)),
            )
    finally:
        block.train(was_training)
    return worst


def _check_routing_options(
    selection_bias_on: str | None,
    softcap: float | None,
    group_score: str,
    n_group: int | None,
    routed_scaling_factor: float,
) -> None:
    if selection_bias_on is not None and selection_bias_on not in _BIAS_PLACES:
        raise ValueError(
            f"selection_bias_on must be None or one of {_BIAS_PLACES}, got {selection_bias_on!r}"
        )
    if selection_bias_on == "logits" and n_group is not None:
        raise ValueError(
            "selection_bias_on='logits' does not go with n_group: groups are scored on the scores"
        )
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap <= 0
    ):
        raise ValueError(f"router_logit_softcap must be None or a number > 0, got {softcap!r}")
    if group_score not in _GROUP_SCORES:
        raise ValueError(f"group_score must be one of {_GROUP_SCORES}, got {group_score!r}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, int | float):
        raise TypeError(f"routed_scaling_factor must be a number, got {type(routed_scaling_factor).__name__}")


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


def _check_zero_experts(num_zero_experts: int, n_group: int | None) -> None:
    if isinstance(num_zero_experts, bool) or not isinstance(num_zero_experts, int) or num_zero_experts < 0:
        raise ValueError(f"num_zero_experts must be an int >= 0, got {num_zero_experts!r}")
    if num_zero_experts and n_group is not None:
        raise ValueError("zero-computation experts with group-limited selection (n_group) are not supported")


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
