"""Pair every model with PADD on the fresh wallet set (`fresh_wallet_eval.py`'s output).

    python research/scripts/summarise_fresh.py OUT_DIR [RUNS_ROOT]

A fresh problem that is in a run's own D_A–D_D (possible for runs not passed when the set was
drawn) is left out of that run's counts: found in RUNS_ROOT's run directories and recorded in
`OUT_DIR/overlaps.json`, which is read instead when RUNS_ROOT is not given. Prints a markdown
table: accuracy per run, the mean, then two tests against PADD:
- per seed (the unit that training randomness replicates): seeds above / below PADD and the
  exact sign-flip permutation test of the per-seed differences (`padd.pipeline.report`);
- per problem: problems won / lost summed over runs, with the exact two-sided sign test. It
  treats problems as independent, so it speaks for these trained models, not for the method
  over training seeds.
"""

import json
import statistics
import sys
from pathlib import Path

from padd.pipeline.report import paired_counts, sign_flip_p, sign_test_p

SHARED_PROBLEMS = Path(__file__).resolve().parent.parent / "fresh_wallet" / "problems.jsonl"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0])
    runs_root = Path(argv[1]) if len(argv) > 1 else None
    problems_file = out_dir / "problems.jsonl"
    if not problems_file.exists():  # one committed copy of the set, shared by every fresh_wallet* folder
        problems_file = SHARED_PROBLEMS
    questions = [json.loads(x)["question"] for x in problems_file.read_text().splitlines()]
    results = {
        p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.stem != "overlaps"
    }
    # r0-r2, then d3, d4, ... (any other prefix, e.g. ds0-ds3, sorts by its seed number alone)
    order = sorted(results, key=lambda r: (r[0] != "r", int(r.lstrip("abcdefghijklmnopqrstuvwxyz"))))

    overlaps_file = out_dir / "overlaps.json"
    if runs_root is None:
        overlaps = json.loads(overlaps_file.read_text())
    else:
        overlaps = {}
        for run in order:
            own = set()
            for split in "ABCD":
                for line in (runs_root / run / "data" / f"D_{split}.jsonl").read_text().splitlines():
                    own.add(json.loads(line)["question"])
            overlaps[run] = [i for i, q in enumerate(questions) if q in own]
        overlaps_file.write_text(json.dumps(overlaps))
    kept = {run: [i for i in range(len(questions)) if i not in set(overlaps[run])] for run in order}
    for run in order:
        if overlaps[run]:
            print(f"{run}: {len(overlaps[run])} fresh problems are in its own data, left out")

    methods = []
    for run in order:
        methods += [m for m in results[run] if m not in methods]
    print(
        f"| method | {' | '.join(order)} | mean | seeds above / below padd (sign-flip p) "
        "| problems won / lost vs padd (sign test) |"
    )
    print("|---" * (len(order) + 4) + "|")
    for method in methods:
        cells, accs, diffs, won, lost = [], [], [], 0, 0
        for run in order:
            got = results[run].get(method)
            if got is None or "padd" not in results[run]:
                cells.append("–")
                continue
            got = "".join(got[i] for i in kept[run])
            acc = got.count("1") / len(got)
            accs.append(acc)
            cells.append(f"{100 * acc:.1f}")
            run_won, run_lost = paired_counts(got, "".join(results[run]["padd"][i] for i in kept[run]))
            diffs.append(run_won - run_lost)
            won, lost = won + run_won, lost + run_lost
        mean = f"{100 * statistics.mean(accs):.1f}" if accs else "–"
        if method == "padd":
            print(f"| {method} | {' | '.join(cells)} | {mean} | | |")
            continue
        above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        seeds = f"{above} / {below} (p {sign_flip_p(diffs):.2g})"
        paired = f"+{won} / −{lost} (p {sign_test_p(won, lost):.2g})"
        print(f"| {method} | {' | '.join(cells)} | {mean} | {seeds} | {paired} |")


if __name__ == "__main__":
    main()
