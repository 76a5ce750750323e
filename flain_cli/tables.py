"""The CSV files the commands write (`defend --trace`, `scan --csv`, `sweep --csv`) and `flain plot`
reads: each format's writer beside its reader, with its columns named once."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_text

TRACE_COLUMNS = ("lambda", "selected", "aux_acc", "drop")
TRACE_OPTIONAL = ("kl",)  # empty unless the search stopped on the divergence
MEANS_COLUMNS = ("neuron", "mean")
SWEEP_COLUMNS = ("lambda", "changed", "aux_acc", "acc", "asr", "asr_clean")


def trace_csv(trace: Iterable[Any], acc0: float) -> str:
    """The search curve (`SearchResult.trace`): one row per threshold at which the selection changed."""
    rows = "".join(f"{s.lam:.9g},{s.selected},{s.acc:.6f},{acc0 - s.acc:.6f},{'' if s.kl is None else f'{s.kl:.6g}'}\n"
                   for s in trace)
    return ",".join(TRACE_COLUMNS + TRACE_OPTIONAL) + "\n" + rows


def means_csv(means: Any) -> str:
    """The mean activation of each input neuron of the defended layer (a 1-D tensor or list)."""
    values = means.tolist() if hasattr(means, "tolist") else list(means)
    return ",".join(MEANS_COLUMNS) + "\n" + "".join(f"{i},{v:.9g}\n" for i, v in enumerate(values))


def sweep_csv(rows: list[dict[str, float | int | None]]) -> str:
    """`flain sweep`'s curve; a value that does not exist (no attack known, the unchanged model's lambda) is empty."""
    return ",".join(SWEEP_COLUMNS) + "\n" + "".join(
        ",".join("" if r[c] is None else f"{r[c]:.9g}" for c in SWEEP_COLUMNS) + "\n" for r in rows)


def read_csv(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, list[float | None]]:
    """Columns as floats; an empty cell is None (allowed only in ``optional`` columns)."""
    rows = list(csv.DictReader(io.StringIO(read_text(path, "CSV file"), newline="")))
    if not rows or any(c not in rows[0] for c in columns + optional):
        raise ConfigError(f"{path} is not a CSV with columns {', '.join(columns + optional)}")
    try:
        return {c: [float(r[c]) if r[c] != "" or c not in optional else None for r in rows]
                for c in columns + optional}
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
