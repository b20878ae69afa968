"""Optional compiled kernels for the variance hook's per-step CPU work (numba; ``pip install sturdy[fast]``).

On a small model the hook's cost per step is dominated by the number of numpy calls of the
selection, the encoding and the decoding (several dozen per bucket), not by arithmetic. With
numba installed, :func:`kernels` returns a module doing each of them in one compiled call, with
bit-identical results (selections, residual and variance updates, payload bytes, decoded sums);
without it, or with the environment variable ``STURDY_NUMBA=0``, it returns ``None`` and the
numpy reference path runs. Compiled code is cached on disk by numba, so only the first process
compiles (a few seconds).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import List, Optional

__all__ = ["kernels", "available", "warm_up"]

_resolved: List[Optional[ModuleType]] = []
_warmed: List[bool] = []


def kernels() -> Optional[ModuleType]:
    """The compiled kernels module, or ``None`` (numba missing or disabled by ``STURDY_NUMBA=0``)."""
    if not _resolved:
        module = None
        if os.environ.get("STURDY_NUMBA", "1") != "0":
            try:
                module = importlib.import_module("sturdy.compression._numba_kernels")
            except ImportError:  # numba not installed (or not for this numpy): the numpy path
                pass
            except Exception as exc:  # e.g. no writable cache location: say so, use the numpy path
                warnings.warn(f"sturdy: numba kernels unavailable ({type(exc).__name__}: {exc}); using numpy",
                              RuntimeWarning, stacklevel=2)
                module = None
        _resolved.append(module)
    return _resolved[0]


def available() -> bool:
    """Whether the compiled kernels are in use."""
    return kernels() is not None


def warm_up() -> bool:
    """Compile (or load from numba's cache) the kernels for float32 buffers; returns :func:`available`.

    Runs a tiny selection and decoding through the hook's own entry points, once per process. Worker
    processes started afterwards load the cached code instead of each compiling it.
    """
    if kernels() is None:
        return False
    if not _warmed:
        import torch

        from sturdy.compression import codec
        from sturdy.compression.compressor import variance_select

        boundaries = torch.tensor([0, 2, 4])
        selection = variance_select(torch.tensor([1.0, 0.0, -0.25, 2.0]), torch.zeros(4), alpha=1.0, zeta=0.5,
                                    quantize="4bit", boundaries=boundaries)
        codec.decode_add_(torch.zeros(4), selection.payload, boundaries=boundaries)
        _warmed.append(True)
    return True
