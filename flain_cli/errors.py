"""The one exception family the core raises.

Every message says what is wrong and what to do about it; the CLI prints it as a single
``Error: ...`` line and exits non-zero. An error about one parameter of a library call names it
(``param``) and starts with it: ``step must be > 0, got -1``; the CLI says the option the user
typed instead (``--step must be > 0, got -1``). A message that advises another parameter names it
with :func:`opt`: ``f"pass {opt('dataset')}"`` reads "pass dataset" from Python and "pass
--dataset" on the command line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = "\x1f"  # brackets a parameter's name inside a message (a control character no message holds)
_NAMED = re.compile(f"{_MARK}(\\w+){_MARK}")


def opt(name: str) -> str:
    """The parameter ``name`` inside an error message, to be shown as the caller knows it (`FlainError.render`)."""
    return f"{_MARK}{name}{_MARK}"


def _same(name: str) -> str:
    return name


class FlainError(Exception):
    """Base class of every error the user can act on.

    ``param``: the parameter the message is about, or None; ``detail``: the message without it.
    ``str(error)`` is ``f"{param} {detail}"`` (just ``detail`` without a parameter), with every
    parameter the detail names (`opt`) by its Python name.
    """

    def __init__(self, detail: str, *, param: str | None = None) -> None:
        self.param, self.detail = param, detail
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = _same) -> str:
        """The message with ``param`` and every `opt` in it named by ``name`` (the CLI passes its option names)."""
        detail = _NAMED.sub(lambda match: name(match.group(1)), self.detail)
        return f"{name(self.param)} {detail}" if self.param else detail


class DataError(FlainError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(FlainError):
    """A checkpoint cannot be read, written or interpreted."""


class ConfigError(FlainError):
    """Options that do not fit together (bad attack, unknown name, out-of-range value)."""


class AuxError(FlainError):
    """The auxiliary set cannot be used with this model."""
