"""Partitions of the training set into clients: index views, never copies of the images."""

from __future__ import annotations

import numpy as np
import torch

from .catalog import SPLITS
from .errors import ConfigError, opt


@SPLITS.register("iid")
def iid_split(labels: torch.Tensor, clients: int, rng: np.random.Generator, alpha: float = 0.5) -> list[torch.Tensor]:
    """A random permutation cut into ``clients`` parts of (almost) equal size."""
    _check(len(labels), clients)
    perm = rng.permutation(len(labels))
    return [torch.from_numpy(np.sort(part)) for part in np.array_split(perm, clients)]


@SPLITS.register("dirichlet")
def dirichlet_split(labels: torch.Tensor, clients: int, rng: np.random.Generator, alpha: float = 0.5,
                    min_size: int = 10, tries: int = 100) -> list[torch.Tensor]:
    """Per class, shares drawn from Dir(alpha) over clients (smaller alpha: more skewed).

    Draws again (up to ``tries`` times) until every client holds at least ``min_size`` samples.
    """
    _check(len(labels), clients)
    if alpha <= 0:
        raise ConfigError(f"must be > 0, got {alpha}", param="alpha")
    y = labels.numpy()
    min_size = min(min_size, len(y) // clients)
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        sizes = [sum(len(ch) for ch in p) for p in parts]
        if min(sizes) >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
    raise ConfigError(f"a Dirichlet split with alpha={alpha} left a client with fewer than {min_size} "
                      f"samples in {tries} draws; use a larger {opt('alpha')} or fewer {opt('clients')}")


def balanced_subset(labels: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Sorted indices of ``n`` samples, as even across classes as the data allows."""
    if not 0 < n <= len(labels):
        raise ConfigError(f"must be between 1 and {len(labels)}, got {n}", param="train_samples")
    y = labels.numpy()
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    take = [0] * len(classes)
    left = n
    while left:  # round-robin over classes that still have samples
        open_ = [i for i, p in enumerate(pools) if take[i] < len(p)]
        share = max(1, left // len(open_))
        for i in open_:
            k = min(share, len(pools[i]) - take[i], left)
            take[i] += k
            left -= k
            if not left:
                break
    return torch.from_numpy(np.sort(np.concatenate([p[:k] for p, k in zip(pools, take)])))


def _check(n: int, clients: int) -> None:
    if clients < 1:
        raise ConfigError(f"must be at least 1, got {clients}", param="clients")
    if clients > n:
        raise ConfigError(f"{clients} clients but only {n} training samples")
