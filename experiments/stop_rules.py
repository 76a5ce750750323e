"""Replay stop rules of the default preset over curves, without the models.

    .venv/bin/python experiments/stop_rules.py CURVES.jsonl [...] [--rule SPEC ...] [--rows]

CURVES.jsonl: lines of ``experiments/rules_lab.py curves`` (one per model and aux set). Each rule picks
one threshold of a curve from what the aux set shows (the flipped layer's KL, agreement and accuracy at
every threshold; the two-fold check of the repair; the model's own output scales); the result is the
default repair's at that threshold, measured on the test images outside the aux set. Only thresholds
where the curve holds the repaired result can be picked: a rule that stops between two of them keeps
the one before (fewer inputs flipped), so replayed results lean to the side of less flipping.

SPECs (default: every one below at a few budgets):
- ``kl:B``: the default preset's stop, at the first threshold whose KL reaches B (``kl:0.07`` today);
- ``shift:C``: the kl stop at C times the model's own scale, the KL of its outputs when the aux images
  move by one pixel (``shift_kl``);
- ``entropy:C``: the kl stop at C times the mean entropy of its outputs on the aux set;
- ``cv:D``: the last threshold before the two-fold check's accuracy (repair on one half of the aux set,
  accuracy on the other, both ways) falls more than D below the model's own on those halves;
- ``cvagree:D``: the same with the share of the other half's images whose class the repair keeps;
- ``cvkl:B``: the last threshold before the two-fold check's KL (the repaired model's outputs against the
  model's own on the half it was not repaired on) reaches B; ``cvkl+:B``: before it rises B above its value
  at the first threshold (the repair's own noise).

A model meets the target when ASR <= 0.03 at a cost of at most 1 ACC point (docs/results.md). Research
code, for choosing a rule on tuning models only: experiments/generality-fmnist.toml says which those are.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Curve = dict[str, Any]
Rule = Callable[[Curve], int]  # the index of the kept row (a repaired one)

DEFAULT_RULES = ["kl:0.07", "kl:0.03", "kl:0.05", "kl:0.1", "kl:0.15",
                 "shift:0.5", "shift:1", "shift:1.5", "shift:2",
                 "entropy:0.1", "entropy:0.15", "entropy:0.2", "entropy:0.25",
                 "cv:0.01", "cv:0.02", "cvagree:0.02", "cvagree:0.04",
                 "cvkl:0.015", "cvkl:0.02", "cvkl:0.025", "cvkl:0.03", "cvkl+:0.015", "cvkl+:0.02"]


def repaired(curve: Curve) -> list[int]:
    return [i for i, row in enumerate(curve["rows"]) if "dacc" in row]


def kept_at(curve: Curve, index: int) -> int:
    """The last repaired row at or before ``index``."""
    return max((i for i in repaired(curve) if i <= index), default=repaired(curve)[0])


def first_reaching(curve: Curve, budget: float) -> int:
    rows = curve["rows"]
    return next((i for i, row in enumerate(rows) if row["kl"] >= budget), len(rows) - 1)


def before_crossing(curve: Curve, crossed: Callable[[dict, dict], bool]) -> int:
    """The last repaired row before the first repaired one for which ``crossed(row, first repaired row)``."""
    rows = repaired(curve)
    first = curve["rows"][rows[0]]
    done = next((i for i in rows if crossed(curve["rows"][i], first)), None)
    if done is None:
        return rows[-1]
    return max((i for i in rows if i < done), default=rows[0])


def make_rule(spec: str) -> Rule:
    kind, _, text = spec.partition(":")
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"Error: rule {spec!r} needs a number after the colon, e.g. kl:0.07") from None
    if kind == "kl":
        return lambda c: kept_at(c, first_reaching(c, value))
    if kind == "shift":
        return lambda c: kept_at(c, first_reaching(c, value * c["shift_kl"]))
    if kind == "entropy":
        return lambda c: kept_at(c, first_reaching(c, value * c["entropy"]))
    if kind == "cv":
        return lambda c: before_crossing(c, lambda row, _: row["cv_acc0"] - row["cv_acc"] > value)
    if kind == "cvagree":
        return lambda c: before_crossing(c, lambda row, _: 1 - row["cv_agree"] > value)
    if kind == "cvkl":
        return lambda c: before_crossing(c, lambda row, _: row["cv_kl"] >= value)
    if kind == "cvkl+":
        return lambda c: before_crossing(c, lambda row, first: row["cv_kl"] - first["cv_kl"] > value)
    raise SystemExit(f"Error: unknown rule {spec!r}: kl, shift, entropy, cv, cvagree, cvkl or cvkl+")


def outcome(curve: Curve, index: int) -> dict[str, float]:
    row, base = curve["rows"][index], curve["base"]
    dasr = base["trig"] - row["asr"]
    der = (max(0.0, dasr) - max(0.0, -row["dacc"] / 100) + 1) / 2
    return {"n": row["n"], "dacc": row["dacc"], "asr": row["asr"], "der": der,
            "meets": row["asr"] <= 0.03 and row["dacc"] >= -1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curves", type=Path, nargs="+")
    ap.add_argument("--rule", action="append", help="a SPEC (repeatable; default: a set of them)")
    ap.add_argument("--rows", action="store_true", help="one line per model and rule")
    args = ap.parse_args()
    lines = [line for path in args.curves for line in path.read_text().splitlines() if line.strip()]
    curves = [json.loads(line) for line in lines]
    for spec in args.rule or DEFAULT_RULES:
        rule = make_rule(spec)
        results = [outcome(c, rule(c)) for c in curves]
        if args.rows:
            for c, r in zip(curves, results):
                print(f"  {spec:14} {c['run']:40} n {r['n']:5d}  {r['dacc']:+6.2f} / {r['asr']:.3f}  DER {r['der']:.3f}"
                      f"{'  meets' if r['meets'] else ''}")
        met, count = sum(r["meets"] for r in results), len(results)

        def mean(key: str) -> float:
            return sum(r[key] for r in results) / count

        worst = min(r["dacc"] for r in results)
        print(f"{spec:14} meets {met} of {count}  mean dACC {mean('dacc'):+.2f}  worst {worst:+.2f}"
              f"  mean ASR {mean('asr'):.3f}  mean DER {mean('der'):.3f}")


if __name__ == "__main__":
    main()
