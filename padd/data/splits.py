"""The four non-overlapping splits of the training problems (method doc, "Data"):
D_A (clustering statistics), D_B (expert warmup), D_C (Stages II–IV), D_D (held-out evaluation).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from padd.data.problem import Problem

SPLIT_NAMES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Splits:
    """Indices into the problem list, per split; disjoint and covering every problem."""

    indices: dict[str, list[int]]

    def take(self, problems: Sequence[Problem], name: str) -> list[Problem]:
        return [problems[i] for i in self.indices[name]]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.indices.items()}


def _dedupe(problems: Sequence[Problem]) -> list[int]:
    # A question asked twice must not land in two splits (e.g. both training and held-out).
    seen: set[str] = set()
    keep = []
    for i, p in enumerate(problems):
        if p.question not in seen:
            seen.add(p.question)
            keep.append(i)
    return keep


def make_splits(
    problems: Sequence[Problem], fractions: Sequence[float] = (0.10, 0.20, 0.65, 0.05), seed: int = 0
) -> Splits:
    """Shuffle (seeded) the distinct problems and cut them 10/20/65/5% (every split ≥ 1 problem)."""
    if len(fractions) != 4 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be 4 positive numbers summing to 1, got {list(fractions)}")
    order = _dedupe(problems)
    if len(order) < 4:
        raise ValueError(f"need at least 4 distinct problems, got {len(order)}")
    random.Random(seed).shuffle(order)
    n = len(order)
    sizes = [max(1, round(f * n)) for f in fractions[:3]]
    while sum(sizes) >= n:  # leave at least one for D_D
        sizes[sizes.index(max(sizes))] -= 1
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes), n]
    return Splits({name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)})


def problems_digest(problems: Sequence[Problem]) -> str:
    """Content hash of a problem list, recorded with the splits so a resumed run can check its data."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.question, p.solution, p.final_answer, p.kind]).encode())
    return h.hexdigest()[:16]


def save_splits(splits: Splits, problems: Sequence[Problem], path: str | Path) -> None:
    """Record the splits (indices, sizes, data digest) and each split's problems as JSONL."""
    path = Path(path)
    record = {"sizes": splits.sizes(), "digest": problems_digest(problems), "indices": splits.indices}
    _atomic_write_text(path / "splits.json", json.dumps(record, indent=1) + "\n")
    for name in SPLIT_NAMES:
        lines = [
            json.dumps({"question": p.question, "answer": p.solution, "kind": p.kind})
            for p in splits.take(problems, name)
        ]
        _atomic_write_text(path / f"D_{name}.jsonl", "\n".join(lines) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    # temp file + os.replace: a reader never sees half a file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_splits(path: str | Path) -> tuple[Splits, str]:
    """The splits recorded by `save_splits`, and the digest of the data they index."""
    rec = json.loads((Path(path) / "splits.json").read_text())
    return Splits({k: list(v) for k, v in rec["indices"].items()}), rec["digest"]
