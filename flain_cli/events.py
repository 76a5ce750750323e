"""Progress events of a training or a grid: what the library reports and the CLI draws.

Plain classes, no torch, so the CLI can define its listeners before the library is imported.
The record of one round, as `flain train --log` writes it (a JSON line) and train.json's
``history`` keeps it, is written by :func:`round_record` and read by :func:`read_train_log`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_text


@dataclass(frozen=True)
class RoundLog:
    round: int
    acc: float | None
    asr: float | None
    seconds: float
    train_seconds: float
    samples: int


def round_record(log: RoundLog) -> dict[str, Any]:
    """One round as the training log and train.json keep it (times in seconds, to the millisecond)."""
    return {"round": log.round, "acc": log.acc, "asr": log.asr, "seconds": round(log.seconds, 3),
            "train_seconds": round(log.train_seconds, 3)}


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The evaluated rounds of one training: a `flain train --log` file (JSON lines), or the train.json
    that `flain experiment` keeps in each cached training folder, or that folder."""
    path = Path(path)
    source = path / "train.json" if path.is_dir() else path
    text = read_text(source, "training log")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    try:
        rows = (record["history"] if isinstance(record, dict) and "history" in record
                else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "round" in r for r in rows):
        raise ConfigError(f"{source} is not a `flain train --log` file (JSON lines) or a train.json")
    rows = [r for r in rows if r.get("acc") is not None]
    if not rows:
        raise ConfigError(f"{source} holds no evaluated rounds")
    for row in rows:  # a value that is not a number would be drawn on a categorical axis
        for key in ("round", "acc", "asr"):
            value = row.get(key)
            if not (value is None and key == "asr" or _is_number(value)):
                raise ConfigError(f"{source}: {key} is {value!r:.40} in the row of round {row['round']!r:.20}, "
                                  "not a number; pass the file `flain train --log` wrote")
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
