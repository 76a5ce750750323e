"""What the commands print: the two consoles (data on stdout, people's messages on stderr), JSON and numbers.

Commands render one result record each; these are the pieces they render with.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

# markup off: paths and labels are printed as given (`runs[/x].safetensors` is a valid file name)
out = Console(highlight=False, markup=False)  # data: tables (stdout)
err = Console(stderr=True, highlight=False, markup=False)  # people: progress, warnings, errors (stderr)

def print_notes(notes: Iterable[str]) -> None:
    """How a checkpoint was read (format, prefix stripped, dtype), on stderr."""
    for note in notes:
        err.print(f"note: {note}", soft_wrap=True)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def print_json(obj: dict[str, Any] | list[dict[str, Any]]) -> None:
    sys.stdout.write(json.dumps(_clean(obj)) + "\n")
    sys.stdout.flush()


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
