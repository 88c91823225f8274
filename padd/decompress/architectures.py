"""Which transformers MoE class a dense teacher decompresses into, and how its config maps.

| teacher (dense, gated MLP) | student (transformers MoE) | notes |
|---|---|---|
| Llama, Mistral | Mixtral | Mistral's sliding window carries over |
| Qwen2 | Qwen2-MoE | shared expert of width 0 (see below) |
| Qwen3 | Qwen3-MoE | `head_dim` carried as an extra config key |

Qwen2-MoE always builds a shared expert next to the routed ones. With
`shared_expert_intermediate_size=0` its three projections are `[0, d]`/`[d, 0]` matrices whose
output is exactly zero (an empty sum), so the block is the routed experts alone; only the
scalar `shared_expert_gate` (`d` weights, zero-initialised, `2d` FLOPs per token) remains. This
saves, reloads and runs in plain transformers (tested).

Every check runs on the config alone, before any compute.
"""

from __future__ import annotations

from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

__all__ = ["SUPPORTED_TEACHERS", "DecompressionError", "check_teacher_config", "student_config"]

SUPPORTED_TEACHERS = ("llama", "mistral", "qwen2", "qwen3")
MOE_STUDENTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class DecompressionError(ValueError):
    """An invalid (teacher, N, k) combination, raised before any compute."""


# Config keys the student takes from the teacher unchanged (attention, embeddings, norms).
_SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_teacher_config(
    config: PretrainedConfig, num_experts: int, top_k: int, *, fill: bool = True
) -> None:
    """Raise `DecompressionError` unless `config` can be decompressed into N experts, top-k."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TEACHERS:
        hint = " (already an MoE: use init_pretrained_student)" if model_type in MOE_STUDENTS else ""
        raise DecompressionError(
            f"unsupported teacher architecture {model_type!r}{hint}; "
            f"supported: {', '.join(SUPPORTED_TEACHERS)}"
        )
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecompressionError(f"{name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise DecompressionError(f"top_k={top_k} > num_experts={num_experts}")
    d_ff = config.intermediate_size
    if d_ff % num_experts:
        raise DecompressionError(
            f"intermediate_size d_ff={d_ff} is not divisible by num_experts N={num_experts} "
            "(each core cluster holds d_ff/N neurons)"
        )
    if fill and d_ff % top_k:
        raise DecompressionError(
            f"intermediate_size d_ff={d_ff} is not divisible by top_k k={top_k} "
            "(each expert holds d_ff/k neurons)"
        )
    if getattr(config, "mlp_bias", False):
        raise DecompressionError(f"{model_type} teacher with mlp_bias=True: MoE experts have no bias")
    if model_type == "llama" and getattr(config, "attention_bias", False):
        raise DecompressionError("llama teacher with attention_bias=True: Mixtral attention has no bias")
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise DecompressionError(
            f"{model_type} teacher with use_sliding_window=True: the per-layer windows of {model_type} "
            "have no equivalent in its MoE class"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise DecompressionError(f"hidden_act={act!r}: only SwiGLU (silu) gated MLPs are supported")


def student_config(
    config: PretrainedConfig, num_experts: int, top_k: int, expert_width: int
) -> PretrainedConfig:
    """The transformers MoE config of the student of a dense teacher config."""
    common = {k: getattr(config, k) for k in _SHARED_KEYS if hasattr(config, k)}
    common["head_dim"] = head_dim(config)
    model_type = config.model_type
    if model_type in ("llama", "mistral"):
        return MixtralConfig(
            **common,
            intermediate_size=expert_width,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            sliding_window=getattr(config, "sliding_window", None),
            router_jitter_noise=0.0,
        )
    moe = dict(
        moe_intermediate_size=expert_width,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    )
    if model_type == "qwen2":
        return Qwen2MoeConfig(
            **common,
            **moe,
            intermediate_size=config.intermediate_size,
            shared_expert_intermediate_size=0,
            qkv_bias=True,
        )
    return Qwen3MoeConfig(
        **common,
        **moe,
        intermediate_size=config.intermediate_size,
        attention_bias=getattr(config, "attention_bias", False),
    )
