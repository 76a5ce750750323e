"""How the stop rule's rho trades ACC for ASR, with and without the repair, over several aux draws.

    .venv/bin/python experiments/tune_rho.py RUN_DIR [RUN_DIR...] [--rhos 0.01 0.02 0.03] \
        [--aux-seeds 0 1 2] [--per-class 20] [--device cuda] [--out rows.jsonl]

The paper's search at each rho (step 0.001, crossing, rescale) without and with the default
repair, exactly as `flain defend --rho R [--preset paper]` does: experiments/tune_rules.py with
the rules "paper rho=R" and "default rho=R". Run it only on trainings that are never reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tune_rules import compare, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.015, 0.02, 0.025, 0.03])
    parser.add_argument("--aux-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rules = [f"{preset} rho={rho}" for preset in ("paper", "default") for rho in args.rhos]
    rows = compare(args.runs, rules, args.aux_seeds, args.per_class, args.device, args.out)
    print("\n" + summary(rows, rules))


if __name__ == "__main__":
    sys.exit(main())
