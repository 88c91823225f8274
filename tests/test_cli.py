"""The `padd` command: `--help` of every subcommand and clear errors before any compute."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")  # the test-only smoke config
SUBCOMMANDS = ["train", "config", "eval", "convert", "flops", "report"]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def padd(*args):
    """Run `padd` in-process (the CLI's error paths; a subprocess per case would be slow)."""
    import contextlib
    import io

    from padd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code
    return Result(rc, out.getvalue(), err.getvalue())


def test_help_of_every_subcommand_via_python_m_padd():
    # Real subprocesses, started together so the interpreter start-ups overlap.
    cmds = [["--help"]] + [[sub, "--help"] for sub in SUBCOMMANDS]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "padd", *c],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in cmds
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for cmd, proc, (stdout, stderr) in zip(cmds, procs, outs, strict=True):
        assert proc.returncode == 0, (cmd, stderr)
        if cmd == ["--help"]:
            assert all(sub in stdout for sub in SUBCOMMANDS)
        else:
            assert f"usage: padd {cmd[0]}" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([MICRO, "teacher.lr=-1"], "teacher.lr: must be > 0"),
        ([MICRO, "teacher.bogus=1"], "teacher.bogus: unknown key"),
        ([MICRO, "training.params.bogus=1"], "training.params.bogus: unknown key"),
        ([MICRO, "training.params.epsilon=2"], "training.params.epsilon"),
        ([MICRO, "training.method=nope"], "training.method"),
        ([MICRO, "training.params.kd_on=negative"], "training.params.kd_on: must be one of"),
        ([MICRO, "compare.methods=[nope]"], "compare.methods[0]: unknown method"),
        ([MICRO, "data.source=jsonl", "data.path=/no/such.jsonl"], "data.path: data path not found"),
        (
            [MICRO, "teacher.source=pretrained", "teacher.path=/no/model"],
            "teacher.path: teacher model not found",
        ),
        (["no-such-preset"], "unknown preset"),
    ],
)
def test_config_errors_before_compute(tmp_path, args, message):
    out = padd("train", *args, f"run.dir={tmp_path}/run", f"run.cache_dir={tmp_path}/cache")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was created, let alone computed


def test_padd_config_prints_the_resolved_config_with_a_doc_per_key():
    out = padd("config", "tiny", "training.steps=7")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  steps: 7" in [ln.split("#")[0].rstrip() for ln in lines]
    assert any(ln.startswith("    kd_on: teacher_correct") and "# " in ln for ln in lines)
    assert all("# " in ln for ln in lines if ln.strip())
    ref = padd("config", "--reference")
    assert ref.returncode == 0 and ref.stdout.startswith("# Configuration reference")
    bad = padd("config", "tiny", "stage1.beta=1")  # a renamed key: stage1.init_weight
    assert bad.returncode == 2 and "stage1.beta: unknown key" in bad.stderr


def test_unsupported_teacher_architecture(tmp_path):
    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(model)
    out = padd(
        "train", MICRO, "teacher.source=pretrained", f"teacher.path={model}", f"run.dir={tmp_path}/run"
    )
    assert out.returncode == 2
    assert "teacher.path: cannot decompress this teacher" in out.stderr


def test_differing_tokenizers_rejected(tmp_path):
    from transformers import LlamaConfig

    from padd.data.tokenizer import build_char_tokenizer

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(teacher)
    build_char_tokenizer().save_pretrained(teacher)
    (student).mkdir()
    (student / "config.json").write_text('{"model_type": "mixtral"}')
    build_char_tokenizer("0123456789 ").save_pretrained(student)
    out = padd(
        "train", MICRO, "teacher.source=pretrained", f"teacher.path={teacher}", "tokenizer.kind=pretrained",
        "student.source=pretrained", f"student.path={student}", f"run.dir={tmp_path}/run",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "student.path: the student's tokenizer differs" in out.stderr


def test_report_of_missing_run_dir(tmp_path):
    out = padd("report", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no eval/ results" in out.stderr


def _one_line_error(out, kind):
    """Exit status 2 and a single `padd: <kind> error: ...` line on stderr (no traceback)."""
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"padd: {kind} error: "), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def _jsonl(path, questions):
    import json

    path.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions))
    return path


def test_invalid_jsonl_is_a_data_error(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ["a", "b"])
    data.write_text(data.read_text() + "{not json\n")
    for cmd in (["train"], ["convert", "--out", str(tmp_path / "student")]):
        out = padd(*cmd, MICRO, "data.source=jsonl", f"data.path={data}", f"run.dir={tmp_path}/run")
        assert f"{data}:3: invalid JSON" in _one_line_error(out, "data")
    assert not (tmp_path / "run").exists() and not (tmp_path / "student").exists()


def test_missing_field_is_a_data_error(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ["a", "b", "c", "d"])
    out = padd(
        "train", MICRO, "data.source=jsonl", f"data.path={data}", "data.question_field=prompt",
        f"run.dir={tmp_path}/run",
    )  # fmt: skip
    assert f"{data}:1: missing field 'prompt'" in _one_line_error(out, "data")


def test_too_few_problems_is_a_data_error(tmp_path):
    # Four records, three distinct questions: caught before the teacher is trained, not after.
    data = _jsonl(tmp_path / "data.jsonl", ["a", "b", "a", "c"])
    out = padd(
        "train", MICRO, "data.source=jsonl", f"data.path={data}",
        f"run.dir={tmp_path}/run", f"run.cache_dir={tmp_path}/cache",
    )  # fmt: skip
    line = _one_line_error(out, "data")
    assert str(data) in line and "need at least 4 distinct problems, got 3" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def _model_dirs(tmp_path):
    """A directory with config.json but no weights, and one whose config.json is not JSON."""
    from transformers import LlamaConfig

    no_weights, bad_config = tmp_path / "no_weights", tmp_path / "bad_config"
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(no_weights)
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    return {"missing": tmp_path / "no_such_model", "no_weights": no_weights, "bad_config": bad_config}


MODEL_MESSAGES = {
    "missing": "no such directory",
    "no_weights": "no weights in",
    "bad_config": "config.json is not valid JSON",
}


@pytest.mark.parametrize("case", ["no_weights", "bad_config"])
def test_broken_teacher_dir_is_a_model_error(tmp_path, case):
    model = _model_dirs(tmp_path)[case]
    out = padd(
        "train", MICRO, "teacher.source=pretrained", f"teacher.path={model}", f"run.dir={tmp_path}/run"
    )
    line = _one_line_error(out, "model")
    assert "teacher.path" in line and MODEL_MESSAGES[case] in line and str(model) in line
    assert not (tmp_path / "run").exists()


def test_missing_teacher_dir_is_a_config_error(tmp_path):
    out = padd("train", MICRO, "teacher.source=pretrained", f"teacher.path={tmp_path}/nope")
    assert f"teacher.path: teacher model not found: {tmp_path}/nope" in _one_line_error(out, "config")


@pytest.mark.parametrize("case", ["missing", "no_weights", "bad_config"])
def test_broken_model_dirs_of_eval_and_flops(tmp_path, case):
    model = _model_dirs(tmp_path)[case]
    out = padd("flops", str(model))
    line = _one_line_error(out, "model")
    assert line.startswith("padd: model error: TEACHER_DIR: ") and MODEL_MESSAGES[case] in line
    out = padd("eval", MICRO, "--model", str(model), f"run.dir={tmp_path}/run")
    line = _one_line_error(out, "model")
    assert line.startswith("padd: model error: --model: ") and MODEL_MESSAGES[case] in line
    assert not (tmp_path / "run").exists()


def test_eval_without_a_trained_student(tmp_path):
    out = padd("eval", MICRO, f"run.dir={tmp_path}/run")
    assert f"no trained student at {tmp_path}/run/train/final" in _one_line_error(out, "model")
    assert not (tmp_path / "run").exists()  # `padd eval` creates no run directory


# ---- `padd eval` on an existing run -------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One complete `padd train tests/fixtures/micro.yaml` run (~40 s), shared by the eval tests below."""
    base = tmp_path_factory.mktemp("cli_eval")
    run = base / "run"
    cmd = [sys.executable, "-m", "padd", "train", MICRO, f"run.dir={run}", f"run.cache_dir={base}/cache"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def _snapshot(run_dir):
    """Every file of a run directory with its content and modification time."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def test_eval_override_leaves_the_run_untouched(micro_run, tmp_path):
    import json

    before = _snapshot(micro_run)
    assert {"fingerprint", "config.yaml", "eval/padd.json", "eval/summary.json"} <= set(before)
    result = tmp_path / "out" / "eval.json"
    # Both spellings: the preset plus the run's directory, and the run directory itself.
    for args in (
        [MICRO, f"run.dir={micro_run}", "eval.num_problems=3", "eval.max_new_tokens=8"],
        [str(micro_run), "eval.num_problems=3", "eval.max_new_tokens=8", "--out", str(result)],
    ):
        out = padd("eval", *args)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["n"] == 3 and 0 <= res["accuracy"] <= 1
        assert res["model"] == str(micro_run / "train" / "final")
    saved = json.loads(result.read_text())
    assert saved["n"] == 3 and len(saved["samples"]) == 3
    assert _snapshot(micro_run) == before  # nothing rewritten, nothing added
    assert json.loads((micro_run / "eval" / "padd.json").read_text())["n"] == 10


def test_eval_refuses_a_different_config(micro_run):
    before = _snapshot(micro_run)
    out = padd("eval", str(micro_run), "training.steps=7")
    line = _one_line_error(out, "config")
    assert "run.dir" in line and "was made by a different config" in line and "eval.*" in line
    for target in ("eval/padd.json", "config.yaml", "new/eval.json"):
        out = padd("eval", str(micro_run), "eval.num_problems=1", "--out", str(micro_run / target))
        assert "--out" in _one_line_error(out, "config")
    assert _snapshot(micro_run) == before


def test_eval_of_a_run_from_another_padd_version_names_it(micro_run, tmp_path):
    """A run directory whose config.yaml has a key this padd does not know (the config changed
    since the run) gets one line saying so; a mistyped override is still the override's error."""
    old = tmp_path / "old_run"
    old.mkdir()
    text = (micro_run / "config.yaml").read_text()
    assert "\nstudent:\n" in text
    (old / "config.yaml").write_text(text.replace("\nstudent:\n", "\nstudent:\n  router_scale: 2.0\n", 1))
    line = _one_line_error(padd("eval", str(old)), "config")
    assert "student.router_scale: unknown key" in line, line
    assert f"{old}/config.yaml was written by another padd version" in line, line
    line = _one_line_error(padd("eval", str(micro_run), "eval.batchsize=3"), "config")
    assert "eval.batchsize: unknown key" in line and "another padd version" not in line, line
