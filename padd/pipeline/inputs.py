"""The run's inputs: problems, tokenizer, models from local paths, and the checks that run before
any compute (missing paths, differing tokenizers, unsupported architectures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from padd.config import ConfigError, PADDRunConfig
from padd.data.problem import Problem
from padd.pipeline.methods import DENSE_SFT_METHOD, STAGE1_ABLATIONS, training_config


def load_problems(cfg: PADDRunConfig) -> list[Problem]:
    """Every problem of the run (before splitting), deterministic in the config."""
    d = cfg.data
    if d.source == "synthetic":
        from padd.data.synthetic import generate_problems

        return generate_problems(d.num_problems, seed=cfg.run.seed, kinds=d.kinds)
    fields = dict(
        question_field=d.question_field,
        answer_field=d.answer_field,
        solution_field=d.solution_field,
        kind_field=d.kind_field,
    )
    if d.source in ("gsm8k", "jsonl"):
        from padd.data.jsonl import load_jsonl

        return load_jsonl(d.path, limit=d.num_problems, **fields)
    from padd.data.jsonl import load_hf_disk

    return load_hf_disk(d.path, split=d.hf_split, limit=d.num_problems, **fields)


def _model_type(path: str | Path) -> str | None:
    cfg = Path(path) / "config.json"
    return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None


def _require_dir(path: str | None, key: str, what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"{what} not found: {p}")


def preflight(cfg: PADDRunConfig) -> None:
    """Every check that needs only files on disk; raises `ConfigError` naming the key."""
    _require_dir(cfg.data.path, "data.path", "data path")
    _require_dir(cfg.teacher.path, "teacher.path", "teacher model")
    _require_dir(cfg.student.path, "student.path", "student model")
    _require_dir(cfg.tokenizer.path, "tokenizer.path", "tokenizer")
    if cfg.data.source == "hf_disk":
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError("data.source", "'hf_disk' needs the `datasets` package") from None
    _check_training(cfg)
    _check_experts_implementation(cfg)
    if cfg.teacher.source == "pretrained":
        if not (Path(cfg.teacher.path) / "config.json").is_file():
            raise ConfigError("teacher.path", f"no config.json in {cfg.teacher.path} (not an HF model dir)")
        if cfg.student.source == "decompress":
            _check_decompressible(cfg)
    if cfg.student.source == "pretrained":
        if not (Path(cfg.student.path) / "config.json").is_file():
            raise ConfigError("student.path", f"no config.json in {cfg.student.path} (not an HF model dir)")
        _check_tokenizers(cfg)


def _check_training(cfg: PADDRunConfig) -> None:
    # The Stages II–IV settings are `padd.training`'s own dataclass: build it now, not mid-run.
    # (`training.params` keys and types are checked by the config itself.)
    not_presets = {*STAGE1_ABLATIONS, DENSE_SFT_METHOD}
    methods = [cfg.training.method] + [m for m in cfg.compare.methods if m not in not_presets]
    for i, method in enumerate(methods):
        key = "training.method" if i == 0 else "compare.methods"
        try:
            training_config(method, cfg.training.params, cfg.run.seed)
        except ValueError as e:
            msg = str(e)
            bad = next((k for k in cfg.training.params if f"PADDConfig.{k}=" in msg), None)
            raise ConfigError(f"training.params.{bad}" if bad else key, msg) from None


def _check_experts_implementation(cfg: PADDRunConfig) -> None:
    from padd.moe.hf_experts import experts_implementations

    if cfg.run.experts_implementation not in experts_implementations():
        raise ConfigError(
            "run.experts_implementation",
            f"must be one of {experts_implementations()}, got {cfg.run.experts_implementation!r}",
        )


def _check_decompressible(cfg: PADDRunConfig) -> None:
    from transformers import AutoConfig

    from padd.decompress.architectures import DecompressionError, check_teacher_config

    teacher_config = AutoConfig.from_pretrained(cfg.teacher.path)
    try:
        check_teacher_config(teacher_config, cfg.student.num_experts, cfg.student.top_k)
    except DecompressionError as e:
        raise ConfigError("teacher.path", f"cannot decompress this teacher: {e}") from None


def _check_tokenizers(cfg: PADDRunConfig) -> None:
    from padd.data.tokenizer import load_tokenizer, tokenizers_match

    teacher_tok = load_tokenizer(cfg.tokenizer.path or cfg.teacher.path)
    student_tok = load_tokenizer(cfg.student.path)
    if not tokenizers_match(teacher_tok, student_tok):
        raise ConfigError(
            "student.path",
            "the student's tokenizer differs from the teacher's (vocab or special tokens); "
            "PADD's token-level distillation needs one shared tokenizer",
        )


def build_tokenizer(cfg: PADDRunConfig) -> Any:
    """The run's tokenizer: the char tokenizer, or a local HF tokenizer (teacher's by default)."""
    from padd.data.tokenizer import build_char_tokenizer, load_tokenizer

    if cfg.tokenizer.kind == "char":
        return build_char_tokenizer()
    return load_tokenizer(cfg.tokenizer.path or cfg.teacher.path)


def load_model(path: str | Path, dtype: str = "float32", experts_implementation: str = "padd") -> Any:
    """A local HF causal LM in eval mode, its MoE experts (if any) on `experts_implementation`."""
    import torch
    from transformers import AutoModelForCausalLM

    from padd.moe.hf_experts import use_experts

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model (config.json) at {path}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return use_experts(model, experts_implementation).eval()
