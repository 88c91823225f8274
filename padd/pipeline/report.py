"""Step 6: `report.md`, `report.json` and PNG plots, built from the run directory's files only
(so `padd report RUN_DIR` can rebuild them at any time)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from padd.pipeline.metrics import read_metrics
from padd.pipeline.run_dir import STEPS, RunDir
from padd.training.checkpointing import atomic_write_json, atomic_write_text

ROUTING_KEYS = ("nmi", "load_cv", "routing_entropy", "kl_to_teacher")
STEP_ORDER = {s: i for i, s in enumerate(STEPS)}
# The method every other one is paired against, problem by problem.
PAIRED_AGAINST = "padd"


def paired_counts(correct: str | None, reference: str | None) -> tuple[int, int] | None:
    """(problems `correct` gets right and `reference` wrong, the reverse), from two eval files'
    "1"/"0" strings over the same problems; None where either is missing or they differ in length.

    Accuracies of two models on one D_D differ by these two counts only: a sign test on them is
    the paired comparison that seed-to-seed spread hides."""
    if not correct or not reference or len(correct) != len(reference):
        return None
    won = sum(a == "1" and b == "0" for a, b in zip(correct, reference, strict=True))
    lost = sum(a == "0" and b == "1" for a, b in zip(correct, reference, strict=True))
    return won, lost


def sign_test_p(won: int, lost: int) -> float:
    """Exact two-sided sign test: the probability, if either model were as likely as the other to
    be the one right on a problem where they differ, of a split at least as uneven as `won` /
    `lost` (ties, where both are right or both wrong, carry no information and are not counted)."""
    if won < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got {won} and {lost}")
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(won, lost) + 1))
    return min(1.0, 2 * tail / 2**n)


def sign_flip_p(diffs: Sequence[int]) -> float:
    """Exact two-sided sign-flip (permutation) test of a paired difference over seeds.

    `diffs`: per seed, problems won minus problems lost against the reference model. Under the
    null the method and the reference are exchangeable within a seed, so each difference is as
    likely to carry either sign; the p-value is the share of the 2^n sign patterns whose total is
    at least as far from 0 as the observed one. Unlike `sign_test_p` on counts pooled over seeds,
    the unit here is the seed, so seed-to-seed spread counts against the claim.
    """
    sums: dict[int, int] = {0: 1}  # achievable totals -> number of sign patterns reaching them
    for d in diffs:
        nxt: dict[int, int] = defaultdict(int)
        for total, count in sums.items():
            nxt[total + d] += count
            nxt[total - d] += count
        sums = nxt
    observed = abs(sum(diffs))
    return sum(c for total, c in sums.items() if abs(total) >= observed) / 2 ** len(diffs)


def _fmt_paired(counts: tuple[int, int] | None, with_p: bool = False) -> str:
    if counts is None:
        return "–"
    text = f"+{counts[0]} / −{counts[1]}"
    if with_p and sum(counts) > 0:
        text += f" (p {sign_test_p(*counts):.2g})"
    return text


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict."""
    run = RunDir(run_dir)
    methods: dict[str, dict] = {}
    skip = (run.eval_summary.stem, run.eval_flops.stem)
    found = {p.stem: p for p in run.eval.glob("*.json") if p.stem not in skip}
    order = sorted(found, key=lambda n: (n != "teacher", n != "base_student", n))
    for name in order:
        methods[name] = _load(found[name])
    for p in run.compare_results():
        methods.setdefault(p.parent.name, _load(p))
    rows = []
    for name, res in methods.items():
        row = {
            "method": name,
            "accuracy": res.get("accuracy"),
            "n": res.get("n"),
            "params": res.get("params"),
            "correct": res.get("correct"),
        }
        row.update({k: res.get(k) for k in ROUTING_KEYS})
        row.update({k: v for k, v in res.items() if k.startswith("accuracy/")})
        rows.append(row)
    train = read_metrics(run.metrics, "train")
    return {
        "run_dir": str(run.root),
        "config": run.config_yaml.read_text() if run.config_yaml.exists() else None,
        "methods": rows,
        "flops": _load(run.eval_flops),
        "wall_s": {k: v.get("wall_s") for k, v in run.read_done().items()},
        "train_curve": [
            {k: r.get(k) for k in ("step", "reward", "drift", "router_drift", "kd_loss", "load_cv")}
            for r in train
        ],
    }


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, int) and x >= 10_000:
        return f"{x / 1e6:.2f}M"
    return str(x)


def render_markdown(rep: dict[str, Any]) -> str:
    lines = ["# PADD run report", "", f"Run directory: `{rep['run_dir']}`", ""]
    lines += ["## Held-out accuracy (greedy pass@1 on D_D) and routing", ""]
    lines += [
        "| model | accuracy | n | params | NMI (expert–kind) | load CV | routing entropy "
        f"| KL(teacher ‖ model) per token | problems won / lost vs {PAIRED_AGAINST} |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    reference = next((r.get("correct") for r in rep["methods"] if r["method"] == PAIRED_AGAINST), None)
    for r in rep["methods"]:
        kl = r.get("kl_to_teacher")
        paired = _fmt_paired(paired_counts(r.get("correct"), reference))
        lines.append(
            f"| {r['method']} | {_fmt(r['accuracy'], True)} | {_fmt(r['n'])} | {_fmt(r['params'])} | "
            f"{_fmt(r['nmi'])} | {_fmt(r['load_cv'])} | {_fmt(r['routing_entropy'])} | "
            f"{'–' if kl is None else f'{kl:.2e}'} | {paired} |"
        )
    fl = rep.get("flops")
    if fl:
        lines += ["", "## Cost", "", "| model | FLOPs/token (analytic) | total params | active params |"]
        lines += ["|---|---|---|---|"]
        for who in ("teacher", "student"):
            d = fl[who]
            lines.append(
                f"| {who} | {d['analytic']['total']:.3g} | {_fmt(d['params'])} | {_fmt(d['active_params'])} |"
            )
        lines.append(f"\nStudent / teacher FLOPs per token: {fl['ratio']:.4f}")
    lines += ["", "## Wall time per step", "", "(a cached teacher shows its load time only)", ""]
    lines += ["| step | seconds |", "|---|---|"]
    for k, v in sorted(rep["wall_s"].items(), key=lambda kv: STEP_ORDER.get(kv[0], 99)):
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "Plots: `plots/accuracy.png`, `plots/expert_load.png`, `plots/training.png`.", ""]
    return "\n".join(lines)


def _run_methods(run: str | Path) -> list[dict[str, Any]]:
    """The method rows of a run directory (read from its eval files), or of a saved `report.json`
    (a run's report kept without its directory, as under `research/runs/`)."""
    path = Path(run)
    if path.is_file():
        return json.loads(path.read_text())["methods"]
    return collect(path)["methods"]


def run_label(run: str | Path) -> str:
    """Column head of a run: the directory's name, or a report file's name without `.json`."""
    path = Path(run)
    return path.stem if path.is_file() else path.name


def seeds_table(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Per method: accuracy of every run (seed) and mean ± std (population std over the runs),
    the means of the routing columns, and `paired`: problems won and lost against `PAIRED_AGAINST`
    summed over the runs where both have per-problem outcomes (None where none has), and
    `seed_diffs`: per such run, won minus lost. Methods missing from a run are left out of its
    mean. Each run is a run directory or a saved `report.json`."""
    per_run = [{r["method"]: r for r in _run_methods(d)} for d in run_dirs]
    names = list(dict.fromkeys(m for run in per_run for m in run))
    rows = []
    for name in names:
        accs = [run[name]["accuracy"] if name in run else None for run in per_run]
        got = [a for a in accs if a is not None]
        row: dict[str, Any] = {"method": name, "accuracy": accs}
        row["mean"] = statistics.fmean(got) if got else None
        row["std"] = statistics.pstdev(got) if len(got) > 1 else None
        for key in ROUTING_KEYS:
            vals = [run[name].get(key) for run in per_run if name in run and run[name].get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
        pairs = [
            paired_counts(run[name].get("correct"), run[PAIRED_AGAINST].get("correct"))
            for run in per_run
            if name in run and PAIRED_AGAINST in run
        ]
        pairs = [p for p in pairs if p is not None]
        row["paired"] = (sum(p[0] for p in pairs), sum(p[1] for p in pairs)) if pairs else None
        row["seed_diffs"] = [won - lost for won, lost in pairs]
        rows.append(row)
    return rows


def render_seeds_markdown(run_dirs: Sequence[str | Path]) -> str:
    """Markdown table of `seeds_table`: one column per run, then mean ± std (the format of the
    seed tables in `docs/results.md`, which `padd report --markdown` prints)."""
    rows = seeds_table(run_dirs)
    heads = [run_label(d) for d in run_dirs]
    lines = [
        "| method | "
        + " | ".join(heads)
        + " | mean ± std | NMI | load CV | routing entropy | KL(T ‖ model) "
        + f"| won / lost vs {PAIRED_AGAINST} (sign test) | seeds above / below (sign-flip p) |",
        "|---|" + "---|" * (len(heads) + 7),
    ]
    for r in rows:
        accs = " | ".join(_fmt(a, True) for a in r["accuracy"])
        spread = "–" if r["mean"] is None else f"{100 * r['mean']:.1f} ± {100 * (r['std'] or 0):.1f}"
        kl = r["kl_to_teacher"]
        lines.append(
            f"| {r['method']} | {accs} | {spread} | {_fmt(r['nmi'])} | {_fmt(r['load_cv'])} | "
            f"{_fmt(r['routing_entropy'])} | {'–' if kl is None else f'{kl:.2e}'} | "
            f"{_fmt_paired(r['paired'], with_p=r['method'] != PAIRED_AGAINST)} | {_fmt_seeds(r)} |"
        )
    return "\n".join(lines)


def _fmt_seeds(row: dict[str, Any]) -> str:
    diffs = row["seed_diffs"]
    if row["method"] == PAIRED_AGAINST or not diffs:
        return "–"
    above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return f"{above} / {below} (p {sign_flip_p(diffs):.2g})"


def make_plots(run_dir: Path, rep: dict[str, Any]) -> list[Path]:
    """Accuracy by method; expert load per layer over training; router drift and reward over steps."""
    # matplotlib is slow to import and only the report draws: not at `padd` start-up.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    out = run.plots
    out.mkdir(exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["method"] for r in rep["methods"]]
    ax.bar(names, [100 * (r["accuracy"] or 0) for r in rep["methods"]], color="tab:blue")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy by method")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    train = read_metrics(run.metrics, "train")
    loads = [r["tokens_per_expert"] for r in train if r.get("tokens_per_expert")]
    if loads:
        arr = np.asarray(loads, dtype=float)  # [steps, L, E]
        arr = arr / np.clip(arr.sum(-1, keepdims=True), 1, None)
        L = arr.shape[1]
        fig, axes = plt.subplots(L, 1, figsize=(7, 1.4 * L + 0.6), squeeze=False, sharex=True)
        for l in range(L):
            im = axes[l, 0].imshow(arr[:, l, :].T, aspect="auto", cmap="viridis", vmin=0)
            axes[l, 0].set_ylabel(f"layer {l}\nexpert")
        axes[-1, 0].set_xlabel("training step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load fraction")
        fig.suptitle("Expert load per layer over training")
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)

    if train:
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r.get("reward") for r in train], color="tab:green", label="reward")
        ax1.set_xlabel("step")
        ax1.set_ylabel("reward")
        drift_key = next((k for k in ("router_drift", "drift", "drift_mean") if k in train[-1]), None)
        if drift_key:
            ax2 = ax1.twinx()
            ax2.plot(steps, [r.get(drift_key) for r in train], color="tab:red", label="router drift")
            ax2.set_ylabel("router drift")
        handles = [h for ax in fig.axes for h in ax.get_lines()]
        ax1.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
        ax1.set_title("Reward and router drift over training")
        fig.tight_layout()
        paths.append(out / "training.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write `report.json`, `report.md` and `plots/*.png` into `run_dir`."""
    run = RunDir(run_dir)
    if not run.eval.is_dir():
        raise FileNotFoundError(f"{run.root} has no eval/ results yet; run `padd train` first")
    rep = collect(run.root)
    rep["plots"] = [str(p.relative_to(run.root)) for p in make_plots(run.root, rep)]
    atomic_write_json(run.report_json, rep)
    atomic_write_text(run.report_md, render_markdown(rep))
    return rep
