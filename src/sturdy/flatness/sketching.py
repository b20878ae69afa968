"""Variance-reduced trace and diagonal of the curvature: Hutch++ and its diagonal analogue (Diag++).

A budget of ``m`` matrix-vector products with the Hessian or GGN ``A`` of the mean training loss
(:class:`~sturdy.flatness.operator.CurvatureOperator`) is split into a sketch of ``k`` columns and ``s``
probes, ``2 k + s = m`` (default ``k = m // 3``). With Rademacher ``S`` ``(P, k)`` and ``G`` ``(P, s)`` drawn
independently, ``Q`` an orthonormal basis of ``A S`` (QR in float64) and ``Pi = I - Q Q^T``:

* **Hutch++** (Meyer, Musco, Musco and Woodruff 2021): ``tr A ~ tr(Q^T A Q) + (1/s) sum_j g_j^T Pi A Pi g_j``;
* **Diag++** (Baston and Nakatsukasa 2022; the diagonal analogue):
  ``diag A ~ rowsum(Q * (A Q)) + (1/s) sum_j g_j * (Pi A g_j)``, where ``Pi A g = A g - Q (A Q)^T g``
  (``A`` symmetric) costs no further product.

Both are unbiased for any ``Q`` independent of ``G`` (the sketched part is exact, the rest is Hutchinson's
estimate of the deflated matrix), and exact when the sketch spans the whole space (``k >= P``). The sketch
removes the few large eigenvalues that dominate plain Hutchinson's variance; the standard errors
reported are those of the probe part over its ``s`` probes, given the sketch. ``method="hutchinson"``
spends the same ``m`` products on plain Rademacher probes (the comparison in BENCHMARKS.md).
Memory: ``O(P m)`` float64 values on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import LossFn, trainable_parameters
from sturdy.flatness.operator import CurvatureOperator, rademacher_matrix
from sturdy.utils import eval_mode
from sturdy.validation import check_count, check_int, check_seed

__all__ = ["TraceSketch", "DiagonalSketch", "hutchpp_trace", "hutchpp_diagonal", "SKETCH_METHODS"]

SKETCH_METHODS = ("hutch++", "hutchinson")
MAX_MATVECS = 100_000
"""Upper bound of ``matvecs`` (each product is a pass over the data)."""


@dataclass(frozen=True)
class TraceSketch:
    """A stochastic trace of the Hessian or GGN of the mean training loss.

    Attributes:
        value: the estimate. stderr: standard error of its probe part over ``probes`` (given the sketch).
        method: ``"hutch++"`` or ``"hutchinson"``. curvature: ``"hessian"`` or ``"ggn"``.
        matvecs: matrix-vector products used; sketch: columns of the sketch (0 for Hutchinson);
        probes: Rademacher probes of the probe part.
    """

    value: float
    stderr: float
    method: str
    curvature: str
    matvecs: int
    sketch: int
    probes: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class DiagonalSketch:
    """A stochastic diagonal of the Hessian or GGN of the mean training loss, per parameter.

    Attributes:
        diagonal: parameter name -> tensor of the parameter's shape (float64, CPU).
        stderr: parameter name -> standard error of each entry's probe part (given the sketch).
        method: ``"hutch++"`` (Diag++) or ``"hutchinson"``; curvature, matvecs, sketch, probes: as in
            :class:`TraceSketch`.
    """

    diagonal: Dict[str, Tensor]
    stderr: Dict[str, Tensor]
    method: str
    curvature: str
    matvecs: int
    sketch: int
    probes: int

    def trace(self) -> float:
        """Sum of every entry."""
        return float(sum(float(d.sum()) for d in self.diagonal.values()))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (tensors as nested lists)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("diagonal", "stderr")}
        out["diagonal"] = {n: d.tolist() for n, d in self.diagonal.items()}
        out["stderr"] = {n: s.tolist() for n, s in self.stderr.items()}
        return out


def _split_budget(method: str, matvecs: int, sketch: Optional[int], size: int) -> Tuple[int, int]:
    """``(k, s)``: sketch columns and probes for a budget of ``matvecs`` products."""
    if method not in SKETCH_METHODS:
        raise ConfigurationError(f"method must be one of {', '.join(SKETCH_METHODS)}, got {method!r}")
    if method == "hutchinson":
        if sketch not in (None, 0):
            raise ConfigurationError("sketch applies to method='hutch++' only")
        check_int(matvecs, "matvecs", low=2, high=MAX_MATVECS)
        return 0, matvecs
    check_int(matvecs, "matvecs", low=4, high=MAX_MATVECS)
    k = matvecs // 3 if sketch is None else check_count(sketch, "sketch", low=1, high=(matvecs - 2) // 2,
                                                       why="2 * sketch + 2 probes must fit in matvecs")
    k = min(k, size)  # a sketch of every direction is exact; more columns would add nothing
    return k, matvecs - 2 * k


def _sketch_basis(op: CurvatureOperator, k: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``Q`` (orthonormal basis of ``A S``) and ``A Q``; ``2 k`` products."""
    if k == 0:
        empty = torch.zeros(op.size, 0, dtype=torch.float64)
        return empty, empty
    q, _ = torch.linalg.qr(op.matmat(rademacher_matrix(op.size, k, seed=seed)))
    return q, op.matmat(q)


def _probe_terms(op: CurvatureOperator, q: Tensor, aq: Tensor, probes: int, seed: int) -> Tensor:
    """Per-probe terms ``g * (Pi A g)`` ``(P, s)``, ``Pi = I - Q Q^T``; ``s`` products."""
    g = rademacher_matrix(op.size, probes, seed=seed + 1)
    return g * (op.matmat(g) - q @ (aq.t() @ g))


def hutchpp_trace(
    model: nn.Module,
    data: Any,
    *,
    method: str = "hutch++",
    matvecs: int = 99,
    sketch: Optional[int] = None,
    seed: int = 0,
    curvature: str = "hessian",
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> TraceSketch:
    """Hutch++ estimate of the trace of the Hessian (or GGN) of the mean training loss (module docstring).

    Args:
        model: the network (evaluated in eval mode); data: as for
            :func:`~sturdy.flatness.curvature.hessian_diagonal`.
        method: ``"hutch++"`` (default) or ``"hutchinson"`` (plain probes at the same budget).
        matvecs: matrix-vector products in all (>= 4 for Hutch++, >= 2 for Hutchinson).
        sketch: sketch columns ``k`` (default ``matvecs // 3``; ``matvecs - 2 k`` probes remain).
        seed: seed of the sketch and probes (drawn on the CPU). curvature: ``"hessian"`` or ``"ggn"``
            (cross-entropy only). batch_size: samples per pass. loss_fn: ``loss_fn(outputs, targets) ->
            batch mean`` (default cross-entropy).

    Returns:
        A :class:`TraceSketch`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
        >>> est = hutchpp_trace(net, (x, y), matvecs=60, sketch=26)  # 26 columns span all 26 parameters
        >>> exact = sum(float(torch.autograd.functional.hessian(
        ...     lambda w: nn.functional.cross_entropy(torch.func.functional_call(net, {n: w}, (x,)), y),
        ...     p.detach()).reshape(p.numel(), p.numel()).trace()) for n, p in net.named_parameters())
        >>> abs(est.value - exact) < 1e-10, est.matvecs
        (True, 60)
    """
    check_seed(seed)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        k, s = _split_budget(method, matvecs, sketch, op.size)
        q, aq = _sketch_basis(op, k, seed)
        z = _probe_terms(op, q, aq, s, seed).sum(0)
    value = float((q * aq).sum()) + float(z.mean())
    return TraceSketch(value=value, stderr=float(z.std() / math.sqrt(s)), method=method, curvature=curvature,
                       matvecs=op.products, sketch=k, probes=s)


def hutchpp_diagonal(
    model: nn.Module,
    data: Any,
    *,
    method: str = "hutch++",
    matvecs: int = 99,
    sketch: Optional[int] = None,
    seed: int = 0,
    curvature: str = "hessian",
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> DiagonalSketch:
    """Diag++ estimate of the diagonal of the Hessian (or GGN) of the mean training loss (module docstring).

    Arguments as for :func:`hutchpp_trace`; ``method="hutch++"`` is Diag++, ``"hutchinson"`` plain
    ``mean_j g_j * (A g_j)`` at the same budget.

    Returns:
        A :class:`DiagonalSketch` over every trainable parameter.
    """
    check_seed(seed)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        k, s = _split_budget(method, matvecs, sketch, op.size)
        q, aq = _sketch_basis(op, k, seed)
        z = _probe_terms(op, q, aq, s, seed)
    flat = (q * aq).sum(1) + z.mean(1)
    err = z.std(1) / math.sqrt(s)
    diag: Dict[str, Tensor] = {}
    stderr: Dict[str, Tensor] = {}
    start = 0
    for name, p in trainable_parameters(model):
        diag[name] = flat[start : start + p.numel()].view(p.shape)
        stderr[name] = err[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return DiagonalSketch(diag, stderr, method=method, curvature=curvature, matvecs=op.products, sketch=k, probes=s)
