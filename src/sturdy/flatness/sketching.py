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

**XTrace / XDiag** (Epperly, Tropp and Webber 2024; ``method="xtrace"`` / ``"xdiag"``) use every product
both ways (exchangeable): ``m / 2`` Rademacher vectors ``Omega``, ``Y = A Omega``, ``Q R = Y`` and
``Z = A Q``. Estimate ``i`` deflates by ``Q_(i)``, an orthonormal basis of ``Y`` without column ``i``
(``P_i = Q Q^T - q_i q_i^T`` with ``q_i = Q s_i``, ``s_i`` the normalised column ``i`` of ``R^{-T}``), and
probes the rest with ``omega_i``, which ``Q_(i)`` does not depend on:

* XTrace: ``t_i = tr(Q^T A Q) - q_i^T A q_i + r_i^T A r_i`` with ``r_i = (I - P_i) omega_i``;
* XDiag: ``d_i = diag(P_i A) + omega_i * ((I - P_i) A omega_i)``.

Each ``t_i``/``d_i`` is unbiased, so their mean is; all the products with ``q_i`` and ``r_i`` are
combinations of the columns of ``Y`` and ``Z`` (no further products). The standard error is the spread of
the ``m / 2`` estimates over ``sqrt(m / 2)`` (they are exchangeable, not independent: an indication). When
the sketch captures the range of ``A`` (a diagonal entry of ``R`` below :data:`RANK_TOL` of the largest:
``A`` has rank below ``m / 2``), ``Q Q^T A = A`` to that rounding and the estimate is the sketch's exact
``tr(Q^T A Q)`` / ``diag(Q Q^T A)``, standard error 0.
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

__all__ = ["TraceSketch", "DiagonalSketch", "hutchpp_trace", "hutchpp_diagonal", "SKETCH_METHODS", "TRACE_METHODS",
           "DIAGONAL_METHODS"]

SKETCH_METHODS = ("hutch++", "hutchinson")
TRACE_METHODS = ("hutch++", "xtrace", "hutchinson")
"""Methods of :func:`hutchpp_trace`."""
DIAGONAL_METHODS = ("hutch++", "xdiag", "hutchinson")
"""Methods of :func:`hutchpp_diagonal` (``"hutch++"`` is Diag++)."""
RANK_TOL = 1e-8
"""Relative size of a diagonal entry of ``R`` below which XTrace/XDiag take the sketch as exact."""
MAX_MATVECS = 100_000
"""Upper bound of ``matvecs`` (each product is a pass over the data)."""


@dataclass(frozen=True)
class TraceSketch:
    """A stochastic trace of the Hessian or GGN of the mean training loss.

    Attributes:
        value: the estimate. stderr: standard error of its probe part over ``probes`` (given the sketch;
            XTrace: the spread of its exchangeable estimates, an indication).
        method: ``"hutch++"``, ``"xtrace"`` or ``"hutchinson"``. curvature: ``"hessian"`` or ``"ggn"``.
        matvecs: matrix-vector products used; sketch: columns of the sketch (0 for Hutchinson);
        probes: Rademacher probes of the probe part (XTrace/XDiag: the same ``matvecs / 2`` vectors as the sketch).
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
        stderr: parameter name -> standard error of each entry's probe part (given the sketch; XDiag: the
            spread of its exchangeable estimates, an indication).
        method: ``"hutch++"`` (Diag++), ``"xdiag"`` or ``"hutchinson"``; curvature, matvecs, sketch, probes: as
            in :class:`TraceSketch`.
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
    """``(k, s)``: sketch columns and probes for a budget of ``matvecs`` products (XTrace/XDiag: ``k = s``)."""
    if method in ("xtrace", "xdiag"):
        if sketch is not None:
            raise ConfigurationError(f"sketch applies to method='hutch++' only ({method} uses matvecs / 2 vectors "
                                     "both ways)")
        check_int(matvecs, "matvecs", low=4, high=MAX_MATVECS)
        m = min(matvecs // 2, size)  # more vectors than directions would add nothing
        return m, m
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


def _check_method(method: str, methods: Tuple[str, ...]) -> None:
    if method not in methods:
        raise ConfigurationError(f"method must be one of {', '.join(methods)}, got {method!r}")


def _spread(estimates: Tensor) -> Tensor:
    """Standard error of the mean of the columns of ``estimates`` ``(rows, m)``, row by row."""
    return estimates.std(1) / math.sqrt(estimates.shape[1])


def _exchangeable(op: CurvatureOperator, m: int, seed: int, *, trace: bool) -> Tensor:
    """The ``m`` XTrace estimates ``(m,)`` or XDiag estimates ``(P, m)`` (module docstring); ``2 m`` products."""
    omega = rademacher_matrix(op.size, m, seed=seed)
    y = op.matmat(omega)
    q, r = torch.linalg.qr(y)
    z = op.matmat(q)
    h = q.t() @ z  # Q^T A Q
    scale = r.diagonal().abs()
    if bool((scale <= RANK_TOL * scale.max()).any()):  # the sketch holds the range of A: Q Q^T A = A
        exact = h.trace().reshape(1) if trace else (q * z).sum(1, keepdim=True)
        return exact.expand(m) if trace else exact.expand(-1, m)
    s = torch.linalg.solve_triangular(r, torch.eye(m, dtype=r.dtype), upper=True).t()  # R^{-T}
    s = s / s.norm(dim=0, keepdim=True)  # q_i = Q s_i: unit, orthogonal to every other column of Y
    qs, zs = q @ s, z @ s  # q_i and A q_i as columns
    if trace:
        w = q.t() @ omega  # Q^T omega_i
        dsw = (s * w).sum(0)  # s_i^T Q^T omega_i
        resid = omega - q @ w + qs * dsw  # r_i = (I - P_i) omega_i
        a_resid = y - z @ w + zs * dsw  # A r_i
        return h.trace() - (s * (h @ s)).sum(0) + (resid * a_resid).sum(0)
    t = q.t() @ y  # Q^T A omega_i
    dst = (s * t).sum(0)
    return (q * z).sum(1, keepdim=True) - qs * zs + omega * (y - q @ t + qs * dst)


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
        method: ``"hutch++"`` (default), ``"xtrace"`` (exchangeable, module docstring) or ``"hutchinson"``
            (plain probes at the same budget).
        matvecs: matrix-vector products in all (>= 4 for Hutch++ and XTrace, >= 2 for Hutchinson).
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
    _check_method(method, TRACE_METHODS)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        k, s = _split_budget(method, matvecs, sketch, op.size)
        if method == "xtrace":
            estimates = _exchangeable(op, k, seed, trace=True)
            return TraceSketch(value=float(estimates.mean()), stderr=_spread(estimates.unsqueeze(0))[0].item(),
                               method=method, curvature=curvature, matvecs=op.products, sketch=k, probes=k)
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

    Arguments as for :func:`hutchpp_trace`; ``method="hutch++"`` is Diag++, ``"xdiag"`` XDiag (module
    docstring), ``"hutchinson"`` plain ``mean_j g_j * (A g_j)`` at the same budget.

    Returns:
        A :class:`DiagonalSketch` over every trainable parameter.
    """
    check_seed(seed)
    _check_method(method, DIAGONAL_METHODS)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        k, s = _split_budget(method, matvecs, sketch, op.size)
        if method == "xdiag":
            estimates = _exchangeable(op, k, seed, trace=False)
            flat, err = estimates.mean(1), _spread(estimates)
        else:
            q, aq = _sketch_basis(op, k, seed)
            z = _probe_terms(op, q, aq, s, seed)
            flat, err = (q * aq).sum(1) + z.mean(1), z.std(1) / math.sqrt(s)
    diag: Dict[str, Tensor] = {}
    stderr: Dict[str, Tensor] = {}
    start = 0
    for name, p in trainable_parameters(model):
        diag[name] = flat[start : start + p.numel()].view(p.shape)
        stderr[name] = err[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return DiagonalSketch(diag, stderr, method=method, curvature=curvature, matvecs=op.products, sketch=k, probes=s)
