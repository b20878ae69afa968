"""Variance-based gradient compression (Tsuzuku et al. 2018) as ``torch.distributed`` DDP hooks.

Public entry points: :func:`attach_squared_gradient_statistics`, :class:`VarianceCompressionState`
with :func:`variance_hook`, baselines (:class:`StromState`/:func:`strom_hook`,
:class:`TopKState`/:func:`topk_hook`, :class:`TorchHookState`/:func:`torch_hook` for PyTorch's
allreduce, fp16 and PowerSGD hooks), :func:`create_compression` by name, the wire format in
:mod:`sturdy.compression.codec`, the cost model in :mod:`sturdy.compression.costmodel`, and the optional
compiled kernels of the hook's per-step CPU work in :mod:`sturdy.compression.accel` (``sturdy[fast]``).
"""

from sturdy.compression.hook import (
    METHODS,
    CompressionStatistics,
    StromState,
    TopKState,
    TorchHookState,
    VarianceCompressionState,
    create_compression,
    strom_hook,
    topk_hook,
    torch_hook,
    variance_hook,
)
from sturdy.compression.statistics import (
    SquaredGradientStatistics,
    attach_squared_gradient_statistics,
    per_sample_squared_gradients,
    register_squared_grad,
)

__all__ = [
    "METHODS",
    "CompressionStatistics",
    "SquaredGradientStatistics",
    "StromState",
    "TopKState",
    "TorchHookState",
    "VarianceCompressionState",
    "attach_squared_gradient_statistics",
    "create_compression",
    "per_sample_squared_gradients",
    "register_squared_grad",
    "strom_hook",
    "topk_hook",
    "torch_hook",
    "variance_hook",
]
