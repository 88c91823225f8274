"""The `padd` command: `--help` of every subcommand and clear errors before any compute."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "eval", "convert", "flops", "report"]


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
        (["micro", "teacher.lr=-1"], "teacher.lr: must be > 0"),
        (["micro", "teacher.bogus=1"], "teacher.bogus: unknown key"),
        (["micro", "training.params.bogus=1"], "training.params.bogus: unknown key"),
        (["micro", "training.params.epsilon=2"], "training.params.epsilon"),
        (["micro", "training.method=nope"], "training.method"),
        (["micro", "data.source=jsonl", "data.path=/no/such.jsonl"], "data.path: data path not found"),
        (
            ["micro", "teacher.source=pretrained", "teacher.path=/no/model"],
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


def test_unsupported_teacher_architecture(tmp_path):
    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(model)
    out = padd(
        "train", "micro", "teacher.source=pretrained", f"teacher.path={model}", f"run.dir={tmp_path}/run"
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
        "train", "micro", "teacher.source=pretrained", f"teacher.path={teacher}", "tokenizer.kind=pretrained",
        "student.source=pretrained", f"student.path={student}", f"run.dir={tmp_path}/run",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "student.path: the student's tokenizer differs" in out.stderr


def test_report_of_missing_run_dir(tmp_path):
    out = padd("report", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no eval/ results" in out.stderr
