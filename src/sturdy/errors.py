"""Exception hierarchy of sturdy.

Every error raised on purpose by the library derives from :class:`SturdyError`, so callers
(and the ``sturdy`` command line) can tell a user mistake from a bug. Messages say what was
wrong, what was expected, and how to fix it.

One rule chooses between the two ``ValueError`` kinds (docs/design.md, Conventions 8): ask what the
user has to change.

* :class:`DataError`: the data. Images, labels and other model inputs (wrong dtype, wrong shape of the
  tensors handed in, NaN or infinite values, labels out of range, pixels outside the bounds), a model's
  outputs on them (non-finite logits from finite inputs), and a data set that is unknown, missing or
  holds such values.
* :class:`ConfigurationError`: the settings. Every argument or option that is not data: numbers
  (out of range, NaN, the wrong type), shapes given as arguments (``input_shape``, a resize), names
  (an unknown method, model, norm or option).

The checks in :mod:`sturdy.validation` follow it; damaged saved state is a :class:`CheckpointError`
whatever it holds.
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
    """A setting (an argument or option that is not data) has an invalid value: a number out of range, a
    shape argument, an unknown name (see the module docstring for the rule)."""


class DataError(SturdyError, ValueError):
    """The data is wrong: images, labels, model inputs or a model's outputs on them (wrong dtype, shape or
    range, NaN/inf), or a data set that is unknown, missing on disk or holds such values (see the module
    docstring for the rule)."""


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
