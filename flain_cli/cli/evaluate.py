"""`flain eval`: clean accuracy (ACC), attack success rates (ASR), robust accuracy (RA) and, against a
reference, the defense effectiveness rating (DER), of one checkpoint or many."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from ..files import FilePlan
from ..tables import results_csv
from .common import (
    ESSENTIALS,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    SourceOptions,
    resolve_device,
    with_model_source,
)
from .output import err, fmt, out, print_json, print_notes

if TYPE_CHECKING:
    from ..evaluation import CheckpointEval

TRIGGER = "The attack measured (default: the checkpoint's)"


@with_model_source
def evaluate_command(
    models: Annotated[list[Path], typer.Argument(
        metavar="MODEL...", help="Checkpoints to measure, one after another on one test set.", show_default=False)],
    reference: Annotated[Path | None, typer.Option(
        help="A model to compare with (typically the one before the defense): adds each model's ACC and ASR "
             "change against it and the DER.", show_default=False, rich_help_panel=ESSENTIALS)] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the table as CSV (one row per model).",
                                             show_default=False, rich_help_panel=ESSENTIALS)] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Also print each model's per-class accuracy.",
                                            rich_help_panel=ESSENTIALS)] = False,
    data_dir: DataDirOpt = None,
    test: Annotated[Path | None, typer.Option(
        help="Evaluate on this file (.safetensors/.npz with images and labels) instead of the dataset's test split.",
        show_default=False)] = None,
    attack: Annotated[str | None, typer.Option(
        help="Attack task SRC:TGT or all:TGT to measure; 'none' skips the ASRs.", show_default=False,
        rich_help_panel=TRIGGER)] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger to measure (a built-in name).", show_default=False,
                                                rich_help_panel=TRIGGER)] = None,
    trigger_alpha: Annotated[float | None, typer.Option(
        help="blend: the pattern's weight.", show_default=False, rich_help_panel=TRIGGER)] = None,
    trigger_pos: Annotated[str | None, typer.Option(
        metavar="ROW,COL", help="checker: its top-left pixel.", show_default=False, rich_help_panel=TRIGGER)] = None,
    trigger_image: Annotated[Path | None, typer.Option(
        help="A trigger you suspect: a PNG of the model's input size whose non-transparent pixels are stamped (or "
             "use --trigger-mask); with --trigger blend, blended over the whole input instead. Needs --attack.",
        show_default=False, rich_help_panel=TRIGGER)] = None,
    trigger_mask: Annotated[Path | None, typer.Option(
        help="With --trigger-image: a PNG whose non-zero pixels say where the trigger is.", show_default=False,
        rich_help_panel=TRIGGER)] = None,
    *,
    source: SourceOptions,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Report clean accuracy (ACC), the attack's success (ASR of the source class, and over every non-target
    class as BackdoorBench counts it), robust accuracy (RA) and, with --reference, the change and DER."""
    from ..evaluation import evaluate_checkpoints

    inputs: dict[str, Path | None] = {f"MODEL {i + 1}": m for i, m in enumerate(models)}
    inputs |= {"--reference": reference, "--test": test, "--data-dir": data_dir, "--trigger-image": trigger_image,
               "--trigger-mask": trigger_mask} | source.inputs()
    with FilePlan(inputs, {"--csv": csv}, force=force).writing() as stage:
        reports = evaluate_checkpoints(models, reference=reference, source=source.build(), data_dir=data_dir,
                                       attack=attack, trigger=trigger, trigger_alpha=trigger_alpha,
                                       trigger_pos=trigger_pos, device=resolve_device(device), test_file=test,
                                       trigger_image=trigger_image, trigger_mask=trigger_mask)
        records = [r.record() for r in reports]
        if csv is not None:
            stage["--csv"].write_text(results_csv([_flat(r) for r in records]))
    for report in reports:
        print_notes(f"{report.path}: {note}" if len(reports) > 1 else note for note in report.notes)
    if as_json:
        print_json(records[0] if len(records) == 1 else records)
        return
    out.print(_table(reports))
    for report in reports:
        if report.attack and report.result.asr is None:
            err.print(f"note: {report.path}: ASR not measured, the test set holds no image of the source class",
                      soft_wrap=True)
    if per_class:
        for report in reports:
            out.print(_per_class(report))


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: the per-class accuracies as columns of their own, the notes joined."""
    row = {k: v for k, v in record.items() if k not in ("per_class_acc", "notes")}
    row |= {f"acc_class_{c}": v for c, v in enumerate(record["per_class_acc"])}
    return row | {"notes": "; ".join(record["notes"])}



LABEL_WIDTH = 24  # the model column at 80 terminal columns


def model_label(name: str, width: int = LABEL_WIDTH) -> str:
    """A file name for the table: without .safetensors, and cut in the middle when long, so that names that
    differ only at their end (final, final.flain-paper...) stay apart."""
    name = name.removesuffix(".safetensors")
    if len(name) <= width:
        return name
    head = (width - 1) // 2 - 1
    return f"{name[:head]}…{name[len(name) - (width - 1 - head):]}"


def _table(reports: list[CheckpointEval]) -> Table:
    referenced = any(r.reference is not None for r in reports)
    first = reports[0]
    title = f"flain eval: {first.result.n_clean} test images"
    several_attacks = len({(str(r.attack.task), r.attack.label) if r.attack else None for r in reports}) > 1
    if not several_attacks and first.attack:
        title += f", attack {first.attack.task} with {first.attack.label}"
    if referenced:
        title += f"; changes against {first.reference_path}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)  # 80 columns hold it
    table.add_column("model", no_wrap=True, overflow="ellipsis", max_width=LABEL_WIDTH)  # the whole path: JSON, CSV
    if several_attacks:
        table.add_column("attack")
    for column, width in (("ACC", 6), ("ASR", 5), ("ASR all", 7), ("RA", 5), ("floor", 5)) + (
            (("dACC", 5), ("DER", 5)) if referenced else ()):
        table.add_column(column, justify="right", no_wrap=True, width=width)
    for r in reports:
        res, record = r.result, r.record()
        label = [f"{r.attack.task} {r.attack.label}" if r.attack else "none"] if several_attacks else []
        changes = ([f"{100 * record['d_acc']:+.2f}", fmt(record["der"], 3)] if r.reference is not None
                   else ["", ""] if referenced else [])
        table.add_row(model_label(r.path.name if r.path else ""), *label, fmt(res.acc), fmt(res.asr, 3),
                      fmt(res.asr_all, 3), fmt(res.ra, 3), fmt(res.asr_clean, 3), *changes)
    table.caption = ("ASR: triggered source-class images taken for the target (the paper's); ASR all: every "
                     "triggered non-target image (BackdoorBench's); RA: those taken for their true class; floor: "
                     "the source images without trigger taken for the target" + (
                         "; dACC in points, DER = [max(0, dASR) - max(0, dACC) + 1] / 2" if referenced else ""))
    return table


def _per_class(report: CheckpointEval) -> Table:
    meta = report.meta
    names = meta.class_names or [str(c) for c in range(meta.num_classes)]
    table = Table(title=f"per-class accuracy: {report.path}")
    table.add_column("class", justify="right")
    table.add_column("name")
    table.add_column("accuracy", justify="right")
    for c, acc in enumerate(report.result.per_class_acc):
        table.add_row(str(c), names[c] if c < len(names) else "", fmt(acc))
    return table
