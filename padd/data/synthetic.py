"""Synthetic two-step math word problems with worked steps and GSM8K's `#### N` final line.

Four problem types (subdomains) with their own wording and their own pair of operations, so the
expert-specialisation metric (NMI between experts and kinds) can tell them apart. Numbers are small
and texts short because the embedded default is a character-level model of about a million
parameters. Everything is reproducible from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from padd.data.problem import Problem

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo")


def _shop(rng: random.Random) -> Problem:
    # a*b + c
    name, item = rng.choice(NAMES), rng.choice(("pens", "cups", "eggs"))
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    m = a * b
    q = f"{name} buys {a} packs of {b} {item} and has {c} {item}. How many {item} now?"
    return Problem(q, f"{a}*{b}={m}\n{m}+{c}={m + c}\n#### {m + c}", str(m + c), "shop")


def _share(rng: random.Random) -> Problem:
    # a/b - c, with b dividing a and a non-negative result
    name, item = rng.choice(NAMES), rng.choice(("nuts", "figs", "buns"))
    b, per = rng.randint(2, 9), rng.randint(2, 9)
    a, c = b * per, rng.randint(0, per)
    q = f"{name} splits {a} {item} among {b} kids. Each kid eats {c}. How many left per kid?"
    return Problem(q, f"{a}/{b}={per}\n{per}-{c}={per - c}\n#### {per - c}", str(per - c), "share")


def _wallet(rng: random.Random) -> Problem:
    # a - b + c
    name = rng.choice(NAMES)
    a = rng.randint(20, 99)
    b, c = rng.randint(1, a), rng.randint(1, 30)
    d = a - b
    q = f"{name} had ${a}, spent ${b}, then earned ${c}. How many dollars now?"
    return Problem(q, f"{a}-{b}={d}\n{d}+{c}={d + c}\n#### {d + c}", str(d + c), "wallet")


def _trip(rng: random.Random) -> Problem:
    # (a + b) * c
    name = rng.choice(NAMES)
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    s = a + b
    q = f"{name} walks {a} km and runs {b} km each day. How many km in {c} days?"
    return Problem(q, f"{a}+{b}={s}\n{s}*{c}={s * c}\n#### {s * c}", str(s * c), "trip")


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "shop": _shop,
    "share": _share,
    "wallet": _wallet,
    "trip": _trip,
}
KINDS: tuple[str, ...] = tuple(GENERATORS)


def iter_problems(seed: int, kinds: tuple[str, ...] | list[str] = KINDS) -> Iterator[Problem]:
    """An endless, seeded stream of problems, kinds in round-robin order (balanced subdomains)."""
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown problem kinds {unknown}; choose from {list(KINDS)}")
    rng = random.Random(seed)
    while True:
        for kind in kinds:
            yield GENERATORS[kind](rng)


def generate_problems(
    n: int,
    seed: int = 0,
    kinds: tuple[str, ...] | list[str] = KINDS,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Problem]:
    """`n` distinct problems (by question text), none of whose questions is in `exclude`.

    Distinct questions make the data splits non-overlapping in content, not only in index.
    """
    out: list[Problem] = []
    seen = set(exclude)
    stream = iter_problems(seed, kinds)
    misses = 0
    while len(out) < n:
        p = next(stream)
        if p.question in seen:
            misses += 1
            if misses > 50 * n + 10_000:
                raise ValueError(f"cannot draw {n} distinct problems of kinds {list(kinds)}")
            continue
        seen.add(p.question)
        out.append(p)
    return out
