"""`padd report RUN_DIR...`: every seed's accuracy and mean ± std, from the runs' eval files."""

import json

import pytest

from padd.cli import main
from padd.config import ConfigError, load_config
from padd.pipeline.report import (
    paired_counts,
    render_seeds_markdown,
    seeds_table,
    sign_flip_p,
    sign_test_p,
)


def _fake_run(root, name, accs, nmi=0.5, correct=None):
    d = root / name
    (d / "eval").mkdir(parents=True)
    for method, acc in accs.items():
        res = {"accuracy": acc, "n": 500}
        if correct and method in correct:
            res["correct"] = correct[method]
        if method != "teacher":
            res.update(nmi=nmi, load_cv=0.1, routing_entropy=1.0, kl_to_teacher=0.01)
        (d / "eval" / f"{method}.json").write_text(json.dumps(res))
    return d


def test_seeds_table_hand_values(tmp_path):
    runs = [
        _fake_run(tmp_path, "s0", {"teacher": 0.90, "padd": 0.92}, nmi=0.4),
        _fake_run(tmp_path, "s1", {"teacher": 0.80, "padd": 0.96}, nmi=0.6),
    ]
    rows = {r["method"]: r for r in seeds_table(runs)}
    assert rows["teacher"]["accuracy"] == [0.90, 0.80]
    assert rows["teacher"]["mean"] == pytest.approx(0.85)
    assert rows["teacher"]["std"] == pytest.approx(0.05)  # population std of {0.9, 0.8}
    assert rows["padd"]["mean"] == pytest.approx(0.94) and rows["padd"]["nmi"] == pytest.approx(0.5)
    assert rows["teacher"]["nmi"] is None
    md = render_seeds_markdown(runs)
    assert "| padd | 92.0% | 96.0% | 94.0 ± 2.0 | 0.500 |" in md


def test_paired_counts_hand_values(tmp_path):
    assert paired_counts("1100", "1010") == (1, 1)
    assert paired_counts("1111", "0000") == (4, 0)
    assert paired_counts("10", "100") is None and paired_counts(None, "1") is None
    runs = [
        _fake_run(
            tmp_path, "s0", {"padd": 0.5, "vanilla": 0.75}, correct={"padd": "1100", "vanilla": "1110"}
        ),
        _fake_run(
            tmp_path, "s1", {"padd": 0.5, "vanilla": 0.25}, correct={"padd": "0011", "vanilla": "1000"}
        ),
    ]
    rows = {r["method"]: r for r in seeds_table(runs)}
    # s0: +1 (third problem) / −0; s1: +1 (first) / −2 (third, fourth)
    assert rows["vanilla"]["paired"] == (2, 2) and rows["padd"]["paired"] == (0, 0)
    assert rows["vanilla"]["seed_diffs"] == [1, -1]
    md = render_seeds_markdown(runs)
    assert "| vanilla | 75.0% | 25.0% |" in md and "| +2 / −2 (p 1) | 1 / 1 (p 1) |" in md
    assert "| +0 / −0 |" in md  # padd against itself: no test
    assert _fake_run(tmp_path, "s2", {"padd": 0.5}) and seeds_table([tmp_path / "s2"])[0]["paired"] is None


def test_sign_test_hand_values():
    # Two-sided exact binomial(n, 1/2): 2 · P(X <= min(won, lost)), capped at 1.
    assert sign_test_p(4, 0) == pytest.approx(2 / 16)
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(3, 1) == pytest.approx(2 * (1 + 4) / 16)
    assert sign_test_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert sign_test_p(1, 1) == 1.0 and sign_test_p(0, 0) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        sign_test_p(-1, 2)


def test_sign_flip_hand_values():
    # Every sign pattern of (1, 2, 3): totals ±6, ±4, ±2, 0, 0; |total| >= 6 in 2 of 8.
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    assert sign_flip_p([-1, -2, -3]) == pytest.approx(2 / 8)
    assert sign_flip_p([3, 3, 3, 3, 3]) == pytest.approx(2 / 32)  # only all + or all −
    assert sign_flip_p([4, 1]) == pytest.approx(2 / 4)  # ±5 reach 5; ±3 do not
    assert sign_flip_p([5]) == 1.0 and sign_flip_p([0, 0]) == 1.0 and sign_flip_p([]) == 1.0


def test_report_cli_with_several_runs_prints_the_table(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"s{i}", {"teacher": 0.9, "padd": 0.9 + i / 100}) for i in range(3)]
    assert main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "| padd | 90.0% | 91.0% | 92.0% | 91.0 ± 0.8 |" in out
    assert all((r / "report.md").exists() for r in runs)


def test_training_params_are_typed_with_dotted_errors():
    cfg = load_config("tiny", ["training.params.learning_rate=1e-5"])  # YAML 1.1 reads a string
    assert cfg.training.params.learning_rate == 1e-5
    with pytest.raises(ConfigError, match=r"training\.params\.lr: unknown key"):
        load_config("tiny", ["training.params.lr=0.1"])
    with pytest.raises(ConfigError, match=r"training\.params\.use_kd: must be true or false"):
        load_config("tiny", ["training.params.use_kd=3"])
    with pytest.raises(ConfigError, match=r"training\.params\.rho: must be < 1"):
        load_config("tiny", ["training.params.rho=2"])


def test_warmup_routing_is_fingerprinted_and_checked():
    """Every setting that changes results is in the fingerprint, defaults included (no shim keeps
    the fingerprints of runs made before a key existed)."""
    learned = load_config("tiny")
    assert learned.stage1.warmup_routing == "learned"  # the tuned default
    assert load_config("tiny", ["stage1.warmup_routing=uniform"]).fingerprint() != learned.fingerprint()
    with pytest.raises(ConfigError, match=r"stage1\.warmup_routing"):
        load_config("tiny", ["stage1.warmup_routing=random"])
