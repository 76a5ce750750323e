"""The CSV files the commands write (`defend --trace`, `scan --csv`, `sweep --csv`, `experiment`'s
results.csv) and `flain plot` reads: each format's writer beside its reader, with its columns named once."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
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


# `flain experiment`'s results: one row per cell, the grid's keys first (in the grid's order), then these.
RESULT_COLUMNS = ("defense", "acc", "asr", "status")
FINISHED = ("done", "cached")  # the statuses of a cell with a result (the others: busy, failed)


def results_csv(rows: list[dict[str, Any]]) -> str:
    """results.csv: every key any row has, in first-seen order (the grid's keys, then RESULT_COLUMNS, then details)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@dataclass(frozen=True)
class GridRow:
    point: dict[str, str]  # the grid's keys and their values, as text
    defense: str
    acc: float | None
    asr: float | None
    status: str


@dataclass(frozen=True)
class GridResults:
    keys: tuple[str, ...]  # the grid's keys, in the file's order
    rows: tuple[GridRow, ...]

    def finished(self) -> list[GridRow]:
        return [r for r in self.rows if r.status in FINISHED and r.acc is not None and r.asr is not None]


def read_results(path: Path) -> GridResults:
    """`flain experiment`'s results.csv or results.json: the grid's keys are the columns before ``defense``."""
    text = read_text(path, "results file")
    records: list[dict[str, Any]]
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
            records = data["rows"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a `flain experiment` results.json (no rows)") from None
    else:
        records = list(csv.DictReader(io.StringIO(text, newline="")))
    if not records or not all(isinstance(r, dict) and set(RESULT_COLUMNS) <= set(r) for r in records):
        raise ConfigError(f"{path} is not a `flain experiment` results file with columns {', '.join(RESULT_COLUMNS)}")
    names = list(records[0])
    keys = tuple(names[:names.index("defense")])

    def number(value: Any) -> float | None:
        if value in ("", None):
            return None
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: acc and asr must be numbers, got {value!r}") from None
        return result if math.isfinite(result) else None

    rows = tuple(GridRow({k: "" if r.get(k) is None else str(r[k]) for k in keys}, str(r["defense"]),
                         number(r["acc"]), number(r["asr"]), str(r["status"])) for r in records)
    return GridResults(keys, rows)
