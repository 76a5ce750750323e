"""Wires the commands together; each lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import aux_cmd, defend, demo, evaluate, experiment, inspect_cmd, plot, scan, sweep, train
from .common import Settings, handle_errors

app = typer.Typer(
    name="flain",
    help="Backdoored federated learning and the FLAIN defense, over safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flain-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="CPU threads for torch (default: torch's choice). Use 1 when running "
                                 "several flain processes side by side.", show_default=False)] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    Settings.debug = debug
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


app.command("train")(handle_errors(train.train))
app.command("demo")(handle_errors(demo.demo))
app.command("eval")(handle_errors(evaluate.evaluate_command))
app.command("inspect")(handle_errors(inspect_cmd.inspect))
app.command("scan")(handle_errors(scan.scan))
app.command("defend")(handle_errors(defend.defend))
app.command("sweep")(handle_errors(sweep.sweep))
aux_cmd.app.command("export")(handle_errors(aux_cmd.export))
app.add_typer(aux_cmd.app, name="aux")
app.command("experiment")(handle_errors(experiment.experiment))
for _name, _command in (("training", plot.training), ("trace", plot.trace), ("sweep", plot.sweep),
                        ("activations", plot.activations), ("grid", plot.grid)):
    plot.app.command(_name)(handle_errors(_command))
app.add_typer(plot.app, name="plot")


def main() -> None:
    app()
