"""Held-out evaluation: greedy pass@1, per-kind accuracy and, for an MoE with a
`RoutingControl`, expert–subdomain specialisation (normalised mutual information), load CV and
routing entropy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from padd.data.problem import Problem, format_prompt

from .metrics import expert_counts, load_cv, routing_entropy
from .rewards import is_correct
from .rollout import forward_with_routing, generate

__all__ = ["evaluate", "normalized_mutual_information"]


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


@torch.no_grad()
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
        `load_cv`, `routing_entropy` and `tokens_per_expert` ([L][E] routed slots).
    """
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    completions: list[str] = []
    experts_by_layer: dict[int, list[int]] = defaultdict(list)
    kinds_by_layer: dict[int, list[str]] = defaultdict(list)
    counts, entropies = None, []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            batch = generate(
                model,
                tokenizer,
                [format_prompt(p.question) for p in chunk],
                num_generations=1,
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
            completions += batch.completions
            correct += [is_correct(c, p.final_answer) for c, p in zip(batch.completions, chunk, strict=True)]
            if control is None:
                continue
            _, logits, selected = forward_with_routing(
                model, batch.sequences_BS, batch.attention_mask_BS, control
            )
            real_T = batch.attention_mask_BS.reshape(-1).bool().cpu()
            kind_T = [p.kind for p in chunk for _ in range(batch.sequences_BS.shape[1])]
            kind_T = [k for k, keep in zip(kind_T, real_T.tolist(), strict=True) if keep]
            for layer, sel_TK in enumerate(selected):
                sel = sel_TK.cpu()[real_T]
                experts_by_layer[layer] += sel.reshape(-1).tolist()
                kinds_by_layer[layer] += [k for k in kind_T for _ in range(sel.shape[1])]
            c = expert_counts(selected, control.num_experts, real_T)
            counts = c if counts is None else counts + c
            entropies.append(routing_entropy(logits, real_T))
    finally:
        model.train(was_training)
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
    if control is not None and counts is not None:
        nmi = [
            normalized_mutual_information(experts_by_layer[l], kinds_by_layer[l])
            for l in sorted(experts_by_layer)
        ]
        out.update(
            nmi=sum(nmi) / max(len(nmi), 1),
            nmi_per_layer=nmi,
            load_cv=load_cv(counts),
            routing_entropy=sum(entropies) / len(entropies),
            tokens_per_expert=counts.long().tolist(),
        )
    return out
