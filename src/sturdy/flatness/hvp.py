"""Hessian-vector products of the mean training loss, and what they estimate over the whole network:
the Hutchinson trace and the top eigenvalue (power iteration). The loss is the **mean** over every
sample of ``data``; the model is evaluated in eval mode; probes are drawn on the CPU from a seed, so
every device gives the same estimate.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    default_loss,
    loss_batches,
    trainable_parameters,
)
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_model, check_number

__all__ = ["TraceEstimate", "EigenEstimate", "hutchinson_trace", "top_hessian_eigenvalue", "rademacher", "probe_seed",
           "batch_gradient", "hvp"]


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of the Hessian trace: ``value`` +- ``stderr`` (standard error over ``probes``)."""

    value: float
    stderr: float
    probes: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)


@dataclass(frozen=True)
class EigenEstimate:
    """Largest-magnitude Hessian eigenvalue by power iteration (the top eigenvalue when the Hessian is PSD).

    Attributes:
        value: Rayleigh quotient ``v^T H v`` of the final unit vector.
        iterations: Hessian-vector products used.
        residual: ``||H v - value v||_2`` at the final vector (0 for an exact eigenvector).
        converged: whether the relative change of ``value`` fell below ``tol``.
    """

    value: float
    iterations: int
    residual: float
    converged: bool

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)


def rademacher(params: Sequence[Tensor], *, seed: int) -> List[Tensor]:
    """Rademacher vectors drawn on the CPU from ``seed`` (identical on every device), one per parameter."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device=p.device, dtype=p.dtype)
        for p in params
    ]


def probe_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k) % (2**63 - 1)


@contextlib.contextmanager
def double_backward_graph() -> Iterator[None]:
    """Gradients kept for a second backward pass: attention (``scaled_dot_product_attention``, as in vision
    transformers) runs on its plain math kernel, since the fused kernels (flash, memory-efficient) have no second
    derivative."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def batch_gradient(
    model: nn.Module, x: Tensor, y: Tensor, params: List[Tensor], loss_fn: LossFn
) -> Tuple[Tensor, ...]:
    """Gradient of the batch's **summed** loss, with its graph kept for double backward."""
    with double_backward_graph():
        loss = loss_fn(model(x), y) * x.shape[0]
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)


def hvp(grads: Tuple[Tensor, ...], params: List[Tensor], vec: Sequence[Tensor], *, retain: bool) -> List[Tensor]:
    """``H v`` from a gradient graph; entries whose gradient is constant contribute nothing."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad(
        [grads[i] for i in live], params, grad_outputs=[vec[i] for i in live], retain_graph=retain, allow_unused=True
    )
    return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(out, params)]


def hutchinson_trace(
    model: nn.Module,
    data: Any,
    *,
    probes: int = 100,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> TraceEstimate:
    """Hutchinson estimate ``mean_k v_k^T H v_k`` of the trace of the Hessian of the mean training loss.

    Uses Rademacher probes over every trainable parameter and one double-backward pass per probe
    and batch (the forward and gradient graph of a batch are shared by all probes).

    Args:
        model: the network (eval mode); data: as for :func:`hessian_diagonal`.
        probes: number of probes (>= 2); seed: their seed (drawn on the CPU).
        batch_size: samples per pass; loss_fn: ``loss_fn(outputs, targets) -> batch mean`` (default
            cross-entropy); progress: show a tqdm bar.

    Returns:
        :class:`TraceEstimate` with the standard error over probes.
    """
    check_model(model)
    check_positive_int("probes", probes, minimum=2)
    device, dtype = model_device_dtype(model)
    tensors = [p for _, p in trainable_parameters(model)]
    batches = loss_batches(model, data, batch_size=batch_size, device=device, dtype=dtype, loss_fn=loss_fn)
    num_samples = sum(int(x.shape[0]) for x, _ in batches)
    loss_fn = loss_fn or default_loss
    per_probe = [0.0] * probes
    with eval_mode(model):
        bar = tqdm(total=probes * len(batches), desc="trace", unit="hvp", disable=not progress)
        for x, y in batches:
            grads = batch_gradient(model, x, y, tensors, loss_fn)
            for k in range(probes):
                v = rademacher(tensors, seed=probe_seed(seed, k))
                hv = hvp(grads, tensors, v, retain=k < probes - 1)
                per_probe[k] += float(sum((vi * hi).sum() for vi, hi in zip(v, hv)))
                bar.update(1)
        bar.close()
    values = torch.tensor(per_probe, dtype=torch.float64) / num_samples
    return TraceEstimate(value=float(values.mean()), stderr=float(values.std() / math.sqrt(probes)), probes=probes)


def top_hessian_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> EigenEstimate:
    """Largest-magnitude eigenvalue of the Hessian of the mean training loss by power iteration on HVPs.

    At a minimum the Hessian is (nearly) positive semi-definite and this is the top eigenvalue.
    Stops when the Rayleigh quotient changes by less than ``tol`` relatively, or after ``iterations``.

    Args:
        model, data, batch_size, loss_fn, progress: as for :func:`hutchinson_trace`.
        iterations: maximum Hessian-vector products; tol: relative stopping tolerance;
        seed: seed of the Gaussian start vector (drawn on the CPU).
    """
    check_model(model)
    check_positive_int("iterations", iterations)
    check_number(tol, "tol", low=0, low_open=True)
    device, dtype = model_device_dtype(model)
    tensors = [p for _, p in trainable_parameters(model)]
    batches = loss_batches(model, data, batch_size=batch_size, device=device, dtype=dtype, loss_fn=loss_fn)
    num_samples = sum(int(x.shape[0]) for x, _ in batches)
    loss_fn = loss_fn or default_loss
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=p.dtype) for p in tensors]

    def normalise(vec: List[Tensor]) -> List[Tensor]:
        norm = math.sqrt(sum(float((t * t).sum()) for t in vec))
        return [t / norm for t in vec] if norm > 0 else vec

    def fullhvp(vec: List[Tensor]) -> List[Tensor]:
        out = [torch.zeros_like(p) for p in tensors]
        for x, y in batches:
            grads = batch_gradient(model, x, y, tensors, loss_fn)
            for o, h in zip(out, hvp(grads, tensors, vec, retain=False)):
                o += h / num_samples
        return out

    v = normalise(v)
    value, residual, converged, used = 0.0, float("inf"), False, 0
    with eval_mode(model):
        for used in tqdm(range(1, iterations + 1), desc="top-eigenvalue", unit="hvp", disable=not progress):
            hv = fullhvp(v)
            new = float(sum((a * b).sum() for a, b in zip(v, hv)))
            residual = math.sqrt(sum(float(((h - new * a) ** 2).sum()) for a, h in zip(v, hv)))
            done = used > 1 and abs(new - value) <= tol * max(abs(new), 1e-30)
            value = new
            if done or residual == 0.0:
                converged = True
                break
            v = normalise(hv)
    return EigenEstimate(value=value, iterations=used, residual=residual, converged=converged)
