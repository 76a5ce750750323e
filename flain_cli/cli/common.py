"""What every command shares: consoles, option aliases, device choice and error handling.

The command modules import torch and the library inside their functions, never at the top: `flain --help`
and usage errors are answered without them (tests/test_startup.py)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from ..errors import ConfigError, FlainError
from ..files import read_text
from ..settings import MAX_SHIFTS
from ..signals import command_started, interrupt_behind, interrupt_note
from .output import err

if TYPE_CHECKING:
    import torch

    from ..checkpoint import ModelSource

P = ParamSpec("P")
R = TypeVar("R")

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint (.safetensors) to read.",
                                          show_default=False)]
RUN_PANEL = "Run and output"  # seed, device, files, JSON: after what a run does
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.",
                                       rich_help_panel=RUN_PANEL)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (cuda when present).",
                                        rich_help_panel=RUN_PANEL)]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, rich_help_panel=RUN_PANEL,
                                      help="Seed of every random choice; a seed makes a run reproducible.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder with the dataset's files (flat, or torchvision's <root>/<Name>/raw/).",
    show_default=False)]
ESSENTIALS = "Options"  # the options most runs need: Typer's first panel (with --help), before the others
AuxOpt = Annotated[Path, typer.Option(
    "--aux", help="Clean aux set: a folder AUX/<class>/<image>.png, or a .safetensors/.npz with images and labels.",
    show_default=False, rich_help_panel=ESSENTIALS)]
ShiftsOpt = Annotated[int, typer.Option(
    "--shifts", min=0, max=MAX_SHIFTS, metavar="N",
    help="Order the inputs by their means over the aux images and their copies moved by up to N pixels, as "
         "`flain defend --shifts N` does (0: the aux images only, the paper's).")]
SOURCE_PANEL = "Model source (for checkpoints without flain-cli metadata)"
LayerOpt = Annotated[str | None, typer.Option(help="Linear layer to work on (default: the checkpoint's defended "
                                                   "layer, fc1).",
                                              show_default=False, rich_help_panel=SOURCE_PANEL)]
DatasetOpt = Annotated[str | None, typer.Option(help="Dataset (default: from the checkpoint).", show_default=False,
                                                rich_help_panel=SOURCE_PANEL)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files (never an input).",
                                        rich_help_panel=RUN_PANEL)]


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"--device {name!r}: there is one CPU device; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


# The options that say how to read a checkpoint as a model, shared by every command that loads one: declared
# once here, added to a command by @with_model_source, handed to it as one SourceOptions.
SOURCE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "arch": (Annotated[str | None, typer.Option(
        help="Architecture (default: from the checkpoint; needed when it has no flain-cli metadata).",
        show_default=False, rich_help_panel=SOURCE_PANEL)], None),
    "dataset": (DatasetOpt, None),
    "model_def": (Annotated[str | None, typer.Option(
        "--model-def", metavar="FILE.py:NAME",
        help="Your own model class or function, for an architecture not built in. This RUNS FILE.py: pass only "
             "files you trust. Needs --dataset.",
        show_default=False, rich_help_panel=SOURCE_PANEL)], None),
    "strict": (Annotated[bool, typer.Option(
        "--strict/--no-strict", help="Refuse a checkpoint holding tensors the architecture lacks (e.g. "
                                     "global_step); --no-strict ignores them and says so.",
        rich_help_panel=SOURCE_PANEL)], True),
    "mean": (Annotated[str | None, typer.Option(
        "--mean", metavar="M[,M,M]", help="Input mean per channel on the 0-1 scale, with --std (default: the "
                                          "checkpoint's, else the dataset's).", show_default=False,
        rich_help_panel=SOURCE_PANEL)], None),
    "std": (Annotated[str | None, typer.Option(
        "--std", metavar="S[,S,S]", help="Input normalization: std per channel, with --mean.", show_default=False,
        rich_help_panel=SOURCE_PANEL)], None),
    "class_names": (Annotated[Path | None, typer.Option(
        "--class-names", help="Text file of class names, one per line in class order (names aux folders may "
                              "use).", show_default=False,
        rich_help_panel=SOURCE_PANEL)], None),
}


@dataclass(frozen=True)
class SourceOptions:
    """The model-source options as the user gave them (SOURCE_OPTIONS)."""

    arch: str | None = None
    dataset: str | None = None
    model_def: str | None = None
    strict: bool = True
    mean: str | None = None
    std: str | None = None
    class_names: Path | None = None

    def build(self) -> ModelSource:
        """As one library object (reads --class-names)."""
        from ..checkpoint import ModelSource

        names = None
        if self.class_names is not None:
            names = [line.strip() for line in read_text(self.class_names, "--class-names", max_bytes=1 << 20)
                     .splitlines() if line.strip()]
        return ModelSource(self.arch, self.dataset, self.model_def, self.strict,
                           parse_normalization(self.mean, self.std), names)

    def inputs(self) -> dict[str, Path | None]:
        """The files among them, for the command's FilePlan."""
        from ..modeldef import model_def_file

        return {"--model-def": model_def_file(self.model_def), "--class-names": self.class_names}


def with_model_source(command: Callable[..., R]) -> Callable[..., R]:
    """Give ``command`` the model-source options (SOURCE_OPTIONS), placed before its ``device`` option (or last);
    it receives them as one ``source: SourceOptions`` argument."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "source"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in SOURCE_OPTIONS.items()]
    at = next((i for i, p in enumerate(own) if p.name == "device"), len(own))
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at]] + added + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> R:
        source = SourceOptions(**{name: kwargs.pop(name) for name in SOURCE_OPTIONS})
        return command(source=source, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
    return wrapper


def parse_normalization(mean: str | None, std: str | None) -> tuple[list[float], list[float]] | None:
    """--mean/--std as two lists of floats, or None when neither is given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ConfigError("--mean and --std go together: give both, or neither")
    try:
        return [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]
    except ValueError:
        raise ConfigError(f"--mean {mean!r} / --std {std!r} must be numbers separated by commas") from None


def interrupt_code(exc: KeyboardInterrupt) -> int:
    """Exit code for an interrupt: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    return getattr(exc, "exit_code", 130)


def interrupt_name(exc: KeyboardInterrupt) -> str:
    return "SIGTERM" if interrupt_code(exc) == 143 else "SIGINT"


def as_interrupt(exc: BaseException) -> KeyboardInterrupt | None:
    """``exc`` when it is an interrupt, else the interrupt it wraps (signals.interrupt_behind), else None."""
    return exc if isinstance(exc, KeyboardInterrupt) else interrupt_behind(exc)


def interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """End the command for an interrupt: one line, exit 130 or 143."""
    err.print(f"Interrupted ({interrupt_name(exc)}); {interrupt_note()}")
    raise typer.Exit(interrupt_code(exc))


class Settings:
    """Process-wide CLI switches, set by the root callback on every invocation."""

    debug: bool = False


# library parameters whose option is not their name in kebab case
FLAGS = {"init_path": "--init", "aux_path": "--aux", "fmt": "--format", "path": "MODEL", "overwrite": "--force",
         "labels": "--label", "defenses": "--defense"}


def flag(param: str) -> str:
    """The option (or argument) the CLI takes for the library parameter ``param``."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(error: FlainError) -> str:
    """The error as the CLI says it: every library parameter it names becomes the option."""
    return error.render(flag)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the core's FlainError (and I/O errors) into one 'Error: ...' line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        command_started()
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - a bug is said in one line, traceback with --debug
            stop = as_interrupt(exc)  # SIGINT, or SIGTERM as signals.Interrupted, maybe wrapped on its way out
            if stop is not None:
                interrupted(stop)
            if isinstance(exc, FlainError):
                message = cli_message(exc)
            elif isinstance(exc, OSError):
                where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
                message = f"{exc.strerror or exc}{where}"
            elif hasattr(exc, "exit_code"):  # Typer's own usage errors keep their exit code
                raise
            else:
                message = f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            if Settings.debug or os.environ.get("FLAIN_DEBUG"):
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            err.print(f"Error: {message}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
