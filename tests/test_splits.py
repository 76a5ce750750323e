import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flain_cli.errors import ConfigError
from flain_cli.splits import balanced_subset, dirichlet_split, iid_split


def _labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, classes, n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(50, 600), clients=st.integers(1, 12), seed=st.integers(0, 2**16),
       alpha=st.floats(0.1, 10.0))
def test_every_sample_is_assigned_exactly_once(n, clients, seed, alpha):
    labels = _labels(n, 5, seed)
    for split in (iid_split(labels, clients, np.random.default_rng(seed)),
                  dirichlet_split(labels, clients, np.random.default_rng(seed), alpha=alpha, min_size=1)):
        assert len(split) == clients
        assert torch.equal(torch.sort(torch.cat(split)).values, torch.arange(n))


def test_iid_parts_are_near_equal():
    sizes = [len(p) for p in iid_split(_labels(1003, 10, 0), 10, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_reproducible_by_seed_and_skewed():
    labels = _labels(5000, 10, 1)
    a = dirichlet_split(labels, 10, np.random.default_rng(7), alpha=0.5)
    b = dirichlet_split(labels, 10, np.random.default_rng(7), alpha=0.5)
    c = dirichlet_split(labels, 10, np.random.default_rng(8), alpha=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # alpha 0.5 gives visibly unequal class mixes: some client lacks a quarter of a class's share
    shares = torch.stack([torch.bincount(labels[p], minlength=10).float() / len(p) for p in a])
    assert shares.max() > 0.3


def test_dirichlet_rejects_bad_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_split(_labels(100, 2, 0), 2, np.random.default_rng(0), alpha=0)


def test_balanced_subset():
    labels = torch.arange(1000) % 10
    idx = balanced_subset(labels, 250, np.random.default_rng(0))
    assert len(idx) == 250 == len(set(idx.tolist()))
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    # a class with too few samples: the others fill in
    skewed = torch.tensor([0] * 5 + [1] * 100)
    idx = balanced_subset(skewed, 50, np.random.default_rng(0))
    assert torch.bincount(skewed[idx]).tolist() == [5, 45]
    with pytest.raises(ConfigError):
        balanced_subset(labels, 2000, np.random.default_rng(0))
