"""The generality table (docs/results.md): every defense column on the grids' cells, as markdown.

    .venv/bin/python experiments/generality_table.py runs/experiments/generality-fmnist/results.json \
        runs/experiments/generality-tables-fmnist/results.json [--role held-out] [--csv rows.csv] [--columns A,B]

Reads `flain experiment` results.json files (or the CSV that --csv wrote, e.g. docs/data/generality-fmnist.csv)
and prints one row per cell (each grid point of the given role; cells without a role, Tables 1/2's, always
count, named "Table 1 (0, 5)" and so on) and one column per defense: ACC change in points /
ASR (the source class's, the paper's) / RA (every triggered non-target image taken for its true class) / DER. Below
it: per column, the mean DER over the cells where the backdoor works (no-defense ASR >= 0.9), and how many of
those meet the target (ASR <= 0.03 at a cost of at most 1 point), over the cells of the role and, when there are
rows without a role, over all rows. Where a peer ran under both presets, the
column shown is fixed by the rule written in docs/results.md: the preset with the better mean DER on the
grid's *tuning* cells, never on the cells reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

KEYS = ("arch", "trigger", "attack", "split", "boost", "neurotoxin", "norm_bound", "adaptive", "mcr", "seed")
PEERS = ("prune", "fine-pruning", "rnp")  # run under both presets: one column each, chosen on the tuning cells
FIXED = ("none", "flain preset=paper", "flain preset=default", "finetune", "distill")
WORKS = 0.9  # no-defense ASR from which a cell's backdoor counts as working
TARGET_ASR, TARGET_POINTS = 0.03, 1.0


NUMBERS = ("acc", "asr", "asr_clean", "asr_all", "ra", "d_acc", "der", "der_all")  # read as numbers from a CSV


def cell_of(row: dict[str, Any]) -> str:
    """The cell's name: Tables 1/2's by their table and task, others by their grid keys that differ from a plain
    CBA cell, in one short label."""
    if row.get("role") is None and row.get("attack") and row.get("split") in ("iid", "dirichlet"):
        source, target = str(row["attack"]).split(":")
        return f"Table {1 if row['split'] == 'iid' else 2} ({source}, {target})"
    parts = [str(row.get("arch", "cnn-mnist"))]
    parts += [f"{k}={row[k]}" for k in KEYS[1:] if row.get(k) not in (None, "")]
    return " ".join(parts)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                found = [{k: None if v == "" else float(v) if k in NUMBERS else v for k, v in row.items()}
                         for row in csv.DictReader(f)]
        else:
            found = json.loads(path.read_text())["rows"]
        for row in found:
            if row.get("status") == "busy":  # its training is still under way: "not run" in the table
                continue
            if row.get("error"):
                raise SystemExit(f"Error: {path}: {cell_of(row)} {row['defense']} failed: {row['error']}")
            rows.append(row)
    return rows


def by_cell(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(cell_of(row), {})[row["defense"]] = row
    return cells


def mean_der(cells: dict[str, dict[str, dict[str, Any]]], column: str) -> float | None:
    ders = [c[column]["der"] for c in cells.values()
            if c["none"]["asr"] >= WORKS and column in c and c[column].get("der") is not None]
    return sum(ders) / len(ders) if ders else None


def pick_presets(rows: list[dict[str, Any]]) -> list[str]:
    """FIXED, then each peer under the preset with the better mean DER on the tuning cells (paper on a tie)."""
    tuning = by_cell([r for r in rows if r.get("role") == "tuning"])
    picked = list(FIXED)
    for peer in PEERS:
        scores = {p: mean_der(tuning, f"{peer} preset={p}") for p in ("paper", "default")}
        best = max(("paper", "default"), key=lambda p: -1.0 if scores[p] is None else scores[p])
        picked.insert(picked.index("finetune") if peer == "prune" else len(picked), f"{peer} preset={best}")
    return picked


def title(column: str) -> str:
    """A column's header: FLAIN's two presets by their roles, a peer with the preset it ran under."""
    names = {"none": "no defense: ACC / ASR / RA", "flain preset=paper": "FLAIN `--preset paper`",
             "flain preset=default": "**FLAIN default rule**"}
    method, _, preset = column.partition(" preset=")
    return names.get(column, f"{method} ({preset})" if preset else method)


def fmt(row: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if row is None:
        return "not run"
    if row["defense"] == "none":
        return f"{row['acc']:.4f} / {row['asr']:.3f} / {row['ra']:.3f}"
    der = "" if row.get("der") is None else f" / {row['der']:.2f}"
    return f"{100 * (row['acc'] - base['acc']):+.2f} / {row['asr']:.3f} / {row['ra']:.3f}{der}"


def table(rows: list[dict[str, Any]], role: str, columns: list[str]) -> list[str]:
    cells = by_cell([r for r in rows if r.get("role") in (role, None)])
    out = ["| cell | " + " | ".join(title(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cell in cells.items():
        works = "" if cell["none"]["asr"] >= WORKS else " (backdoor < 0.9)"
        out.append(f"| {name}{works} | " + " | ".join(fmt(cell.get(c), cell["none"]) for c in columns) + " |")
    scopes = [(f"{role} cells", by_cell([r for r in rows if r.get("role") == role]))]
    if any(r.get("role") is None for r in rows):
        scopes.append(("all rows", cells))
    for scope, counted in scopes:
        ders, met = [], []
        for column in columns:
            value = mean_der(counted, column)
            ders.append("" if value is None or column == "none" else f"{value:.3f}")
            working = [c for c in counted.values() if c["none"]["asr"] >= WORKS and column in c]
            ok = sum(1 for c in working if c[column]["asr"] <= TARGET_ASR
                     and round(100 * (c["none"]["acc"] - c[column]["acc"]), 6) <= TARGET_POINTS)
            met.append("" if column == "none" else f"{ok} of {len(working)}")
        out.append(f"| **mean DER**, {scope} (backdoor works) | " + " | ".join(ders) + " |")
        out.append(f"| **ASR <= 0.03 within 1 point**, {scope} | " + " | ".join(met) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--role", default="held-out")
    parser.add_argument("--csv", type=Path, help="also write every row read (all columns, all roles)")
    parser.add_argument("--columns", help="these defenses, comma-separated, by their results' names (e.g. "
                                          "'none,flain kl_unit=shift'), instead of the table's columns")
    args = parser.parse_args(argv)
    rows = load(args.results)
    columns = pick_presets(rows) if args.columns is None else args.columns.split(",")
    unknown = sorted(set(columns) - {r["defense"] for r in rows})
    if unknown:
        raise SystemExit(f"Error: no results for column(s) {', '.join(unknown)}; the results hold "
                         f"{', '.join(sorted({r['defense'] for r in rows}))}")
    print("\n".join(table(rows, args.role, columns)))
    if args.csv:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
