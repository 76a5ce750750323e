"""`flain inspect`: what a checkpoint file is, and which built-in architecture it fits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..catalog import ARCHITECTURES
from .common import JsonOpt
from .output import out, print_json, print_notes

MAX_ROWS = 40


def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A checkpoint: safetensors, torch.save state dict "
                                                              "(.pt/.pth/.bin) or .npz array list.",
                                         show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Describe a checkpoint: format, tensors, metadata, the built-in architectures it fits, candidate layers."""
    from ..inspection import inspect_checkpoint

    found = inspect_checkpoint(file)
    if as_json:
        print_json(found.record())
        return
    print_notes(found.notes)
    about = f"flain-cli metadata (role {found.meta.get('role')})" if found.meta else "no flain-cli metadata"
    out.print(f"{file}: {found.format}, {found.size:,} bytes, sha256 {found.sha256[:16]}..., "
              f"{len(found.tensors)} tensors, {about}")
    tensors = Table(title="tensors")
    for column in ("name", "shape", "dtype"):
        tensors.add_column(column)
    rows = found.tensors
    if len(rows) > MAX_ROWS:
        rows = rows[:MAX_ROWS // 2] + rows[-MAX_ROWS // 2:]
    for i, t in enumerate(rows):
        if len(found.tensors) > MAX_ROWS and i == MAX_ROWS // 2:
            tensors.add_row("...", f"({len(found.tensors) - MAX_ROWS} more)", "")
        tensors.add_row(t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"])
    out.print(tensors)
    if not found.matches:
        out.print("fits no built-in architecture; 2-D weight tensors (Linear-like layers): "
                  + (", ".join(found.linear_like) or "none"))
        return
    matches = Table(title="built-in architectures it fits (pass --arch NAME with --dataset to eval/scan/defend)")
    for column in ("--arch", "classes", "Linear layers (in -> out; * = defended by default)", "how"):
        matches.add_column(column)
    for m in found.matches:
        layers = ", ".join(f"{x['name']}{'*' if x['defended'] else ''} {x['in_features']}->{x['out_features']}"
                           for x in m.linear_layers)
        matches.add_row(m.arch, str(m.num_classes), layers, "; ".join(m.notes) or "as is")
    out.print(matches)
    names = [m.arch for m in found.matches]
    if len(names) > 1:
        out.print("several architectures hold the same tensors; they differ in what the tensors do not show: "
                  + "; ".join(f"{n}: {ARCHITECTURES.get(n).description}" for n in names))
