"""PADD against another method, two training trajectories each, on D_D and on the fresh wallet
set: is a D_D gap the training or the problems D_D happens to hold?

    python research/scripts/kd_replicates.py [--against=METHOD | --upcycled] RUNS_ROOT SEED [SEED ...]

METHOD is `no_stage2` (the default), `teacher_grpo` or `online_kd`.

Per seed S it reads four models, each pair trained from the same Stage-I student (or teacher):
- PADD: `dsS` (`train/final`) and `tpSa` (the same with `training.params.seed=100`, so other
  rollouts, same prompts);
- no Stage II (the default): `dsS/compare/no_stage2` and `tnSa` (`training.method=no_stage2`,
  seed 100); or `teacher_grpo` / `online_kd`: `dsS/compare/METHOD` and `tgSa/compare/teacher_grpo`
  / `tokSa/compare/online_kd` (copies of tpSa's directory plus `--compare` with that method,
  seed 100).
`--upcycled`: PADD against no Stage II, both from the no-Stage-I student (sparse upcycling, a
student far below its teacher): PADD is `dsS/compare/no_stage1` and `upSa`, no Stage II `uS` and
`unSa` (runs whose `stage1/student` is a copy of `dsS/compare/no_stage1/stage1`, with
`training.method=no_stage2` and/or `training.params.seed=100`); fresh outcomes from
`fresh_wallet_upcycled/`.
D_D outcomes come from the runs' eval files, fresh wallet outcomes from
`research/fresh_wallet_ds/dsS.json` and `fresh_wallet_variants/` (the same 1,500
problems). A problem is "PADD only" when both PADD models solve it and both of the other
method's miss it, "other only" for the reverse: problems the trajectories agree on, so the two
counts measure what separates the methods rather than the noise of one run. Prints a markdown
table.
"""

import json
import sys
from pathlib import Path

REPLICATE_DIR = {"teacher_grpo": "tg", "online_kd": "tok"}  # seed-100 run directory prefix
fresh_dir = Path(__file__).resolve().parent.parent


def outcomes(path: Path) -> str:
    return json.loads(path.read_text())["correct"]


def fresh(name: str, model: str, folder: str | None = None) -> str:
    folder = folder or ("fresh_wallet_ds" if name.startswith("ds") else "fresh_wallet_variants")
    return json.loads((fresh_dir / folder / f"{name}.json").read_text())[model]


def upcycled_models(root: Path, s: int) -> tuple[dict[str, str], dict[str, str]]:
    """`--upcycled`: D_D and fresh outcomes of PADD and no Stage II from the no-Stage-I student."""
    # slot: (run, its eval file for D_D, the model's key in the fresh outcomes)
    runs = {
        "p": (f"ds{s}", "compare/no_stage1/eval.json", "no_stage1"),
        "p2": (f"up{s}a", "eval/padd.json", "padd"),
        "o": (f"u{s}", "eval/no_stage2.json", "padd"),  # a run's trained model is its `padd` slot
        "o2": (f"un{s}a", "eval/no_stage2.json", "padd"),
    }
    d_d = {k: outcomes(root / run / result) for k, (run, result, _) in runs.items()}
    new = {k: fresh(run, key, "fresh_wallet_upcycled") for k, (run, _, key) in runs.items()}
    return d_d, new


def models(root: Path, s: int, against: str, upcycled: bool) -> tuple[dict[str, str], dict[str, str]]:
    """D_D and fresh outcomes of PADD (p, p2) and the other method (o, o2) on seed s."""
    if upcycled:
        return upcycled_models(root, s)
    d_d = {
        "p": outcomes(root / f"ds{s}" / "eval" / "padd.json"),
        "p2": outcomes(root / f"tp{s}a" / "eval" / "padd.json"),
    }
    new = {"p": fresh(f"ds{s}", "padd"), "p2": fresh(f"tp{s}a", "padd")}
    d_d["o"] = outcomes(root / f"ds{s}" / "compare" / against / "eval.json")
    new["o"] = fresh(f"ds{s}", against)
    if against == "no_stage2":
        d_d["o2"] = outcomes(root / f"tn{s}a" / "eval" / "no_stage2.json")
        new["o2"] = fresh(f"tn{s}a", "padd")  # tnSa's trained model is its `padd` slot: method no_stage2
    else:
        name = f"{REPLICATE_DIR[against]}{s}a"
        d_d["o2"] = outcomes(root / name / "compare" / against / "eval.json")
        new["o2"] = fresh(name, against)
    return d_d, new


def only(sets: dict[str, str], i: int, right: tuple[str, str], wrong: tuple[str, str]) -> bool:
    """Problem i is solved by both models in `right` and missed by both in `wrong`."""
    return all(sets[k][i] == "1" for k in right) and all(sets[k][i] == "0" for k in wrong)


def row(label: str, sets: dict[str, str], idx: list[int]) -> str:
    acc = {k: 100 * sum(v[i] == "1" for i in idx) / len(idx) for k, v in sets.items()}
    mine = sum(only(sets, i, ("p", "p2"), ("o", "o2")) for i in idx)
    theirs = sum(only(sets, i, ("o", "o2"), ("p", "p2")) for i in idx)
    cells = " | ".join(f"{acc[k]:.1f}" for k in ("p", "p2", "o", "o2"))
    gap = round((acc["p"] + acc["p2"] - acc["o"] - acc["o2"]) / 2, 1) + 0.0  # + 0.0: no "-0.0"
    return f"| {label} | {len(idx)} | {cells} | {gap:+.1f} | {mine} / {theirs} |"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    upcycled = args[0] == "--upcycled"
    if upcycled:
        args.pop(0)
    against = args.pop(0).split("=", 1)[1] if args[0].startswith("--against=") else "no_stage2"
    root, seeds = Path(args[0]), [int(s) for s in args[1:]]
    head = ("seed, set", "n", "PADD", "PADD, seed 100", against, f"{against}, seed 100")
    print("| " + " | ".join(head) + f" | PADD − {against} | PADD only / {against} only |")
    print("|---|---|---|---|---|---|---|---|")
    for s in seeds:
        problems = [json.loads(x) for x in (root / f"ds{s}" / "data" / "D_D.jsonl").read_text().splitlines()]
        d_d, new = models(root, s, against, upcycled)
        print(row(f"{s}, D_D", d_d, list(range(len(problems)))))
        print(row(f"{s}, D_D wallet", d_d, [i for i, p in enumerate(problems) if p["kind"] == "wallet"]))
        print(row(f"{s}, fresh wallet", new, list(range(len(new["p"])))))


if __name__ == "__main__":
    main()
