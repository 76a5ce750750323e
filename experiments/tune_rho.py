"""How the stop rule's rho trades ACC for ASR, with and without the repair, over several aux draws.

    .venv/bin/python experiments/tune_rho.py RUN_DIR [RUN_DIR...] [--rhos 0.01 0.02 0.03] \
        [--aux-seeds 0 1 2] [--per-class 20] [--device cuda] [--out rows.jsonl]

Each RUN_DIR holds a `flain train` run's init.safetensors and final.safetensors (Fashion-MNIST).
For each aux draw (`export_aux` of the test split, seed S) and each rho, `defend_checkpoint` runs
the paper's search at that rho (step 0.001, crossing, rescale) without and with the default
repair, exactly as `flain defend --rho R [--preset paper]` does; the defended model is scored on
the test images *not* in that aux set. One JSON line per (run, draw, rho, rule) goes to --out;
a summary per rho (worst and mean over every run and draw) is printed at the end. Run it only on
trainings that are never reported: it is how a rho gets chosen.
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
from flain_cli.defense import PRESETS
from flain_cli.evaluation import resolve_attack
from flain_cli.metrics import evaluate
from flain_cli.triggers import make_trigger


def score(state_or_path, meta_ckpt, test: Split, data, device) -> tuple[float, float]:
    """ACC and ASR of a checkpoint (path) or of defended tensors with the original's metadata."""
    ckpt = load_checkpoint(state_or_path) if isinstance(state_or_path, Path) else meta_ckpt
    meta = resolve_model_meta(ckpt)
    attack = resolve_attack(ckpt, meta["num_classes"])
    model = build_from(ckpt, meta)
    if not isinstance(state_or_path, Path):
        model.load_state_dict(state_or_path)
    trigger = make_trigger(attack.trigger, *data.spec.shape[1:])
    res = evaluate(model.to(device), test, data.spec, attack.task, trigger, device=device)
    return res.acc, res.asr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.015, 0.02, 0.025, 0.03])
    parser.add_argument("--aux-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    sink = args.out.open("a") if args.out else None
    data = load_dataset("fmnist")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.aux_seeds:
            aux = Path(tmp) / f"aux-{seed}"
            manifest = export_aux("fmnist", args.per_class, aux, seed=seed)
            keep = torch.ones(len(data.test), dtype=torch.bool)
            keep[torch.tensor(manifest["indices"])] = False
            disjoint = Split(data.test.images[keep], data.test.labels[keep])
            for run in args.runs:
                final, init = run / "final.safetensors", run / "init.safetensors"
                ckpt = load_checkpoint(final)
                acc0, asr0 = score(final, None, disjoint, data, args.device)
                for rho in args.rhos:
                    for rule, preset in (("paper", PRESETS["paper"]), ("default", PRESETS["default"])):
                        config = dataclasses.replace(preset, rho=rho)
                        outcome = defend_checkpoint(final, init, aux, config, seed=seed, device=args.device)
                        acc, asr = score(outcome.state, ckpt, disjoint, data, args.device)
                        d = outcome.meta["defense"]
                        row = {"run": str(run), "aux_seed": seed, "rho": rho, "rule": rule,
                               "flipped": d["flipped"], "of": d["of"], "acc0": acc0, "asr0": asr0,
                               "acc": acc, "asr": asr, "dacc": acc - acc0, "n_test": len(disjoint)}
                        rows.append(row)
                        print(f"{run.name} aux{seed} rho {rho} {rule}: {d['flipped']} flipped, "
                              f"dACC {100 * (acc - acc0):+.2f}, ASR {asr:.3f}", flush=True)
                        if sink:
                            sink.write(json.dumps(row) + "\n")
                            sink.flush()
    print("\n| rule | rho | runs x draws | meets target (ASR <= 0.03, dACC >= -1) | worst dACC | mean dACC | "
          "worst ASR | mean ASR |")
    print("|---|---|---|---|---|---|---|---|")
    for rule in ("paper", "default"):
        for rho in args.rhos:
            sel = [r for r in rows if r["rule"] == rule and r["rho"] == rho]
            met = sum(r["asr"] <= 0.03 and r["dacc"] >= -0.01 for r in sel)
            print(f"| {rule} | {rho} | {len(sel)} | {met} | {100 * min(r['dacc'] for r in sel):+.2f} | "
                  f"{100 * sum(r['dacc'] for r in sel) / len(sel):+.2f} | {max(r['asr'] for r in sel):.3f} | "
                  f"{sum(r['asr'] for r in sel) / len(sel):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
