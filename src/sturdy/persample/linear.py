"""``nn.Linear``: ``(delta^2)^T (a^2)`` for 2-D inputs; chunked per-sample products over extra dimensions.

Its column rule adds the squared output gradients of a group's columns first for 2-D inputs (the per-sample
gradient is an outer product, so ``sum_k (delta_k^2)^T a^2 = (sum_k delta_k^2)^T a^2``; every group shares
one product) and stacks the columns along the output features otherwise.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

from torch import Tensor, nn

from sturdy.persample.chunking import sum_of_squared_products
from sturdy.persample.registry import check_groups, register_column_rule, register_squared_grad

__all__ = ["linear_rule", "linear_column_rule"]


@register_squared_grad(nn.Linear)
def linear_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Squared per-sample gradients of a Linear layer (the sum over extra dimensions is per sample)."""
    out: Dict[str, Tensor] = {}
    want_bias = module.bias is not None and module.bias.requires_grad
    if a.dim() == 2:
        d2 = delta.square()
        if module.weight.requires_grad:
            out["weight"] = d2.t().mm(a.square())
        if want_bias:
            out["bias"] = d2.sum(0)
        return out
    n = a.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])
    d3 = delta.reshape(n, -1, delta.shape[-1])
    if module.weight.requires_grad:
        d3t = d3.transpose(1, 2)  # (n, out, t)

        def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
            return zip(d3t.split(chunk), a3.split(chunk))

        out["weight"] = sum_of_squared_products(pairs, n, (d3.shape[-1], a3.shape[-1]), budget, a).view_as(
            module.weight
        )
    if want_bias:
        out["bias"] = d3.sum(1).square_().sum(0)
    return out


def _group_squares(d: Tensor) -> Tensor:
    """``sum_j d[:, :, j]^2`` of ``(n, groups, per_group, out)``, one fused multiply-add per column (a reduction
    over the small middle dimension is several times slower). ``d`` is a view of the columns stacked per
    sample when they arrive so."""
    total = d[:, :, 0].square()
    for j in range(1, d.shape[2]):
        total.addcmul_(d[:, :, j], d[:, :, j])
    return total


@register_column_rule(nn.Linear)
def linear_column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int, groups: int = 1) -> Dict[str, Tensor]:
    """:func:`linear_rule` summed over ``groups`` equal groups of the columns in ``deltas``: ``(groups, *shape)``.

    For 2-D inputs the squared output gradients of a group's columns are added first and all groups share
    one product with the squared input (``(n, groups * out)^T (n, in)``).
    """
    out: Dict[str, Tensor] = {}
    columns, n = deltas.shape[0], a.shape[0]
    per_group = check_groups(columns, groups)
    want_bias = module.bias is not None and module.bias.requires_grad
    if a.dim() == 2:
        d2 = _group_squares(deltas.transpose(0, 1).reshape(n, groups, per_group, -1))  # (n, groups, out)
        if module.weight.requires_grad:
            out["weight"] = d2.reshape(n, -1).t().mm(a.square()).view(groups, *module.weight.shape)
        if want_bias:
            out["bias"] = d2.sum(0)
        return out
    a3 = a.reshape(n, -1, a.shape[-1])
    d4 = deltas.reshape(columns, n, -1, deltas.shape[-1])  # (K, n, t, out)
    width = d4.shape[-1]
    if module.weight.requires_grad:
        d_per_sample = d4.permute(1, 0, 3, 2)  # (n, K, out, t)

        def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
            for left, right in zip(d_per_sample.split(chunk), a3.split(chunk)):
                yield left.reshape(left.shape[0], columns * width, -1), right

        total = sum_of_squared_products(pairs, n, (columns * width, a3.shape[-1]), budget, a,
                                        extra_per_sample=columns * d4.shape[2] * width)
        out["weight"] = total.view(groups, per_group, width, -1).sum(1).view(groups, *module.weight.shape)
    if want_bias:
        out["bias"] = d4.sum(2).square_().reshape(groups, per_group * n, width).sum(1)
    return out
