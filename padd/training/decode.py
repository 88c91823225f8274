"""padd's own batched decode loop: transformers' `generate` (sample or greedy) for what padd asks
of it, without the work that does not change the result.

Why (profiled on the `small` preset, 2 CPU cores): a Stages II–IV step samples 8 responses for
each of 32 prompts, 256 rows. transformers' `generate` prefills all 256 rows although only 32
differ, and its dynamic KV cache re-concatenates every layer's keys and values at every token
(a copy of the whole cache per token). This loop
- prefills each distinct prompt once and writes its keys/values into all of its rows
  (`repeats`), and hands the first token's logits to every row;
- keeps the KV cache in buffers allocated once for prompt + `max_new_tokens`; each step writes
  one column and attends over a view, so nothing is copied;
- writes tokens into a preallocated output instead of growing it.

Everything else is transformers' own: the model's forward (masks, RoPE, attention, experts), the
logits processors (`TemperatureLogitsWarper`, `TopPLogitsWarper`, `SuppressTokensLogitsProcessor`),
the token choice (`softmax` + `torch.multinomial(probs, 1)` over all rows each step, or `argmax`),
finished rows padded, and the stop when every row has ended (EOS) or `max_new_tokens`. Same
positions, same masks, same order of random draws: greedy decoding gives transformers' tokens,
and sampling draws the same tokens under the same seed (tests/test_decode.py checks both against
`model.generate`). `supported` says when this loop applies; `rollout.generate` falls back to
`model.generate` otherwise (a generation config asking for other processors, sliding-window or
other cache layers, encoder-decoder models, sharded models).

Legend: P distinct prompts, G = repeats, B = P·G rows, L prompt columns, R = max_new_tokens,
H KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["decode", "supported"]

# Generation-config fields this loop implements; a model whose generation config sets any other
# field away from transformers' default (repetition penalty, min length, bad words, a static cache,
# ...) decodes through `model.generate` instead.
_HANDLED = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "max_length",
        "max_new_tokens",
        "use_cache",
        "suppress_tokens",
    }
)
# Fields that change nothing while off (what a checkpoint's generation config often spells out).
_HANDLED_WHEN_OFF = frozenset(
    {"output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate"}
)


class _BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values live in one buffer [B, H, L + R, D] made at the prefill.

    The prefill may run on the P distinct rows only: its keys/values are written into each of the
    `repeats` rows of their prompt, and the prefill's own attention gets them as computed (what
    `DynamicLayer` returns, a contiguous copy). Each decoding step writes its column and returns a
    view of the filled part.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__()
        self.rows, self.capacity, self.length = rows, capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:  # the prefill
            self.device = key_states.device
            P, H, _, D = key_states.shape
            shape = (self.rows, H, self.capacity, D)
            self._k = key_states.new_empty(shape)
            self._v = value_states.new_empty(shape)
            per_prompt = (P, self.rows // P, H, self.capacity, D)
            self._k.view(per_prompt)[:, :, :, :n] = key_states[:, None]
            self._v.view(per_prompt)[:, :, :, :n] = value_states[:, None]
            self.is_initialized, self.length = True, n
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
            # As DynamicLayer's `cat([empty, k])`: the prefill attends over a contiguous copy.
            return key_states.contiguous(), value_states.contiguous()
        end = self.length + n
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        super().reset()


def _buffer_cache(model, rows: int, capacity: int) -> DynamicCache | None:
    """transformers' own cache for `model` with its layers swapped for buffers, or None when any
    layer is not a plain `DynamicLayer` (sliding windows, linear attention: not reproduced here)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    n = len(cache.layers) or model.config.get_text_config(decoder=True).num_hidden_layers
    cache.layers = [_BufferLayer(rows, capacity) for _ in range(n)]
    return cache


def _generation_config(model, **kwargs) -> GenerationConfig:
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config.update(**kwargs)
    return config


def supported(model, **kwargs) -> bool:
    """Whether `decode` reproduces `model.generate(**kwargs)` for this model (see module doc)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if not hasattr(model, "generation_config") or not hasattr(model, "_supports_logits_to_keep"):
        return False
    if not model._supports_logits_to_keep():
        return False
    for key, value in _generation_config(model, **kwargs).to_diff_dict().items():
        if key not in _HANDLED and not (key in _HANDLED_WHEN_OFF and not value):
            return False
    return _buffer_cache(model, 1, 1) is not None


def _processors(config: GenerationConfig, device) -> LogitsProcessorList:
    """The processors `GenerationMixin._get_logits_processor` builds for the fields in `_HANDLED`,
    in its order."""
    out = LogitsProcessorList()
    if config.suppress_tokens is not None:
        out.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            out.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            from transformers.generation.logits_process import TopKLogitsWarper

            out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return out


@torch.no_grad()
def decode(
    model,
    input_ids_PL: torch.Tensor,
    attention_mask_PL: torch.Tensor,
    *,
    repeats: int = 1,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: list[int] | None,
    **generation_kwargs,
) -> torch.Tensor:
    """`model.generate` on each prompt row repeated `repeats` times (rows prompt-major, as
    `repeat_interleave`), returning the same [B, L + n] token ids (n ≤ `max_new_tokens`: the loop
    stops when every row has produced an EOS). `generation_kwargs`: `do_sample`, `temperature`,
    `top_p`, `top_k` as `generate` takes them. Call only when `supported(model, ...)`."""
    device = input_ids_PL.device
    config = _generation_config(model, max_new_tokens=max_new_tokens, **generation_kwargs)
    processors = _processors(config, device)
    P, L = input_ids_PL.shape
    B, R = P * repeats, max_new_tokens
    if R <= 0:
        return input_ids_PL.repeat_interleave(repeats, 0)
    cache = _buffer_cache(model, B, L + R)
    # generate's positions: the count of real tokens before each one (0 on left padding).
    mask_PL = attention_mask_PL.long()
    position_PL = (mask_PL.cumsum(-1) - 1).masked_fill(mask_PL == 0, 0)
    tokens_BS = torch.full((B, L + R), pad_token_id, dtype=torch.long, device=device)
    tokens_BS[:, :L] = input_ids_PL.repeat_interleave(repeats, 0)
    mask_BS = torch.ones((B, L + R), dtype=mask_PL.dtype, device=device)
    mask_BS[:, :L] = mask_PL.repeat_interleave(repeats, 0)
    next_position_B1 = position_PL[:, -1:].repeat_interleave(repeats, 0) + 1
    # generate drops a mask of all ones (no padding) after making the positions: so do we, since
    # the forward then builds its attention mask (or none) differently.
    padded = not bool((mask_PL == 1).all())
    eos = torch.tensor(eos_token_id or [], dtype=torch.long, device=device)
    unfinished_B = torch.ones(B, dtype=torch.long, device=device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    # transformers' decode-time switch (e.g. grouped_mm → batched_mm experts on GPU), as in generate.
    optimise = getattr(model, "_optimize_model_for_decode", contextlib.nullcontext)
    out = model(
        input_ids=input_ids_PL,
        attention_mask=attention_mask_PL if padded else None,
        position_ids=position_PL,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        return_dict=True,
    )
    logits_BV = out.logits[:, -1].to(copy=True, dtype=torch.float32).repeat_interleave(repeats, 0)
    del out
    n = 0
    with optimise():
        while True:
            scores_BV = processors(tokens_BS[:, : L + n], logits_BV)
            if config.do_sample:
                next_B = torch.multinomial(torch.softmax(scores_BV, dim=-1), num_samples=1).squeeze(1)
            else:
                next_B = torch.argmax(scores_BV, dim=-1)
            if eos.numel():  # finished rows take the pad token, as generate does with an EOS criterion
                next_B = next_B * unfinished_B + pad * (1 - unfinished_B)
            tokens_BS[:, L + n] = next_B
            n += 1
            if eos.numel():
                unfinished_B = unfinished_B & ~torch.isin(next_B, eos)
            if n == R or not bool(unfinished_B.any()):
                break
            out = model(
                input_ids=next_B[:, None],
                attention_mask=mask_BS[:, : L + n] if padded else None,
                position_ids=next_position_B1,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                return_dict=True,
            )
            next_position_B1 = next_position_B1 + 1
            logits_BV = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            del out
    return tokens_BS[:, : L + n]
