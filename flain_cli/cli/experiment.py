"""`flain experiment`: a grid of attacks and defenses from a TOML file, cached and resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import FlainError
from ..events import ExperimentListener, RoundLog
from ..files import FilePlan
from ..settings import MAX_POINTS
from .common import DataDirOpt, DeviceOpt, JsonOpt, as_interrupt, interrupt_code, interrupt_name, resolve_device
from .output import err, out, print_json


class _RichListener(ExperimentListener):
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.cells = progress.add_task("cells", total=total)
        self.rounds = progress.add_task("training", total=None, visible=False)

    def resumed(self, history: list[RoundLog]) -> None:
        self.progress.console.print(f"  resuming an interrupted training after round {len(history)}")

    def round_start(self, rnd: int, sampled: list[int]) -> None:
        self.progress.update(self.rounds, visible=True, description=f"training round {rnd}")

    def round_end(self, log: RoundLog) -> None:
        self.progress.console.print(f"  round {log.round}: acc {log.acc if log.acc is None else round(log.acc, 4)} "
                                    f"asr {log.asr if log.asr is None else round(log.asr, 4)} ({log.seconds:.0f} s)")

    def waiting(self, label: str, reason: str) -> None:
        self.progress.console.print(f"  later: {label} ({reason})", markup=False)

    def cell(self, label: str, status: str) -> None:
        self.progress.update(self.rounds, visible=False)
        self.progress.advance(self.cells)
        self.progress.console.print(f"{status:>6}: {label}")


def experiment(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="Experiment grid (see experiments/).",
                                           show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the results (default: the file's `out`, else runs/experiments/NAME); "
                      "also for the trainings when no cache is set.",
        show_default=False)] = None,
    cache: Annotated[Path | None, typer.Option(
        help="Folder for the trainings (train-<hash>/), which experiments may share (default: the file's "
             "`cache`, else --out).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and trainings, run nothing.")] = False,
    max_points: Annotated[int, typer.Option(
        min=1, help="Refuse a grid of more points than this (each point is one or two trainings); raise it to "
                    "confirm a larger grid.")] = MAX_POINTS,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "cpu",
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS", help="Run each training of the grid (with its defenses) as a Ray task: local (a "
        "new Ray instance on this machine), auto (the running cluster) or ray://HOST:PORT. Every node must see "
        "--out, the cache and the data at the same paths. Needs the 'flower' extra (docs/scale.md).",
        show_default=False)] = None,
    ray_cpus: Annotated[int, typer.Option(min=1, help="With --ray: CPUs (and torch threads) each task takes.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Train each configuration of a grid once, apply every defense, and tabulate ACC and ASR."""
    from ..experiment import load_experiment, markdown_table, result_paths, run_experiment
    from ..rayrun import check_address, run_experiment_ray

    address = check_address(ray) if ray is not None else None
    exp = load_experiment(config, out_dir, cache, max_points=max_points)
    # both folders are added to as the grid runs (and resumed), so they may exist: no --force here
    FilePlan({"CONFIG.toml": config, "--data-dir": data_dir},
             {"--out": exp.out, "--cache": None if exp.cache == exp.out else exp.cache},
             force=True, folders=("--out", "--cache")).check()
    points = exp.points()
    defenses = exp.defenses
    total = len(points) * len(defenses)
    if dry_run:
        trainings = {exp.config(p, d.aggregator) for p in points for d in defenses}
        cached = sum(exp.trained(cfg) for cfg in trainings)
        plan = {"name": exp.name, "out": str(exp.out), "cache": str(exp.cache), "cells": total,
                "trainings": len(trainings), "cached_trainings": cached,
                "points": points, "defenses": [d.label for d in defenses]}
        if as_json:
            print_json(plan)
        else:
            out.print(f"{exp.name}: {len(points)} grid points x {len(defenses)} defenses = {total} cells, "
                      f"{len(trainings)} trainings ({cached} already in {exp.cache}/), results into {exp.out}/")
        return
    torch_device = resolve_device(device)
    try:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            listener = _RichListener(progress, total)
            if address is None:
                cells = run_experiment(exp, device=torch_device, data_dir=data_dir, listener=listener)
            else:
                cells = run_experiment_ray(exp, address=address, device=torch_device, data_dir=data_dir,
                                           listener=listener, cpus=ray_cpus,
                                           gpus=1.0 if torch_device.type == "cuda" else 0.0)
    except (KeyboardInterrupt, Exception) as caught:  # an interrupt, maybe wrapped on its way out
        exc = as_interrupt(caught)
        if exc is None:
            raise
        err.print(f"Interrupted ({interrupt_name(exc)}): finished cells and training rounds are kept; rerun the same "
                  "command to resume.")
        raise typer.Exit(interrupt_code(exc)) from None
    paths = result_paths(exp)
    failed = [c for c in cells if c.status == "failed"]
    if as_json:
        print_json({"name": exp.name, "results": {k: str(v) for k, v in paths.items()},
                    "rows": [c.row() for c in cells]})
    else:
        out.print(markdown_table(exp, cells), markup=False)
        out.print(f"results: {paths['md']}, {paths['csv']}, {paths['json']}")
    if failed:
        for cell in failed:
            err.print(f"failed: {cell.point} {cell.defense}: {cell.error}", markup=False)
        raise FlainError(f"{len(failed)} of {len(cells)} cells failed (listed above); the others are in "
                         f"{paths['json']}")
