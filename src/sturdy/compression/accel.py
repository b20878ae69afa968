"""Optional compiled kernels for the variance hook's per-step CPU work (numba; ``pip install sturdy[fast]``).

On a small model the hook's cost per step is dominated by the number of numpy calls of the
selection, the encoding and the decoding (several dozen per bucket), not by arithmetic. With
numba installed, :func:`kernels` returns a module doing each of them in one compiled call, with
bit-identical results (selections, residual and variance updates, payload bytes, decoded sums);
without it, or with the environment variable ``STURDY_NUMBA=0``, it returns ``None`` and the
numpy reference path runs. Compiled code is cached on disk by numba, so only the first process
compiles (a few seconds); :func:`sturdy.compression.compressor.warm_up` does that up front.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import List, Optional

__all__ = ["kernels", "available"]

_resolved: List[Optional[ModuleType]] = []


def kernels() -> Optional[ModuleType]:
    """The compiled kernels module, or ``None`` (numba missing or disabled by ``STURDY_NUMBA=0``)."""
    if not _resolved:
        module = None
        if os.environ.get("STURDY_NUMBA", "1") != "0" and importlib.util.find_spec("numba") is not None:
            try:
                module = importlib.import_module("sturdy.compression._numba_kernels")
            except Exception as exc:  # numba present but unusable (another numpy, no cache folder): say why
                warnings.warn(f"sturdy: numba kernels unavailable ({type(exc).__name__}: {exc}); using numpy",
                              RuntimeWarning, stacklevel=2)
        _resolved.append(module)
    return _resolved[0]


def available() -> bool:
    """Whether the compiled kernels are in use."""
    return kernels() is not None
