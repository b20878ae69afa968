"""``nn.Embedding``: sample ``x``'s gradient of row ``v`` is the sum of its output gradients at the
positions whose index is ``v``; the rule sums them per (sample, row) pair that occurs, squares, and adds
the squares into the rows. Memory: the output gradients' size. ``padding_idx`` rows get zero; an
embedding that rescales its gradients by batch frequencies (``scale_grad_by_freq``, samples interact) or
renormalises its weight in the forward (``max_norm``) takes the ``torch.func`` rule.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from sturdy.persample.generic import generic_rule
from sturdy.persample.registry import check_groups, looped_columns, register_column_rule, register_squared_grad

__all__ = ["embedding_rule", "embedding_column_rule"]


def _embedding_squares(module: nn.Embedding, a: Tensor, deltas: Tensor, sets: int = 1) -> Dict[str, Tensor]:
    """``deltas`` ``(K, n, *a.shape[1:], dim)``: the squares summed over samples and over each of ``sets`` equal
    consecutive sets of the columns: ``(sets, rows, dim)``."""
    if not module.weight.requires_grad:
        return {}
    columns, n = deltas.shape[0], a.shape[0]
    rows, dim = module.weight.shape
    idx = a.reshape(n, -1).long()
    keys = (torch.arange(n, device=a.device)[:, None] * rows + idx).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    sums = deltas.new_zeros(columns, unique.numel(), dim)
    sums.index_add_(1, inverse, deltas.reshape(columns, -1, dim))
    squares = sums.square_().view(sets, check_groups(columns, sets), -1, dim).sum(1)
    weight = deltas.new_zeros(sets, rows, dim)
    weight.index_add_(1, unique % rows, squares)
    if module.padding_idx is not None:
        weight[:, module.padding_idx] = 0
    return {"weight": weight}


@register_squared_grad(nn.Embedding)
def embedding_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Squared per-sample gradients of an Embedding's weight."""
    if module.scale_grad_by_freq or module.max_norm is not None:
        return generic_rule(module, a, delta, budget)
    return {name: value[0] for name, value in _embedding_squares(module, a, delta.unsqueeze(0)).items()}


@register_column_rule(nn.Embedding)
def embedding_column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int,
                          groups: int = 1) -> Dict[str, Tensor]:
    """:func:`embedding_rule` summed over each of ``groups`` equal groups of the columns of ``deltas``."""
    if module.scale_grad_by_freq or module.max_norm is not None:
        return looped_columns(generic_rule)(module, a, deltas, budget, groups)
    return _embedding_squares(module, a, deltas, groups)
