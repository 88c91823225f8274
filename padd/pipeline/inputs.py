"""The run's inputs: problems and their splits, tokenizer, models from local paths (`RunInputs`
makes each on first use), and the checks that run before any compute (missing paths, differing
tokenizers, unsupported architectures)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from padd.config import ConfigError, PADDRunConfig
from padd.data.jsonl import load_hf_disk, load_jsonl
from padd.data.problem import Problem
from padd.data.splits import Splits, make_splits
from padd.data.synthetic import generate_problems
from padd.data.tokenizer import build_char_tokenizer, load_tokenizer, tokenizers_match
from padd.decompress.architectures import DecompressionError, check_teacher_config
from padd.moe.hf_experts import experts_implementations, use_experts
from padd.pipeline.run_dir import RunDir
from padd.pipeline.shipped_teacher import SHIPPED_TEACHER_DIR, check_shipped_teacher
from padd.pipeline.teacher import teacher_cache_key
from padd.training.checkpointing import atomic_dir

# Loads the run's teacher afresh (in eval mode, on the run's device) each time it is called.
TeacherLoader = Callable[[], PreTrainedModel]


def load_problems(cfg: PADDRunConfig) -> list[Problem]:
    """Every problem of the run (before splitting), deterministic in the config."""
    d = cfg.data
    if d.source == "synthetic":
        return generate_problems(d.num_problems, seed=cfg.problem_seed, kinds=d.kinds)
    fields = dict(
        question_field=d.question_field,
        answer_field=d.answer_field,
        solution_field=d.solution_field,
        kind_field=d.kind_field,
    )
    if d.source in ("gsm8k", "jsonl"):
        return load_jsonl(d.path, limit=d.num_problems, **fields)
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
        try:  # optional and heavy: imported only to probe for it
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError("data.source", "'hf_disk' needs the `datasets` package") from None
    _check_experts_implementation(cfg)
    if cfg.teacher.source == "shipped":
        check_shipped_teacher(cfg)
    if cfg.teacher.source == "pretrained":
        if not (Path(cfg.teacher.path) / "config.json").is_file():
            raise ConfigError("teacher.path", f"no config.json in {cfg.teacher.path} (not an HF model dir)")
        if cfg.student.source == "decompress":
            _check_decompressible(cfg)
    if cfg.student.source == "pretrained":
        if not (Path(cfg.student.path) / "config.json").is_file():
            raise ConfigError("student.path", f"no config.json in {cfg.student.path} (not an HF model dir)")
        _check_tokenizers(cfg)


def _check_experts_implementation(cfg: PADDRunConfig) -> None:
    if cfg.run.experts_implementation not in experts_implementations():
        raise ConfigError(
            "run.experts_implementation",
            f"must be one of {experts_implementations()}, got {cfg.run.experts_implementation!r}",
        )


def _check_decompressible(cfg: PADDRunConfig) -> None:
    teacher_config = AutoConfig.from_pretrained(cfg.teacher.path)
    try:
        check_teacher_config(teacher_config, cfg.student.num_experts, cfg.student.top_k)
    except DecompressionError as e:
        raise ConfigError("teacher.path", f"cannot decompress this teacher: {e}") from None


def _check_tokenizers(cfg: PADDRunConfig) -> None:
    teacher_tok = load_tokenizer(cfg.tokenizer.path or cfg.teacher.path)
    student_tok = load_tokenizer(cfg.student.path)
    if not tokenizers_match(teacher_tok, student_tok):
        raise ConfigError(
            "student.path",
            "the student's tokenizer differs from the teacher's (vocab or special tokens); "
            "PADD's token-level distillation needs one shared tokenizer",
        )


def build_tokenizer(cfg: PADDRunConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the char tokenizer, or a local HF tokenizer (teacher's by default)."""
    if cfg.tokenizer.kind == "char":
        return build_char_tokenizer()
    return load_tokenizer(cfg.tokenizer.path or cfg.teacher.path)


def load_model(
    path: str | Path, dtype: str = "float32", experts_implementation: str = "padd"
) -> PreTrainedModel:
    """A local HF causal LM in eval mode, its MoE experts (if any) on `experts_implementation`."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model (config.json) at {path}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return use_experts(model, experts_implementation).eval()


class RunInputs:
    """One run's inputs, each made on first use and then kept: the problems, their D_A–D_D splits
    and the tokenizer; and the run's teacher, loaded afresh on every `load_teacher()`.

    `padd train` (`Pipeline`) saves the tokenizer into the run directory on rank 0
    (`save_tokenizer`); `RunInputs.read_only` opens a run without writing anything.
    """

    def __init__(
        self,
        cfg: PADDRunConfig,
        run_dir: RunDir,
        *,
        device: torch.device,
        save_tokenizer: bool,
        teacher_from_record: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self._save_tokenizer = save_tokenizer
        self._teacher_from_record = teacher_from_record
        self._problems: list[Problem] | None = None
        self._splits: Splits | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def read_only(cls, cfg: PADDRunConfig, device: torch.device | None = None) -> RunInputs:
        """The inputs of the run in `cfg.run.dir` (made or not) for reading (`padd eval`, the CLI's
        checks before compute): nothing is written, models go to `device` (default the CPU), and
        the teacher is the one the run recorded in `done/teacher.json` (wherever `run.cache_dir`
        points now)."""
        return cls(
            cfg,
            RunDir(cfg.run.dir),
            device=device or torch.device("cpu"),
            save_tokenizer=False,
            teacher_from_record=True,
        )

    @property
    def problems(self) -> list[Problem]:
        """Every problem of the run, before splitting (raises `DataError` for a bad data file)."""
        if self._problems is None:
            self._problems = load_problems(self.cfg)
        return self._problems

    @property
    def splits(self) -> Splits:
        """D_A–D_D as indices into `problems` (raises `ValueError` for too few problems)."""
        if self._splits is None:
            s = self.cfg.data.splits
            self._splits = make_splits(self.problems, (s.a, s.b, s.c, s.d), seed=self.cfg.problem_seed)
        return self._splits

    def split(self, name: str) -> list[Problem]:
        """The problems of split `name` ("A", "B", "C" or "D")."""
        return self.splits.take(self.problems, name)

    def eval_problems(self) -> list[Problem]:
        """D_D, cut to `eval.num_problems` when that is set."""
        d = self.split("D")
        n = self.cfg.eval.num_problems
        return d[:n] if n else d

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The run's tokenizer; with `save_tokenizer`, also saved to `tokenizer/` when first made."""
        if self._tokenizer is None:
            tokenizer = build_tokenizer(self.cfg)
            self._tokenizer = tokenizer
            if self._save_tokenizer and not self.run_dir.tokenizer.exists():
                atomic_dir(self.run_dir.tokenizer, lambda d: tokenizer.save_pretrained(d))
        return self._tokenizer

    def teacher_path(self) -> Path:
        """The local model, or the trained teacher in `run.cache_dir` (keyed by what it depends on)."""
        if self._teacher_from_record:
            record = self.run_dir.done_record("teacher") or {}
            recorded = record.get("path")
            if recorded and Path(recorded).exists():
                return Path(recorded)
        if self.cfg.teacher.source == "pretrained":
            return Path(self.cfg.teacher.path)
        if self.cfg.teacher.source == "shipped":
            return SHIPPED_TEACHER_DIR
        return Path(self.cfg.run.cache_dir) / "teachers" / teacher_cache_key(self.cfg)

    def load_teacher(self) -> PreTrainedModel:
        """A fresh copy of the run's teacher on the run's device (a `TeacherLoader`)."""
        cfg = self.cfg
        return load_model(self.teacher_path(), cfg.teacher.dtype, cfg.run.experts_implementation).to(
            self.device
        )
