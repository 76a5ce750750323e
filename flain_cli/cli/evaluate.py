"""`flain eval`: clean accuracy (ACC) and attack success rate (ASR) of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import DataDirOpt, DeviceOpt, JsonOpt, ModelArg, SourceOptions, resolve_device, with_model_source
from .output import fmt, out, print_json, print_notes


@with_model_source
def evaluate_command(
    model: ModelArg,
    data_dir: DataDirOpt = None,
    attack: Annotated[str | None, typer.Option(
        help="Attack task SRC:TGT or all:TGT to measure (default: from the checkpoint); 'none' skips ASR.",
        show_default=False)] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger stamped for ASR (default: from the checkpoint).",
                                                show_default=False)] = None,
    trigger_image: Annotated[Path | None, typer.Option(
        help="Measure ASR for a trigger you suspect: a PNG of the model's input size whose non-transparent pixels "
             "are stamped (or use --trigger-mask); needs --attack SRC:TGT or all:TGT.", show_default=False)] = None,
    trigger_mask: Annotated[Path | None, typer.Option(
        help="With --trigger-image: a PNG whose non-zero pixels say where the trigger is.", show_default=False)] = None,
    test: Annotated[Path | None, typer.Option(
        help="Evaluate on this file (.safetensors/.npz with images and labels) instead of the dataset's test split.",
        show_default=False)] = None,
    *,
    source: SourceOptions,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Report clean accuracy (ACC) and attack success rate (ASR) on the test set."""
    from ..evaluation import evaluate_checkpoint

    report = evaluate_checkpoint(model, source=source.build(),
                                 data_dir=data_dir, attack=attack, trigger=trigger, device=resolve_device(device),
                                 test_file=test, trigger_image=trigger_image, trigger_mask=trigger_mask)
    print_notes(report.notes)
    res, meta, spec_attack = report.result, report.meta, report.attack
    summary = {"model": str(model), "acc": res.acc, "asr": res.asr, "asr_clean": res.asr_clean, "n_clean": res.n_clean,
               "n_triggered": res.n_triggered, "dataset": meta.dataset, "arch": meta.arch,
               "attack": str(spec_attack.task) if spec_attack else None,
               "trigger": spec_attack.trigger if spec_attack else None,
               "per_class_acc": list(res.per_class_acc), "notes": list(report.notes)}
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"flain eval {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("images", justify="right")
    table.add_row("ACC (clean test)", fmt(res.acc), str(res.n_clean))
    attack_label = f"ASR ({spec_attack.task}, {spec_attack.trigger})" if spec_attack else "ASR (no attack known)"
    if spec_attack and res.asr is None:
        attack_label += ": not measured, no source-class image in the test set"
    table.add_row(attack_label, fmt(res.asr), str(res.n_triggered))
    if spec_attack:
        table.add_row(f"  the same images without the trigger -> {spec_attack.task.target}", fmt(res.asr_clean),
                      str(res.n_triggered))
    out.print(table)
    names = meta.class_names or [str(c) for c in range(meta.num_classes)]
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class", justify="right")
    per_class.add_column("name")
    per_class.add_column("accuracy", justify="right")
    for c, acc in enumerate(res.per_class_acc):
        per_class.add_row(str(c), names[c] if c < len(names) else "", fmt(acc))
    out.print(per_class)
