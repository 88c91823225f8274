"""Tiny random transformers MoE models for the padd.moe tests (no downloads).

Each config is small enough that a forward+backward takes milliseconds on 2 CPU cores. E = 6
(not a power of two), K = 2.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

NUM_EXPERTS = 6
TOP_K = 2
VOCAB = 64

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=TOP_K,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str):
    """A tiny config of `arch` in {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe"}."""
    if arch == "mixtral":
        return MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=NUM_EXPERTS)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=NUM_EXPERTS,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    if arch == "olmoe":
        return OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=NUM_EXPERTS, norm_topk_prob=False)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **_COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=NUM_EXPERTS,
            decoder_sparse_step=1,
            norm_topk_prob=False,
        )
    raise ValueError(f"unknown arch {arch!r}")


ARCHS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")


def tiny_model(arch: str, seed: int = 0):
    """A freshly initialised tiny model in eval mode (fp32)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()


def saved_tiny_model(arch: str, path, seed: int = 0) -> str:
    """Save a tiny random model with `save_pretrained` under `path`; returns the directory."""
    tiny_model(arch, seed).save_pretrained(path)
    return str(path)
