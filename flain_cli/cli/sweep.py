"""`flain sweep`: ACC and ASR at every threshold of the search (a diagnostic that reads test labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..catalog import METHODS
from ..files import FilePlan
from ..settings import DEFAULT, defense_config
from ..tables import sweep_csv
from .common import (
    ESSENTIALS,
    AuxOpt,
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    ModelArg,
    ShiftsOpt,
    SourceOptions,
    resolve_device,
    with_model_source,
)
from .output import fmt, out, print_json


@with_model_source
def sweep(
    model: ModelArg,
    init: Annotated[Path, typer.Option(help="The initial checkpoint W0 of the same run (init.safetensors).",
                                       show_default=False, rich_help_panel=ESSENTIALS)],
    aux: AuxOpt,
    method: Annotated[str, typer.Option(help=f"{'|'.join(METHODS.names())}, as in `defend`.")] = DEFAULT.method,
    step: Annotated[float, typer.Option(help="Threshold step, as in `defend`.")] = DEFAULT.step,
    points: Annotated[int, typer.Option(min=1, max=100_000, help="Thresholds to score: mu, mu + step, ...")] = 25,
    shifts: ShiftsOpt = DEFAULT.shifts,
    rescale: Annotated[bool, typer.Option(
        "--rescale/--no-rescale", help="Scale the flipped layer back to its original norm, as `defend` does.")
    ] = DEFAULT.rescale,
    layer: LayerOpt = None,
    data_dir: DataDirOpt = None,
    test: Annotated[Path | None, typer.Option(
        help="Score on this file (.safetensors/.npz with images and labels) instead of the dataset's test split.",
        show_default=False)] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the curve as CSV.", show_default=False)] = None,
    *,
    source: SourceOptions,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score the model that `defend` would write at each threshold: aux accuracy, test ACC, ASR, and the ASR
    without trigger. A diagnostic for whoever holds labelled test data: it shows whether any threshold
    removes the backdoor and what it costs, and where the paper's stopping rule lands."""
    from ..sweep import sweep_checkpoint

    config = defense_config(method=method, step=step, shifts=shifts, rescale=rescale)
    torch_device = resolve_device(device)
    plan = FilePlan({"MODEL": model, "--init": init, "--aux": aux, "--test": test, "--data-dir": data_dir}
                    | source.inputs(), {"--csv": csv}, force=force)
    with plan.writing() as stage:
        res = sweep_checkpoint(model, init, aux, config, points=points, layer=layer, source=source.build(),
                               data_dir=data_dir, test_file=test, device=torch_device)
        rows = [{"lambda": p.lam, "changed": p.changed, "aux_acc": p.aux_acc, "acc": p.acc, "asr": p.asr,
                 "asr_clean": p.asr_clean} for p in res.points]
        if csv is not None:
            stage["--csv"].write_text(sweep_csv(rows))
    if as_json:
        print_json({"model": str(model), "layer": res.layer, "method": method, "step": step, "of": res.of,
                    "attack": res.attack, "n_aux": res.n_aux, "n_test": res.n_test, "shifts": shifts,
                    "rescale": config.rescale, "points": rows})
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
