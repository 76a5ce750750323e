"""SIGINT and SIGTERM, the one process-wide state of the library.

:func:`raise_on_signal` is the handler the CLI installs for both signals. It raises
:class:`Interrupted` (a KeyboardInterrupt), so ``finally`` blocks remove temporary files, except
inside :func:`deferred` (a command's outputs being put in place, :mod:`flain_cli.files`), where it
only records the signal: that block finishes or undoes its work and then raises itself. Long loops
call :func:`stop_if_signalled` between steps, because Python drops an exception raised inside a
``__del__`` or a weakref callback. Where the exception arrives wrapped in another,
:func:`interrupt_behind` finds it again. :func:`outputs_written` tells the CLI whether a command
had put its outputs in place before the signal came, so that it never says "nothing was written"
when something was.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_received: int | None = None  # the first SIGINT/SIGTERM seen
_deferring = False
_written = False  # a command's outputs were put in place (files.FilePlan)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def raise_on_signal(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal module's signature
    """Signal handler: remember the signal; raise Interrupted unless inside :func:`deferred`."""
    global _received
    _received = _received or signum
    if not _deferring:
        raise Interrupted(signum)


def signal_received() -> int | None:
    """The first SIGINT/SIGTERM seen by :func:`raise_on_signal` in this process, if any."""
    return _received


def stop_if_signalled() -> None:
    """Raise Interrupted if a signal arrived whose exception something swallowed (a no-op otherwise).

    Python drops an exception raised inside a ``__del__`` or a weakref callback ("Exception ignored
    in ..."), so a signal landing there would let a long loop run to its end; the loops of training
    and repair call this between steps.
    """
    if _received is not None and not _deferring:
        raise Interrupted(_received)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold signals back for the block: the handler only records them. The caller checks
    :func:`signal_received` at the end of the block and undoes or finishes its work."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


def command_started() -> None:
    """A new command begins: nothing of its own is written yet (several run in one process under tests)."""
    global _written
    _written = False


def mark_written() -> None:
    """Record that a command's outputs are in place (a later interrupt must not say otherwise)."""
    global _written
    _written = True


def outputs_written() -> bool:
    """Whether a command of this process has put its outputs in place."""
    return _written


def interrupt_note() -> str:
    """What an interrupt leaves, for the line that reports it: nothing, unless the outputs were in place."""
    return "its outputs had been written in full." if _written else "nothing was written."


def interrupt_behind(exc: BaseException) -> Interrupted | None:
    """The interrupt that ``exc`` stands for, if any: ``exc`` itself, an :class:`Interrupted` among its causes,
    or, failing both, a signal the handler saw. Python wraps what a handler raises inside some hooks (in 3.11
    ``__set_name__``, which runs while torch lazily imports a module, gives a RuntimeError), and a library may
    catch it and raise its own error: either way the command ends because of the signal, not of a bug."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, Interrupted):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return Interrupted(_received) if _received is not None else None
