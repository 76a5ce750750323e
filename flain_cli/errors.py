"""The one exception family the core raises.

Every message says what is wrong and what to do about it; the CLI prints it as a single
``Error: ...`` line and exits non-zero.
"""


class FlainError(Exception):
    """Base class of every error the user can act on."""


class DataError(FlainError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(FlainError):
    """A checkpoint cannot be read, written or interpreted."""


class ConfigError(FlainError):
    """Options that do not fit together (bad attack, unknown name, out-of-range value)."""


class AuxError(FlainError):
    """The auxiliary set cannot be used with this model."""
