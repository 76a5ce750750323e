"""`flain experiment --ray`: a grid's trainings as Ray tasks, on this machine or a Ray cluster.

Each distinct training of the grid is one task: it trains into the shared cache (or finds it
there) and applies every defense of its cells, exactly as `experiment.run_experiment` does, through
the same functions, locks and records; the driver writes the results as tasks finish. A grid is
therefore resumed and shared as before: a second run, with Ray or without, reuses what is cached.

On a cluster every node must see the grid's ``out`` and ``cache`` folders and the dataset at the
same paths (a shared file system); paths are made absolute before they are sent. Ray comes with
the 'flower' extra (``pip install 'flain-cli[flower]'``, or ``bash scripts/setup.sh --flower``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .events import ExperimentListener
from .experiment import Cell, Defense, Experiment, attempt_cell, start_results, write_results


def _cells_task(exp: Experiment, items: list[tuple[dict[str, Any], Defense]], device: str,
                data_dir: Path | None, threads: int) -> list[Cell]:
    """In a Ray worker: the cells of one training, in grid order (the first one trains, the others reuse it)."""
    torch.set_num_threads(threads)
    cells = []
    for point, defense in items:
        cell = Cell(point, defense.label)
        attempt_cell(exp, cell, defense, device, data_dir, {}, ExperimentListener(), wait=True)
        cells.append(cell)
    return cells


def run_experiment_ray(exp: Experiment, *, address: str = "local", device: torch.device | str = "cpu",
                       data_dir: Path | None = None, listener: ExperimentListener | None = None,
                       cpus: int = 1, gpus: float = 0.0) -> list[Cell]:
    """`experiment.run_experiment` with one Ray task per distinct training of the grid.

    Args:
        exp: the grid (`experiment.load_experiment`).
        address: ``local`` starts a Ray instance on this machine (stopped at the end); ``auto`` or
            ``ray://HOST:PORT`` joins a running cluster.
        device, data_dir: as for `run_experiment`; ``cpus``/``gpus``: what each task reserves (its
            torch threads are ``cpus``).

    Returns the cells in grid order, as `run_experiment` does; the results files are rewritten as
    each task finishes. Example: ``run_experiment_ray(load_experiment(Path("grid.toml")), cpus=1)``.
    """
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("needs Ray: bash scripts/setup.sh --flower, or pip install 'flain-cli[flower]'",
                          param="ray")
    if cpus < 1:
        raise ConfigError(f"must be at least 1, got {cpus}", param="ray_cpus")
    import ray

    listener = listener or ExperimentListener()
    exp = dataclasses.replace(exp, out=exp.out.resolve(), cache=exp.cache.resolve())  # the same on every node
    data_dir = data_dir.resolve() if data_dir is not None else None
    start_results(exp)
    pairs = [(point, defense) for point in exp.points() for defense in exp.defenses]  # the cells, in grid order
    cells = [Cell(point, defense.label, "busy", error="queued on Ray") for point, defense in pairs]
    groups: dict[Path, list[int]] = {}  # training (its run folder) -> the indices of its cells
    for i, (point, defense) in enumerate(pairs):
        groups.setdefault(exp.run_dir(exp.config(point, defense.aggregator)), []).append(i)
    started = not ray.is_initialized()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default, without its warning
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_cells_task)
        pending = {task.remote(exp, [pairs[i] for i in indices], str(device), data_dir, cpus): indices
                   for indices in groups.values()}
        write_results(exp, cells)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            indices = pending.pop(done[0])
            try:
                finished = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its cells, not the grid
                finished = [Cell(cells[i].point, cells[i].defense, "failed", error=f"the Ray task failed: {exc}")
                            for i in indices]
            for i, cell in zip(indices, finished):
                cells[i] = cell
                listener.cell(", ".join(f"{k}={v}" for k, v in cell.point.items()) + f", {cell.defense}",
                              cell.status)
            write_results(exp, cells)
    finally:
        if started:
            ray.shutdown()
    return cells


def check_address(address: str) -> str:
    """``local``, ``auto`` or ``ray://HOST:PORT``, or a clear error."""
    if address in ("local", "auto") or address.startswith("ray://"):
        return address
    raise ConfigError(f"must be local (a new Ray instance here), auto (the running cluster) or ray://HOST:PORT, got "
                      f"{address!r} (docs/scale.md)", param="ray")
