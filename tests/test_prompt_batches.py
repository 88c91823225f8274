"""`prompt_batches`, the one prompt sampler of Stages II–IV: seeded epochs, a pure function of
the step (so a resumed run draws the batches of an uninterrupted one)."""

import itertools
from collections import Counter

import pytest

from padd.training.prompts import prompt_batches


def _take(it, k):
    return list(itertools.islice(it, k))


@pytest.mark.parametrize(("n", "per_step"), [(7, 3), (5, 5), (3, 8)])
def test_every_epoch_visits_each_problem_once(n, per_step):
    items = [x for batch in _take(prompt_batches(list(range(n)), per_step, seed=1), 4 * n) for x in batch]
    for e in range(len(items) // n):
        assert sorted(items[e * n : (e + 1) * n]) == list(range(n)), e
    assert len(_take(prompt_batches(list(range(n)), per_step, seed=1), 1)[0]) == per_step


def test_resuming_at_a_step_draws_the_uninterrupted_batches():
    problems = [f"q{i}" for i in range(11)]
    uninterrupted = _take(prompt_batches(problems, 4, seed=3), 12)
    for start in (1, 5, 9):
        assert _take(prompt_batches(problems, 4, seed=3, start=start), 12 - start) == uninterrupted[start:]


def test_the_seed_sets_the_order():
    problems = list(range(30))
    a, b = (_take(prompt_batches(problems, 10, seed=s), 3) for s in (0, 1))
    assert a == _take(prompt_batches(problems, 10, seed=0), 3) and a != b
    assert Counter(x for batch in a for x in batch) == Counter(problems)  # one epoch, all of it


def test_empty_or_zero_is_refused():
    with pytest.raises(ValueError, match="at least one problem"):
        next(prompt_batches([], 2, seed=0))
    with pytest.raises(ValueError, match="per_step"):
        next(prompt_batches([1], 0, seed=0))
