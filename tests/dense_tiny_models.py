"""Tiny random dense teachers (Llama, Mistral, Qwen2, Qwen3) for the decompression tests.

d = 32, d_ff = 64, 2 layers, vocab 64: a forward takes about a millisecond on 2 CPU cores.
`initializer_range=0.1` keeps FFN activations well above float noise.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 64

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def tiny_dense_config(arch: str, **overrides):
    """A tiny config of a dense teacher `arch` in `ARCHS`."""
    kw = {**_COMMON, **overrides}
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(**kw, sliding_window=16)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "qwen3":
        return Qwen3Config(**{**kw, "head_dim": 16})
    raise ValueError(arch)


def tiny_teacher(arch: str, seed: int = 0, **overrides):
    """A tiny random teacher in eval mode, saved to nothing (callers save_pretrained if needed)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_dense_config(arch, **overrides)).eval()


def token_batches(num_batches: int = 2, batch: int = 4, seq: int = 12, seed: int = 0):
    """Dict batches of random token ids with a padded tail on the last row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
