"""Answer extraction and rewards, on real GSM8K answers (fixture excerpt, MIT) and LaTeX cases."""

import json
from pathlib import Path

import pytest

from padd.training.rewards import (
    answer_reward,
    extract_answer,
    format_reward,
    is_correct,
    normalize_number,
    reward,
)

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_excerpt.jsonl"


def _gsm8k_rows():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_fixture_ships_with_its_license():
    assert (FIXTURE.parent / "GSM8K_LICENSE").read_text().startswith("MIT License")
    assert len(_gsm8k_rows()) >= 20


@pytest.mark.parametrize("row", _gsm8k_rows(), ids=lambda r: r["answer"].rsplit("####", 1)[-1].strip())
def test_gsm8k_answer_field_gives_its_final_line(row):
    # The reference is the text after '####'; thousands separators are dropped by normalisation.
    ref = row["answer"].rsplit("####", 1)[-1].strip()
    assert extract_answer(row["answer"]) == ref.replace(",", "")
    assert is_correct(row["answer"], ref)
    assert format_reward(row["answer"]) == 1.0
    # The worked steps (with <<a*b=c>> annotations) alone do not leak the '####' answer.
    assert extract_answer(row["answer"].rsplit("####", 1)[0], fallback_last_number=False) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1,234", "1234"),
        ("#### $1,450,000.", "1450000"),
        ("#### -10", "-10"),
        ("#### $-5", "-5"),
        ("#### -$5.50", "-5.5"),
        ("#### 2.50", "2.5"),
        ("#### 0.125", "0.125"),
        ("#### .5", "0.5"),
        ("#### 18 dollars", "18"),
        ("#### 45%", "45"),
        ("so 3 + 4 = 7.\n#### 7.", "7"),
        ("The answer is 1,000.", "1000"),
        ("first 3 then 12 and finally 42.", "42"),
        (r"\boxed{42}", "42"),
        (r"we get \boxed{1{,}000}.", "1000"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac{3}{6}}", "0.5"),
        (r"\boxed{\frac{1}{3}}", "1/3"),
        (r"\boxed{-\frac{3}{4}}", "-0.75"),
        (r"\boxed{\$18.00}", "18"),
        (r"\boxed{5\%}", "5"),
        (r"\boxed{12\text{ apples}}", "12"),
        (r"\boxed{{7}}", "7"),
        (r"first \boxed{3}, finally \boxed{\frac{\sqrt{4}}{2}} no: \boxed{-2.0}", "-2"),
        (r"\boxed{x+1}", "x+1"),
        ("#### 3 \n#### 4", "4"),
        ("no number here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_boxed_takes_priority_over_hashes_and_nested_braces_match():
    assert extract_answer(r"#### 5" + "\n" + r"\boxed{\frac{10}{4}}") == "2.5"
    assert extract_answer(r"\boxed{ {1}{,}{000} }") is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("$2.50", "2.5"),
        ("-0", "0"),
        ("3/6", "0.5"),
        ("007", "7"),
        ("1,00", None),
        ("abc", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_rewards_are_linear_in_answer_and_format():
    good = "3 + 4 = 7\n#### 7"
    assert answer_reward(good, "7") == 1.0 and format_reward(good) == 1.0
    assert reward(good, "7") == pytest.approx(1.1)
    assert reward(good, "8") == pytest.approx(0.1)  # right format, wrong answer
    assert reward("it is 7", "7") == pytest.approx(1.0)  # right answer (last number), no format
    assert reward("it is 7", "7", w_answer=2.0, w_format=0.5) == pytest.approx(2.0)
    assert reward("#### seven", "7") == 0.0
    assert format_reward("#### 7\nmore text") == 0.0  # the '####' line must be the last one
    assert reward("#### 1,000", "1000") == pytest.approx(1.1)
