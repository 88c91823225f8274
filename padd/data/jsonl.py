"""Problems from JSONL files with configurable field names, or from an HF dataset saved to disk.

A record's answer field may hold a worked solution ending in GSM8K's `#### N` line (then the
final answer is parsed from it) or the bare final answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from padd.data.gsm8k import parse_final_answer
from padd.data.problem import Problem


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and record."""


def record_to_problem(
    record: Mapping[str, Any],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    solution_field: str | None = None,
    kind_field: str | None = None,
    where: str = "record",
) -> Problem:
    """Map one record onto a `Problem`; a missing field raises `DataError` naming it."""
    for name in (question_field, answer_field, solution_field, kind_field):
        if name is not None and name not in record:
            raise DataError(f"{where}: missing field {name!r} (fields: {sorted(record)})")
    answer_text = str(record[answer_field])
    final = parse_final_answer(answer_text)
    if final is None:
        raise DataError(f"{where}: no final answer in field {answer_field!r}: {answer_text[-80:]!r}")
    if solution_field is not None:
        solution = f"{record[solution_field]}\n#### {final}"
    elif "####" in answer_text:
        solution = answer_text.strip()
    else:
        solution = f"#### {final}"
    kind = str(record[kind_field]) if kind_field is not None else "unknown"
    return Problem(str(record[question_field]).strip(), solution, final, kind)


def load_jsonl(path: str | Path, limit: int = 0, **fields: Any) -> list[Problem]:
    """Problems from a JSONL file (one JSON object per line); `fields` as in `record_to_problem`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out: list[Problem] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            out.append(record_to_problem(record, where=f"{path}:{lineno}", **fields))
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no records")
    return out


def load_gsm8k(path: str | Path, limit: int = 0) -> list[Problem]:
    """GSM8K JSONL (`question`, `answer` with `#### N`), e.g. the official `train.jsonl`."""
    return load_jsonl(path, limit=limit, question_field="question", answer_field="answer")


def load_hf_disk(path: str | Path, split: str | None = None, limit: int = 0, **fields: Any) -> list[Problem]:
    """Problems from `datasets.load_from_disk(path)` (a Dataset, or a DatasetDict with `split`)."""
    try:
        from datasets import load_from_disk
    except ImportError as e:  # optional dependency
        raise ImportError("data.source 'hf_disk' needs the `datasets` package: pip install datasets") from e
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path not found: {path}")
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # DatasetDict
        if split is None:
            raise DataError(f"{path} holds splits {list(ds.keys())}; set data.hf_split")
        ds = ds[split]
    rows: Iterable[Mapping[str, Any]] = ds
    out = []
    for i, rec in enumerate(rows):
        out.append(record_to_problem(rec, where=f"{path}[{i}]", **fields))
        if limit and len(out) >= limit:
            break
    return out
