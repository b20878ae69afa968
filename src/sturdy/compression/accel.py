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


def kernels() -> Optional[ModuleType]:
    """The compiled kernels module, or ``None`` (numba missing or disabled by ``STURDY_NUMBA=0``)."""
    if not _resolved:
        module = None
        if os.environ.get("STURDY_NUMBA", "1") != "0":
            try:
                module = importlib.import_module("sturdy.compression._numba_kernels")
            except ImportError:  # numba not installed (or not for this numpy): the numpy path
                module = None
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

    Worker processes started afterwards load the cached code instead of each compiling it.
    """
    compiled = kernels()
    if compiled is None:
        return False
    import numpy as np

    r = np.array([1.0, 0.0, -0.25, 2.0], dtype=np.float32)
    v = np.zeros(4, dtype=np.float32)
    payload, _, _ = compiled.select_encode_4bit(r, v, alpha=1.0, zeta=0.5, edges=np.array([0, 2, 4]))
    header = 13 + 4 * 2
    index_bytes = int(payload[9:13].view("<i4")[0])
    compiled.decode_add_4bit(
        np.zeros(4, dtype=np.float32), payload[header : header + index_bytes], delta=not (payload[0] >> 2) & 1,
        k=int(payload[0] >> 3), count=int(payload[1:5].view("<i4")[0]), scales=payload[13:header].view(np.float32),
        inner=np.array([2]), value_section=payload[header + index_bytes :],
    )
    return True

