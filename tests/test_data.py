"""padd.data: synthetic generator, char tokenizer, JSONL/GSM8K loaders, D_A–D_D splits."""

import json
from pathlib import Path

import pytest

from padd.data.gsm8k import parse_final_answer
from padd.data.jsonl import DataError, load_gsm8k, load_jsonl
from padd.data.problem import format_example
from padd.data.splits import load_splits, make_splits, save_splits
from padd.data.synthetic import KINDS, generate_problems, iter_problems
from padd.data.tokenizer import build_char_tokenizer, load_tokenizer, tokenizers_match

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_excerpt.jsonl"


def _eval_steps(solution: str) -> int:
    """Check every worked step `a<op>b=c` by evaluating it; return the final answer."""
    *steps, final = solution.split("\n")
    for step in steps:
        expr, result = step.split("=")
        assert eval(expr) == int(result), step  # noqa: S307 — tiny trusted arithmetic
    assert final.startswith("#### ")
    return int(final[5:])


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)


def test_at_least_four_kinds_balanced_with_distinct_wording():
    problems = generate_problems(400, seed=0)
    kinds = {p.kind for p in problems}
    assert len(kinds) >= 4 and kinds == set(KINDS)
    for kind in kinds:
        assert sum(p.kind == kind for p in problems) == 100
    # each kind has a keyword no other kind uses (what lets routing tell them apart)
    for kw, kind in (("packs", "shop"), ("splits", "share"), ("$", "wallet"), ("km", "trip")):
        assert all((kw in p.question) == (p.kind == kind) for p in problems)


def test_answers_are_verifiable_from_the_worked_steps():
    for p in generate_problems(200, seed=1):
        answer = _eval_steps(p.solution)
        assert str(answer) == p.final_answer == parse_final_answer(p.solution)
        assert answer >= 0
        assert len(format_example(p)) < 140  # short enough for a char-level tiny model


def test_exclusion_and_distinct_questions():
    held = generate_problems(100, seed=5)
    other = generate_problems(300, seed=5, exclude={p.question for p in held})
    assert not {p.question for p in held} & {p.question for p in other}
    assert len({p.question for p in other}) == 300


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown problem kinds"):
        next(iter_problems(0, ["shop", "poetry"]))


def test_tokenizer_round_trip_and_save_load(tmp_path):
    tok = build_char_tokenizer()
    text = format_example(generate_problems(1, seed=0)[0])
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert tokenizers_match(tok, again)
    assert again(text)["input_ids"] == ids
    assert tokenizers_match(tok, build_char_tokenizer())  # teacher and student build the same one
    assert not tokenizers_match(tok, build_char_tokenizer("abc"))


def test_splits_non_overlapping_sizes_and_recorded(tmp_path):
    problems = generate_problems(1000, seed=0)
    splits = make_splits(problems, seed=7)
    assert splits.sizes() == {"A": 100, "B": 200, "C": 650, "D": 50}
    sets = [set(v) for v in splits.indices.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 1000
    questions = [{problems[i].question for i in s} for s in sets]
    assert sum(len(q) for q in questions) == len(set().union(*questions))
    assert make_splits(problems, seed=7) == splits and make_splits(problems, seed=8) != splits
    save_splits(splits, problems, tmp_path)
    loaded, digest = load_splits(tmp_path)
    assert loaded == splits and len(digest) == 16
    assert len((tmp_path / "D_D.jsonl").read_text().splitlines()) == 50


def test_splits_drop_duplicate_questions():
    p = generate_problems(20, seed=0)
    splits = make_splits(p + p[:5], seed=0)
    assert sum(splits.sizes().values()) == 20


def test_gsm8k_fixture_loads():
    problems = load_gsm8k(FIXTURE)
    assert len(problems) >= 5
    for p in problems:
        assert p.solution.rstrip().splitlines()[-1].startswith("####")
        assert p.final_answer == parse_final_answer(p.solution)
    assert problems[0].final_answer == "18"


def test_jsonl_configurable_fields(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [
        {"problem": "What is 2+3?", "sol": "2+3=5", "ans": "5", "topic": "add"},
        {"problem": "What is 1,000+1?", "sol": "1000+1=1001", "ans": "1,001", "topic": "add"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_jsonl(
        path, question_field="problem", answer_field="ans", solution_field="sol", kind_field="topic"
    )
    assert [p.final_answer for p in problems] == ["5", "1001"]
    assert problems[1].solution == "1000+1=1001\n#### 1001" and problems[0].kind == "add"
    with pytest.raises(DataError, match="missing field 'question'"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "nope.jsonl")


def test_parse_final_answer_forms():
    assert parse_final_answer("x\n#### 1,234") == "1234"
    assert parse_final_answer("#### 2.50") == "2.5"
    assert parse_final_answer("#### -7") == "-7"
    assert parse_final_answer("42") == "42"
    assert parse_final_answer("no answer here") is None
