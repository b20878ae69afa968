"""Compression methods by name: ``(state, hook)`` for each method of :data:`METHODS`.

Every state has PyTorch's hook conventions (``hook(state, bucket) -> Future[Tensor]``, per-bucket
state keyed by ``bucket.index()``, plain allreduce until ``start_iter``, ``state_dict()`` /
``load_state_dict()``) and counts its traffic (``state.statistics()``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from sturdy.compression.baselines import StromState, TopKState, TorchHookState, strom_hook, topk_hook, torch_hook
from sturdy.compression.variance import VarianceCompressionState, variance_hook
from sturdy.errors import ConfigurationError
from sturdy.validation import check_model

__all__ = ["METHODS", "Hook", "create_compression"]

METHODS = ("vgc", "strom", "topk", "fp16", "bf16", "powersgd", "none")
Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


def create_compression(
    method: str,
    *,
    model: Optional[nn.Module] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    alpha: float = 4.0,
    zeta: float = 0.999,
    quantize: Optional[str] = "4bit",
    tau: float = 1e-3,
    ratio: float = 0.01,
    rank: int = 1,
    start_iter: int = 2,
    gather: str = "capacity",
    slack: float = 1.25,
    momentum: float = 0.0,
    momentum_masking: bool = True,
    warmup_steps: int = 0,
    feedback: str = "all",
) -> Tuple[Any, Hook]:
    """Build ``(state, hook)`` for a method of :data:`METHODS` by name.

    ``model`` is the module DDP wraps: ``vgc`` attaches its statistics to it and every state takes
    parameter names from it. Without ``model`` the state is built unbound: call
    ``state.bind_model(model)`` once the model exists (before training). ``slack`` applies to the
    sparse methods (``vgc``, ``strom``, ``topk``), like ``gather``: see :class:`VarianceCompressionState`.
    ``momentum``, ``momentum_masking``, ``warmup_steps`` and ``feedback`` are ``vgc``'s convergence remedies
    (momentum correction: the optimizer must then run without momentum).
    """
    if method not in METHODS:
        raise ConfigurationError(f"unknown compression method {method!r}; expected one of {METHODS}")
    check_model(model)
    named = list(model.named_parameters()) if model is not None else None
    if method == "vgc":
        vgc = VarianceCompressionState(
            process_group=process_group, alpha=alpha, zeta=zeta, quantize=quantize, start_iter=start_iter,
            defer_statistics=True, gather=gather, slack=slack, momentum=momentum, momentum_masking=momentum_masking,
            warmup_steps=warmup_steps, feedback=feedback,
        )
        if model is not None:
            vgc.bind_model(model)
        return vgc, variance_hook
    if method == "strom":
        state = StromState(process_group=process_group, tau=tau, start_iter=start_iter, named_parameters=named,
                           gather=gather, slack=slack)
        return state, strom_hook
    if method == "topk":
        state = TopKState(process_group=process_group, ratio=ratio, start_iter=start_iter, named_parameters=named,
                          gather=gather, slack=slack)
        return state, topk_hook
    wrapped = TorchHookState(method, process_group=process_group, rank=rank, start_iter=start_iter)
    if model is not None:
        wrapped.bind_model(model)
    return wrapped, torch_hook
