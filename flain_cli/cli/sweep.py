"""`flain sweep`: ACC and ASR at every threshold of the search (a diagnostic that reads test labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..catalog import METHODS
from ..files import FilePlan
from ..settings import PAPER_STEP
from ..tables import sweep_csv
from .common import (
    ArchOpt,
    AuxOpt,
    ClassNamesOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    MeanOpt,
    ModelArg,
    ModelDefOpt,
    ShiftsOpt,
    StdOpt,
    StrictOpt,
    fmt,
    model_source,
    out,
    print_json,
    resolve_device,
)


def sweep(
    model: ModelArg,
    init: Annotated[Path, typer.Option(help="The initial checkpoint W0 of the same run (init.safetensors).",
                                       show_default=False)],
    aux: AuxOpt,
    method: Annotated[str, typer.Option(help=f"{'|'.join(METHODS.names())}.")] = "flain",
    step: Annotated[float, typer.Option(help="Threshold step, as in `defend`.")] = PAPER_STEP,
    points: Annotated[int, typer.Option(min=1, max=100_000, help="Thresholds to score: mu, mu + step, ...")] = 25,
    shifts: ShiftsOpt = 0,
    layer: LayerOpt = None,
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    strict: StrictOpt = True,
    model_def: ModelDefOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    class_names: ClassNamesOpt = None,
    data_dir: DataDirOpt = None,
    test: Annotated[Path | None, typer.Option(
        help="Score on this file (.safetensors/.npz with images and labels) instead of the dataset's test split.",
        show_default=False)] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the curve as CSV.", show_default=False)] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score the model that `defend` would write at each threshold: aux accuracy, test ACC, ASR, and the ASR
    without trigger. A diagnostic for whoever holds labelled test data: it shows whether any threshold
    removes the backdoor and what it costs, and where the paper's stopping rule lands."""
    from ..modeldef import model_def_file
    from ..sweep import sweep_checkpoint

    torch_device = resolve_device(device)
    source = model_source(arch, dataset, model_def, strict, mean, std, class_names)
    plan = FilePlan({"MODEL": model, "--init": init, "--aux": aux, "--test": test, "--data-dir": data_dir,
                     "--model-def": model_def_file(model_def),
                     "--class-names": class_names},
                    {"--csv": csv}, force=force)
    with plan.writing() as stage:
        res = sweep_checkpoint(model, init, aux, method=method, step=step, points=points, layer=layer,
                               source=source, data_dir=data_dir, test_file=test, shifts=shifts,
                               device=torch_device)
        rows = [{"lambda": p.lam, "changed": p.changed, "aux_acc": p.aux_acc, "acc": p.acc, "asr": p.asr,
                 "asr_clean": p.asr_clean} for p in res.points]
        if csv is not None:
            stage["--csv"].write_text(sweep_csv(rows))
    if as_json:
        print_json({"model": str(model), "layer": res.layer, "method": method, "step": step, "of": res.of,
                    "attack": res.attack, "n_aux": res.n_aux, "n_test": res.n_test, "shifts": shifts,
                    "points": rows})
        return
    table = Table(title=f"flain sweep {model}: {method} on {res.layer} ({res.of} inputs), step {step}"
                        f"{f', shifts {shifts}' if shifts else ''}; "
                        f"{res.n_aux} aux images, {res.n_test} test images, attack {res.attack or 'none known'}")
    for column in ("lambda", "neurons changed", "aux acc", "ACC", "ASR", "ASR without trigger"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row("(unchanged)" if r["lambda"] is None else f"{r['lambda']:.6f}", str(r["changed"]),
                      fmt(r["aux_acc"]), fmt(r["acc"]), fmt(r["asr"]), fmt(r["asr_clean"]))
    out.print(table)
