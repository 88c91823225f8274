"""`padd report --markdown RUN...`: the seed table of `docs/results.md`, from run directories or
saved `report.json` files, printed and nothing written; and every table in the README,
`docs/results.md` and `benchmarks/README.md` that names its command is what that command prints."""

import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from padd.cli import main
from padd.pipeline.report import render_seeds_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"


def _fake_run(root, name, accs, correct):
    d = root / name
    (d / "eval").mkdir(parents=True)
    for method, acc in accs.items():
        res = {"accuracy": acc, "n": 4, "correct": correct[method]}
        if method != "teacher":
            res.update(nmi=0.5, load_cv=0.1, routing_entropy=1.0, kl_to_teacher=0.01)
        (d / "eval" / f"{method}.json").write_text(json.dumps(res))
    return d


def test_markdown_from_run_dirs_and_report_files(tmp_path, capsys):
    s0 = _fake_run(tmp_path, "s0", {"teacher": 0.5, "padd": 0.75}, {"teacher": "1100", "padd": "1110"})
    s1 = _fake_run(tmp_path, "s1", {"teacher": 0.25, "padd": 1.0}, {"teacher": "1000", "padd": "1111"})
    # s1 kept as a saved report (research/runs/*.json): the same rows without the directory
    saved = tmp_path / "s1.json"
    saved.write_text(json.dumps({"methods": [
        {"method": "teacher", "accuracy": 0.25, "correct": "1000"},
        {"method": "padd", "accuracy": 1.0, "correct": "1111", "nmi": 0.5, "load_cv": 0.1,
         "routing_entropy": 1.0, "kl_to_teacher": 0.01},
    ]}))  # fmt: skip
    assert main(["report", "--markdown", str(s0), str(s1)]) == 0
    from_dirs = capsys.readouterr().out
    assert not (s0 / "report.md").exists() and not (s0 / "report.json").exists()  # nothing written
    assert main(["report", "--markdown", str(s0), str(saved)]) == 0
    from_file = capsys.readouterr().out
    assert from_dirs == from_file  # the column head is the file's stem
    lines = from_dirs.splitlines()
    assert lines[0].startswith("| method | s0 | s1 | mean ± std |")
    assert "| teacher | 50.0% | 25.0% | 37.5 ± 12.5 | – |" in from_dirs
    assert "| padd | 75.0% | 100.0% | 87.5 ± 12.5 | 0.500 |" in from_dirs
    # teacher vs padd: s0 −1 (third problem), s1 −3: +0 / −4 pooled, both seeds below
    assert "| +0 / −4 (p 0.12) | 0 / 2 (p 0.5) |" in from_dirs


def _tables(text):
    """(command, exact, table lines) for every `<!-- table: COMMAND -->` marker in a markdown file;
    `<!-- table (rows): COMMAND -->` marks a table of some of the command's rows, in its order."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- table( \(rows\))?: (.+) -->", line.strip())
        if m:
            table = []
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("|"):
                    break
                table.append(nxt)
            yield m.group(2), m.group(1) is None, table


def _load_script(path):
    spec = importlib.util.spec_from_file_location(f"docs_table_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _printed(command):
    """What `command` (one of the generators the docs name) prints, run in-process."""
    argv = shlex.split(command)
    if argv[:3] == ["padd", "report", "--markdown"]:
        return render_seeds_markdown([ROOT / a for a in argv[3:]])
    if argv[:2] == ["python", "benchmarks/summarize.py"]:
        return _load_script(ROOT / argv[1]).summarize([ROOT / a for a in argv[2:]])
    if argv[0] == "python" and argv[1].startswith("research/scripts/"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _load_script(ROOT / argv[1]).main([str(ROOT / a) for a in argv[2:]])
        return out.getvalue()
    raise AssertionError(f"no generator known for {command!r}")


def _is_subsequence(part, whole):
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_generated_tables_are_what_their_commands_print(doc):
    found = list(_tables((ROOT / doc).read_text()))
    assert found, f"{doc} names no table command"
    for command, exact, table in found:
        rows = [x for x in _printed(command).splitlines() if x.startswith("|")]
        if exact:
            assert table == rows, command
        else:  # the header, then some of the rows in the command's order
            assert table[:2] == rows[:2] and _is_subsequence(table[2:], rows[2:]), command
