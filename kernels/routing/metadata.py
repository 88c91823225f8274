"""The routing result: one explicit object that every MoE kernel consumes.

Shape legend: T tokens, E experts, K = top_k, S = T·K token slots. Slot `s = t·K + j` is the
j-th choice of token t.

Invariants (tested in tests/kernels/test_routing_*):
- `sort_order` lists the slots sorted by expert, stably (slots of one expert keep slot order);
- `inverse_order[sort_order] == arange(S)`;
- `tokens_per_expert.sum() == S` and `expert_offsets == [0, cumsum(tokens_per_expert)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Top-k routing decisions plus the permutation metadata the grouped expert GEMMs need.

    T tokens, E experts, K = top_k; slot `s = t·K + j` is the j-th choice of token t.

    Attributes:
        weights: `[T, K]` fp32 gate weights of the chosen experts (differentiable).
        expert_ids: `[T, K]` int32 ids of the chosen experts; ties resolve to the lower id.
        tokens_per_expert: `[E]` int32 number of slots routed to each expert.
        expert_offsets: `[E + 1]` int32 `[0, cumsum(tokens_per_expert)]`.
        sort_order: `[T·K]` int32 slot ids sorted by expert (stable).
        inverse_order: `[T·K]` int32 position of each slot in `sort_order`.
        num_experts: E.
        scores: `[T, E]` fp32 full score vector (softmax or sigmoid of the logits), when
            requested (`route(..., return_scores=True)`), else None.
        logsumexp: `[T]` fp32 log-sum-exp of the logits per token (for the z-loss), when
            available (`route(..., score="softmax")`), else None.
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sort_order: torch.Tensor
    inverse_order: torch.Tensor
    num_experts: int
    scores: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None

    @classmethod
    def with_lazy_metadata(
        cls,
        weights: torch.Tensor,
        expert_ids: torch.Tensor,
        flat_ids_S: torch.Tensor,
        num_experts: int,
        scores: torch.Tensor | None = None,
        logsumexp: tuple | None = None,
    ) -> Routing:
        """A `Routing` whose four metadata fields are computed from `flat_ids_S` (int32 or int64
        `[T·K]`, `expert_ids` flattened, every id in [0, E)) on first access, by `sorted_metadata`,
        and whose `logsumexp`, when `logsumexp` is `(fn, *args)`, is `fn(*args)` on first access
        (None: no logsumexp).

        `route`'s eager CPU path returns this: callers that read only `expert_ids` and
        `weights` (the transformers re-routing hook of the default pipeline) skip the sort, and
        on CPU the metadata's ~8 small ops cost as much as routing a few hundred tokens; the
        logsumexp is read only by the z-loss."""
        r = cls.__new__(cls)
        r.__dict__.update(
            weights=weights,
            expert_ids=expert_ids,
            num_experts=num_experts,
            scores=scores,
            _lazy_ids_S=flat_ids_S,
        )
        if logsumexp is None:
            r.__dict__["logsumexp"] = None
        else:
            r.__dict__["_lazy_logsumexp"] = logsumexp
        return r

    def _fill_lazy(self, name: str):
        """The value of lazy field `name` (see `_LazyField`), computed and stored on first read."""
        state = self.__dict__
        if name == "logsumexp":
            lazy = state.pop("_lazy_logsumexp", None)
            value = state["logsumexp"] = None if lazy is None else lazy[0](*lazy[1:])
            return value
        lazy = state.pop("_lazy_ids_S", None)
        if lazy is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        fields = sorted_metadata(lazy, state["num_experts"])
        for key, value in zip(_METADATA_FIELDS, fields, strict=True):
            state.setdefault(key, value)  # a field the caller assigned meanwhile stays
        return state[name]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    def load_fraction(self) -> torch.Tensor:
        """f_i: fraction of routed slots that went to each expert, fp32 [E] (no gradient)."""
        total = max(self.num_tokens * self.top_k, 1)
        return self.tokens_per_expert.float() / total

    def aux_loss(self) -> torch.Tensor:
        """Switch-style load-balancing loss `E · Σ_i f_i · P_i` (needs `scores`)."""
        if self.scores is None:
            raise ValueError("aux_loss needs the full scores: call route(..., return_scores=True)")
        if self.num_tokens == 0:
            return self.scores.sum() * 0.0
        prob_mean_E = self.scores.mean(dim=0)
        return self.num_experts * torch.sum(self.load_fraction() * prob_mean_E)

    def z_loss(self) -> torch.Tensor:
        """Router z-loss `mean_t logsumexp(z_t)^2` (ST-MoE)."""
        if self.logsumexp is None:
            raise ValueError("z_loss needs the logsumexp, which route() computes for score='softmax'")
        if self.num_tokens == 0:
            return self.logsumexp.sum() * 0.0
        return self.logsumexp.square().mean()


_METADATA_FIELDS = ("tokens_per_expert", "expert_offsets", "sort_order", "inverse_order")


class _LazyField:
    """A non-data descriptor on `Routing` for a field that `with_lazy_metadata` leaves out of the
    instance: an instance's own value (every `Routing(...)` sets all fields) shadows it, so it
    runs only for a lazy instance's first read, which it computes and stores. Cheaper than a
    `__getattr__` (no AttributeError raised and caught first)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj._fill_lazy(self.name)


# After the dataclass took its defaults (`logsumexp = None` lives on in `__init__`'s signature).
for _name in (*_METADATA_FIELDS, "logsumexp"):
    setattr(Routing, _name, _LazyField(_name))
del _name
_ARANGES: dict[torch.dtype, torch.Tensor] = {}
_ARANGE_VIEWS: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _arange(n: int, dtype: torch.dtype) -> torch.Tensor:
    """`arange(n)` on CPU as a view of a cached, growing buffer that nothing writes to (the views
    of the sizes last asked for are cached too: slicing a tensor costs more than a lookup)."""
    view = _ARANGE_VIEWS.get((n, dtype))
    if view is not None:
        return view
    buf = _ARANGES.get(dtype)
    if buf is None or buf.numel() < n:
        buf = _ARANGES[dtype] = torch.arange(max(n, 2 * (0 if buf is None else buf.numel())), dtype=dtype)
        _ARANGE_VIEWS.clear()
    if len(_ARANGE_VIEWS) >= 64:
        _ARANGE_VIEWS.clear()
    view = _ARANGE_VIEWS[(n, dtype)] = buf[:n]
    return view


def sorted_metadata(flat_S: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """`routing_metadata` of int32 or int64 ids `[S]` known to lie in [0, E), in fewer ops (CPU).

    The offsets come from the sorted ids' `searchsorted` (int32 directly) and the counts are
    their differences; the inverse permutation is scattered straight into int32. Five small
    ops instead of eleven: at decode sizes on CPU each op's dispatch costs more than its work.
    """
    sorted_S, order_S = torch.sort(flat_S, stable=True)
    offsets_E1 = torch.searchsorted(sorted_S, _arange(num_experts + 1, flat_S.dtype), out_int32=True)
    arange_S = _arange(flat_S.numel(), torch.int32)
    inverse_S = torch.empty(flat_S.numel(), dtype=torch.int32).scatter_(0, order_S, arange_S)
    return offsets_E1.diff(), offsets_E1, order_S.int(), inverse_S


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Permutation metadata from expert choices, in plain torch (no host sync).

    The reference of the `padd::routing_metadata` op (and its CPU path).

    Args:
        expert_ids: `[T, K]` integer expert ids in [0, num_experts).
        num_experts: E.

    Returns:
        `(tokens_per_expert [E], expert_offsets [E + 1], sort_order [T·K], inverse_order [T·K])`,
        all int32: the `Routing` fields of the same names.
    """
    flat_S = expert_ids.reshape(-1).to(torch.int64)
    # Stable sort keeps slots of one expert in slot order: deterministic gathers and combines.
    _, sort_order_S = torch.sort(flat_S, stable=True)
    # One op per field (scatter, pad): Python indexing and slice assignment cost more than the
    # work itself at decode sizes on CPU.
    arange_S = torch.arange(flat_S.numel(), device=flat_S.device)
    inverse_order_S = torch.empty_like(sort_order_S).scatter_(0, sort_order_S, arange_S)
    tokens_per_expert_E = torch.bincount(flat_S, minlength=num_experts)[:num_experts]
    expert_offsets_E1 = torch.nn.functional.pad(torch.cumsum(tokens_per_expert_E, dim=0), (1, 0))
    return (
        tokens_per_expert_E.to(torch.int32),
        expert_offsets_E1.to(torch.int32),
        sort_order_S.to(torch.int32),
        inverse_order_S.to(torch.int32),
    )
