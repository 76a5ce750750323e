"""Where FLAIN's accuracy goes: one trained model, one post-training factor changed at a time.

    .venv/bin/python experiments/ablation.py RUN_DIR [--aux-sizes 20 80 200] [--out ablation.json]

RUN_DIR holds a `flain train` run's init.safetensors and final.safetensors (Fashion-MNIST). For
each aux size (images per class, drawn from the test split with seed 0 by `export_aux`), every
defense setting below runs through `defend_checkpoint`, as `flain defend` does, and the defended
model is scored on the test images *not* in that aux set (ACC) and on the triggered source-class
images among them (ASR). Prints a Markdown table; `--out` keeps the rows as JSON.
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
from flain_cli.checkpoint import build_from, load_checkpoint, resolve_model_meta, save_checkpoint
from flain_cli.datasets import Split, load_dataset
from flain_cli.evaluation import resolve_attack
from flain_cli.metrics import evaluate
from flain_cli.settings import PRESETS
from flain_cli.triggers import make_trigger

PAPER, DEFAULT = PRESETS["paper"], PRESETS["default"]
# (label, config): the paper's Algorithm 1, then one factor at a time, then the default rule
VARIANTS = [
    ("paper: step 0.001, rho 0.03, crossing, rescale", PAPER),
    ("no rescale", dataclasses.replace(PAPER, rescale=False)),
    ("select last-safe", dataclasses.replace(PAPER, select="last-safe")),
    ("rho 0.01", dataclasses.replace(PAPER, rho=0.01)),
    ("rho 0", dataclasses.replace(PAPER, rho=0.0)),
    ("step 0.0001, rho 0.024 (reference code's FMNIST)", dataclasses.replace(PAPER, step=0.0001, rho=0.024)),
    ("holdout 0.5", dataclasses.replace(PAPER, holdout=0.5)),
    ("default rule: paper + distillation repair", DEFAULT),
    ("default rule, rho 0.01", dataclasses.replace(DEFAULT, rho=0.01)),
]


def score(path: Path, test: Split, dataset: str, device: str = "cpu") -> tuple[float, float]:
    ckpt = load_checkpoint(path)
    meta = resolve_model_meta(ckpt)
    attack = resolve_attack(ckpt, meta.num_classes)
    data = load_dataset(dataset)
    trigger = make_trigger(attack.trigger, *data.spec.shape[1:])
    res = evaluate(build_from(ckpt, meta).to(device), test, data.spec, attack.task, trigger, device=device)
    return res.acc, res.asr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--aux-sizes", type=int, nargs="+", default=[20, 80, 200], help="aux images per class")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    final, init = args.run / "final.safetensors", args.run / "init.safetensors"
    dataset = load_checkpoint(final).meta["dataset"]
    test = load_dataset(dataset).test
    rows = []
    print("| aux | setting | flipped | aux acc before -> after | ACC (disjoint test) | ASR |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for per_class in args.aux_sizes:
            aux = Path(tmp) / f"aux{per_class}"
            manifest = export_aux(dataset, per_class, aux, seed=0)
            keep = torch.ones(len(test), dtype=torch.bool)
            keep[torch.tensor(manifest["indices"])] = False
            disjoint = Split(test.images[keep], test.labels[keep])
            acc0, asr0 = score(final, disjoint, dataset, args.device)
            n = manifest["count"]
            print(f"| {n} | no defense | 0 | | {acc0:.4f} | {asr0:.3f} |", flush=True)
            rows.append({"aux": n, "setting": "none", "acc": acc0, "asr": asr0, "n_test": len(disjoint)})
            for label, config in VARIANTS:
                outcome = defend_checkpoint(final, init, aux, config, device=args.device)
                path = Path(tmp) / "defended.safetensors"
                save_checkpoint(path, outcome.state, outcome.meta)
                acc, asr = score(path, disjoint, dataset, args.device)
                d = outcome.meta["defense"]
                print(f"| {n} | {label} | {d['flipped']} | {d['aux_acc_before']:.3f} -> {d['aux_acc_after']:.3f} | "
                      f"{acc:.4f} ({100 * (acc - acc0):+.1f}) | {asr:.3f} |", flush=True)
                rows.append({"aux": n, "setting": label, "config": config.record(), "flipped": d["flipped"],
                             "aux_acc_before": d["aux_acc_before"], "aux_acc_after": d["aux_acc_after"],
                             "acc": acc, "asr": asr, "n_test": len(disjoint)})
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
