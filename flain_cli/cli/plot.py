"""`flain plot`: PNG figures from the files train, defend, sweep, scan and experiment write (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..files import FilePlan
from ..plots import check_png, plot_activations, plot_grid, plot_sweep, plot_trace, plot_training
from .common import ForceOpt, JsonOpt
from .output import out, print_json

app = typer.Typer(help="Draw PNG figures (needs matplotlib, the optional 'plot' extra of flain-cli).",
                  no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", help="PNG file to write.", show_default=False)]
TitleOpt = Annotated[str | None, typer.Option(help="Figure title.", show_default=False)]


def _draw(inputs: dict[str, Path | None], out_path: Path, force: bool, as_json: bool,
          draw: Callable[[Path], object]) -> None:
    """Every plot command: its inputs and its PNG declared, ``draw(staged path)``, then say what was written."""
    with FilePlan(inputs, {"--out": check_png(out_path)}, force=force).writing() as stage:
        draw(stage["--out"])
    if as_json:
        print_json({"out": str(out_path)})
    else:
        out.print(f"wrote {out_path}")


def training(runs: Annotated[list[Path], typer.Argument(
                 metavar="RUN...", show_default=False,
                 help="Trainings to draw on one figure: `flain train --log` files (JSON lines), or the train.json "
                      "files of a `flain experiment` cache, or their train-*/ folders.")],
             out_path: OutOpt, title: TitleOpt = None,
             labels: Annotated[list[str] | None, typer.Option(
                 "--label", help="Legend name of each RUN, in order (repeat it; default: the file or folder name).",
                 show_default=False)] = None,
             force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """ACC and ASR per round, for one training or several side by side."""
    inputs: dict[str, Path | None] = {f"RUN {i + 1}": r / "train.json" if r.is_dir() else r
                                      for i, r in enumerate(runs)}
    _draw(inputs, out_path, force, as_json, lambda png: plot_training(runs, png, title, labels))


def trace(trace_csv: Annotated[Path, typer.Argument(metavar="TRACE.csv", help="A `flain defend --trace` file.",
                                                    show_default=False)],
          out_path: OutOpt, title: TitleOpt = None, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """The search curve: aux accuracy and neurons selected against the threshold lambda."""
    _draw({"TRACE.csv": trace_csv}, out_path, force, as_json, lambda png: plot_trace(trace_csv, png, title))


def sweep(sweep_csv: Annotated[Path, typer.Argument(metavar="SWEEP.csv", help="A `flain sweep --csv` file.",
                                                    show_default=False)],
          out_path: OutOpt, title: TitleOpt = None, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """ACC, ASR, ASR without trigger and aux accuracy against the threshold lambda."""
    _draw({"SWEEP.csv": sweep_csv}, out_path, force, as_json, lambda png: plot_sweep(sweep_csv, png, title))


def activations(means_csv: Annotated[Path, typer.Argument(metavar="MEANS.csv", help="A `flain scan --csv` file.",
                                                          show_default=False)],
                out_path: OutOpt, bins: Annotated[int, typer.Option(min=1, max=10_000, help="Histogram bins.")] = 60,
                title: TitleOpt = None, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Histogram of the mean activations of the defended layer's inputs."""
    _draw({"MEANS.csv": means_csv}, out_path, force, as_json,
          lambda png: plot_activations(means_csv, png, bins, title))


def grid(results: Annotated[Path, typer.Argument(
             metavar="RESULTS", help="A `flain experiment` results.csv or results.json.", show_default=False)],
         out_path: OutOpt,
         x: Annotated[str | None, typer.Option(
             "--x", help="Grid key on the x axis (default: the first key of the grid other than --over).",
             show_default=False)] = None,
         over: Annotated[str | None, typer.Option(
             help="Grid key folded into mean and min-max bars (default: seed, when the grid varies it).",
             show_default=False)] = None,
         defenses: Annotated[list[str] | None, typer.Option(
             "--defense", help="Draw only this column of the results (repeat it; default: every column).",
             show_default=False)] = None,
         title: TitleOpt = None, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """ACC and ASR of each defense against a grid key: one row of panels per value of the other keys."""
    _draw({"RESULTS": results}, out_path, force, as_json,
          lambda png: plot_grid(results, png, x, over, defenses, title))
