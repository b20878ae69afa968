"""Brute-force references for the Lipschitz tests (float64, tiny inputs)."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn


def dense_operator(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int]) -> torch.Tensor:
    """Matrix of an affine map ``fn`` on per-sample inputs ``in_shape``, by applying it to the identity
    basis (``fn(e_j) - fn(0)``, so biases drop out), float64."""
    n = 1
    for s in in_shape:
        n *= int(s)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        zero = torch.zeros((1, *in_shape), dtype=torch.float64)
        cols = fn(basis) - fn(zero)
    return cols.reshape(n, -1).T


def exact_norm(module: nn.Module, in_shape: Sequence[int]) -> float:
    """Exact spectral norm of a linear module (eval mode, float64 copy) on per-sample shape ``in_shape``."""
    net = copy.deepcopy(module).to(torch.float64).eval()
    return float(torch.linalg.matrix_norm(dense_operator(net, in_shape), ord=2))


def jacobian_norms(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """``||J(x)||_2`` of ``model`` (float64 copy, eval) at each row of ``xs``."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    out = []
    for x in xs.to(torch.float64):
        jac = torch.autograd.functional.jacobian(lambda t: net(t.unsqueeze(0))[0], x)
        out.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))
    return torch.stack(out)


def adversarial_lipschitz(model: nn.Module, in_shape: Sequence[int], *, starts: int = 8, steps: int = 60,
                          seed: int = 0) -> float:
    """Largest difference quotient ``||f(a) - f(b)|| / ||a - b||`` found by gradient ascent over pairs."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn((starts, *in_shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    d = (0.1 * torch.randn((starts, *in_shape), generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([a, d], lr=0.05)
    best = 0.0
    for _ in range(steps):
        num = (net(a + d) - net(a)).flatten(1).norm(dim=1)
        ratio = num / d.flatten(1).norm(dim=1).clamp_min(1e-12)
        best = max(best, float(ratio.max().detach()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (so BN is not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=gen) * 1.5)
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model


class Fn(nn.Module):
    """A module computing ``fn(x)`` (functional forms inside a traced forward)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
