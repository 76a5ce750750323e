"""`flain scan`: mean activation of every input neuron of the defended layer on the aux set."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..files import FilePlan
from ..settings import DEFAULT
from ..tables import means_csv
from . import common
from .common import SourceOptions, with_model_source
from .output import err, out, print_json, print_notes

if TYPE_CHECKING:
    import torch


def histogram_rows(values: torch.Tensor, bins: int = 12, width: int = 40) -> list[tuple[str, int, str]]:
    """(range label, count, bar) for a terminal histogram."""
    import torch

    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return [(f"{lo:.4f}", len(values), "#" * width)]
    counts = torch.histc(values.double(), bins=bins, min=lo, max=hi).long().tolist()
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    top = max(counts)
    return [(f"{edges[i]:.4f} - {edges[i + 1]:.4f}", c, "#" * round(width * c / top)) for i, c in enumerate(counts)]


@with_model_source
def scan(
    model: common.ModelArg,
    aux: common.AuxOpt,
    layer: common.LayerOpt = None,
    lowest: Annotated[int, typer.Option(min=1, help="How many of the least active neurons to list.")] = 10,
    csv: Annotated[Path | None, typer.Option(help="Write 'neuron,mean' for every neuron to this CSV file.",
                                             show_default=False)] = None,
    shifts: common.ShiftsOpt = DEFAULT.shifts,
    *,
    source: SourceOptions,
    device: common.DeviceOpt = "cpu",
    force: common.ForceOpt = False,
    as_json: common.JsonOpt = False,
) -> None:
    """Print the mean activation of each input neuron of a Linear layer over the aux set."""
    import torch

    from ..audit import scan_checkpoint

    torch_device = common.resolve_device(device)
    with FilePlan({"MODEL": model, "--aux": aux} | source.inputs(), {"--csv": csv}, force=force).writing() as stage:
        res = scan_checkpoint(model, aux, layer=layer, source=source.build(), shifts=shifts, device=torch_device)
        means = res.means
        if csv is not None:
            stage["--csv"].write_text(means_csv(means))
    print_notes(res.notes)
    for warning in res.warnings:
        err.print(f"warning: {warning}", soft_wrap=True)
    summary = {"model": str(model), "layer": res.layer, "neurons": int(means.numel()), "n_aux": res.n_aux,
               "aux_acc": res.aux_acc, "min": float(means.min()), "median": float(means.median()),
               "max": float(means.max()), "zeros": int((means == 0).sum()), "shifts": shifts, "notes": list(res.notes),
               "warnings": list(res.warnings)}
    if as_json:
        print_json(summary | {"means": means.tolist()})
        return
    moved = f" and their moved copies (shifts {shifts})" if shifts else ""
    table = Table(title=f"flain scan {model}: inputs of {res.layer} over {res.n_aux} aux images{moved}")
    for column in ("neurons", "min", "median", "max", "exactly 0", "aux accuracy"):
        table.add_column(column, justify="right")
    table.add_row(str(summary["neurons"]), f"{summary['min']:.4f}", f"{summary['median']:.4f}",
                  f"{summary['max']:.4f}", str(summary["zeros"]), f"{res.aux_acc:.4f}")
    out.print(table)
    hist = Table(title="mean activation histogram")
    hist.add_column("mean activation", justify="right")
    hist.add_column("neurons", justify="right")
    hist.add_column("", no_wrap=True)
    for label, count, bar in histogram_rows(means):
        hist.add_row(label, str(count), bar)
    out.print(hist)
    low = Table(title=f"{min(lowest, means.numel())} least active neurons")
    low.add_column("neuron", justify="right")
    low.add_column("mean activation", justify="right")
    values, order = torch.sort(means, stable=True)
    for i, v in zip(order[:lowest].tolist(), values[:lowest].tolist()):
        low.add_row(str(i), f"{v:.6f}")
    out.print(low)
