"""Server-side aggregation rules: pure math over client updates (state_dict deltas).

Every rule takes the clients' updates (``{name: tensor}``, the whole state_dict including
BatchNorm buffers), their weights (local data sizes) and returns the step the server adds to
the global model.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from .catalog import AGGREGATORS
from .errors import ConfigError

Update = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AggregatorSettings:
    server_lr: float = 1.0
    rlr_threshold: int | None = None  # None: floor(m / 2) + 1 for m sampled clients
    buffers: Collection[str] = ()  # names voted on by no rule (BatchNorm statistics)


def weighted_mean(updates: list[Update], weights: list[float]) -> Update:
    """sum_k n_k * delta_k / sum_k n_k, per tensor, in float32 (integer buffers included)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    out: Update = {}
    for name in updates[0]:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float32)
        for update, w in zip(updates, weights):
            acc.add_(update[name].to(torch.float32), alpha=w / total)
        out[name] = acc
    return out


@AGGREGATORS.register("fedavg")
def fedavg(updates: list[Update], weights: list[float], settings: AggregatorSettings) -> Update:
    """Eq. 3: w_{t+1} = w_t + alpha * sum_k n_k dw_k / sum_k n_k."""
    return {name: settings.server_lr * t for name, t in weighted_mean(updates, weights).items()}


def rlr_threshold(settings: AggregatorSettings, sampled: int) -> int:
    return settings.rlr_threshold if settings.rlr_threshold is not None else sampled // 2 + 1


@AGGREGATORS.register("rlr")
def rlr(updates: list[Update], weights: list[float], settings: AggregatorSettings) -> Update:
    """Robust learning rate (Ozdayi et al. 2021) on top of FedAvg.

    Per parameter coordinate: the server lr is -lr where |sum_k sign(dw_k)| < threshold, else lr.
    Buffers (BatchNorm statistics) are plainly averaged: they carry no gradient direction to vote on.
    """
    threshold = rlr_threshold(settings, len(updates))
    if threshold < 1:
        raise ConfigError(f"must be at least 1, got {threshold}", param="rlr_threshold")
    mean = weighted_mean(updates, weights)
    out: Update = {}
    for name, step in mean.items():
        if name in settings.buffers:
            out[name] = settings.server_lr * step
            continue
        votes = torch.zeros_like(step)
        for update in updates:
            votes.add_(torch.sign(update[name].to(torch.float32)))
        lr = torch.where(votes.abs() < threshold, -settings.server_lr, settings.server_lr)
        out[name] = lr * step
    return out


def apply_update(state: Update, step: Update) -> Update:
    """state + step, cast back to each tensor's dtype (integer buffers are rounded)."""
    out: Update = {}
    for name, value in state.items():
        new = value.to(torch.float32) + step[name]
        out[name] = new.round().to(value.dtype) if not value.is_floating_point() else new.to(value.dtype)
    return out
