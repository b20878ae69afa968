"""Brute-force reference of the squared-gradient rules: one backward pass per sample."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor, nn

__all__ = ["per_sample_squared_gradients"]


def per_sample_squared_gradients(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Dict[str, Tensor]:
    """Brute-force reference: one backward per sample, ``{name: sum_x (grad of loss_x / b)^2}``.

    ``loss_fn(logits, targets)`` must return the per-sample mean loss of its batch; the result uses the
    mean convention (each sample's gradient scaled by ``1/b``, ``b`` the batch size), the statistic of
    the mean loss that the rules give when it is backpropagated. Only valid for models whose samples
    do not interact (no training-mode BatchNorm).
    """
    b = inputs.shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in range(b):
        loss = loss_fn(model(inputs[x : x + 1]), targets[x : x + 1]) / b
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                out[n] += g * g
    return out
