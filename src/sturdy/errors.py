"""Exception hierarchy of sturdy.

Every error raised on purpose by the library derives from :class:`SturdyError`, so callers
(and the ``sturdy`` command line) can tell a user mistake from a bug. Messages say what was
wrong, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "SturdyError",
    "ConfigurationError",
    "DataError",
    "MissingDependencyError",
    "CheckpointError",
    "UnsupportedModuleError",
    "DistributedError",
    "SoundnessError",
]


class SturdyError(Exception):
    """Base class of every error sturdy raises deliberately."""


class ConfigurationError(SturdyError, ValueError):
    """An argument or setting has an invalid value (wrong range, wrong shape, unknown name)."""


class DataError(SturdyError, ValueError):
    """A data set is unknown, missing on disk, or holds values of the wrong shape or range."""


class MissingDependencyError(SturdyError, ImportError):
    """An optional package is needed for the requested feature; the message says how to install it."""


class CheckpointError(SturdyError):
    """A checkpoint is missing, corrupt, of the wrong kind, or refused as unsafe."""


class UnsupportedModuleError(SturdyError, TypeError):
    """A layer or operator has no registered rule (e.g. no Lipschitz bound); never silently assumed.

    Attributes:
        module: the offending module or function (may be ``None``).
        path: its qualified name inside the model (e.g. ``"features.3"``), or ``""``.
    """

    def __init__(self, message: str, *, module: object = None, path: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.path = path


class DistributedError(SturdyError, RuntimeError):
    """A distributed run failed: a worker died, timed out, or the process group is misconfigured."""


class SoundnessError(SturdyError):
    """A guarantee was contradicted (e.g. an attack beat a certified radius): a bug in a rule, never a user mistake."""
