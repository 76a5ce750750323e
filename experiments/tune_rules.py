"""Compare defense rules over trainings and aux draws, on the test images outside each aux set.

    .venv/bin/python experiments/tune_rules.py RUN_DIR [RUN_DIR...] --rule SPEC [--rule SPEC...] \
        [--aux-seeds 0 1 2] [--per-class 20] [--device cuda] [--out rows.jsonl]

A SPEC is a preset name followed by settings to change, e.g. ``default``, ``paper``,
``"default holdout=0.5"``, ``"paper step=0.0001 rho=0.024"``, ``"default repair.steps=300"``
(any DefenseConfig field; ``repair.X`` for a RepairSettings field; ``repair=none``).
Each RUN_DIR holds a `flain train` run's init.safetensors and final.safetensors (Fashion-MNIST).
For each aux draw (`export_aux` of the test split, seed S) and each rule, `defend_checkpoint`
runs exactly as `flain defend` does; the defended model is scored on the test images *not* in
that aux set. One JSON line per (run, draw, rule) goes to --out, and a summary per rule (how many
meet the target ASR <= 0.03 within 1 ACC point, worst and mean) is printed at the end. Run it
only on trainings that are never reported: it is how a rule gets chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from flain_cli.audit import defend_checkpoint
from flain_cli.auxdata import export_aux
from flain_cli.checkpoint import build_from, load_checkpoint, resolve_model_meta
from flain_cli.datasets import Split, load_dataset
from flain_cli.evaluation import resolve_attack
from flain_cli.metrics import evaluate
from flain_cli.settings import PRESETS, DefenseConfig, RepairSettings
from flain_cli.triggers import make_trigger


def parse_rule(spec: str) -> DefenseConfig:
    """``"default holdout=0.5 repair.steps=300"`` -> the default preset with those two settings changed."""
    name, *changes = spec.split()
    config = PRESETS[name]
    for change in changes:
        key, _, text = change.partition("=")
        if key == "repair" and text == "none":
            config = dataclasses.replace(config, repair=None)
        elif key.startswith("repair."):
            field = key.removeprefix("repair.")
            kind = type(getattr(RepairSettings(), field))
            config = dataclasses.replace(config, repair=dataclasses.replace(config.repair or RepairSettings(),
                                                                            **{field: kind(text)}))
        else:
            kind = type(getattr(config, key))
            value = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
            config = dataclasses.replace(config, **{key: value})
    config.check()
    return config


def score(state_or_path, meta_ckpt, test: Split, data, device) -> tuple[float, float, float]:
    """ACC, ASR and ASR's floor (the source images taken for the target without trigger) of a checkpoint
    (path) or of defended tensors with the original's metadata."""
    ckpt = load_checkpoint(state_or_path) if isinstance(state_or_path, Path) else meta_ckpt
    meta = resolve_model_meta(ckpt)
    attack = resolve_attack(ckpt, meta.num_classes)
    model = build_from(ckpt, meta)
    if not isinstance(state_or_path, Path):
        model.load_state_dict(state_or_path)
    trigger = make_trigger(attack.trigger, *data.spec.shape[1:])
    res = evaluate(model.to(device), test, data.spec, attack.task, trigger, device=device)
    return res.acc, res.asr, res.asr_clean


def compare(runs: list[Path], rules: list[str], aux_seeds: list[int], per_class: int, device: str,
            out: Path | None) -> list[dict]:
    configs = {spec: parse_rule(spec) for spec in rules}
    rows: list[dict] = []
    sink = out.open("a") if out else None
    data = load_dataset("fmnist")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in aux_seeds:
            aux = Path(tmp) / f"aux-{seed}"
            manifest = export_aux("fmnist", per_class, aux, seed=seed)
            keep = torch.ones(len(data.test), dtype=torch.bool)
            keep[torch.tensor(manifest["indices"])] = False
            disjoint = Split(data.test.images[keep], data.test.labels[keep])
            for run in runs:
                final, init = run / "final.safetensors", run / "init.safetensors"
                ckpt = load_checkpoint(final)
                acc0, asr0, floor0 = score(final, None, disjoint, data, device)
                for spec, config in configs.items():
                    outcome = defend_checkpoint(final, init, aux, config, seed=seed, device=device)
                    acc, asr, floor = score(outcome.state, ckpt, disjoint, data, device)
                    d = outcome.meta["defense"]
                    row = {"run": str(run), "aux_seed": seed, "per_class": per_class, "rule": spec,
                           "config": config.record(), "flipped": d["flipped"], "of": d["of"], "acc0": acc0,
                           "asr0": asr0, "floor0": floor0, "acc": acc, "asr": asr, "floor": floor,
                           "dacc": acc - acc0, "n_test": len(disjoint)}
                    rows.append(row)
                    print(f"{run.name} aux{seed} [{spec}]: {d['flipped']} flipped, "
                          f"dACC {100 * (acc - acc0):+.2f}, ASR {asr:.3f} (no trigger {floor:.3f}, "
                          f"before the defense {floor0:.3f})", flush=True)
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
    parser.add_argument("--rule", dest="rules", action="append", required=True)
    parser.add_argument("--aux-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = compare(args.runs, args.rules, args.aux_seeds, args.per_class, args.device, args.out)
    print("\n" + summary(rows, args.rules))


if __name__ == "__main__":
    sys.exit(main())
