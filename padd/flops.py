"""FLOPs per token of dense teachers and MoE students: analytic from the config, and measured.

Conventions (both ways agree on them, and the tests check equality):
- forward pass only; a matmul `[m, n] @ [n, p]` costs `2·m·n·p`; element-wise ops, norms,
  softmax and biases are not counted (as `torch.utils.flop_counter.FlopCounterMode` does);
- attention scores `QKᵀ` and `AV` are counted over the full `seq_len × seq_len` square (the
  eager kernel computes it before masking), `4·n_heads·head_dim·seq_len` per token;
- MoE: only the k active experts of a token count; the router is `2·d·N`, plus Qwen2-MoE's
  scalar shared-expert gate `2·d`.

Components: attention (q/k/v/o projections + scores), ffn (dense MLP, or active experts and
any shared expert), router, lm_head, other (anything else the counter sees; 0 for the supported
models). `measure` runs the model once under `FlopCounterMode`, on any device including `meta`
(7B-class configs need no weights): attention is switched to "eager" and experts to
"batched_mm" (which gathers exactly the k active experts per token) for the count, unless the
model uses `experts_implementation="padd"` on real tensors: then padd's custom ops are counted
through their own FLOP formulas (on `meta`, padd's routing metadata has no kernel, so
"batched_mm" is used there too).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, PretrainedConfig

__all__ = [
    "DEFAULT_SEQ_LEN",
    "FlopsBreakdown",
    "active_parameters",
    "analytic",
    "compare",
    "measure",
    "meta_model",
    "parameters",
]

DEFAULT_SEQ_LEN = 512
_COMPONENTS = ("attention", "ffn", "router", "lm_head", "other")


@dataclass
class FlopsBreakdown:
    """Forward FLOPs per token, by component."""

    attention: float = 0.0
    ffn: float = 0.0
    router: float = 0.0
    lm_head: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.router + self.lm_head + self.other

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_experts(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0) or 0)


def _is_moe_layer(config: PretrainedConfig, layer: int) -> bool:
    if _num_experts(config) == 0:
        return False
    if layer in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (layer + 1) % (getattr(config, "decoder_sparse_step", 1) or 1) == 0


def analytic(config: PretrainedConfig, *, seq_len: int = DEFAULT_SEQ_LEN) -> FlopsBreakdown:
    """Forward FLOPs per token from a transformers config (dense or MoE decoder LM).

    Example:
        >>> analytic(LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=64), seq_len=64).ffn
        1572864.0
    """
    d, hd = config.hidden_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention_layer = 2 * d * (2 * q + 2 * kv) + 4 * config.num_attention_heads * hd * seq_len
    out = FlopsBreakdown(lm_head=2.0 * d * config.vocab_size)
    for layer in range(config.num_hidden_layers):
        out.attention += attention_layer
        if not _is_moe_layer(config, layer):
            out.ffn += 6.0 * d * config.intermediate_size
            continue
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        out.ffn += 6.0 * d * width * config.num_experts_per_tok
        out.router += 2.0 * d * _num_experts(config)
        if hasattr(config, "shared_expert_intermediate_size"):
            out.ffn += 6.0 * d * config.shared_expert_intermediate_size
            out.router += 2.0 * d  # the shared expert's sigmoid gate
    return out


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of `config` on the `meta` device (no memory, no weights), ready for `measure`."""
    with torch.device("meta"), warnings.catch_warnings():
        # A width-0 Qwen2-MoE shared expert (decompressed students): "initialising is a no-op".
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return AutoModelForCausalLM.from_config(config)


_ATTN = re.compile(r"\.layers\.\d+\.self_attn$")
_MLP = re.compile(r"\.layers\.\d+\.mlp$")
_ROUTER = re.compile(r"\.layers\.\d+\.mlp\.(gate|shared_expert_gate)$")
_LM_HEAD = re.compile(r"(^|\.)lm_head$")
# The rotary tables (an outer product of positions and frequencies, once per forward) run as a
# matmul in some transformers versions and elementwise in others; not per-token model FLOPs.
_ROTARY = re.compile(r"(^|\.)rotary_emb$")


def measure(model: nn.Module, *, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per token counted by `FlopCounterMode` on one `[batch_size, seq_len]` batch.

    Works on real and `meta` tensors. The model's attention and experts implementations are
    switched for the count (see the module docstring) and restored afterwards.
    """
    device = next(model.parameters()).device
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    with _countable(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    total = counts.get("Global", 0) - sum(v for k, v in counts.items() if _ROTARY.search(k))
    pick = lambda pattern: sum(v for k, v in counts.items() if pattern.search(k))
    tokens = batch_size * seq_len
    attention, mlp, router, lm_head = pick(_ATTN), pick(_MLP), pick(_ROUTER), pick(_LM_HEAD)
    return FlopsBreakdown(
        attention=attention / tokens,
        ffn=(mlp - router) / tokens,
        router=router / tokens,
        lm_head=lm_head / tokens,
        other=(total - attention - mlp - lm_head) / tokens,
    )


class _countable:
    """Context: eager attention and a countable experts implementation, restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    def __enter__(self):
        self.attn = self.config._attn_implementation
        self.experts = self.config._experts_implementation  # every transformers 5 config has it
        self.model.set_attn_implementation("eager")
        keep = ("eager", "batched_mm") if self._on_meta() else ("padd", "eager", "batched_mm")
        if self.experts is not None and self.experts not in keep:
            self.model.set_experts_implementation("batched_mm")
        return self

    def _on_meta(self) -> bool:
        # padd's routing metadata (bincount) has no meta kernel: count meta models via batched_mm.
        return next(self.model.parameters()).device.type == "meta"

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.attn)
        if self.experts is not None and self.config._experts_implementation != self.experts:
            self.model.set_experts_implementation(self.experts)


def parameters(model: nn.Module) -> int:
    """Total parameters (tied weights counted once); works on `meta` models."""
    return sum(p.numel() for p in model.parameters())


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: every non-expert tensor plus k/N of each routed expert tensor
    (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        fresh = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        own = sum(p.numel() for p in fresh)
        if hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            own = own * model.config.num_experts_per_tok // module.num_experts
        total += own
    return total


def compare(
    teacher: nn.Module, student: nn.Module, *, seq_len: int = DEFAULT_SEQ_LEN, measured: bool = True
) -> dict:
    """Teacher vs student: FLOPs per token (analytic, and measured when `measured`), their ratio
    (student active / teacher), and total and active parameters."""
    report = {"seq_len": seq_len}
    for name, model in (("teacher", teacher), ("student", student)):
        report[name] = {
            "analytic": analytic(model.config, seq_len=seq_len).as_dict(),
            "params": parameters(model),
            "active_params": active_parameters(model),
        }
        if measured:
            report[name]["measured"] = measure(model, seq_len=seq_len).as_dict()
    key = "measured" if measured else "analytic"
    report["ratio"] = report["student"][key]["total"] / report["teacher"][key]["total"]
    return report
