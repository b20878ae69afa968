"""Variance-based gradient compression (Tsuzuku et al. 2018) as ``torch.distributed`` DDP hooks.

Public entry points: :func:`attach_squared_gradient_statistics`, :class:`VarianceCompressionState`
with :func:`variance_hook`, baselines (:class:`StromState`/:func:`strom_hook`,
:class:`TopKState`/:func:`topk_hook`, :class:`TorchHookState`/:func:`torch_hook` for PyTorch's
allreduce, fp16 and PowerSGD hooks), :func:`create_compression` by name, traffic as
:class:`CompressionStatistics`, the wire format in :mod:`sturdy.compression.codec`, the cost model and
timing in :mod:`sturdy.compression.costmodel` and :mod:`sturdy.compression.timing`, and the optional
compiled kernels of the hook's per-step CPU work in :mod:`sturdy.compression.accel` (``sturdy[fast]``,
compiled up front by :func:`warm_up`).

Layout: ``traffic`` (accounting), ``residual`` (per-bucket state that follows parameters),
``exchange`` (select, gather, sum), ``variance`` (the method), ``baselines``, ``methods`` (by name);
``compressor`` (selection rules), ``codec`` and ``wire`` (wire format), ``collective`` (variable-size
all-gather).
"""

from sturdy.compression import device_codec  # noqa: F401 - registers the device decoder with the codec
from sturdy.compression.baselines import StromState, TopKState, TorchHookState, strom_hook, topk_hook, torch_hook
from sturdy.compression.compressor import warm_up
from sturdy.compression.lag import CompressionLagWarning, LagReport
from sturdy.compression.methods import METHODS, create_compression
from sturdy.compression.statistics import (
    SquaredGradientStatistics,
    attach_squared_gradient_statistics,
)
from sturdy.compression.traffic import CompressionStatistics
from sturdy.compression.variance import VarianceCompressionState, variance_hook

__all__ = [
    "METHODS",
    "CompressionLagWarning",
    "CompressionStatistics",
    "LagReport",
    "SquaredGradientStatistics",
    "StromState",
    "TopKState",
    "TorchHookState",
    "VarianceCompressionState",
    "attach_squared_gradient_statistics",
    "create_compression",
    "strom_hook",
    "topk_hook",
    "torch_hook",
    "variance_hook",
    "warm_up",
]
