"""sturdy: certified robustness, Fourier sensitivity, normalized flatness and gradient compression."""

from sturdy.errors import (
    CheckpointError,
    ConfigurationError,
    DataError,
    DistributedError,
    MissingDependencyError,
    SturdyError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "SturdyError",
    "ConfigurationError",
    "DataError",
    "MissingDependencyError",
    "CheckpointError",
    "UnsupportedModuleError",
    "DistributedError",
]
