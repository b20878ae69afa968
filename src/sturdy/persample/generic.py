"""The fallback rule: per-sample gradients through ``torch.func`` (any module whose samples are independent).

``vmap`` vectorises the per-sample gradients; a module it cannot batch (an operator without a batching
rule that fails, e.g. ``nn.GRU``'s in-place updates) is run one sample at a time instead, with a warning.
"""

from __future__ import annotations

import warnings
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

    sample_grad = grad(sample_objective)
    per_sample_grad = vmap(sample_grad, in_dims=(None, 0, 0))

    def vectorised(sl: slice) -> Dict[str, Tensor]:
        return {name: g.square_().sum(0) for name, g in per_sample_grad(params, a[sl], delta[sl]).items()}

    def one_at_a_time(sl: slice) -> Dict[str, Tensor]:
        sums = {name: torch.zeros_like(p) for name, p in params.items()}
        for i in range(sl.start, sl.stop):
            for name, g in sample_grad(params, a[i], delta[i]).items():
                sums[name] += g.square()
        return sums

    out = {name: torch.zeros_like(p) for name, p in params.items()}
    chunk = samples_per_chunk(budget, sum(p.numel() for p in params.values()), a.element_size())
    step = vectorised
    for sl in chunks(a.shape[0], chunk):
        with torch.enable_grad(), warnings.catch_warnings():  # torch.func needs grad mode (off in a backward)
            # operators without a batching rule run correctly, only slower: nothing for the user to act on
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            try:
                squares = step(sl)
            except (RuntimeError, NotImplementedError) as exc:
                if step is one_at_a_time:
                    raise
                step = one_at_a_time
                reason = " ".join(str(exc).split())[:160]
                warnings.warn(f"torch.func.vmap cannot batch {type(module).__name__} ({reason}); its per-sample "
                              "gradients are computed one sample at a time (exact, slower)", RuntimeWarning,
                              stacklevel=2)
                squares = step(sl)
        for name, value in squares.items():
            out[name] += value
    return out


def generic_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """The rule of modules without a registered one: :func:`func_squared_gradients` of their own parameters."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    return func_squared_gradients(module, params, a, delta, budget)
