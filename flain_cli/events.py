"""Progress events of a training or a grid: what the library reports and the CLI draws.

Plain classes, no torch, so the CLI can define its listeners before the library is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundLog:
    round: int
    acc: float | None
    asr: float | None
    seconds: float
    train_seconds: float
    samples: int


class Listener:
    """Receives progress events; the CLI draws them, the library ignores them."""

    def resumed(self, history: list[RoundLog]) -> None: ...
    def round_start(self, rnd: int, sampled: list[int]) -> None: ...
    def client_done(self, rnd: int, client: int) -> None: ...
    def round_end(self, log: RoundLog) -> None: ...


class ExperimentListener(Listener):
    """Progress of the grid; the CLI draws it."""

    def cell(self, label: str, status: str) -> None: ...

    def waiting(self, label: str, reason: str) -> None:
        """A cell's training is under way in another process; it is done at the end, after that one."""
