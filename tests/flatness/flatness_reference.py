"""Brute-force references of the flatness algorithms (tiny inputs only)."""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def loss_of(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable = F.cross_entropy) -> Callable:
    """The mean training loss as a function of the flat parameter vector (for autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def f(flat: Tensor) -> Tensor:
        parts = flat.split(sizes)
        state = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        state.update(buffers)
        return loss_fn(functional_call(model, state, (x,)), y)

    return f


def full_hessian(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable = F.cross_entropy) -> Tensor:
    """Dense Hessian of the mean loss over all parameters, by ``torch.autograd.functional.hessian``."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    was = model.training
    model.eval()
    try:
        return torch.autograd.functional.hessian(loss_of(model, x, y, loss_fn), flat)
    finally:
        model.train(was)


def hessian_diagonal_reference(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """Diagonal of the dense Hessian, split per parameter."""
    diag = full_hessian(model, x, y).diagonal()
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = diag[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def brute_force_layer(h: Tensor, s: Tensor, variant: str) -> float:
    """Minimise a layer's normalized-sharpness objective with LBFGS in log space (float64)."""
    h = h.double().clamp_min(0)
    s = s.double()
    m, n = h.shape
    size = m + n if variant == "arxiv" else n
    x = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=2000, tolerance_grad=1e-15, tolerance_change=1e-18,
                            history_size=50, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        if variant == "arxiv":
            a, b = x[:m].exp(), x[m:].exp()
            return a @ h @ b + (1 / a) @ s @ (1 / b)
        b = x.exp()
        return ((h @ b) * (s @ (1 / b))).sum()

    def closure() -> Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    for _ in range(5):
        opt.step(closure)
    value = float(objective().detach())
    return value if variant == "arxiv" else value**0.5


def ggn_diagonal_reference(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """Diagonal of the dense GGN (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n (:func:`full_ggn`), per parameter."""
    diag = full_ggn(model, x, y).diagonal()
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = diag[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def full_ggn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Dense GGN ``(1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n`` of the mean cross-entropy, all parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(v: Tensor) -> Tensor:
        state = {n: t.reshape(s) for n, t, s in zip(names, v.split(sizes), shapes)}
        state.update(buffers)
        return functional_call(model, state, (x,))

    was = model.training
    model.eval()
    try:
        jac = torch.autograd.functional.jacobian(logits, flat)  # (N, C, P)
        p = torch.softmax(logits(flat), dim=1).detach()
    finally:
        model.train(was)
    m = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, m, jac) / x.shape[0]


def tanh_net(seed: int = 0) -> nn.Module:
    """A tiny tanh network in float64 (31 parameters, an indefinite Hessian)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
