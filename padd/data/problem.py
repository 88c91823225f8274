"""The unit of data every stage shares: a math problem with a verifiable final answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        question: the problem text.
        solution: worked steps ending in GSM8K's `#### <final answer>` line.
        final_answer: the final answer as a canonical string (e.g. "42", "-3", "2.5").
        kind: subdomain label (problem type), used for the expert-specialisation metric.
    """

    question: str
    solution: str
    final_answer: str
    kind: str = "unknown"


def format_prompt(question: str) -> str:
    """The prompt the models see; the completion is the worked solution."""
    return f"Q: {question}\nA: "


def format_example(problem: Problem) -> str:
    """Prompt plus target, for supervised (teacher) training."""
    return format_prompt(problem.question) + problem.solution
