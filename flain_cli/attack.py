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
