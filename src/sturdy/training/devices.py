"""Devices and ranks: the one home of "where does this run" (docs/design.md, "Training core")."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from sturdy.errors import ConfigurationError

__all__ = ["resolve_device", "world", "autocast_dtype"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise validate the given device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def world() -> Tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device`` (``None`` for ``"none"``).

    Raises:
        ConfigurationError: a dtype the device cannot run (fp16 autocast on the CPU, bf16 on a GPU without it).
    """
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigurationError("--amp fp16 needs a CUDA device (fp16 matrix products on the CPU are emulated "
                                     "and slower than float32); use --amp bf16 on the CPU, or --amp none")
        return torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigurationError(f"--amp bf16 is not supported by {torch.cuda.get_device_name(device)}; use "
                                     "--amp fp16 or --amp none")
        return torch.bfloat16
    raise ConfigurationError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
