"""BatchNorm (``_BatchNorm``): per-sample terms ``sum_hw delta * xhat`` and ``sum_hw delta`` with the
normalisation statistics the forward used (batch statistics when :func:`uses_batch_statistics`,
running ones otherwise).

With batch statistics the samples interact; the rule then gives the squared gradients of per-sample
copies of the affine parameters (what each sample's share of ``delta`` contributes, the batch
statistics held fixed as the forward computed them). The column rule broadcasts over a leading column
dimension of the output gradients.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from sturdy.persample.registry import check_groups, register_column_rule, register_squared_grad

__all__ = ["batchnorm_rule", "batchnorm_column_rule", "uses_batch_statistics"]


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that normalises with the statistics of its batch (samples interact)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or not module.track_running_stats or module.running_mean is None
    )


def _batchnorm_squares(module: nn.Module, a: Tensor, delta: Tensor, lead: int, sets: int = 1) -> Dict[str, Tensor]:
    """The squares for ``delta`` with ``lead`` leading dimensions (batch, or columns and batch); with columns,
    per each of ``sets`` equal consecutive sets of them: ``(sets, *shape)``."""
    out: Dict[str, Tensor] = {}
    reduce_dims = [0] + list(range(2, a.dim()))
    shape = [1, -1] + [1] * (a.dim() - 2)
    if uses_batch_statistics(module):
        mean = a.mean(reduce_dims)
        var = a.var(reduce_dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    spatial = list(range(lead + 1, delta.dim()))

    def total(per_sample: Tensor) -> Tensor:
        squares = per_sample * per_sample
        if lead == 1:
            return squares.sum(0)
        return squares.reshape(sets, -1, squares.shape[-1]).sum(1)  # (K, n, C) -> (sets, C)

    if module.weight is not None and module.weight.requires_grad:
        xhat = (a - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
        out["weight"] = total((delta * xhat).sum(spatial) if spatial else delta * xhat)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = total(delta.sum(spatial) if spatial else delta)
    return out


@register_squared_grad(nn.modules.batchnorm._BatchNorm)
def batchnorm_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Squared per-sample gradients of a BatchNorm's affine parameters."""
    return _batchnorm_squares(module, a, delta, 1)


@register_column_rule(nn.modules.batchnorm._BatchNorm)
def batchnorm_column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int,
                          groups: int = 1) -> Dict[str, Tensor]:
    """:func:`batchnorm_rule` summed over each of ``groups`` equal groups of the columns of ``deltas``."""
    check_groups(deltas.shape[0], groups)
    return _batchnorm_squares(module, a, deltas, 2, groups)
