"""The fallback rule: per-sample gradients through ``torch.func`` (any module whose samples are independent)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from sturdy.persample.chunking import chunks, samples_per_chunk

__all__ = ["func_squared_gradients", "generic_rule"]


def func_squared_gradients(
    module: nn.Module,
    params: Dict[str, Tensor],
    a: Tensor,
    delta: Tensor,
    budget: int,
    *,
    constants: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Tensor]:
    """``sum_x (d/dp <module(a_x), delta_x>)^2`` for every ``p`` of ``params``, by ``vmap(grad(...))``.

    ``params`` maps names as in ``module.named_parameters()`` (dotted names reach into submodules,
    so ``module`` may be a whole network) to the values to differentiate at; the module's other
    parameters and buffers are used as they are, or as given in ``constants`` (e.g. detached copies,
    which spare autograd a graph of them). Each sample runs through ``module`` alone (batch of
    one), so its samples must not interact. Chunks of samples keep the per-sample gradients of one
    chunk below ``budget`` bytes.
    """
    from torch.func import functional_call, grad, vmap

    fixed = constants or {}

    def sample_objective(p: Dict[str, Tensor], a_x: Tensor, d_x: Tensor) -> Tensor:
        y = functional_call(module, {**fixed, **p} if fixed else p, (a_x.unsqueeze(0),))
        return (y * d_x.unsqueeze(0)).sum()

    per_sample_grad = vmap(grad(sample_objective), in_dims=(None, 0, 0))
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    chunk = samples_per_chunk(budget, sum(p.numel() for p in params.values()), a.element_size())
    for sl in chunks(a.shape[0], chunk):
        with torch.enable_grad():  # torch.func needs grad mode, which is off inside a backward pass
            grads = per_sample_grad(params, a[sl], delta[sl])
        for name, g in grads.items():
            out[name] += g.square_().sum(0)
    return out


def generic_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """The rule of modules without a registered one: :func:`func_squared_gradients` of their own parameters."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    return func_squared_gradients(module, params, a, delta, budget)
