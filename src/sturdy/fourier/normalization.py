"""Input normalisation inside the model, so that Fourier noise is added in pixel space.

Heat maps and attacks perturb images in pixel space (``[0, 1]``), where the budget ``eps`` and the
clipping are defined. A model trained on normalised inputs ``(x - mean) / std`` must therefore receive
pixel-space images and normalise them itself; feeding it pre-normalised images and perturbing those
measures the budget in normalised units, clips at the wrong range, and (a known pitfall of heat-map tools)
gives flat maps. :func:`with_normalization` wraps such a model.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.utils import model_device_dtype

__all__ = ["Normalized", "with_normalization"]


class Normalized(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean`` and ``std`` (buffers, shape ``(1, C, 1, 1)``)."""

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return self.model((x - mean) / std)


def with_normalization(
    model: nn.Module, mean: Union[float, Sequence[float], Tensor], std: Union[float, Sequence[float], Tensor]
) -> Normalized:
    """Wrap ``model`` so that it takes pixel-space images and normalises them per channel itself.

    Pass the wrapped model and pixel-space images (in ``bounds``, default ``[0, 1]``) to
    :func:`~sturdy.fourier.fourier_heatmap`, :func:`~sturdy.fourier.single_fourier_attack` and the other
    analyses: the Fourier noise is then added before normalisation, as it would reach a deployed model.

    Args:
        model: classifier trained on ``(x - mean) / std``.
        mean: per-channel means (one number, or ``C`` numbers), in pixel units.
        std: per-channel standard deviations (> 0).

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
        >>> wrapped = with_normalization(net, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        >>> x = torch.rand(5, 3, 4, 4)
        >>> m, s = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
        >>> bool(torch.allclose(wrapped(x), net((x - m[:, None, None]) / s[:, None, None])))
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"model must be an nn.Module, got {type(model).__name__}")
    device, dtype = model_device_dtype(model)
    if not dtype.is_floating_point:
        dtype = torch.float32
    values = []
    for name, value in (("mean", mean), ("std", std)):
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise ConfigurationError(f"{name} must be one or C finite numbers, got {value!r}")
        values.append(t)
    if bool((values[1] <= 0).any()):
        raise ConfigurationError(f"std must be > 0 in every channel, got {std!r}")
    if values[0].numel() != values[1].numel() and 1 not in (values[0].numel(), values[1].numel()):
        raise ConfigurationError(
            f"mean and std must have the same number of channels, got {values[0].numel()} and {values[1].numel()}"
        )
    mean_t, std_t = (v.to(device=device, dtype=dtype).view(1, -1, 1, 1) for v in values)
    return Normalized(model, mean_t, std_t)
