"""padd.config: presets, validation errors naming the dotted key, `key.sub=value` overrides, the
tuned defaults every preset starts from, and the generated reference (docs/config.md)."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from padd.config import ConfigError, PADDRunConfig, load_config, preset_names
from padd.config_docs import annotated_yaml, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")  # the test-only smoke config


def test_presets_load_and_differ():
    assert {"tiny", "small", "paper", "qwen2.5-math-1.5b", "pretrained-moe"} <= set(preset_names())
    assert "micro" not in preset_names()  # a test fixture, not shipped
    fps = {load_config(name).fingerprint() for name in preset_names()}
    assert len(fps) == len(preset_names())
    tiny = load_config("tiny")
    assert isinstance(tiny, PADDRunConfig)
    assert tiny.student.num_experts == 8 and tiny.teacher.source == "shipped"


@pytest.mark.parametrize(
    "override, key",
    [
        ("teacher.bogus=1", "teacher.bogus"),
        ("nosection.x=1", "nosection"),
        ("data.splits.e=0.1", "data.splits.e"),
        ("teacher.lr=-1", "teacher.lr"),
        ("teacher.steps=ten", "teacher.steps"),
        ("teacher.steps=2.5", "teacher.steps"),
        ("student.top_k=9", "student.top_k"),
        ("student.init=magic", "student.init"),
        ("data.splits.d=0.5", "data.splits.d"),
        ("data.kinds=[shop,poetry]", "data.kinds"),
        ("data.source=jsonl", "data.path"),
        ("run.progress=maybe", "run.progress"),
        ("teacher.num_heads=3", "teacher.num_heads"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, [override])
    assert err.value.key == key
    assert key in str(err.value)


def test_overrides_apply_with_types():
    cfg = load_config(
        MICRO, ["teacher.lr=1e-3", "training.steps=9", "data.kinds=[shop,trip]", "run.dir=/x/y"]
    )
    assert cfg.teacher.lr == 1e-3 and isinstance(cfg.teacher.lr, float)
    assert cfg.training.steps == 9 and cfg.data.kinds == ["shop", "trip"]
    assert cfg.run.dir == "/x/y"


def test_fingerprint_ignores_where_the_run_lives():
    a = load_config(MICRO, ["run.dir=/a", "run.progress=true"])
    b = load_config(MICRO, ["run.dir=/b"])
    c = load_config(MICRO, ["training.steps=7"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_collective_timeout_is_checked_and_not_fingerprinted():
    base = load_config(MICRO)
    longer = load_config(MICRO, ["distributed.timeout_minutes=240"])
    assert longer.distributed.timeout_minutes == 240.0
    assert longer.fingerprint() == base.fingerprint()  # how long ranks wait, not what they compute
    with pytest.raises(ConfigError, match="distributed.timeout_minutes: must be > 0"):
        load_config(MICRO, ["distributed.timeout_minutes=0"])


def test_yaml_file_and_bad_override_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  steps: 5\n")
    assert load_config(str(path)).teacher.steps == 5
    path.write_text("teacher:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match="teacher.stepz"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(MICRO, ["teacher.steps"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_small_is_tiny_with_its_teacher_trained_here():
    # The oracle: tiny with small's two settings given as overrides.
    tiny = load_config("tiny", ["run.dir=runs/small", "teacher.source=train"])
    assert load_config("small").to_dict() == tiny.to_dict()
    assert load_config("tiny").training.params.dynamic_sampling == 4  # the headline's method


def test_base_merges_sections_and_resolves_relative_to_the_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "parent.yaml").write_text(f"base: {MICRO}\ntraining:\n  steps: 9\n  params:\n    kd_on: all\n")
    child = "base: sub/parent.yaml\ntraining:\n  params:\n    learning_rate: 3.0e-5\n"
    (tmp_path / "child.yaml").write_text(child)
    got = load_config(str(tmp_path / "child.yaml"))
    want = load_config(
        MICRO, ["training.steps=9", "training.params.kd_on=all", "training.params.learning_rate=3.0e-5"]
    )
    assert got.to_dict() == want.to_dict()  # the params mapping merged, not replaced


def test_bad_base_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(str(a))
    assert err.value.key == "base"
    a.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        load_config(str(a))
    a.write_text("base: [small]\n")
    with pytest.raises(ConfigError, match="base: must be a preset name"):
        load_config(str(a))


def test_a_presets_base_is_a_preset_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like small's base must not shadow the preset
    assert load_config("small").teacher.source == "train"
    assert load_config("small").data.problem_seed == 0  # from tiny, the base


def test_experts_implementation_is_checked_before_compute_and_not_fingerprinted():
    from padd.pipeline.inputs import preflight

    base = load_config("tiny")
    assert base.run.experts_implementation == "padd"
    other = load_config("tiny", ["run.experts_implementation=grouped_mm"])
    preflight(other)
    assert other.fingerprint() == base.fingerprint()  # same math, another implementation
    with pytest.raises(ConfigError, match="run.experts_implementation.*must be one of"):
        preflight(load_config("tiny", ["run.experts_implementation=bogus"]))


# ---- one default: the method as tuned ------------------------------------------------------------


def _method(cfg: PADDRunConfig) -> dict:
    """The settings that make the method (not the data, the models' shapes or the run's scale)."""
    params = dataclasses.asdict(cfg.training.params)
    params.pop("max_new_tokens")  # a length cap: the data's
    stage1 = dataclasses.asdict(cfg.stage1)
    stage1.pop("warmup_steps")  # a schedule's length: the run's budget, like training.steps
    return {
        "student.init": cfg.student.init,
        "router": dataclasses.asdict(cfg.router),
        "stage1": stage1,
        "training.method": cfg.training.method,
        "training.params": params,
    }


def test_a_minimal_user_config_trains_with_the_headline_method(tmp_path):
    """A YAML naming only its teacher, data and student shape gets `small`'s method, not the
    method as printed (which a user got before: 12 points below the teacher)."""
    path = tmp_path / "mine.yaml"
    path.write_text(
        "teacher: {source: train}\n"
        "data: {source: synthetic, num_problems: 4000}\n"
        "student: {source: decompress, num_experts: 8, top_k: 2}\n"
    )
    mine, small = load_config(str(path)), load_config("small")
    assert _method(mine) == _method(small)
    assert (small.stage1.warmup_lr, small.stage1.warmup_routing) == (1e-4, "learned")
    assert (small.training.params.kd_on, small.training.params.dynamic_sampling) == ("teacher_correct", 4)
    assert (small.router.objective, small.router.weight, small.router.xi) == ("sequence_kl", 0.1, 0.05)


def test_every_shipped_preset_keeps_the_tuned_method_but_paper():
    """Presets change scale (data, models, lengths, schedules), not the method; `paper` is the
    method as printed; the real-model presets use the exact Stage I."""
    tuned = PADDRunConfig()
    for name in preset_names():
        cfg = load_config(name)
        if name == "paper":
            assert cfg.student.init == "cluster" and cfg.training.params.kd_on == "all"
            assert cfg.stage1.warmup_routing == "uniform" and cfg.training.params.dynamic_sampling == 1
            continue
        assert cfg.training.params.kd_on == tuned.training.params.kd_on, name
        assert cfg.training.params.dynamic_sampling == tuned.training.params.dynamic_sampling, name
        assert cfg.stage1.warmup_routing == "learned" and cfg.router == tuned.router, name
        if cfg.student.source == "decompress":
            assert cfg.student.init == "exact", name


def test_a_preset_override_has_a_reason():
    """Each value a shipped preset sets carries a one-line `# reason`; what names its inputs (which
    data, which models, where the run lives) needs none."""
    inputs = ("dir:", "base:", "source:", "path:", "kind:", "question_field:", "answer_field:", "top_k:")
    for path in sorted((ROOT / "padd" / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            body = line.split("#")[0].rstrip()
            if not body or body.endswith(":") or body.lstrip().startswith(inputs):
                continue
            assert "#" in line, f"{path.name}: {line.strip()!r} says not why"


# ---- the typed tree: one name for one thing, errors carrying their key -------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.params.rho=2", "training.params.rho"),
        ("training.params.kd_on=negative", "training.params.kd_on"),
        ("training.params.use_kd=3", "training.params.use_kd"),
        ("training.params.bogus=1", "training.params.bogus"),
        ("training.params.seed=3", "training.params.seed"),  # one seed: run.seed
        ("training.params.router_weight=1", "training.params.router_weight"),  # router.weight
        ("training.params.temperature_form=paper", "training.params.temperature_form"),
        ("stage1.beta=1", "stage1.beta"),  # now stage1.init_weight
        ("student.init=upcycle", "student.init"),  # a --compare ablation, not a setting
        ("student.router_scale=2", "student.router_scale"),
        ("training.method=nope", "training.method"),
        ("compare.methods=[vanilla_grpo,nope]", "compare.methods[1]"),
    ],
)
def test_the_typed_tree_names_the_bad_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert err.value.key == key


def test_no_key_name_means_two_things():
    """A leaf name appears once in the tree, but for the few that mean the same kind of thing in
    each section they sit in (where the data comes from, how long, how big a batch...)."""
    generic = {"source", "path", "kind", "steps", "batch_size", "max_new_tokens", "checkpoint_every",
               "warmup_steps", "num_problems", "weight_decay", "lr", "method", "methods", "dir"}  # fmt: skip
    seen: dict[str, list[str]] = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                seen.setdefault(f.name, []).append(prefix + f.name)

    walk(PADDRunConfig(), "")
    twice = {k: v for k, v in seen.items() if len(v) > 1 and k not in generic}
    assert not twice, twice
    assert all(k not in seen for k in ("alpha", "kd_jsd_beta", "router_weight", "seed_"))


def test_the_printed_config_documents_every_key_and_loads_back(tmp_path):
    cfg = load_config("small", ["training.steps=7"])
    text = annotated_yaml(cfg)
    assert all("# " in ln for ln in text.splitlines() if ln.strip())  # one doc per key and section
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["training"]["steps"] == 7
    assert load_config(str(path)).to_dict() == cfg.to_dict()


def test_docs_config_md_is_generated_from_the_config():
    """`docs/config.md` is `padd config --reference`; `PADD_REGENERATE=1` rewrites it."""
    path = ROOT / "docs" / "config.md"
    want = reference_markdown()
    if os.environ.get("PADD_REGENERATE"):
        path.write_text(want)
    assert path.read_text() == want, "docs/config.md is stale: PADD_REGENERATE=1 pytest tests/test_config.py"
