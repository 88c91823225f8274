"""Rollouts: G sampled responses per prompt, and the forward that scores them.

Layout: rows are prompt-major, so group `i` (the G samples of prompt `i`) is rows
`i·G … (i+1)·G − 1`. Prompts are left-padded so every response starts at column `P`.

Old-policy quantities are *recomputed* after generation over the full sequences (not collected
during `generate`): with a KV cache each decoding step sees one token, and a full forward gives
exactly the tensors the update's forward produces for θ = θ_old (same positions, same padding),
so the importance ratio is 1 and the drift 0 at the first update. `PADDTrainer` gets them for
free: its first update's forward runs at θ = θ_old, so it detaches that forward's log-probs and
router probabilities. The router tensors come from `RoutingControl` (selection bias included in
top-k, probabilities unbiased), or from transformers' `output_router_logits` when none is given.

Legend: B = rows (prompts × G), S = P + R tokens, P = prompt columns, R = response columns,
E = experts, L = MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import decode as padd_decode

__all__ = [
    "RolloutBatch",
    "forward_with_routing",
    "generate",
    "position_ids_from_mask",
    "response_mask",
    "token_logprobs",
]


@dataclass
class RolloutBatch:
    """What the update needs from a rollout (all on the model's device, no grad).

    Attributes:
        sequences_BS: prompt + response token ids.
        attention_mask_BS: 1 on real tokens (left padding of prompts is 0).
        prompt_length: P, the column where responses start.
        response_mask_BR: 1.0 on response tokens up to and including the first EOS.
        completions: decoded responses (special tokens skipped), B strings.
    """

    sequences_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    prompt_length: int
    response_mask_BR: torch.Tensor
    completions: list[str]

    def select_groups(self, groups: torch.Tensor, num_generations: int) -> RolloutBatch:
        """The rows of the given prompt groups (group `i` is rows `i·G … (i+1)·G − 1`), in order."""
        G = num_generations
        rows = (groups.to(torch.long)[:, None] * G + torch.arange(G)).reshape(-1)
        rows_dev = rows.to(self.sequences_BS.device)
        return RolloutBatch(
            self.sequences_BS[rows_dev],
            self.attention_mask_BS[rows_dev],
            self.prompt_length,
            self.response_mask_BR[rows_dev],
            [self.completions[i] for i in rows.tolist()],
        )


def position_ids_from_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them (so forwards match decoding)."""
    return (attention_mask_BS.long().cumsum(-1) - 1).clamp_min(0)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def response_mask(responses_BR: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row (the EOS is trained: it ends the answer)."""
    if not eos_ids or responses_BR.shape[1] == 0:
        return torch.ones_like(responses_BR, dtype=torch.float32)
    is_eos = torch.isin(responses_BR, torch.tensor(eos_ids, device=responses_BR.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float()


def is_sharded(model: torch.nn.Module) -> bool:
    """True for an FSDP2 model in a multi-rank run: its every forward is a collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_generations: int = 1,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    use_padd_decode: bool = True,
) -> RolloutBatch:
    """Sample `num_generations` responses per prompt in one batched decode (KV cache): padd's
    loop (`padd.training.decode`, the same tokens as transformers' `generate`) where it applies,
    else `model.generate`; `use_padd_decode=False` forces the latter."""
    device = next(model.parameters()).device
    if tokenizer.pad_token is None:  # batching needs one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    input_ids = prompt_ids.repeat_interleave(num_generations, 0)
    attn = prompt_attn.repeat_interleave(num_generations, 0)
    eos = _eos_ids(model, tokenizer)
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # explicit greedy: override sampling defaults a checkpoint's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    # Sharded: a rank whose sequences all ended keeps stepping until every rank is done, or the
    # others would wait forever in the next layer's all-gather: transformers' `synced_gpus` does it.
    sharded = is_sharded(model)
    if use_padd_decode and not sharded and padd_decode.supported(model, **kwargs):
        # The same tokens as `model.generate` (see `padd.training.decode`), without its per-row
        # prefill of repeated prompts and its per-token copies of the KV cache.
        out = padd_decode.decode(
            model,
            prompt_ids,
            prompt_attn,
            repeats=num_generations,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=eos,
            **kwargs,
        )
    else:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attn,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=eos or None,
            synced_gpus=sharded,
            **kwargs,
        )
    P = input_ids.shape[1]
    responses = out[:, P:]
    mask_BR = response_mask(responses, eos)
    full_attn = torch.cat([attn, mask_BR.to(attn.dtype)], dim=1)
    completions = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(responses, mask_BR, strict=True)
    ]
    return RolloutBatch(out, full_attn, P, mask_BR, completions)


def forward_with_routing(model, sequences_BS, attention_mask_BS, control=None, *, moe: bool = True):
    """One forward returning (last hidden states [B,S,H], router logits L×[B·S,E], selected L×[B·S,k]).

    Router tensors come from `control` (a `RoutingControl`, bias-aware selection) when given,
    else from transformers' `output_router_logits` with plain top-k selection; both are empty
    for a dense model (`moe=False`). Logits are not computed here (the caller applies the head
    only where needed).
    """
    pos = position_ids_from_mask(attention_mask_BS)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if control is not None:
        with control.capturing():
            out = base(input_ids=sequences_BS, attention_mask=attention_mask_BS, position_ids=pos)
            logits = list(control.router_logits)
            selected = list(control.selected_experts)
        control.clear()
        return out.last_hidden_state, logits, selected
    if not moe:
        out = base(input_ids=sequences_BS, attention_mask=attention_mask_BS, position_ids=pos)
        return out.last_hidden_state, [], []
    out = base(
        input_ids=sequences_BS, attention_mask=attention_mask_BS, position_ids=pos, output_router_logits=True
    )
    logits = list(out.router_logits or [])
    k = getattr(model.config, "num_experts_per_tok", 1)
    selected = [torch.topk(z.detach().float(), k, dim=-1).indices for z in logits]
    return out.last_hidden_state, logits, selected


def token_logprobs(logits_BRV: torch.Tensor, tokens_BR: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32, without materialising the full log-softmax twice."""
    logits = logits_BRV.float()
    return logits.gather(-1, tokens_BR.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def response_slice(x_BS, prompt_length: int) -> torch.Tensor:
    """Positions P−1 … S−2: the states that predict response tokens P … S−1."""
    return x_BS[:, prompt_length - 1 : -1]
