"""Generate the CLI reference (docs/cli.md) from the Typer app itself.

    .venv/bin/python -m flain_cli.cli.reference > docs/cli.md

tests/test_docs.py fails when docs/cli.md differs from what this prints, so a new command or
option cannot go undocumented.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer

from .app import app


def _default(param: Any) -> str:
    if param.required or param.default is None or param.param_type_name == "argument":
        return ""
    if isinstance(param.default, bool):
        return "off" if not param.default else "on"
    return f"`{getattr(param.default, 'value', param.default)}`"  # an Enum choice by its name on the command line


def _rows(command: Any) -> list[str]:
    rows = ["| argument / option | default | meaning |", "|---|---|---|"]
    for param in command.params:
        if param.name == "help":
            continue
        name = (param.metavar or param.name.upper()) if param.param_type_name == "argument" else ", ".join(param.opts)
        required = " (required)" if param.required else ""
        help_text = (getattr(param, "help", None) or "").replace("|", "\\|")
        rows.append(f"| `{name}`{required} | {_default(param)} | {help_text} |")
    return rows


def _walk(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if hasattr(command, "commands"):
            yield from _walk(command, path)
        else:
            yield path, command


def render() -> str:
    root = typer.main.get_command(app)
    lines = ["# CLI reference", "",
             "Generated from the Typer app by `python -m flain_cli.cli.reference`; do not edit by hand.", "",
             f"`flain [--debug] [--threads N] [--version] COMMAND ...`: {root.help}", ""]
    lines += _rows(root) + [""]
    for path, command in _walk(root, "flain"):
        lines += [f"## `{path}`", "", (command.help or "").strip(), ""] + _rows(command) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
