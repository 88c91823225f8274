"""padd.config: presets, validation errors naming the dotted key, `key.sub=value` overrides."""

import pytest

from padd.config import ConfigError, PADDRunConfig, load_config, preset_names


def test_presets_load_and_differ():
    assert {"tiny", "micro", "qwen2.5-math-1.5b", "pretrained-moe"} <= set(preset_names())
    fps = {load_config(name).fingerprint() for name in preset_names()}
    assert len(fps) == len(preset_names())
    tiny = load_config("tiny")
    assert isinstance(tiny, PADDRunConfig)
    assert tiny.student.num_experts == 8 and tiny.teacher.source == "train"


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
        load_config("micro", [override])
    assert err.value.key == key
    assert key in str(err.value)


def test_overrides_apply_with_types():
    cfg = load_config(
        "micro", ["teacher.lr=1e-3", "training.steps=9", "data.kinds=[shop,trip]", "run.dir=/x/y"]
    )
    assert cfg.teacher.lr == 1e-3 and isinstance(cfg.teacher.lr, float)
    assert cfg.training.steps == 9 and cfg.data.kinds == ["shop", "trip"]
    assert cfg.run.dir == "/x/y"


def test_fingerprint_ignores_where_the_run_lives():
    a = load_config("micro", ["run.dir=/a", "run.progress=true"])
    b = load_config("micro", ["run.dir=/b"])
    c = load_config("micro", ["training.steps=7"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_collective_timeout_is_checked_and_not_fingerprinted():
    base = load_config("micro")
    longer = load_config("micro", ["distributed.timeout_minutes=240"])
    assert longer.distributed.timeout_minutes == 240.0
    assert longer.fingerprint() == base.fingerprint()  # how long ranks wait, not what they compute
    with pytest.raises(ConfigError, match="distributed.timeout_minutes: must be > 0"):
        load_config("micro", ["distributed.timeout_minutes=0"])


def test_yaml_file_and_bad_override_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  steps: 5\n")
    assert load_config(str(path)).teacher.steps == 5
    path.write_text("teacher:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match="teacher.stepz"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("micro", ["teacher.steps"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_tiny_is_small_cut_short():
    # The oracle: small with tiny's three settings given as overrides.
    small = load_config("small", ["run.dir=runs/tiny", "training.steps=30", "training.checkpoint_every=10"])
    assert load_config("tiny").to_dict() == small.to_dict()
    assert load_config("small").training.params["dynamic_sampling"] == 4  # the headline's method


def test_base_merges_sections_and_resolves_relative_to_the_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "parent.yaml").write_text("base: micro\ntraining:\n  steps: 9\n  params:\n    kd_on: all\n")
    child = "base: sub/parent.yaml\ntraining:\n  params:\n    learning_rate: 3.0e-5\n"
    (tmp_path / "child.yaml").write_text(child)
    got = load_config(str(tmp_path / "child.yaml"))
    want = load_config(
        "micro", ["training.steps=9", "training.params.kd_on=all", "training.params.learning_rate=3.0e-5"]
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
    a.write_text("base: [micro]\n")
    with pytest.raises(ConfigError, match="base: must be a preset name"):
        load_config(str(a))


def test_a_presets_base_is_a_preset_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small").mkdir()  # a folder named like tiny's base must not shadow the preset
    assert load_config("tiny").training.steps == 30


def test_experts_implementation_is_checked_before_compute_and_not_fingerprinted():
    from padd.pipeline.inputs import preflight

    base = load_config("tiny")
    assert base.run.experts_implementation == "padd"
    other = load_config("tiny", ["run.experts_implementation=grouped_mm"])
    preflight(other)
    assert other.fingerprint() == base.fingerprint()  # same math, another implementation
    with pytest.raises(ConfigError, match="run.experts_implementation.*must be one of"):
        preflight(load_config("tiny", ["run.experts_implementation=bogus"]))
