"""`padd train` in the paper's setting (`student.source: pretrained`) through the program: a tiny
dense Llama teacher and a tiny random Mixtral of another hidden size, both saved to disk with one
shared tokenizer. Every step runs and the report is written."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from padd.data.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _save_models(root: Path) -> tuple[Path, Path]:
    tok = build_char_tokenizer()
    common = dict(
        vocab_size=len(tok), num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**common, hidden_size=32, intermediate_size=64))
    student = MixtralForCausalLM(
        MixtralConfig(
            **common, hidden_size=48, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
        )
    )
    paths = root / "teacher", root / "student"
    for model, path in zip((teacher, student), paths, strict=True):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def test_pretrained_moe_student_through_padd_train(tmp_path):
    teacher_dir, student_dir = _save_models(tmp_path)
    micro = yaml.safe_load((ROOT / "tests" / "fixtures" / "micro.yaml").read_text())
    micro["tokenizer"] = {"kind": "pretrained", "path": str(teacher_dir)}
    micro["teacher"] = {"source": "pretrained", "path": str(teacher_dir), "max_len": 96}
    micro["student"] = {"source": "pretrained", "path": str(student_dir), "num_experts": 4, "top_k": 2}
    micro["run"]["dir"] = str(tmp_path / "run")
    micro["run"]["cache_dir"] = str(tmp_path / "cache")
    config = tmp_path / "pretrained.yaml"
    config.write_text(yaml.safe_dump(micro))
    out = subprocess.run(
        [sys.executable, "-m", "padd", "train", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    stage1 = json.loads((run / "done" / "stage1.json").read_text())
    assert stage1["warmup"] == "done" and len(stage1["router_fit_r2"]) == 2
    student_cfg = json.loads((run / "train" / "final" / "config.json").read_text())
    assert student_cfg["model_type"] == "mixtral" and student_cfg["hidden_size"] == 48
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary) == {"teacher", "base_student", "padd"}
    assert (run / "report.md").exists()
