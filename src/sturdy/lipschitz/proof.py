"""What a certificate checks by behaviour before it is issued (docs/design.md, section 1 "Soundness checks").

The structure of a traced model cannot show everything a proof rests on, so :func:`~sturdy.lipschitz.certify`
also checks:

* :func:`model_fingerprint`: a bound belongs to the exact weights, buffers, module structure and input shape it
  was computed for (a bound from another model, or from weights changed since, is refused);
* :func:`check_batch_rows`: every sample's logits depend on that sample alone, at the batch size used (a few
  rows of each batch are recomputed one at a time);
* :func:`check_lipschitz_pairs`: a sampled self-check of the claim itself. For a few inputs ``x`` it searches,
  by a power iteration on secants (``v <- J^T (f(x + h v) - f(x - h v))``), for a pair of inputs whose outputs
  move further apart than the bound allows, for the global form ``||f(a) - f(b)|| <= L ||a - b||`` and for the
  pairwise form ``|m_i(a) - m_i(b)| <= L_body ||w_p - w_i|| ||a - b||`` (``m_i = f_p - f_i``). Every pair it
  evaluates is a real pair of inputs, so a violation beyond floating-point rounding disproves the bound.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch
from torch import nn

from sturdy.errors import SoundnessError, UnsupportedModuleError
from sturdy.lipschitz.registry import instance_overrides
from sturdy.lipschitz.results import LipschitzBound

__all__ = ["model_fingerprint", "check_batch_rows", "check_lipschitz_pairs", "rounding_slack"]

ROWS_PER_BATCH = 2  # rows of every certified batch recomputed alone
SELF_CHECK_POINTS = 4  # inputs of the secant self-check
SELF_CHECK_ITERATIONS = 4  # power-iteration steps on secants per input
SECANT_STEP = 0.05  # half-distance h of each secant pair, relative to sqrt(input size)


def model_fingerprint(model: nn.Module, input_shape: Sequence[int]) -> str:
    """sha256 of everything a bound depends on: the per-sample input shape, every parameter and buffer (names,
    dtypes, shapes, bytes), and every module's class, instance-level overrides and hooks."""
    h = hashlib.sha256()
    h.update(repr(tuple(int(s) for s in input_shape[1:])).encode())
    for name, module in model.named_modules():
        cls = type(module)
        hooks = (len(module._forward_hooks), len(module._forward_pre_hooks))
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{instance_overrides(module)}|{hooks}".encode())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        data = t.detach()
        if data.numel():
            h.update(data.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def rounding_slack(dtype: torch.dtype) -> float:
    """Relative tolerance for a model evaluated in ``dtype`` (the forward pass rounds; the bound does not count it)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(1e-5, 2000.0 * eps)


def check_batch_rows(model: nn.Module, batch: torch.Tensor, logits: torch.Tensor, *, generator: torch.Generator,
                     rows: int = ROWS_PER_BATCH) -> None:
    """Refuse a model whose logits for a sample change with the other samples of its batch.

    Recomputes ``rows`` random rows of ``batch`` one at a time (plus the first and last when the batch is
    small) and compares them with the batched ``logits``.

    Raises:
        UnsupportedModuleError: a row differs beyond rounding.
    """
    n = batch.shape[0]
    if n < 2:
        return
    picks = torch.randperm(n, generator=generator)[:rows].tolist()
    tol = rounding_slack(logits.dtype)
    with torch.no_grad():
        for i in picks:
            alone = model(batch[i : i + 1])
            together = logits[i : i + 1]
            scale = max(float(together.detach().abs().max()), float(alone.detach().abs().max()), 1.0)
            if alone.shape != together.shape or not bool(
                    torch.allclose(alone.double(), together.double(), rtol=tol, atol=tol * scale)):
                raise UnsupportedModuleError(
                    f"{type(model).__name__} gives sample {i} of a batch of {n} other logits than the same sample "
                    "alone: its output mixes the samples of a batch (a statistic or reduction over the batch "
                    "dimension, the batch size used as a number), so no per-sample certificate holds; make forward "
                    "act on each sample separately",
                    module=model,
                )


def _margins(z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return z.gather(1, pred[:, None]) - z  # (n, K): f_p - f_i


def check_lipschitz_pairs(model: nn.Module, x: torch.Tensor, bound: LipschitzBound, *, seed: int = 0,
                          iterations: int = SELF_CHECK_ITERATIONS) -> None:
    """Search for inputs that disprove ``bound`` near the points ``x`` (see the module doc).

    Raises:
        SoundnessError: a pair of inputs moves the logits (or a pairwise margin) further than the bound allows.
    """
    if x.shape[0] == 0 or not x.is_floating_point():
        return
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = x.shape[0]
    h = SECANT_STEP * math.sqrt(x[0].numel())
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        base = model(x)
    pred = base.argmax(dim=1)
    w = None if bound.last_weight is None else bound.last_weight.to(device=x.device, dtype=torch.float64)
    for _ in range(iterations + 1):
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(n, *([1] * (x.dim() - 1)))
        a = (x + h * v).detach()
        b = (x - h * v).detach()
        with torch.no_grad():
            fa, fb = model(torch.cat([a, b])).split(n)
        dist = (a - b).double().flatten(1).norm(dim=1)
        _check_pairs(model, fa.double(), fb.double(), dist, pred, bound, w, rounding_slack(base.dtype))
        v = _secant_direction(model, x, v, fa - fb)


def _check_pairs(model: nn.Module, fa: torch.Tensor, fb: torch.Tensor, dist: torch.Tensor, pred: torch.Tensor,
                 bound: LipschitzBound, w: Optional[torch.Tensor], tol: float) -> None:
    scale = torch.maximum(fa.abs().amax(dim=1), fb.abs().amax(dim=1)).clamp_min(1.0)
    moved = (fa - fb).norm(dim=1)
    allowed = bound.upper * dist * (1 + tol) + tol * scale
    _refuse_if(moved > allowed, moved / dist, bound.upper, "global", model)
    if w is None or bound.upper_body is None:
        return
    mv = (_margins(fa, pred) - _margins(fb, pred)).abs()  # (n, K)
    pair = torch.cdist(w, w)[pred]  # (n, K): ||w_p - w_i||
    allowed_pair = bound.upper_body * pair * dist[:, None] * (1 + tol) + tol * scale[:, None]
    _refuse_if((mv > allowed_pair).any(dim=1), (mv / (pair * dist[:, None]).clamp_min(1e-300)).amax(dim=1),
               bound.upper_body, "pairwise (body)", model)


def _refuse_if(bad: torch.Tensor, slope: torch.Tensor, claimed: float, form: str, model: nn.Module) -> None:
    if bool(bad.any()):
        worst = float(slope[bad].max())
        raise SoundnessError(
            f"the {form} Lipschitz bound {claimed:.6g} of {type(model).__name__} is disproved by a pair of inputs "
            f"whose outputs move {worst:.6g} per unit of input distance: the model does not compute what its traced "
            "graph describes (a forward replaced at run time, state changed since the bound, or a missing rule); "
            "no certificate is issued"
        )


def _secant_direction(model: nn.Module, x: torch.Tensor, v: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """``J(x)^T (f(x + h v) - f(x - h v))`` per sample: the next power-iteration direction (the old one when the
    model has no gradient)."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        if not out.requires_grad:
            return v
        (g,) = torch.autograd.grad(out, xg, grad_outputs=diff.detach().to(out.dtype), allow_unused=True)
    if g is None or not bool(torch.isfinite(g).all()) or float(g.abs().max()) == 0.0:
        return v
    return g.detach()
