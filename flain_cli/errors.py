"""The one exception family the core raises.

Every message says what is wrong and what to do about it; the CLI prints it as a single
``Error: ...`` line and exits non-zero. An error about one parameter of a library call names it
(``param``) and starts with it: ``step must be > 0, got -1``; the CLI says the option the user
typed instead (``--step must be > 0, got -1``).
"""


class FlainError(Exception):
    """Base class of every error the user can act on.

    ``param``: the parameter the message is about, or None; ``detail``: the message without it.
    ``str(error)`` is ``f"{param} {detail}"`` (just ``detail`` without a parameter).
    """

    def __init__(self, detail: str, *, param: str | None = None) -> None:
        super().__init__(f"{param} {detail}" if param else detail)
        self.param, self.detail = param, detail


class DataError(FlainError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(FlainError):
    """A checkpoint cannot be read, written or interpreted."""


class ConfigError(FlainError):
    """Options that do not fit together (bad attack, unknown name, out-of-range value)."""


class AuxError(FlainError):
    """The auxiliary set cannot be used with this model."""
