"""The run configuration: typed nested dataclasses mapped from YAML, with `key.sub=value` overrides.

Every check happens here, before any compute: an unknown key or an invalid value raises
`ConfigError` naming the key by its dotted path (e.g. `teacher.lr`). Presets are the YAML files in
`padd/configs/`; `load_config("tiny")` and `load_config("path/to/file.yaml")` both work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from padd.data.synthetic import KINDS


class ConfigError(ValueError):
    """An invalid configuration; `key` is the dotted name of the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        _check(getattr(obj, n) > 0, n, f"must be > 0, got {getattr(obj, n)!r}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        _check(getattr(obj, n) >= 0, n, f"must be >= 0, got {getattr(obj, n)!r}")


@dataclass
class RunConfig:
    """Where and how the run lives."""

    dir: str = "runs/tiny"
    seed: int = 0
    cache_dir: str = "runs/cache"  # trained teachers, shared across runs
    progress: bool = True  # tqdm bars
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    deterministic: bool = True  # CUDA: deterministic algorithms, so a seed reproduces a run
    # How MoE experts run, a transformers `experts_implementation`: "padd" (padd's kernels: Triton
    # on CUDA, the PyTorch reference elsewhere), or e.g. "grouped_mm"/"eager" to compare against.
    # Same math, so not in the fingerprint (like num_threads); saved checkpoints do not record it.
    experts_implementation: str = "padd"

    def __post_init__(self) -> None:
        _check(bool(self.dir), "dir", "must not be empty")
        _check(bool(self.experts_implementation), "experts_implementation", "must not be empty")
        _non_negative(self, "num_threads", "seed")


@dataclass
class SplitConfig:
    """Fractions of the problems that go to D_A/D_B/D_C/D_D (method doc, "Data")."""

    a: float = 0.10  # clustering statistics
    b: float = 0.20  # expert warmup
    c: float = 0.65  # main training (Stages II–IV)
    d: float = 0.05  # held-out evaluation

    def __post_init__(self) -> None:
        for n in ("a", "b", "c", "d"):
            _check(0 < getattr(self, n) < 1, n, f"must be in (0, 1), got {getattr(self, n)!r}")
        total = self.a + self.b + self.c + self.d
        _check(abs(total - 1.0) < 1e-6, "d", f"a + b + c + d must be 1, got {total:.6f}")


@dataclass
class DataConfig:
    """The problems: synthetic, GSM8K JSONL, any JSONL, or an HF dataset saved to disk."""

    source: Literal["synthetic", "gsm8k", "jsonl", "hf_disk"] = "synthetic"
    path: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"  # a solution ending in `#### N`, or the bare answer
    solution_field: str | None = None  # when answers are bare, the worked solution (optional)
    kind_field: str | None = None  # subdomain label, for the specialisation metric
    hf_split: str | None = None  # split of a saved DatasetDict
    num_problems: int = 4000  # synthetic: how many to draw; files: cap (0 = all)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    splits: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            _check(self.path is not None, "path", f"required when source is {self.source!r}")
        _non_negative(self, "num_problems")
        if self.source == "synthetic":
            _check(self.num_problems >= 20, "num_problems", "synthetic data needs at least 20 problems")
            bad = [k for k in self.kinds if k not in KINDS]
            _check(not bad and bool(self.kinds), "kinds", f"unknown kinds {bad}; choose from {list(KINDS)}")


@dataclass
class TokenizerConfig:
    """`char`: the built-in character tokenizer; `pretrained`: load from `path` (or the teacher's)."""

    kind: Literal["char", "pretrained"] = "char"
    path: str | None = None


@dataclass
class TeacherConfig:
    """`train`: a tiny dense Llama trained here (cached); `pretrained`: a local HF model."""

    source: Literal["train", "pretrained"] = "train"
    path: str | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position: int = 256
    steps: int = 1100
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_len: int = 160
    checkpoint_every: int = 200
    data_seed: int = 1  # the teacher's training stream; held-out questions are excluded from it
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.source == "pretrained":
            _check(self.path is not None, "path", "required when source is 'pretrained'")
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position")
        _positive(self, "steps", "batch_size", "lr", "max_len")
        _non_negative(self, "warmup_steps", "weight_decay", "checkpoint_every")
        _check(self.hidden_size % self.num_heads == 0, "num_heads", "must divide hidden_size")


@dataclass
class StudentConfig:
    """`decompress`: built from the teacher by Stage I; `pretrained`: an existing local MoE."""

    source: Literal["decompress", "pretrained"] = "decompress"
    path: str | None = None
    num_experts: int = 8
    top_k: int = 2
    # "exact": tied groups of k experts, equal to the teacher for any router (the default);
    # "cluster": the earlier importance-filled construction (not function-preserving; ablation).
    init: Literal["exact", "cluster", "random_split", "upcycle"] = "exact"
    router_scale: float = 1.0  # factor on the centroid router init (`padd.decompress.decompress`)

    def __post_init__(self) -> None:
        if self.source == "pretrained":
            _check(self.path is not None, "path", "required when source is 'pretrained'")
        _positive(self, "num_experts", "top_k", "router_scale")
        _check(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts ({self.num_experts})")
        if self.init == "exact" and self.source == "decompress":
            _check(
                self.num_experts % self.top_k == 0,
                "num_experts",
                f"init 'exact' forms groups of top_k experts: top_k ({self.top_k}) must divide it",
            )


@dataclass
class RouterConfig:
    """How a tied-group student (`student.init=exact`) learns to route.

    The targets are the teacher's sequence clusters (`padd.decompress.sequence_targets`):
    `p_T = softmax(cos(prompt feature, centroid) / xi)`. Stage I fits the router to them on D_A
    and its warmup keeps `L_init` on them; Stages II–IV add `weight · Σ_l KL(p_S,l ‖ p_T)` on the
    rollouts (`objective: none` leaves the router to Stage IV's bias alone).
    """

    objective: Literal["sequence_kl", "none"] = "sequence_kl"
    weight: float = 0.1
    xi: float = 0.05

    def __post_init__(self) -> None:
        _positive(self, "xi")
        _non_negative(self, "weight")


@dataclass
class Stage1Config:
    """Stage I: teacher statistics on D_A, then expert warmup on D_B."""

    stats_batches: int = 4
    batch_size: int = 64
    warmup_steps: int = 60
    warmup_lr: float = 1e-3
    alpha: float = 1.0  # weight of L_KD in the warmup loss
    beta: float = 1.0  # weight of L_init
    xi: float = 1.0  # temperature of the neuron-cluster targets (non-exact inits)
    skip: bool = False  # no warmup (part of the "no Stage I" ablation)
    # "uniform": frozen round-robin routing (the method); "learned": the router's own top-k
    warmup_routing: Literal["uniform", "learned"] = "uniform"

    def __post_init__(self) -> None:
        _positive(self, "stats_batches", "batch_size", "warmup_lr", "xi")
        _non_negative(self, "warmup_steps", "alpha", "beta")


@dataclass
class TrainingConfig:
    """Stages II–IV: `method` is a `padd.training` preset; `params` overrides its fields."""

    method: str = "padd"
    steps: int = 150
    prompts_per_step: int = 8
    checkpoint_every: int = 25
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.method), "method", "must not be empty")
        _positive(self, "steps", "prompts_per_step")
        _non_negative(self, "checkpoint_every")
        self.params = _typed_params(self.params)


def _typed_params(params: dict[str, Any]) -> dict[str, Any]:
    """`training.params` checked against `PADDConfig`'s fields and types (`params.KEY` errors);
    YAML's `1e-5` (a string to YAML 1.1) becomes the float it means."""
    from padd.training.config import PADDConfig

    hints = typing.get_type_hints(PADDConfig)
    out = {}
    for key, value in params.items():
        if key not in hints:
            raise ConfigError(f"params.{key}", f"unknown key (known: {', '.join(sorted(hints))})")
        out[key] = _coerce(value, hints[key], f"params.{key}")
    try:
        PADDConfig(**out)
    except ValueError as e:  # "PADDConfig.<field>=<value>: why": name the field
        field_name, _, why = str(e).removeprefix("PADDConfig.").partition("=")
        key = f"params.{field_name}" if field_name in hints else "params"
        raise ConfigError(key, why.partition(": ")[2] or str(e)) from None
    return out


@dataclass
class EvalConfig:
    """Held-out evaluation on D_D: greedy pass@1."""

    max_new_tokens: int = 40
    batch_size: int = 64
    num_problems: int = 0  # 0 = all of D_D

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size")
        _non_negative(self, "num_problems")


@dataclass
class CompareConfig:
    """Methods `padd train --compare` runs on the same data, teacher and seeds."""

    methods: list[str] = field(
        default_factory=lambda: [
            "teacher_grpo",
            "teacher_sft",
            "vanilla_grpo",
            "online_kd",
            "rspo",
            "no_stage1",
            "no_stage2",
            "no_stage3",
            "no_stage4",
        ]  # fmt: skip
    )


@dataclass
class DistributedConfig:
    """torchrun: data parallel by default; FSDP2 when the model should be sharded."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # How long a rank may wait in a collective. Under `--compare` the other ranks wait while rank
    # 0 alone evaluates each method (and trains `teacher_sft`), which can take long on a real model.
    timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        _positive(self, "timeout_minutes")


@dataclass
class PADDRunConfig:
    """Everything `padd train` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.teacher.source == "train":
            _check(self.tokenizer.kind == "char", "tokenizer.kind", "a teacher trained here uses 'char'")
        if self.student.source == "pretrained" and self.tokenizer.kind == "char":
            raise ConfigError("tokenizer.kind", "a pre-trained student needs kind 'pretrained'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every setting that changes results (not where the run lives or how it prints)."""
        d = self.to_dict()
        for k in ("dir", "progress", "cache_dir", "tensorboard", "num_threads", "experts_implementation"):
            d["run"].pop(k)
        d.pop("compare")
        d["distributed"].pop("timeout_minutes")  # how long to wait, not what is computed
        # Keys added after runs were made count only when set away from their default, so those
        # runs (which behaved as the default) keep their fingerprint and stay resumable.
        for section, key, default in _LATER_KEYS:
            if d[section].get(key) == default:
                d[section].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_LATER_KEYS = (("stage1", "warmup_routing", "uniform"),)


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
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, list | tuple), key, f"must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(
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
        _check(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
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
        _check(all(parts), key, "empty component in the key")
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            _check(isinstance(nxt, dict), ".".join(parts[: i + 1]), "is not a section")
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
    _check(isinstance(base, str) and base, "base", f"must be a preset name or a YAML path, got {base!r}")
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
