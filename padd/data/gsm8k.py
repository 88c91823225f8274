"""GSM8K's answer format: a worked solution whose last line is `#### <final answer>`.

Only the format lives here; `padd.data.jsonl.load_gsm8k` reads GSM8K files (jsonl imports this
module, never the other way round).
"""

from __future__ import annotations

import re

_FINAL = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def parse_final_answer(text: str) -> str | None:
    """The canonical final answer of a GSM8K solution (`#### 1,234` → "1234"), or of a bare answer.

    Returns None when there is no `####` line and the text is not itself a number.
    """
    matches = _FINAL.findall(text)
    raw = matches[-1] if matches else text.strip()
    raw = raw.replace(",", "").replace("$", "").strip().rstrip(".")
    if not _NUMBER.match(raw):
        # a non-numeric `####` answer ("3/4", "x=2") is kept verbatim; bare text is not an answer
        return (raw or None) if matches else None
    if "." in raw:  # "2.50" → "2.5", "3.0" → "3"
        raw = raw.rstrip("0").rstrip(".")
    return str(int(raw)) if re.fullmatch(r"-?\d+", raw) else raw
