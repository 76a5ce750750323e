"""The backdoor task: which labels are attacked, and which training samples get poisoned."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError


@dataclass(frozen=True)
class AttackTask:
    """Relabel triggered images of ``source`` (None: every class but the target) to ``target``."""

    source: int | None
    target: int

    @classmethod
    def parse(cls, text: str, num_classes: int) -> AttackTask:
        """``"SRC:TGT"`` or ``"all:TGT"`` (all-to-one)."""
        parts = text.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            source = None if parts[0].strip().lower() == "all" else int(parts[0])
            target = int(parts[1])
        except ValueError:
            raise ConfigError(f"attack {text!r} is not SRC:TGT (e.g. 0:5) or all:TGT") from None
        task = cls(source, target)
        task.check(num_classes)
        return task

    def check(self, num_classes: int) -> None:
        for label in (self.source, self.target):
            if label is not None and not 0 <= label < num_classes:
                raise ConfigError(f"attack {self} names class {label}, but the dataset has classes "
                                  f"0..{num_classes - 1}")
        if self.source == self.target:
            raise ConfigError(f"attack {self}: source and target are the same class")

    def is_source(self, labels: torch.Tensor) -> torch.Tensor:
        """Which labels the attack applies to (bool mask)."""
        if self.source is None:
            return labels != self.target
        return labels == self.source

    def __str__(self) -> str:
        return f"{'all' if self.source is None else self.source}:{self.target}"


def choose_poisoned(labels: torch.Tensor, task: AttackTask, pdr: float,
                    rng: np.random.Generator) -> torch.Tensor:
    """Bool mask over a client's samples: floor(PDR * #source samples) of them, chosen at random."""
    candidates = torch.nonzero(task.is_source(labels)).flatten().numpy()
    count = int(pdr * len(candidates))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if count:
        mask[torch.from_numpy(rng.choice(candidates, size=count, replace=False))] = True
    return mask


# ---- stronger attackers: what a malicious client does to its update (pure functions over state_dict deltas)

ADAPTIVE_SHARE = 0.05  # the FLAIN-aware attacker guards the 5 % of the defended layer's inputs its trigger raises most


def neurotoxin_masks(previous: dict[str, torch.Tensor], share: float, names: list[str]) -> dict[str, torch.Tensor]:
    """Neurotoxin (Zhang et al. 2022): bool masks over the tensors ``names`` that keep every coordinate except the
    ``share`` % with the largest magnitude in the previous global update ``previous``, ranked over all of them
    together: the coordinates benign clients write most are left alone, so the backdoor lives where they do not."""
    flat = torch.cat([previous[n].detach().abs().flatten().float() for n in names])
    count = int(flat.numel() * share / 100)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count:
        keep[torch.topk(flat, count).indices] = False
    masks, start = {}, 0
    for n in names:
        size = previous[n].numel()
        masks[n] = keep[start:start + size].view_as(previous[n]).to(previous[n].device)
        start += size
    return masks


def boosted(update: dict[str, torch.Tensor], factor: float, names: list[str]) -> dict[str, torch.Tensor]:
    """Model replacement / boosting (Bagdasaryan et al. 2020): the tensors ``names`` of the update times ``factor``,
    so that they survive averaging with the benign updates (the others, e.g. BatchNorm counters, as they are)."""
    return {n: t * factor if n in names else t for n, t in update.items()}


def projected(update: dict[str, torch.Tensor], radius: float, names: list[str]) -> dict[str, torch.Tensor]:
    """The update onto the L2 ball of ``radius`` (over the tensors ``names`` together), as an attacker facing norm
    clipping sends it: unchanged inside the ball, scaled down to its surface outside."""
    norm = float(torch.stack([(update[n].double() ** 2).sum() for n in names]).sum().sqrt())
    if norm <= radius:
        return update
    return boosted(update, radius / norm, names)


def trigger_inputs(clean: torch.Tensor, triggered: torch.Tensor, share: float = ADAPTIVE_SHARE) -> torch.Tensor:
    """The indices of the defended layer's inputs that the trigger raises most (mean on ``triggered`` rows minus
    mean on ``clean`` rows, ``[N, in]`` each): the ``share`` of them, at least one."""
    raised = triggered.mean(0) - clean.mean(0)
    return torch.topk(raised, max(1, round(share * raised.numel()))).indices


def adaptive_penalty(clean: torch.Tensor, chosen: torch.Tensor, level: float) -> torch.Tensor:
    """The FLAIN-aware attacker's loss term: for each chosen input, how far its mean activation over the clean rows
    ``clean`` ``[B, in]`` falls short of ``level`` (a typical clean activation), averaged. It is zero when those
    inputs are as busy on clean images as a typical input, and FLAIN then no longer reads them as silent."""
    return torch.relu(level - clean[:, chosen].mean(0)).mean()
