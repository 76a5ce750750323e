"""`flain aux export`: write a class-balanced aux folder from a dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..catalog import DATASETS
from ..errors import ConfigError
from ..files import FilePlan
from .common import DataDirOpt, ForceOpt, JsonOpt, SeedOpt
from .output import out, print_json


class ExportFormat(str, Enum):
    folder = "folder"
    npz = "npz"


app = typer.Typer(help="Make auxiliary (clean) sets for scan and defend.", no_args_is_help=True)


def export(
    dataset: Annotated[str, typer.Option(help=f"Dataset: {'|'.join(DATASETS.names())}.")] = "fmnist",
    per_class: Annotated[int, typer.Option(
        help="Images per class (the paper: 20 for MNIST/FMNIST, 60 for CIFAR-10).")] = 20,
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Folder to create: OUT/<class>/<image>.png and OUT/aux.json.")] = Path("aux"),
    split: Annotated[str, typer.Option(help="Draw from the train or test split.")] = "test",
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="folder (OUT/<class>/*.png) or npz (one file, OUT.npz; .npz is added when missing).")
    ] = ExportFormat.folder,
    exclude: Annotated[Path | None, typer.Option(
        help="Never draw the images of this earlier export (folder with aux.json, or .npz), e.g. to keep a "
             "test subset disjoint from an aux set.", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a class-balanced, seeded aux folder (PNG) drawn from a dataset split."""
    from ..auxdata import export_aux, export_path, exported_indices

    out_dir = export_path(out_dir, fmt.value)
    plan = FilePlan({"--data-dir": data_dir, "--exclude": exclude}, {"--out": out_dir}, force=force,
                    folders=("--out",) if fmt is ExportFormat.folder else ())
    plan.check()
    if force and out_dir.is_dir() and not (out_dir / "aux.json").is_file():
        raise ConfigError(f"--out {out_dir} is a folder that `flain aux export` did not write (it has no aux.json); "
                          "--force replaces only an earlier aux set: choose another path")
    with plan.writing() as stage:
        manifest = export_aux(dataset, per_class, stage["--out"], split=split, seed=seed, data_dir=data_dir,
                              fmt=fmt.value,
                              exclude=exported_indices(exclude) if exclude else None)
    summary = {k: v for k, v in manifest.items() if k != "indices"} | {"out": str(out_dir)}
    if as_json:
        print_json(summary)
        return
    out.print(f"wrote {manifest['count']} images ({per_class} per class, {split} split, seed {seed}) to {out_dir}")
