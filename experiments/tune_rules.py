"""Compare defense rules over trainings and aux draws, on the test images outside each aux set.

    .venv/bin/python experiments/tune_rules.py RUN_DIR [RUN_DIR...] --rule SPEC [--rule SPEC...] \
        [--aux-seeds 0 1 2] [--per-class 20 [80 ...]] [--device cuda] [--out rows.jsonl] \
        [--model-def FILE.py:NAME --dataset fmnist]

A SPEC is a preset name followed by `flain defend` settings by their library names, e.g. ``default``,
``paper``, ``"default holdout=0.5"``, ``"paper step=0.0001 rho=0.024"``, ``"default repair_steps=300"``,
``"default repair=none"``: exactly :func:`flain_cli.settings.defense_config`'s arguments (values are read
as JSON where they parse, else as text). ``--rules ablation`` adds the paper's Algorithm 1 with one
factor changed at a time, and ``--rhos R [R ...]`` adds ``paper rho=R`` and ``default rho=R`` for each R.

Each RUN_DIR holds a `flain train` run's init.safetensors and final.safetensors, or any model and W0
that `flain defend` reads (``--model-def``/``--dataset`` for an architecture that is not built in). For
each aux size and draw (`flain aux export` of the test split, seed S) and each rule,
`defend_checkpoint` runs exactly as `flain defend` does; the defended model is scored
(`evaluation.evaluate_loaded`) on the test images *not* in that aux set (`Split.without`). One JSON
line per (run, size, draw, rule) goes to --out, and a summary per rule (how many meet the target
ASR <= 0.03 within 1 ACC point, worst and mean) is printed at the end. Run it only on trainings that
are never reported: it is how a rule gets chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from flain_cli.audit import defend_checkpoint
from flain_cli.auxdata import export_aux
from flain_cli.checkpoint import ModelSource
from flain_cli.datasets import load_dataset
from flain_cli.evaluation import evaluate_loaded
from flain_cli.loading import load_aux_for, load_model
from flain_cli.settings import DefenseConfig, defense_config

# the paper's Algorithm 1, then one factor at a time, then the default rule (experiments/ablation.py before
# 2026-12-05; docs/results.md, "The ablation")
ABLATION = ["paper", "paper rescale=false", "paper select=last-safe", "paper rho=0.01", "paper rho=0",
            "paper step=0.0001 rho=0.024", "paper holdout=0.5", "default", "default rho=0.01"]


def parse_rule(spec: str) -> DefenseConfig:
    """``"default holdout=0.5 repair_steps=300"`` -> defense_config("default", holdout=0.5, repair_steps=300)."""
    preset, *changes = spec.split()
    settings: dict[str, Any] = {}
    for change in changes:
        key, _, text = change.partition("=")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return defense_config(preset, **settings)


def compare(runs: list[Path], rules: list[str], aux_seeds: list[int], sizes: list[int], device: str = "cpu",
            out: Path | None = None, source: ModelSource = ModelSource(), data_dir: Path | None = None,
            attack: str | None = None, trigger: str | None = None) -> list[dict]:
    configs = {spec: parse_rule(spec) for spec in rules}
    rows: list[dict] = []
    sink = out.open("a") if out else None
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            final, init = run / "final.safetensors", run / "init.safetensors"
            loaded = load_model(final, source, device)
            dataset = loaded.meta.test_dataset(final)
            test = load_dataset(dataset, data_dir).test
            for per_class in sizes:
                for seed in aux_seeds:
                    aux = Path(tmp) / f"aux-{dataset}-{per_class}-{seed}"
                    if not aux.exists():
                        export_aux(dataset, per_class, aux, seed=seed, data_dir=data_dir)
                    held = load_aux_for(loaded, aux)
                    disjoint = test.without(held.images, held.labels)
                    before = evaluate_loaded(loaded, disjoint, device=device, attack=attack, trigger=trigger)
                    for spec, config in configs.items():
                        outcome = defend_checkpoint(final, init, aux, config, source=source, seed=seed, device=device)
                        after = evaluate_loaded(loaded, disjoint, outcome.state, device, attack, trigger)
                        d = outcome.record
                        row = {"run": str(run), "aux_seed": seed, "per_class": per_class, "rule": spec,
                               "config": config.record(), "flipped": d.flipped, "of": d.of, "acc0": before.acc,
                               "asr0": before.asr, "floor0": before.asr_clean, "acc": after.acc, "asr": after.asr,
                               "floor": after.asr_clean, "dacc": after.acc - before.acc, "n_test": len(disjoint)}
                        rows.append(row)
                        print(f"{run.name} aux {per_class}x seed {seed} [{spec}]: {d.flipped} flipped, "
                              f"dACC {100 * row['dacc']:+.2f}, ASR {after.asr:.3f} (no trigger {after.asr_clean:.3f}, "
                              f"before the defense {before.asr_clean:.3f})", flush=True)
                        if sink:
                            sink.write(json.dumps(row) + "\n")
                            sink.flush()
    return rows


def summary(rows: list[dict], rules: list[str]) -> str:
    lines = ["| rule | runs x draws | meets target (ASR <= 0.03, dACC >= -1) | worst dACC | mean dACC | "
             "worst ASR | mean ASR |", "|---|---|---|---|---|---|---|"]
    for spec in rules:
        sel = [r for r in rows if r["rule"] == spec]
        met = sum(r["asr"] <= 0.03 and r["dacc"] >= -0.01 for r in sel)
        lines.append(f"| {spec} | {len(sel)} | {met} | {100 * min(r['dacc'] for r in sel):+.2f} | "
                     f"{100 * sum(r['dacc'] for r in sel) / len(sel):+.2f} | {max(r['asr'] for r in sel):.3f} | "
                     f"{sum(r['asr'] for r in sel) / len(sel):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rule", dest="rules", action="append", default=[])
    parser.add_argument("--rules", dest="named", choices=("ablation",), help="add a named list of rules")
    parser.add_argument("--rhos", type=float, nargs="+", default=[], help="add paper rho=R and default rho=R")
    parser.add_argument("--aux-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, nargs="+", default=[20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model-def", help="FILE.py:NAME, for an architecture that is not built in")
    parser.add_argument("--dataset", help="the dataset of such a model")
    parser.add_argument("--data-dir", type=Path, help="the dataset's files (default: where flain finds them)")
    parser.add_argument("--attack", help="SRC:TGT to measure, for a model whose metadata records none")
    parser.add_argument("--trigger", help="the trigger stamped for it (default: the recorded one, else cba)")
    args = parser.parse_args()
    rules = args.rules + (ABLATION if args.named == "ablation" else []) + [
        f"{preset} rho={rho}" for preset in ("paper", "default") for rho in args.rhos]
    if not rules:
        parser.error("give at least one --rule, --rules or --rhos")
    source = ModelSource(dataset=args.dataset, model_def=args.model_def)
    rows = compare(args.runs, rules, args.aux_seeds, args.per_class, args.device, args.out, source, args.data_dir,
                   args.attack, args.trigger)
    print("\n" + summary(rows, rules))


if __name__ == "__main__":
    sys.exit(main())
