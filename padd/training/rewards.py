"""Verifiable rewards: final-answer extraction, exact match and a format reward.

The reward of a completion is linear: `w_answer · answer_reward + w_format · format_reward`.
Answers are compared as exact rationals (`fractions.Fraction`), so "1,000", "$1000.00",
"\\boxed{1{,}000}" and "1000." all match "1000", and "0.5" matches "\\frac{1}{2}".
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answer_reward",
    "extract_answer",
    "format_reward",
    "is_correct",
    "normalize_number",
    "reward",
]

# A number as people write it: optional sign and `$`, thousands separators, decimals, a/b.
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?\$?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+"
)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_FINAL_LINE_RE = re.compile(r"^####\s*(\S.*)$")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}`, braces matched (they may nest)."""
    out = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append(text[start:i])
                break
    return out


def _strip_latex(s: str) -> str:
    """LaTeX spellings of a number → plain text ("1{,}000" → "1,000", "\\frac{1}{2}" → "1/2")."""
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = s.replace("\\$", "$").replace("\\%", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    s = _TEXT_RE.sub("", s)
    s = re.sub(r"\(\s*(-?[\d.]+)\s*\)", r"\1", s)  # "(1)/(2)" → "1/2" once the parts are numbers
    return s.strip()


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written in `text`, or None if it is not one number.

    Accepts a sign, `$`, thousands separators, decimals, `a/b`, a trailing `%` or period and
    surrounding spaces. Canonical form: an integer ("1000", "-3"), a terminating decimal without
    trailing zeros ("2.5"), else a reduced fraction ("1/3").

    >>> normalize_number("$1,234.50.")
    '1234.5'
    """
    s = _strip_latex(text).strip().rstrip(".").strip()
    s = s.rstrip("%").strip()
    neg = False
    # Sign and currency in either order: "-$5", "$-5", "- 5".
    while s[:1] in ("-", "$", "+", "−") and len(s) > 1:
        neg ^= s[0] in ("-", "−")
        s = s[1:].strip()
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?", s):
        return None
    try:
        value = Fraction(s.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return _canonical(-value if neg else value)


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    return f"{float(value):.{digits}f}" if digits <= 15 else str(value)


def _first_number(text: str) -> str | None:
    for match in _NUMBER_RE.finditer(_strip_latex(text)):
        value = normalize_number(match.group())
        if value is not None:
            return value
    return None


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER_RE.finditer(_strip_latex(text)))
    for match in reversed(matches):
        value = normalize_number(match.group())
        if value is not None:
            return value
    return None


def _parse_span(span: str) -> str | None:
    """A whole answer span ("$18.", "1{,}000") as a number, else the first number in it."""
    return normalize_number(span) or _first_number(span)


def extract_answer(text: str, *, fallback_last_number: bool = True) -> str | None:
    """The final answer of a completion, normalised (see `normalize_number`), or None.

    Priority: the last `\\boxed{...}`, then the last GSM8K `#### N` line, then "the answer is N",
    then (if `fallback_last_number`) the last number in the text. A boxed or `####` answer that
    is not a number is returned as its stripped text, so symbolic answers still compare exactly.
    """
    boxed = _boxed_contents(text)
    if boxed:
        span = _strip_latex(boxed[-1])
        if normalize_number(span) is None and re.search(r"[A-Za-z\\]", span):
            return span  # symbolic ("x+1"): compared as text, not mined for a number
        return _parse_span(span) or span or None
    hashes = _HASH_RE.findall(text)
    if hashes:
        span = hashes[-1].strip()
        return _parse_span(span) or (span.rstrip(".").strip() or None)
    said = _ANSWER_IS_RE.findall(text)
    if said:
        value = _parse_span(said[-1])
        if value is not None:
            return value
    return _last_number(text) if fallback_last_number else None


def _canonical_reference(final_answer: str) -> str:
    return normalize_number(final_answer) or _strip_latex(final_answer).strip()


def is_correct(completion: str, final_answer: str, *, fallback_last_number: bool = True) -> bool:
    """Exact match of the completion's extracted answer with the reference answer."""
    got = extract_answer(completion, fallback_last_number=fallback_last_number)
    return got is not None and got == _canonical_reference(final_answer)


def answer_reward(completion: str, final_answer: str, *, fallback_last_number: bool = True) -> float:
    """1.0 if the extracted final answer equals `final_answer` exactly (as a number), else 0.0."""
    return float(is_correct(completion, final_answer, fallback_last_number=fallback_last_number))


def format_reward(completion: str) -> float:
    """1.0 if the completion's last non-empty line is `#### <number>`, else 0.0.

    This is the format the prompts teach (GSM8K's), so a parseable final line is rewarded even
    when the number is wrong: it keeps a small learning signal in all-wrong groups.
    """
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return 0.0
    match = _FINAL_LINE_RE.match(lines[-1])
    return float(match is not None and normalize_number(match.group(1)) is not None)


def reward(completion: str, final_answer: str, w_answer: float = 1.0, w_format: float = 0.1) -> float:
    """Linear reward `w_answer · answer_reward + w_format · format_reward`."""
    return w_answer * answer_reward(completion, final_answer) + w_format * format_reward(completion)
