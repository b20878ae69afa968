"""Small helpers every part shares (device/dtype convention, temporary eval mode)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ["eval_mode", "model_device_dtype"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's training flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device_dtype(model: Any, fallback: Optional[torch.Tensor] = None) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter.

    Models without one (a plain function, a parameter-free module) take those of ``fallback``, else
    CPU and the default dtype.
    """
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.dtype.is_floating_point:
                return p.device, p.dtype
    if fallback is not None:
        return fallback.device, fallback.dtype
    return torch.device("cpu"), torch.get_default_dtype()
