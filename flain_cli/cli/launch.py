"""The `flain` entry point. It takes over SIGINT and SIGTERM before anything else is imported
(torch takes seconds to import), so an interrupt at any moment ends the command with one line
and exit code 130 (SIGINT) or 143 (SIGTERM), and no temporary file is left behind."""

from __future__ import annotations

import signal
import sys

from ..signals import Interrupted, interrupt_behind, interrupt_note, raise_on_signal, signal_received


def _interrupted(signum: int, note: str) -> None:
    sys.stderr.write(f"Interrupted ({signal.Signals(signum).name}); {note}\n")
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, raise_on_signal)
    signal.signal(signal.SIGTERM, raise_on_signal)
    if sys.argv[1:] == ["--version"]:  # answered without importing torch (seconds): scripts ask this often
        from .. import __version__
        print(f"flain-cli {__version__}")
        return
    try:
        from .app import app
        app()
    except Interrupted as exc:  # during the imports, or as Typer returns from a command
        _interrupted(exc.signum, interrupt_note())
    except KeyboardInterrupt:  # pragma: no cover - only before our handler is in place
        _interrupted(signal.SIGINT, "nothing was written.")
    except Exception as exc:  # the interrupt wrapped by Python during an import (a RuntimeError from __set_name__)
        stop = interrupt_behind(exc)
        if stop is None:
            raise
        _interrupted(stop.signum, interrupt_note())
    except SystemExit as exc:
        signum = signal_received()
        if signum is not None and exc.code in (0, None):  # a signal whose exception something swallowed
            _interrupted(signum, interrupt_note())
        raise
