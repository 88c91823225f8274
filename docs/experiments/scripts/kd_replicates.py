"""PADD against the same loop without KD, two training trajectories each, on D_D and on the
fresh wallet set: is a D_D gap the training or the problems D_D happens to hold?

    python docs/experiments/scripts/kd_replicates.py RUNS_ROOT SEED [SEED ...]

Per seed S it reads four models trained from the same Stage-I student:
- PADD: `dsS` (`train/final`) and `tpSa` (the same with `training.params.seed=100`, so other
  rollouts, same prompts);
- no Stage II: `dsS/compare/no_stage2` and `tnSa` (`training.method=no_stage2`, seed 100).
D_D outcomes come from the runs' eval files, fresh wallet outcomes from
`docs/experiments/fresh_wallet_ds/dsS.json` and `fresh_wallet_variants/t?Sa.json` (the same
1,500 problems). A problem is "KD only" when both PADD models solve it and both no-Stage-II
models miss it, "no-KD only" for the reverse: problems the trajectories agree on, so the two
counts measure what separates the methods rather than the noise of one run. Prints a markdown
table.
"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
seeds = [int(s) for s in sys.argv[2:]]
fresh_dir = Path(__file__).resolve().parent.parent


def dd(path: Path) -> str:
    return json.loads(path.read_text())["correct"]


def fresh(name: str, model: str) -> str:
    folder = "fresh_wallet_ds" if name.startswith("ds") else "fresh_wallet_variants"
    return json.loads((fresh_dir / folder / f"{name}.json").read_text())[model]


def only(sets: dict[str, str], i: int, right: tuple[str, str], wrong: tuple[str, str]) -> bool:
    """Problem i is solved by both models in `right` and missed by both in `wrong`."""
    return all(sets[k][i] == "1" for k in right) and all(sets[k][i] == "0" for k in wrong)


def row(label: str, sets: dict[str, str], idx: list[int]) -> str:
    acc = {k: 100 * sum(v[i] == "1" for i in idx) / len(idx) for k, v in sets.items()}
    kd = sum(only(sets, i, ("p", "p2"), ("n", "n2")) for i in idx)
    nokd = sum(only(sets, i, ("n", "n2"), ("p", "p2")) for i in idx)
    cells = " | ".join(f"{acc[k]:.1f}" for k in ("p", "p2", "n", "n2"))
    gap = (acc["p"] + acc["p2"] - acc["n"] - acc["n2"]) / 2
    return f"| {label} | {len(idx)} | {cells} | {gap:+.1f} | {kd} / {nokd} |"


HEAD = ("seed, set", "n", "PADD", "PADD, seed 100", "no Stage II", "no Stage II, seed 100")
print("| " + " | ".join(HEAD) + " | PADD − no Stage II | KD only / no-KD only |")
print("|---|---|---|---|---|---|---|---|")
for s in seeds:
    d_d = [json.loads(x) for x in (root / f"ds{s}" / "data" / "D_D.jsonl").read_text().splitlines()]
    sets_dd = {
        "p": dd(root / f"ds{s}" / "eval" / "padd.json"),
        "p2": dd(root / f"tp{s}a" / "eval" / "padd.json"),
        "n": dd(root / f"ds{s}" / "compare" / "no_stage2" / "eval.json"),
        "n2": dd(root / f"tn{s}a" / "eval" / "no_stage2.json"),
    }
    sets_fresh = {
        "p": fresh(f"ds{s}", "padd"),
        "p2": fresh(f"tp{s}a", "padd"),
        "n": fresh(f"ds{s}", "no_stage2"),
        "n2": fresh(f"tn{s}a", "padd"),  # tnSa's trained model is its `padd` slot: method no_stage2
    }
    print(row(f"{s}, D_D", sets_dd, list(range(len(d_d)))))
    print(row(f"{s}, D_D wallet", sets_dd, [i for i, p in enumerate(d_d) if p["kind"] == "wallet"]))
    print(row(f"{s}, fresh wallet", sets_fresh, list(range(len(sets_fresh["p"])))))
