"""Balanced k-means of FFN neurons: exact sizes, determinism, objective vs a random split."""

import pytest
import torch

from padd.decompress import balanced_kmeans, clustering_objective, random_balanced_split


def _clustered_rows(num=256, dim=16, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=gen) * 3
    labels = torch.arange(num) % k
    return centres[labels] + torch.randn(num, dim, generator=gen)


@pytest.mark.parametrize("num,clusters", [(256, 8), (96, 3), (60, 5), (64, 1), (64, 64)])
def test_exact_cluster_sizes(num, clusters):
    res = balanced_kmeans(torch.randn(num, 12), clusters, seed=1)
    assert torch.bincount(res.assignment_F, minlength=clusters).tolist() == [num // clusters] * clusters
    assert res.members().shape == (clusters, num // clusters)
    assert sorted(res.members().reshape(-1).tolist()) == list(range(num))


def test_deterministic_under_seed():
    rows = torch.randn(128, 16)
    a, b = balanced_kmeans(rows, 4, seed=3), balanced_kmeans(rows, 4, seed=3)
    assert torch.equal(a.assignment_F, b.assignment_F)
    assert a.objective == b.objective
    r1, r2 = random_balanced_split(rows, 4, seed=3), random_balanced_split(rows, 4, seed=3)
    assert torch.equal(r1.assignment_F, r2.assignment_F)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_at_most_random_split(seed):
    rows = _clustered_rows(seed=seed)
    km, rnd = balanced_kmeans(rows, 8, seed=seed), random_balanced_split(rows, 8, seed=seed)
    assert km.objective <= rnd.objective
    # Planted equal-size clusters are recovered almost perfectly.
    assert km.objective < 0.5 * rnd.objective
    # Unstructured rows: still no worse than random.
    noise = torch.randn(256, 16)
    assert (
        balanced_kmeans(noise, 8, seed=seed).objective <= random_balanced_split(noise, 8, seed=seed).objective
    )


def test_objective_matches_helper():
    rows = torch.randn(64, 8)
    res = balanced_kmeans(rows, 4)
    assert res.objective == pytest.approx(clustering_objective(rows, res.assignment_F, 4), rel=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="cannot be split"):
        balanced_kmeans(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="rows must be"):
        balanced_kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="positive int"):
        random_balanced_split(torch.randn(10, 4), 0)
