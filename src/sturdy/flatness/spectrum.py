"""The spectrum of the curvature by Lanczos: top-k eigenvalues and a spectral density (SLQ).

Lanczos on the Hessian or GGN ``A`` of the mean training loss
(:class:`~sturdy.flatness.operator.CurvatureOperator`), one product per step, with **full
reorthogonalisation** (two Gram-Schmidt passes against every earlier vector, float64), builds
``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` with ``T_m`` tridiagonal. With ``T_m = U diag(theta) U^T``:

* **top-k eigenvalues** (:func:`hessian_eigenvalues`): the ``k`` largest Ritz values ``theta_i`` (largest
  algebraic: the top of a Hessian that may be indefinite), each with its residual
  ``||A y_i - theta_i y_i|| = beta_m |U_{m,i}|`` (``y_i = Q_m u_i``); the iteration stops when every residual is
  below ``tol * max |theta|`` or after ``iterations`` products;
* **spectral density by stochastic Lanczos quadrature** (:func:`spectral_density`; Lin, Saad and Yang
  2016; Ghorbani, Krishnan and Xiao 2019): for Rademacher probes ``v_l`` normalised to unit length, the
  Gauss quadrature of ``v^T f(A) v`` has nodes ``theta_{l,i}`` and weights ``tau_{l,i} = U_{1,i}^2``
  (exact for polynomials ``f`` of degree below ``2 m``); the density of the eigenvalues,
  ``(1/P) sum_j delta(t - lambda_j)``, is estimated by ``(1/L) sum_l sum_i tau_{l,i} delta(t - theta_{l,i})``
  (``E tau`` is exact for every polynomial of degree below ``2 m``) and smoothed with a Gaussian of width
  ``sigma`` on a grid. Probes run side by side: one pass over the data per step for all of them.

A probe whose Lanczos vector vanishes (an invariant subspace: ``beta_j <= BREAKDOWN * ||A||`` estimate)
stops early; its quadrature is then exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.flatness._data import LossFn
from sturdy.flatness.operator import CurvatureOperator, rademacher_matrix
from sturdy.utils import eval_mode
from sturdy.validation import check_count, check_number, check_seed

__all__ = ["Eigenvalues", "SpectralDensity", "hessian_eigenvalues", "spectral_density", "lanczos"]

BREAKDOWN = 1e-12
"""Relative size of a Lanczos residual below which the Krylov space is invariant (the probe stops)."""
MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class Eigenvalues:
    """The largest eigenvalues of the Hessian or GGN of the mean training loss, by Lanczos.

    Attributes:
        values: the ``k`` largest Ritz values, largest first. residuals: ``||A y - theta y||`` of each.
        iterations: Lanczos steps (matrix-vector products). converged: every residual below the tolerance.
        curvature: ``"hessian"`` or ``"ggn"``.
    """

    values: Tuple[float, ...]
    residuals: Tuple[float, ...]
    iterations: int
    converged: bool
    curvature: str

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return {"values": list(self.values), "residuals": list(self.residuals), "iterations": self.iterations,
                "converged": self.converged, "curvature": self.curvature}


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the eigenvalue density of the Hessian or GGN.

    Attributes:
        nodes, weights: per probe, the quadrature nodes (Ritz values) and weights (each probe's sum to 1).
        grid, density: the Gaussian-smoothed density on ``grid`` (it integrates to about 1).
        sigma: width of the Gaussian. iterations: Lanczos steps per probe; probes: number of probes;
        matvecs: products used in all. curvature: ``"hessian"`` or ``"ggn"``. size: dimension ``P``.
    """

    nodes: Tuple[Tuple[float, ...], ...]
    weights: Tuple[Tuple[float, ...], ...]
    grid: Tuple[float, ...]
    density: Tuple[float, ...]
    sigma: float
    iterations: int
    probes: int
    matvecs: int
    curvature: str
    size: int

    def moment(self, power: int) -> float:
        """``(1/L) sum_l sum_i tau_{l,i} theta_{l,i}^power``: an estimate of ``tr(A^power) / P``."""
        return sum(sum(w * t**power for t, w in zip(n, ws)) for n, ws in zip(self.nodes, self.weights)) / self.probes

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        out = {k: v for k, v in self.__dict__.items()}
        for key in ("nodes", "weights"):
            out[key] = [list(row) for row in out[key]]
        out["grid"], out["density"] = list(self.grid), list(self.density)
        return out


def _tridiagonal(alpha: List[float], beta: List[float]) -> Tensor:
    m = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


class _Lanczos:
    """Lanczos sequences with full reorthogonalisation from the columns of ``start`` ``(P, L)``, side by side.

    ``alphas[l]`` and ``betas[l]`` hold the diagonal and off-diagonal of probe ``l``'s ``T`` (``betas[l][-1]`` is
    the norm of the last residual, 0 when the Krylov space became invariant and the probe stopped).
    """

    def __init__(self, op: CurvatureOperator, start: Tensor) -> None:
        self.op = op
        self.basis = [[col / col.norm()] for col in start.t()]
        self.alphas: List[List[float]] = [[] for _ in self.basis]
        self.betas: List[List[float]] = [[] for _ in self.basis]
        self.active = list(range(len(self.basis)))
        self.scale = 0.0

    def step(self) -> None:
        """One product per active probe, all in one pass over the data."""
        products = self.op.matmat(torch.stack([self.basis[i][-1] for i in self.active], 1))
        still = []
        for col, i in enumerate(self.active):
            w, q = products[:, col], self.basis[i][-1]
            self.alphas[i].append(float(q @ w))
            self.scale = max(self.scale, float(w.norm()))
            qs = torch.stack(self.basis[i], 1)
            for _ in range(2):  # full reorthogonalisation; twice is enough
                w = w - qs @ (qs.t() @ w)
            beta = float(w.norm())
            if beta > BREAKDOWN * max(self.scale, 1e-300) and len(self.basis[i]) < self.op.size:
                self.basis[i].append(w / beta)
                self.betas[i].append(beta)
                still.append(i)
            else:
                self.betas[i].append(0.0)
        self.active = still


def lanczos(op: CurvatureOperator, start: Tensor, steps: int) -> Tuple[List[List[float]], List[List[float]]]:
    """``(alphas, betas)`` of ``steps`` Lanczos steps from each column of ``start`` (see :class:`_Lanczos`)."""
    run = _Lanczos(op, start)
    for _ in range(steps):
        if not run.active:
            break
        run.step()
    return run.alphas, run.betas


def hessian_eigenvalues(
    model: nn.Module,
    data: Any,
    *,
    k: int = 5,
    iterations: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    curvature: str = "hessian",
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> Eigenvalues:
    """The ``k`` largest eigenvalues of the Hessian (or GGN) of the mean training loss by Lanczos.

    Args:
        model: the network (evaluated in eval mode); data: as for
            :func:`~sturdy.flatness.curvature.hessian_diagonal`.
        k: eigenvalues wanted (at most the number of parameters).
        iterations: most Lanczos steps (products); convergence is checked every step after ``k``.
        tol: stop when every residual is below ``tol * max |theta|``.
        seed: seed of the Rademacher start vector (drawn on the CPU). curvature: ``"hessian"`` or ``"ggn"``.
        batch_size, loss_fn: as for :func:`~sturdy.flatness.sketching.hutchpp_trace`.

    Returns:
        :class:`Eigenvalues`, largest first.
    """
    check_seed(seed)
    check_number(tol, "tol", low=0, low_open=True)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        check_count(k, "k", high=op.size, why=f"the model has {op.size} trainable parameters")
        check_count(iterations, "iterations", low=k, high=MAX_ITERATIONS, why="at least k steps")
        run = _Lanczos(op, rademacher_matrix(op.size, 1, seed=seed))
        values, residuals, converged = (), (), False
        while run.active and op.products < iterations:
            run.step()
            alpha, beta = run.alphas[0], run.betas[0]
            if len(alpha) >= k or not run.active:
                values, residuals = _top_ritz(alpha, beta, k)
                top = max(abs(v) for v in values)
                converged = not run.active or max(residuals) <= tol * max(top, 1e-300)
                if converged:
                    break
    return Eigenvalues(values=values, residuals=residuals, iterations=op.products, converged=converged,
                       curvature=curvature)


def _top_ritz(alpha: List[float], beta: List[float], k: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    theta, u = torch.linalg.eigh(_tridiagonal(alpha, beta))
    order = torch.argsort(theta, descending=True)[:k]
    res = (abs(beta[-1]) * u[-1, order].abs()).tolist()
    return tuple(theta[order].tolist()), tuple(res)


def spectral_density(
    model: nn.Module,
    data: Any,
    *,
    iterations: int = 40,
    probes: int = 4,
    sigma: Optional[float] = None,
    points: int = 256,
    seed: int = 0,
    curvature: str = "hessian",
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian (or GGN) of the mean training loss by stochastic Lanczos quadrature.

    Args:
        model, data, seed, curvature, batch_size, loss_fn: as for :func:`hessian_eigenvalues`.
        iterations: Lanczos steps per probe (quadrature nodes); probes: Rademacher probes.
        sigma: width of the Gaussian smoothing (default 1% of the span of the nodes).
        points: grid points of the smoothed density (the grid spans the nodes plus ``5 sigma``).

    Returns:
        :class:`SpectralDensity` (``iterations * probes`` products at most).
    """
    check_seed(seed)
    check_count(probes, "probes", high=4096, why="probes run side by side, one vector each per step")
    check_count(points, "points", low=2, high=1_000_000, why="a grid of the density")
    if sigma is not None:
        check_number(sigma, "sigma", low=0, low_open=True)
    with eval_mode(model):
        op = CurvatureOperator(model, data, curvature=curvature, batch_size=batch_size, loss_fn=loss_fn)
        check_count(iterations, "iterations", high=min(MAX_ITERATIONS, op.size),
                    why=f"at most the {op.size} trainable parameters")
        alphas, betas = lanczos(op, rademacher_matrix(op.size, probes, seed=seed), iterations)
    nodes, weights = [], []
    for alpha, beta in zip(alphas, betas):
        theta, u = torch.linalg.eigh(_tridiagonal(alpha, beta))
        nodes.append(tuple(theta.tolist()))
        weights.append(tuple((u[0] ** 2).tolist()))
    grid, density, width = _smooth(nodes, weights, sigma, points)
    return SpectralDensity(nodes=tuple(nodes), weights=tuple(weights), grid=grid, density=density, sigma=width,
                           iterations=max(len(a) for a in alphas), probes=probes, matvecs=op.products,
                           curvature=curvature, size=op.size)


def _smooth(nodes: List[Tuple[float, ...]], weights: List[Tuple[float, ...]], sigma: Optional[float],
            points: int) -> Tuple[Tuple[float, ...], Tuple[float, ...], float]:
    theta = torch.tensor([t for row in nodes for t in row], dtype=torch.float64)
    tau = torch.tensor([w for row in weights for w in row], dtype=torch.float64) / len(nodes)
    span = float(theta.max() - theta.min())
    width = sigma if sigma is not None else max(0.01 * span, 1e-12 * max(1.0, float(theta.abs().max())))
    grid = torch.linspace(float(theta.min()) - 5 * width, float(theta.max()) + 5 * width, points, dtype=torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None] - theta[None]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return tuple(grid.tolist()), tuple((gauss @ tau).tolist()), width
