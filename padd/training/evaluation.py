"""Held-out evaluation: greedy pass@1, per-kind accuracy and, for an MoE with a
`RoutingControl`, expert–subdomain specialisation (normalised mutual information), load CV and
routing entropy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from padd.data.problem import Problem, format_prompt

from .metrics import expert_counts, load_cv, routing_entropy
from .rewards import is_correct
from .rollout import forward_with_routing, generate

__all__ = [
    "BatchOutcome",
    "evaluate",
    "evaluate_batches",
    "normalized_mutual_information",
    "num_batches",
    "summarise",
]


def normalized_mutual_information(labels_a: Sequence, labels_b: Sequence) -> float:
    """NMI = I(A;B) / mean(H(A), H(B)) (arithmetic normalisation), in [0, 1].

    Both labelings constant → 1.0 (identical partitions); exactly one constant → 0.0.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"labels_a and labels_b differ in length: {len(labels_a)} vs {len(labels_b)}")
    n = len(labels_a)
    if n == 0:
        return 0.0
    _, a = np.unique(np.asarray(labels_a), return_inverse=True)
    _, b = np.unique(np.asarray(labels_b), return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    p_ab = joint / n
    p_a, p_b = p_ab.sum(1), p_ab.sum(0)
    h_a, h_b = -(p_a * np.log(p_a)).sum(), -(p_b * np.log(p_b)).sum()  # every class occurs: p > 0
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    if h_a == 0.0 or h_b == 0.0:
        return 0.0
    nz = p_ab > 0
    mi = (p_ab[nz] * np.log(p_ab[nz] / np.outer(p_a, p_b)[nz])).sum()
    return float(max(0.0, min(1.0, mi / (0.5 * (h_a + h_b)))))


@dataclass
class BatchOutcome:
    """What one evaluation batch gives: its completions and verdicts and, with routing, what the
    batch's routed slots chose. Batches are independent, so any process may evaluate any of them
    and `summarise` merges them in batch order."""

    index: int
    completions: list[str]
    correct: list[bool]
    experts_by_layer: list[list[int]] = field(default_factory=list)  # [L][slots]
    kinds_by_layer: list[list[str]] = field(default_factory=list)  # the slot's problem kind
    counts: torch.Tensor | None = None  # [L, E] routed slots
    entropy: float | None = None  # mean routing entropy of the batch's real tokens


def num_batches(num_problems: int, batch_size: int) -> int:
    """How many batches `evaluate_batches` splits `num_problems` into."""
    return -(-num_problems // batch_size)


def batch_of(problems: Sequence[Problem], index: int, batch_size: int) -> Sequence[Problem]:
    """Batch `index` of `problems` as `evaluate_batches` cuts them (the last may be short)."""
    return problems[index * batch_size : (index + 1) * batch_size]


@torch.no_grad()
def evaluate_batches(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    control=None,
    indices: Sequence[int] | None = None,
    progress: str | None = None,
) -> list[BatchOutcome]:
    """Greedy completions of the batches `indices` (default: all) of `problems`, batch `i` being
    `problems[i * batch_size : (i + 1) * batch_size]`: the same batch gives the same outcome
    whichever process runs it, so sharding by batch changes no result. `progress`: the label of
    a progress bar over the batches (None: no bar)."""
    was_training = model.training
    model.eval()
    out: list[BatchOutcome] = []
    indices = range(num_batches(len(problems), batch_size)) if indices is None else indices
    bar = tqdm(indices, desc=progress, unit="batch", disable=progress is None, dynamic_ncols=True)
    try:
        for i in bar:
            chunk = batch_of(problems, i, batch_size)
            batch = generate(
                model,
                tokenizer,
                [format_prompt(p.question) for p in chunk],
                num_generations=1,
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
            verdicts = [is_correct(c, p.final_answer) for c, p in zip(batch.completions, chunk, strict=True)]
            outcome = BatchOutcome(i, batch.completions, verdicts)
            out.append(outcome)
            if control is None:
                continue
            _, logits, selected = forward_with_routing(
                model, batch.sequences_BS, batch.attention_mask_BS, control
            )
            real_T = batch.attention_mask_BS.reshape(-1).bool().cpu()
            kind_T = [p.kind for p in chunk for _ in range(batch.sequences_BS.shape[1])]
            kind_T = [k for k, keep in zip(kind_T, real_T.tolist(), strict=True) if keep]
            for sel_TK in selected:
                sel = sel_TK.cpu()[real_T]
                outcome.experts_by_layer.append(sel.reshape(-1).tolist())
                outcome.kinds_by_layer.append([k for k in kind_T for _ in range(sel.shape[1])])
            outcome.counts = expert_counts(selected, control.num_experts, real_T).cpu()
            outcome.entropy = routing_entropy(logits, real_T)
    finally:
        bar.close()
        model.train(was_training)
    return out


def summarise(problems: Sequence[Problem], outcomes: Sequence[BatchOutcome]) -> dict:
    """`evaluate`'s result from the outcomes of every batch of `problems` (in any order)."""
    outcomes = sorted(outcomes, key=lambda o: o.index)
    if [o.index for o in outcomes] != list(range(len(outcomes))):
        raise ValueError(f"batch outcomes {[o.index for o in outcomes]} are not each batch once")
    completions = [c for o in outcomes for c in o.completions]
    correct = [ok for o in outcomes for ok in o.correct]
    if len(correct) != len(problems):
        raise ValueError(f"{len(correct)} verdicts for {len(problems)} problems")
    out: dict = {
        "accuracy": sum(correct) / max(len(correct), 1),
        "n": len(correct),
        "completions": completions,
        "correct": correct,
    }
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p, ok in zip(problems, correct, strict=True):
        by_kind[p.kind].append(ok)
    for kind, oks in sorted(by_kind.items()):
        out[f"accuracy/{kind}"] = sum(oks) / len(oks)
    routed = [o for o in outcomes if o.counts is not None]
    if routed:
        layers = range(len(routed[0].experts_by_layer))
        nmi = [
            normalized_mutual_information(
                [e for o in routed for e in o.experts_by_layer[l]],
                [k for o in routed for k in o.kinds_by_layer[l]],
            )
            for l in layers
        ]
        counts = routed[0].counts
        for o in routed[1:]:
            counts = counts + o.counts
        out.update(
            nmi=sum(nmi) / max(len(nmi), 1),
            nmi_per_layer=nmi,
            load_cv=load_cv(counts),
            routing_entropy=sum(o.entropy for o in routed) / len(routed),
            tokens_per_expert=counts.long().tolist(),
        )
    return out


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    control=None,
) -> dict:
    """Greedy pass@1 on `problems` (one sample per problem, exact match of the final answer).

    Returns:
        `accuracy`, `n`, `accuracy/<kind>` per problem kind, `completions` and `correct` (one bool
        per problem, in order: what paired comparisons between models count). With `control`
        (a `RoutingControl` on an MoE model) also `nmi` (expert–kind NMI over every routed slot
        of every non-padding token, prompt and response, mean over layers), `nmi_per_layer`,
        `load_cv`, `routing_entropy` (mean over batches) and `tokens_per_expert` ([L][E] routed
        slots). `evaluate_batches` + `summarise` do the same split over processes.
    """
    outcomes = evaluate_batches(
        model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size, control=control
    )
    return summarise(problems, outcomes)
