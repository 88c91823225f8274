"""The run configuration: typed nested dataclasses mapped from YAML, with `key.sub=value` overrides.

The defaults are the method as tuned here (each tuned field notes its measurement): a YAML that
names only its teacher, data and student shape trains with it. The `paper` preset is
the method as printed, for comparison. Every key has a one-line doc (`padd config PRESET|FILE`
prints them; `docs/config.md` is generated from them).

Every check happens here, before any compute: the dataclasses' `__post_init__` validate values and
`from_dict` types, so an unknown key or an invalid value raises `ConfigError` whose `key` is the
dotted path (e.g. `teacher.lr`). Presets are the YAML files in `padd/configs/`;
`load_config("small")` and `load_config("path/to/file.yaml")` both work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from padd.config_schema import ConfigError, check, non_negative, positive, setting
from padd.data.synthetic import KINDS
from padd.training.config import PRESETS, LoopParams

__all__ = [
    "DENSE_SFT_METHOD",
    "STAGE1_ABLATIONS",
    "ConfigError",
    "PADDRunConfig",
    "Stage1Ablation",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "from_dict",
    "load_config",
    "preset_names",
    "read_config_source",
]


@dataclass
class RunConfig:
    """Where and how the run lives."""

    dir: str = setting("runs/run", "run directory: checkpoints, metrics, evaluations, report")
    seed: int = setting(0, "the one seed: problems, splits, Stage I and the training loop")
    cache_dir: str = setting(
        "runs/cache", "trained teachers, shared across runs (runs side by side train one once: the rest wait)"
    )
    progress: bool = setting(True, "tqdm progress bars")
    num_threads: int = setting(0, "torch intra-op threads; 0 = torch's default")
    tensorboard: bool = setting(True, "also log to TensorBoard when it is installed")
    deterministic: bool = setting(True, "CUDA: deterministic algorithms, so a seed reproduces a run")
    # Same math whatever the implementation: not in the fingerprint, not in saved checkpoints.
    experts_implementation: str = setting(
        "padd", "how MoE experts run: 'padd' (its kernels) or a transformers one, e.g. 'grouped_mm'"
    )

    def __post_init__(self) -> None:
        check(bool(self.dir), "dir", "must not be empty")
        check(bool(self.experts_implementation), "experts_implementation", "must not be empty")
        non_negative(self, "num_threads", "seed")


@dataclass
class SplitConfig:
    """Fractions of the problems that go to D_A/D_B/D_C/D_D (docs/method.md, "Data")."""

    a: float = setting(0.10, "D_A: teacher statistics for clustering")
    b: float = setting(0.20, "D_B: expert warmup")
    c: float = setting(0.65, "D_C: Stages II-IV")
    d: float = setting(0.05, "D_D: held-out evaluation")

    def __post_init__(self) -> None:
        for n in ("a", "b", "c", "d"):
            check(0 < getattr(self, n) < 1, n, f"must be in (0, 1), got {getattr(self, n)!r}")
        total = self.a + self.b + self.c + self.d
        check(abs(total - 1.0) < 1e-6, "d", f"a + b + c + d must be 1, got {total:.6f}")


@dataclass
class DataConfig:
    """The problems: synthetic, GSM8K JSONL, any JSONL, or an HF dataset saved to disk."""

    source: Literal["synthetic", "gsm8k", "jsonl", "hf_disk"] = setting(
        "synthetic", "'synthetic' (drawn here), 'gsm8k', 'jsonl' or 'hf_disk' (read from `path`)"
    )
    path: str | None = setting(None, "the data file or directory (not for synthetic)")
    question_field: str = setting("question", "field holding the question")
    answer_field: str = setting("answer", "field holding a solution ending in `#### N`, or the bare answer")
    solution_field: str | None = setting(
        None, "when answers are bare, the worked solution's field (optional)"
    )
    kind_field: str | None = setting(None, "subdomain label's field, for the specialisation metric")
    hf_split: str | None = setting(None, "split of a saved DatasetDict")
    problem_seed: int | None = setting(
        None,
        "draws the synthetic problems and the A/B/C/D splits; unset: `run.seed`. Fixed, every "
        "seed of a run meets the same problems, held-out set and (cached or shipped) teacher",
    )
    num_problems: int = setting(4000, "synthetic: how many to draw; files: a cap (0 = all)")
    kinds: list[str] = setting(doc="synthetic problem types", factory=lambda: list(KINDS))
    splits: SplitConfig = setting(doc="", factory=SplitConfig)

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            check(self.path is not None, "path", f"required when source is {self.source!r}")
        non_negative(self, "num_problems")
        if self.source == "synthetic":
            check(self.num_problems >= 20, "num_problems", "synthetic data needs at least 20 problems")
            bad = [k for k in self.kinds if k not in KINDS]
            check(not bad and bool(self.kinds), "kinds", f"unknown kinds {bad}; choose from {list(KINDS)}")


@dataclass
class TokenizerConfig:
    """Which tokenizer the teacher and student share."""

    kind: Literal["char", "pretrained"] = setting(
        "char", "'char' (built in, for a teacher trained here) or 'pretrained' (from `path`)"
    )
    path: str | None = setting(None, "a local HF tokenizer (default: the teacher's)")


@dataclass
class TeacherConfig:
    """The dense teacher: `train` one here (a tiny Llama, cached) or load a local HF model."""

    source: Literal["shipped", "train", "pretrained"] = setting(
        "train",
        "'shipped' (the default's teacher, in the package), 'train' (here, cached) or 'pretrained' (`path`)",
    )
    path: str | None = setting(None, "local HF model directory (source 'pretrained')")
    hidden_size: int = setting(128, "trained teacher: hidden size")
    num_layers: int = setting(4, "trained teacher: layers")
    num_heads: int = setting(4, "trained teacher: attention heads")
    intermediate_size: int = setting(512, "trained teacher: FFN width d_ff")
    max_position: int = setting(256, "trained teacher: positions")
    steps: int = setting(1100, "trained teacher: optimiser steps")
    batch_size: int = setting(64, "trained teacher: batch size")
    lr: float = setting(2e-3, "trained teacher: AdamW learning rate")
    warmup_steps: int = setting(50, "trained teacher: learning-rate warmup steps")
    weight_decay: float = setting(0.0, "trained teacher: AdamW weight decay")
    max_len: int = setting(160, "token cap of a prompt + solution (teacher training, Stage I)")
    checkpoint_every: int = setting(200, "trained teacher: steps between checkpoints")
    data_seed: int = setting(1, "trained teacher: its training stream (held-out questions excluded)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "dtype teacher and student load in")

    def __post_init__(self) -> None:
        if self.source == "pretrained":
            check(self.path is not None, "path", "required when source is 'pretrained'")
        positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position")
        positive(self, "steps", "batch_size", "lr", "max_len")
        non_negative(self, "warmup_steps", "weight_decay", "checkpoint_every")
        check(self.hidden_size % self.num_heads == 0, "num_heads", "must divide hidden_size")


@dataclass
class StudentConfig:
    """The MoE student: `decompress` the teacher (Stage I) or load an existing local MoE."""

    source: Literal["decompress", "pretrained"] = setting(
        "decompress", "'decompress' (built from the teacher) or 'pretrained' (`path`)"
    )
    path: str | None = setting(None, "local HF MoE model directory (source 'pretrained')")
    num_experts: int = setting(8, "N, experts per layer")
    top_k: int = setting(2, "k, experts per token")
    init: Literal["exact", "cluster"] = setting(
        "exact",
        "'exact': tied groups of k experts, the teacher for any router; 'cluster': as printed",
    )

    def __post_init__(self) -> None:
        if self.source == "pretrained":
            check(self.path is not None, "path", "required when source is 'pretrained'")
        positive(self, "num_experts", "top_k")
        check(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts ({self.num_experts})")
        if self.init == "exact" and self.source == "decompress":
            check(
                self.num_experts % self.top_k == 0,
                "num_experts",
                f"init 'exact' forms groups of top_k experts: top_k ({self.top_k}) must divide it",
            )


@dataclass
class RouterConfig:
    """How a tied-group student (`student.init: exact`) learns to route.

    The targets are the teacher's sequence clusters (`padd.decompress.sequence_targets`):
    `p_T = softmax(cos(prompt feature, centroid) / xi)`. Stage I fits the router to them on D_A
    and its warmup keeps `L_init` on them; Stages II–IV add `weight · Σ_l KL(p_S,l ‖ p_T)`.
    """

    objective: Literal["sequence_kl", "none"] = setting(
        "sequence_kl", "'sequence_kl' (routes distilled from the teacher) or 'none' (Stage IV's bias alone)"
    )
    weight: float = setting(0.1, "Stages II-IV weight of the route KL towards the teacher's clusters")
    xi: float = setting(0.05, "temperature of the sequence-cluster targets")

    def __post_init__(self) -> None:
        positive(self, "xi")
        non_negative(self, "weight")


@dataclass
class Stage1Config:
    """Stage I: teacher statistics on D_A, then expert warmup on D_B.

    The warmup loss is `L_LM + kd_weight·L_KD + init_weight·L_init` (`padd.decompress.warmup`)."""

    # The tuned warmup (measured on `small`): 180 steps on learned routes 94.9 +- 1.1 against 60 on
    # round-robin ones 94.7 +- 1.4; at 1e-3 Adam moves every weight of an exact student by ~1e-3,
    # measured -24 points against 1e-4. `paper.yaml` undoes all three.
    stats_batches: int = setting(4, "batches of D_A the teacher statistics use")
    batch_size: int = setting(64, "batch size of the statistics and the warmup")
    warmup_steps: int = setting(180, "expert warmup steps on D_B; 0 = no warmup")
    warmup_lr: float = setting(
        1e-4, "warmup AdamW learning rate (1e-3 moves an exact student off its teacher)"
    )
    kd_weight: float = setting(1.0, "weight of L_KD (to the teacher) in the warmup loss")
    init_weight: float = setting(1.0, "weight of L_init (router towards its targets) in the warmup loss")
    neuron_xi: float = setting(
        1.0, "temperature of the neuron-cluster targets ('cluster' init, pretrained student)"
    )
    warmup_routing: Literal["learned", "uniform"] = setting(
        "learned", "'learned': the router's own top-k; 'uniform': frozen round-robin (as printed)"
    )

    def __post_init__(self) -> None:
        positive(self, "stats_batches", "batch_size", "warmup_lr", "neuron_xi")
        non_negative(self, "warmup_steps", "kd_weight", "init_weight")


@dataclass
class TrainingConfig:
    """Stages II–IV: `method` is a `padd.training` preset of the loop that `params` set up."""

    method: str = setting("padd", f"the loop's preset: one of {', '.join(PRESETS)}")
    steps: int = setting(120, "training steps")
    prompts_per_step: int = setting(8, "prompts each step updates on")
    checkpoint_every: int = setting(20, "steps between checkpoints; 0 = only the end")
    params: LoopParams = setting(doc="", factory=LoopParams)

    def __post_init__(self) -> None:
        check(
            self.method in PRESETS, "method", f"unknown method {self.method!r}; known: {', '.join(PRESETS)}"
        )
        positive(self, "steps", "prompts_per_step")
        non_negative(self, "checkpoint_every")


@dataclass
class EvalConfig:
    """Held-out evaluation on D_D: greedy pass@1."""

    max_new_tokens: int = setting(40, "answer length cap (tokens)")
    batch_size: int = setting(64, "prompts per generation batch")
    num_problems: int = setting(0, "problems of D_D evaluated; 0 = all")

    def __post_init__(self) -> None:
        positive(self, "max_new_tokens", "batch_size")
        non_negative(self, "num_problems")


@dataclass(frozen=True)
class Stage1Ablation:
    """A `--compare` method that builds its own Stage-I student (the run's settings but these),
    then trains it with the run's `training.method`."""

    init: Literal["exact", "cluster", "random_split", "upcycle"]
    warmup: bool = True


# Stage I's ablations: constructions that lost to the exact one, kept as rows of `--compare`
# (`padd.decompress.decompress` documents each `init`), not as user settings.
STAGE1_ABLATIONS: dict[str, Stage1Ablation] = {
    "no_stage1": Stage1Ablation("upcycle", warmup=False),  # sparse upcycling, random router, no warmup
    "cluster_init": Stage1Ablation("cluster"),  # importance-filled experts, not function-preserving
    "upcycle": Stage1Ablation("upcycle"),  # sparse upcycling, warmed up
    "random_split": Stage1Ablation("random_split"),  # a random balanced neuron split
}
# The dense teacher after the Stage I warmup's supervised steps on D_B (a `--compare` row only).
DENSE_SFT_METHOD = "teacher_sft"
COMPARE_METHODS = (*PRESETS, *STAGE1_ABLATIONS, DENSE_SFT_METHOD)


@dataclass
class CompareConfig:
    """Methods `padd train --compare` runs on the same data, teacher and seeds."""

    methods: list[str] = setting(
        doc="baselines and ablations, each a row of the report",
        factory=lambda: [
            "teacher_grpo",
            "teacher_sft",
            "vanilla_grpo",
            "online_kd",
            "rspo",
            "no_stage1",
            "no_stage2",
            "no_stage3",
            "no_stage4",
        ],  # fmt: skip
    )

    def __post_init__(self) -> None:
        for i, m in enumerate(self.methods):
            check(
                m in COMPARE_METHODS,
                f"methods[{i}]",
                f"unknown method {m!r}; known: {', '.join(COMPARE_METHODS)}",
            )


@dataclass
class DistributedConfig:
    """torchrun: data parallel by default; FSDP2 when the model should be sharded."""

    strategy: Literal["auto", "ddp", "fsdp"] = setting(
        "auto", "'auto', 'ddp' (replicas) or 'fsdp' (FSDP2 shards)"
    )
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "process-group backend")
    # Under `--compare` the other ranks wait while rank 0 alone evaluates each method.
    timeout_minutes: float = setting(60.0, "how long a rank may wait in a collective")

    def __post_init__(self) -> None:
        positive(self, "timeout_minutes")


@dataclass
class PADDRunConfig:
    """Everything `padd train` needs."""

    run: RunConfig = setting(doc="", factory=RunConfig)
    data: DataConfig = setting(doc="", factory=DataConfig)
    tokenizer: TokenizerConfig = setting(doc="", factory=TokenizerConfig)
    teacher: TeacherConfig = setting(doc="", factory=TeacherConfig)
    student: StudentConfig = setting(doc="", factory=StudentConfig)
    router: RouterConfig = setting(doc="", factory=RouterConfig)
    stage1: Stage1Config = setting(doc="", factory=Stage1Config)
    training: TrainingConfig = setting(doc="", factory=TrainingConfig)
    eval: EvalConfig = setting(doc="", factory=EvalConfig)
    compare: CompareConfig = setting(doc="", factory=CompareConfig)
    distributed: DistributedConfig = setting(doc="", factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.teacher.source in ("train", "shipped"):
            check(self.tokenizer.kind == "char", "tokenizer.kind", "a teacher trained here uses 'char'")
        if self.student.source == "pretrained" and self.tokenizer.kind == "char":
            raise ConfigError("tokenizer.kind", "a pre-trained student needs kind 'pretrained'")

    @property
    def problem_seed(self) -> int:
        """The seed of the problems and their splits: `data.problem_seed`, else `run.seed`."""
        return self.run.seed if self.data.problem_seed is None else self.data.problem_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every setting that changes results (not where the run lives or how it prints)."""
        d = self.to_dict()
        for k in ("dir", "progress", "cache_dir", "tensorboard", "num_threads", "experts_implementation"):
            d["run"].pop(k)
        d.pop("compare")
        d["distributed"].pop("timeout_minutes")  # how long to wait, not what is computed
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---- mapping dicts onto dataclasses -------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int→float and numeric strings from the CLI."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        check(isinstance(value, list | tuple), key, f"must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        check(
            isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}"
        )
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        check(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and invalid values by dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in names:
            raise ConfigError(dotted(k), f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], dotted(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix + "."):
            raise e.under(prefix) from None
        raise


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML (`lr=1e-3`, `kinds=[shop,trip]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        check(all(parts), key, "empty component in the key")
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            check(isinstance(nxt, dict), ".".join(parts[: i + 1]), "is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def preset_names() -> list[str]:
    """Names of the shipped presets (`padd/configs/*.yaml`)."""
    return sorted(p.name[:-5] for p in resources.files("padd.configs").iterdir() if p.name.endswith(".yaml"))


def read_config_source(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML path, with its `base:` chain merged in.

    A config may start from another one: `base: small` (a preset name, or a YAML path relative to
    the file) takes that config and puts this file's keys on top, section by section. So a
    preset that differs from another in two settings says just those two."""
    return _read_with_bases(name_or_path, Path.cwd(), ())


def _read_with_bases(name_or_path: str, here: Path | None, chain: tuple[str, ...]) -> dict[str, Any]:
    data, origin = _read_one(name_or_path, here)
    base = data.pop("base", None)
    if base is None:
        return data
    check(isinstance(base, str) and base, "base", f"must be a preset name or a YAML path, got {base!r}")
    if origin in chain:
        cycle = " -> ".join((*chain, origin))
        raise ConfigError("base", f"configs name each other as base in a cycle: {cycle}")
    # A preset's base is another preset; a file's base is a preset or a path relative to the file.
    here = None if origin.startswith("preset:") else Path(origin).parent
    parent = _read_with_bases(base, here, (*chain, origin))
    return _merge(parent, data)


def _read_one(name_or_path: str, here: Path | None) -> tuple[dict[str, Any], str]:
    """One YAML mapping, and where it came from (the resolved path, or `preset:NAME`).

    `here` is the folder a relative path is taken from; None looks among the presets only."""
    path = Path(name_or_path) if here is None or Path(name_or_path).is_absolute() else here / name_or_path
    if here is not None and (path.suffix in (".yaml", ".yml") or path.exists()):
        if not path.is_file():
            raise ConfigError("", f"config file not found: {name_or_path}")
        text, origin = path.read_text(), str(path.resolve())
    else:
        res = resources.files("padd.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError("", f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        text, origin = res.read_text(), f"preset:{name_or_path}"
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{name_or_path}: the top level must be a mapping")
    return data, origin


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, recursing into sections (mappings); lists and values are replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PADDRunConfig:
    """Resolve a preset name or YAML path plus overrides into a validated `PADDRunConfig`."""
    data = apply_overrides(read_config_source(name_or_path), list(overrides or []))
    return from_dict(PADDRunConfig, data)


def config_from_dict(data: dict[str, Any]) -> PADDRunConfig:
    return from_dict(PADDRunConfig, data)


def dump_config(cfg: PADDRunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
