"""`padd train tests/fixtures/micro.yaml --compare` with the dense "Teacher (GRPO)" and "Teacher
(SFT on D_B)" rows and the no-Stage-I and random-split ablations."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")  # the test-only smoke config


def test_compare_teacher_grpo_and_no_stage1(tmp_path):
    run = tmp_path / "run"
    methods = "compare.methods=[teacher_grpo,no_stage1,teacher_sft,random_split]"
    cmd = [sys.executable, "-m", "padd", "train", MICRO, "--compare", f"run.dir={run}",
           f"run.cache_dir={tmp_path / 'cache'}", methods]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    teacher = json.loads((run / "compare" / "teacher_grpo" / "eval.json").read_text())
    assert "nmi" not in teacher  # a dense model: no routing columns
    cfg = json.loads((run / "compare" / "teacher_grpo" / "final" / "config.json").read_text())
    assert cfg["model_type"] == "llama"  # the teacher itself was trained, not a student
    no_s1 = json.loads((run / "compare" / "no_stage1" / "eval.json").read_text())
    assert {"nmi", "load_cv", "routing_entropy", "kl_to_teacher"} <= set(no_s1)
    s1_cfg = json.loads((run / "compare" / "no_stage1" / "stage1" / "config.json").read_text())
    assert "padd_router_group_size" not in s1_cfg  # upcycled, not the exact construction
    main_cfg = json.loads((run / "stage1" / "student" / "config.json").read_text())
    assert main_cfg["padd_router_group_size"] == 2
    # random_split builds from random-partition statistics (it failed at Stage I on k-means ones)
    split = json.loads((run / "compare" / "random_split" / "eval.json").read_text())
    assert {"nmi", "load_cv"} <= set(split)
    sft = json.loads((run / "compare" / "teacher_sft" / "eval.json").read_text())
    assert "nmi" not in sft and sft["n"] == teacher["n"]
    # Each method's one result file carries its training-and-evaluation time.
    assert all(r["wall_s"] > 0 for r in (teacher, no_s1, sft))
    report = (run / "report.md").read_text()
    assert "| teacher_grpo |" in report and "| no_stage1 |" in report
    train = json.loads((run / "done" / "train.json").read_text())
    assert train["router_untied"] == 0.0  # the tied router rows stayed tied through training


def test_a_run_tuning_padd_keeps_the_baselines_standard():
    """`training.params` tune the shared loop (learning rate, scales) for every method, but cannot
    change what defines a baseline or ablation: its preset's switches win."""
    from padd.pipeline.methods import training_config
    from padd.training.config import LoopParams

    params = LoopParams(kd_on="teacher_correct", drift_on="all", use_kd=True, learning_rate=3e-5)
    padd = training_config("padd", params, seed=4, router_weight=0.1)
    assert (padd.kd_on, padd.drift_on, padd.learning_rate, padd.seed, padd.router_weight) == (
        "teacher_correct",
        "all",
        3e-5,
        4,
        0.1,
    )
    online = training_config("online_kd", params, seed=4, router_weight=0.1)
    assert (online.kd_on, online.drift_on, online.kd_temperature_mode, online.router_weight) == (
        "all",
        "none",
        "fixed",
        0.0,
    )
    assert online.learning_rate == 3e-5
    assert training_config("no_stage2", params, seed=4).use_kd is False
    assert training_config("vanilla_grpo", params, seed=4).drift_on == "none"
    no3 = training_config("no_stage3", params, seed=4)
    assert no3.drift_on == "none" and no3.kd_on == "teacher_correct"  # only Stage III is removed


def test_lost_stage1_constructions_are_compare_rows_not_settings():
    """`upcycle` and `random_split` lost to the exact Stage I: a run cannot choose them
    (`student.init`), `--compare` still builds them as rows."""
    import pytest

    from padd.config import ConfigError, load_config
    from padd.pipeline.methods import STAGE1_ABLATIONS

    assert {a.init for a in STAGE1_ABLATIONS.values()} == {"upcycle", "cluster", "random_split"}
    assert STAGE1_ABLATIONS["no_stage1"].warmup is False
    cfg = load_config(MICRO, ["compare.methods=[no_stage1,upcycle,random_split,cluster_init]"])
    assert cfg.compare.methods[-1] == "cluster_init"
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, ["student.init=random_split"])
    assert err.value.key == "student.init"
