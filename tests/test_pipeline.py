"""`padd train tests/fixtures/micro.yaml` through every stage, every artifact; a real SIGTERM
mid-training, then a resume that ends with exactly the metrics of an uninterrupted run."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_runs import sigterm_once_training_starts, train_records

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")  # the test-only smoke config
# A few more steps than the preset so the signal reliably lands mid-training.
OVERRIDES = ["training.steps=10", "training.checkpoint_every=3"]


def _cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "padd",
        "train",
        MICRO,
        f"run.dir={run_dir}",
        f"run.cache_dir={cache}",
        *OVERRIDES,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted micro run (its teacher cache is shared with the interrupted run)."""
    base = tmp_path_factory.mktemp("pipeline")
    out = subprocess.run(
        _cmd(base / "ref", base / "cache", "run.progress=true"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (base / "ref.out").write_text(out.stdout + out.stderr)
    return base


def test_progress_says_what_each_phase_is_doing(reference):
    """With `run.progress`, every phase that takes time shows a bar or a line naming it."""
    out = (reference / "ref.out").read_text()
    for label in (
        "teacher:",  # the micro teacher trains here (a bar)
        "stage1: the teacher's FFN statistics",
        "stage1: the exact student",
        "stage1: fitting its router",
        "stage1 warmup:",
        "train:",
        "eval teacher:",
        "eval base_student:",
        "eval padd:",
    ):
        assert label in out, f"no {label!r} in the run's output"


def test_every_stage_and_artifact(reference):
    run = reference / "ref"
    for step in ("teacher", "data", "stage1", "train", "eval", "report"):
        assert (run / "done" / f"{step}.json").is_file(), step
    assert (run / "config.yaml").is_file() and (run / "fingerprint").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    splits = json.loads((run / "data" / "splits.json").read_text())
    assert splits["sizes"] == {"A": 20, "B": 40, "C": 130, "D": 10}
    for name in "ABCD":
        assert (run / "data" / f"D_{name}.jsonl").is_file()
    for d in (run / "stage1" / "student", run / "train" / "final"):
        assert (d / "model.safetensors").is_file() and (d / "padd_router_bias.safetensors").is_file()
    assert json.loads((run / "stage1" / "student" / "config.json").read_text())["model_type"] == "mixtral"
    assert (run / "train" / "ckpt" / "latest").is_file()
    # Stage I built and warmed the student on padd's experts (the loader is tested in test_hf_experts)
    assert json.loads((run / "done" / "stage1.json").read_text())["experts_implementation"] == "padd"
    for name in ("teacher", "base_student", "padd", "flops", "summary"):
        assert (run / "eval" / f"{name}.json").is_file(), name
    ev = json.loads((run / "eval" / "padd.json").read_text())
    assert ev["n"] == 10 and 0 <= ev["accuracy"] <= 1 and "nmi" in ev and "load_cv" in ev
    # Per-problem outcomes, in D_D order: each agrees with its sample's completion, re-scored.
    from padd.training.rewards import is_correct

    assert len(ev["correct"]) == 10 and ev["correct"].count("1") == round(10 * ev["accuracy"])
    for flag, sample in zip(ev["correct"], ev["samples"], strict=True):
        assert (flag == "1") == is_correct(sample["completion"], sample["answer"])
    steps = [r["step"] for r in train_records(run)]
    assert steps == list(range(1, 11))
    report = json.loads((run / "report.json").read_text())
    assert {r["method"] for r in report["methods"]} == {"teacher", "base_student", "padd"}
    assert report["flops"]["ratio"] == pytest.approx(1.0, abs=0.05)  # the teacher's FLOPs per token
    assert set(report["wall_s"]) >= {"teacher", "data", "stage1", "train", "eval"}
    md = (run / "report.md").read_text()
    assert "| teacher |" in md and "FLOPs/token" in md
    for plot in ("accuracy", "expert_load", "training"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 1000


def test_dynamic_sampling_draws_more_prompts_than_it_updates_on(reference):
    """`training.params.dynamic_sampling=2`: each step samples 2 × prompts_per_step prompts and
    updates on prompts_per_step of them (micro: 2)."""
    run = reference / "dynamic"
    out = subprocess.run(
        _cmd(run, reference / "cache", "training.params.dynamic_sampling=2"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert {(r["prompts_sampled"], r["prompts_updated"]) for r in records} == {(4, 2)}


def test_resume_skips_done_steps_and_refuses_other_config(reference):
    run = reference / "ref"
    out = subprocess.run(
        _cmd(run, reference / "cache"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("done already, skipped") == 6
    out = subprocess.run(
        _cmd(run, reference / "cache", "training.params.learning_rate=0.5"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "run.dir" in out.stderr and "--force" in out.stderr


def test_sigterm_mid_training_then_resume_matches_uninterrupted(reference):
    run = reference / "interrupted"
    proc = subprocess.Popen(
        _cmd(run, reference / "cache"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err = sigterm_once_training_starts(proc, run, timeout_s=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "checkpoint written" in err
    assert not (run / "done" / "train.json").exists()
    assert (run / "train" / "ckpt" / "latest").is_file()
    partial = train_records(run)
    assert 1 <= len(partial) < 10

    out = subprocess.run(
        _cmd(run, reference / "cache"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from step_" in out.stdout
    assert train_records(run) == train_records(reference / "ref")
    for name in ("padd", "base_student", "teacher"):
        a = json.loads((run / "eval" / f"{name}.json").read_text())
        b = json.loads((reference / "ref" / "eval" / f"{name}.json").read_text())
        assert a == b, name


def test_report_flops_and_convert_subcommands(reference, capsys, tmp_path):
    from padd.cli import main

    run = reference / "ref"
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.md").is_file()
    teacher = json.loads((run / "done" / "teacher.json").read_text())["path"]
    capsys.readouterr()
    assert main(["flops", teacher, str(run / "stage1" / "student")]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert flops["student"]["params"] > flops["teacher"]["params"]
    assert flops["student"]["active_params"] < flops["student"]["params"]
    args = [MICRO, f"run.dir={run}", f"run.cache_dir={reference / 'cache'}", *OVERRIDES]
    assert main(["convert", *args, "--out", str(tmp_path / "student")]) == 0
    assert (tmp_path / "student" / "model.safetensors").is_file()
