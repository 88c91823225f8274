"""The teacher shipped in `padd/assets/teacher/`: it loads, it is the teacher the default config
asks for, and it answers the default's held-out problems exactly as its provenance records (so
the README's teacher figure holds on any machine); a config for another teacher is refused."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from padd import cli
from padd.config import ConfigError, load_config
from padd.pipeline.inputs import RunInputs, load_model, preflight
from padd.pipeline.shipped_teacher import (
    SHIPPED_TEACHER_DIR,
    check_shipped_teacher,
    export_teacher,
    shipped_teacher_record,
)
from padd.pipeline.teacher import build_tiny_llama, save_model
from padd.training.evaluation import evaluate_batches

DEFAULT = "tiny"


def test_default_config_uses_the_shipped_teacher():
    cfg = load_config(DEFAULT)
    assert cfg.teacher.source == "shipped"
    check_shipped_teacher(cfg)  # raises when the key differs


def test_shipped_teacher_answers_as_recorded(tmp_path):
    cfg = load_config(DEFAULT, [f"run.dir={tmp_path / 'run'}"])
    record = shipped_teacher_record()
    inputs = RunInputs.read_only(cfg)
    problems = inputs.eval_problems()
    teacher = load_model(SHIPPED_TEACHER_DIR, "float32", "eager")
    outcomes = evaluate_batches(
        teacher,
        inputs.tokenizer,
        problems,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )
    correct = "".join("1" if ok else "0" for o in outcomes for ok in o.correct)
    assert record["problem_seed"] == cfg.problem_seed and record["held_out"]["n"] == len(problems)
    assert correct == record["held_out"]["correct"]


@pytest.mark.parametrize("override", ["teacher.hidden_size=64", "teacher.steps=10", "data.num_problems=500"])
def test_config_for_another_teacher_is_refused_before_compute(override):
    cfg = load_config(DEFAULT, [override])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert err.value.key == "teacher.source"
    assert "teacher.source=train" in str(err.value)


def test_export_writes_a_teacher_the_config_accepts(tmp_path):
    """`padd export-teacher` on a (fake, tiny) finished run: the weights are copied unchanged and the
    provenance carries the key of the config that trained them."""
    cfg = load_config(
        DEFAULT, ["teacher.source=train", "teacher.hidden_size=32", "teacher.intermediate_size=64"]
    )
    run = tmp_path / "run"
    (run / "done").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    tok = RunInputs.read_only(cfg).tokenizer
    torch.manual_seed(0)
    t = cfg.teacher
    model = build_tiny_llama(
        len(tok), t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.max_position,
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )  # fmt: skip
    trained = save_model(model, tok, tmp_path / "cache" / "teacher")
    (run / "done" / "teacher.json").write_text(json.dumps({"path": str(trained)}))
    (run / "eval" / "teacher.json").write_text(json.dumps({"accuracy": 0.5, "n": 2, "correct": "10"}))

    out = tmp_path / "shipped"
    assert cli.main(["export-teacher", str(run), "--out", str(out)]) == 0  # `padd export-teacher`
    record = shipped_teacher_record(out)
    check_shipped_teacher(cfg, out)
    assert record["held_out"] == {"accuracy": 0.5, "n": 2, "correct": "10"}
    loaded = load_model(out, "float32", "eager")
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    with pytest.raises(ConfigError):
        check_shipped_teacher(load_config(DEFAULT, ["teacher.source=train"]), out)


def test_export_refuses_a_run_that_did_not_train_its_teacher(tmp_path):
    cfg = load_config(DEFAULT)
    (tmp_path / "done").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "done" / "teacher.json").write_text(json.dumps({"path": str(SHIPPED_TEACHER_DIR)}))
    (tmp_path / "eval" / "teacher.json").write_text(json.dumps({"accuracy": 1.0, "n": 1, "correct": "1"}))
    with pytest.raises(ConfigError, match="did not train its teacher"):
        export_teacher(tmp_path, tmp_path / "out")
