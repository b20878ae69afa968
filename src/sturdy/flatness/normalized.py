"""Normalized sharpness (Tsuzuku, Sato, Sugiyama, ICML 2020, arXiv:1901.04653).

For each weight tensor ``W`` of an ``nn.Linear`` (out x in), ``nn.Conv1d/2d/3d`` (out x in x kernel) or
``nn.Embedding`` (tokens x dim, taken as dim x tokens: its inputs are the tokens) with curvature
diagonal ``H`` of the mean training loss, kernel positions are aggregated,
``H_ij = sum_k H_ijk`` and ``S_ij = sum_k W_ijk^2`` (exact under the row/column-scaled posterior
``sigma_ijk^2 = alpha_i beta_j``), and

* ``variant="arxiv"`` (default): ``NS = min_{alpha, beta > 0} sum_ij H_ij alpha_i beta_j + S_ij / (alpha_i beta_j)``,
  solved by alternating the closed forms
  ``alpha_i = sqrt(sum_j S_ij / beta_j / sum_j H_ij beta_j)`` (and symmetrically for ``beta``), each an exact
  block minimisation of a function convex in ``(log alpha, log beta)``;
* ``variant="icml"``: ``NS = min_{beta > 0} sqrt( sum_i (sum_k H_ik beta_k) (sum_j S_ij / beta_j) )``, the
  ICML-2020 form, solved by damped Newton steps in ``log beta`` (convex there).

A grouped convolution's ``(out, in/groups)`` matrices are placed block-diagonally in ``(out, in)``
(weights that do not exist are zero in both ``H`` and ``S`` and add nothing), so that ``beta_j`` scales
input channel ``j`` whatever its group and the invariance below holds.

The network value is the sum over layers. Trainable matrices outside these layers (a bare
``nn.Parameter``, a ``ConvTranspose``, attention projections called through ``F``) are listed in
``skipped`` with a warning, or refused with ``strict=True``; biases and normalisation scales are outside
the measure by definition. The curvature is the GGN diagonal unless stated otherwise: the result says
whether it is the Hessian's (``is_hessian``), and ``require_hessian=True`` refuses when it is not.
A Monte-Carlo diagonal (``"ggn-mc"``) carries its uncertainty into ``stderr`` and ``interval``, and the low
bias of a minimum at a noisy diagonal (concave in it) is removed, both by the jackknife over its groups of
sampled labels (:mod:`~sturdy.flatness.jackknife`; ``plug_in_value`` is the uncorrected value; coverage over
seeds in BENCHMARKS.md). Negative curvature entries (stochastic diagonals) are clamped to 0 and counted. Rows
and columns whose curvature (or weight) is all zero, e.g. dead ReLU units, contribute exactly their infimum 0
and are removed analytically, never by a ridge:
even a tiny ridge breaks the rescaling invariance (BENCHMARKS.md, figures moved from docstrings).

Both variants are invariant under node-wise rescaling of ReLU networks
(``W_l <- D W_l, b_l <- D b_l, W_{l+1} <- W_{l+1} D^{-1}``): ``H`` and ``S`` of the affected rows and
columns scale by ``d^{-2}`` and ``d^2`` and the minimisation absorbs them. The solvers start from a
point that transforms the same way, so the iterates (not only the minimum) are covariant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import check_positive_int, select_weight_layers
from sturdy.flatness.curvature import HessianDiagonal, hessian_diagonal
from sturdy.flatness.jackknife import jackknife_layers
from sturdy.validation import check_model

__all__ = [
    "LayerSharpness",
    "NormalizedSharpness",
    "VARIANTS",
    "aggregate_layer",
    "solve_layer",
    "normalized_sharpness",
]

VARIANTS = ("arxiv", "icml")


@dataclass(frozen=True)
class LayerSharpness:
    """Normalized sharpness of one layer.

    Attributes:
        value: the layer's minimum.
        iterations: solver iterations (alternating sweeps for ``arxiv``, Newton steps for ``icml``).
        grad_norm: Euclidean norm of the objective's gradient in log space at the solution, divided
            by the objective (dimensionless; 0 at an exact minimiser).
        converged: the relative change of the objective fell below ``tol``.
        clamped_entries: negative entries of the aggregated curvature ``H_ij`` set to 0.
        removed_rows: rows (output units) removed analytically (all-zero curvature or weight).
        removed_cols: columns (input units) removed analytically.
        shape: ``(rows, cols)`` of the aggregated matrices.
    """

    value: float
    iterations: int
    grad_norm: float
    converged: bool
    clamped_entries: int
    removed_rows: int
    removed_cols: int
    shape: Tuple[int, int]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (``shape`` as a list)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class NormalizedSharpness:
    """Normalized sharpness of a network: ``value`` = sum of ``per_layer`` values.

    Attributes:
        value: network normalized sharpness.
        per_layer: module name -> :class:`LayerSharpness`.
        iterations: total solver iterations over layers.
        grad_norm: largest relative log-space gradient norm over layers.
        clamped_entries: total negative curvature entries clamped to 0.
        variant: ``"arxiv"`` or ``"icml"``.
        hessian_method: method of the curvature diagonal used (``"given"`` when passed as a plain mapping).
        quantity: ``"ggn_diagonal"``, ``"hessian_diagonal"`` or ``"given"``.
        is_hessian: whether the curvature was (an estimate of) the Hessian diagonal (``None``: unknown, given).
        skipped: trainable matrices not covered (see the module docstring).
        stderr: standard error of ``value`` from the Monte-Carlo curvature (jackknife over groups of sampled
            labels; 0 for an exact diagonal, ``None`` when unknown, e.g. Hutchinson or given diagonals).
        interval: 95% interval ``value -+ t stderr`` (Student's t, groups - 1 dof, for a Monte-Carlo curvature;
            ``None`` when ``stderr`` is).
        plug_in_value: the minimum at the mean curvature diagonal, before the jackknife's bias correction.
    """

    value: float
    per_layer: Dict[str, LayerSharpness]
    iterations: int
    grad_norm: float
    clamped_entries: int
    variant: str
    hessian_method: str
    quantity: str = "ggn_diagonal"
    is_hessian: Optional[bool] = None
    skipped: Tuple[str, ...] = ()
    stderr: Optional[float] = None
    interval: Optional[Tuple[float, float]] = field(default=None)
    plug_in_value: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types; ``per_layer`` maps module name -> :meth:`LayerSharpness.to_dict`."""
        return {
            "value": self.value, "per_layer": {k: v.to_dict() for k, v in self.per_layer.items()},
            "iterations": self.iterations, "grad_norm": self.grad_norm, "clamped_entries": self.clamped_entries,
            "variant": self.variant, "hessian_method": self.hessian_method, "quantity": self.quantity,
            "is_hessian": self.is_hessian, "skipped": list(self.skipped), "stderr": self.stderr,
            "interval": list(self.interval) if self.interval is not None else None,
            "plug_in_value": self.plug_in_value,
        }


def aggregate_layer(weight: Tensor, hessian: Tensor) -> Tuple[Tensor, Tensor]:
    """``(H, S)`` as float64 ``(out, in)`` matrices: sums over kernel positions of the curvature and of ``W^2``."""
    if weight.shape != hessian.shape:
        raise ConfigurationError(
            f"the Hessian diagonal must have the weight's shape {tuple(weight.shape)}, got {tuple(hessian.shape)}"
        )
    if weight.dim() < 2:
        raise ConfigurationError(f"weights must have at least 2 dimensions (out, in, ...), got {weight.dim()}")
    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(torch.float64)
    dims = tuple(range(2, w.dim()))
    if dims:
        return h.sum(dims), (w * w).sum(dims)
    return h.clone(), w * w


def layer_matrices(module: nn.Module, hessian: Tensor) -> Tuple[Tensor, Tensor]:
    """``(H, S)`` of a covered layer as float64 ``(out, in)`` matrices (module docstring): kernel positions
    summed, a grouped convolution block-diagonal, an Embedding transposed (dim x tokens)."""
    h, s = aggregate_layer(module.weight, hessian)
    if isinstance(module, nn.Embedding):
        return h.t().contiguous(), s.t().contiguous()
    groups = getattr(module, "groups", 1)
    if groups > 1:
        out, per_group = h.shape
        rows = out // groups
        hh, ss = h.new_zeros(out, per_group * groups), s.new_zeros(out, per_group * groups)
        for g in range(groups):
            block = (slice(g * rows, (g + 1) * rows), slice(g * per_group, (g + 1) * per_group))
            hh[block], ss[block] = h[g * rows : (g + 1) * rows], s[g * rows : (g + 1) * rows]
        return hh, ss
    return h, s


def _prune(h: Tensor, s: Tensor, *, icml: bool) -> Tuple[Tensor, Tensor]:
    """Boolean masks of the rows and columns kept after removing those with infimum contribution 0."""
    rows = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    cols = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
    if icml:
        # Objective sum_{k != j} C_kj b_k / b_j + trace(C), C = H^T S. A column whose off-diagonal row of C
        # is zero can take b -> inf; one whose off-diagonal column is zero can take b -> 0.
        c = h.t() @ s
        c.fill_diagonal_(0.0)
        while True:
            sub = c[cols][:, cols]
            keep = (sub.sum(1) > 0) & (sub.sum(0) > 0)
            if bool(keep.all()):
                return rows, cols
            idx = cols.nonzero().squeeze(1)
            cols[idx[~keep]] = False
    while True:
        hs, ss = h[rows][:, cols], s[rows][:, cols]
        keep_r = (hs.sum(1) > 0) & (ss.sum(1) > 0)
        keep_c = (hs.sum(0) > 0) & (ss.sum(0) > 0)
        if bool(keep_r.all()) and bool(keep_c.all()):
            return rows, cols
        ridx, cidx = rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)
        rows[ridx[~keep_r]] = False
        cols[cidx[~keep_c]] = False


def _solve_arxiv(h: Tensor, s: Tensor, *, tol: float, max_iter: int) -> Tuple[float, int, float, bool]:
    beta = (s.sum(0) / h.sum(0)).sqrt()
    value = math.inf
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        alpha = ((s @ (1.0 / beta)) / (h @ beta)).sqrt()
        beta = ((s.t() @ (1.0 / alpha)) / (h.t() @ alpha)).sqrt()
        new = float(alpha @ h @ beta + (1.0 / alpha) @ s @ (1.0 / beta))
        if abs(value - new) <= tol * new:
            value = new
            converged = True
            break
        value = new
    a_h, a_s = alpha * (h @ beta), (s @ (1.0 / beta)) / alpha
    b_h, b_s = beta * (h.t() @ alpha), (s.t() @ (1.0 / alpha)) / beta
    grad = torch.cat([a_h - a_s, b_h - b_s])
    return value, it, float(grad.norm()) / value, converged


def _solve_icml(h: Tensor, s: Tensor, *, constant: float, tol: float, max_iter: int) -> Tuple[float, int, float, bool]:
    """Minimise ``constant + sum_{k != j} C_kj b_k / b_j`` (``C = H^T S``) by damped Newton steps in ``log b``."""
    c = h.t() @ s
    c.fill_diagonal_(0.0)
    n = c.shape[0]
    u = 0.5 * ((s.sum(0)).log() - (h.sum(0)).log())  # covariant start, as for the arxiv variant

    def terms(v: Tensor) -> Tensor:
        return c * torch.exp(v[:, None] - v[None, :])

    e = terms(u)
    f = float(e.sum())
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        grad = e.sum(1) - e.sum(0)
        hess = torch.diag(e.sum(1) + e.sum(0)) - (e + e.t())
        # The objective is invariant along u + t*1: solve in the orthogonal complement (pseudo-inverse).
        evals, evecs = torch.linalg.eigh(hess)
        cutoff = evals.abs().max() * n * torch.finfo(h.dtype).eps
        inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
        step = -(evecs @ (inv * (evecs.t() @ grad)))
        slope = float(grad @ step)
        t = 1.0
        while True:
            e_new = terms(u + t * step)
            f_new = float(e_new.sum())
            if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        u = u + t * step
        e = e_new
        change = abs(f - f_new)
        f = f_new
        if change <= tol * (f + constant):
            converged = True
            break
    grad = e.sum(1) - e.sum(0)
    total = f + constant
    return math.sqrt(total), it, float(grad.norm()) / total if total > 0 else 0.0, converged


def solve_layer(
    h: Tensor, s: Tensor, *, variant: str = "arxiv", tol: float = 1e-10, max_iter: int = 10_000
) -> LayerSharpness:
    """Minimise one layer's normalized-sharpness objective over the aggregated ``(out, in)`` matrices.

    Args:
        h: aggregated curvature ``H_ij`` (negative entries are clamped to 0 and counted).
        s: aggregated squared weights ``S_ij >= 0``.
        variant: ``"arxiv"`` or ``"icml"`` (see the module docstring).
        tol: stop when the objective changes by less than ``tol`` relatively between iterations.
        max_iter: iteration cap.

    Returns:
        :class:`LayerSharpness` (computed in float64).

    Example:
        >>> import torch
        >>> solve_layer(torch.tensor([[4.0]]), torch.tensor([[9.0]])).value  # 1x1: 2 sqrt(H S)
        12.0
    """
    if variant not in VARIANTS:
        raise ConfigurationError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not (isinstance(tol, float) and math.isfinite(tol) and tol > 0):
        raise ConfigurationError(f"tol must be a finite float > 0, got {tol!r}")
    check_positive_int("max_iter", max_iter)
    if h.dim() != 2 or h.shape != s.shape:
        raise ConfigurationError(
            f"h and s must be 2-D matrices of one shape, got {tuple(h.shape)} and {tuple(s.shape)}"
        )
    h = h.detach().to(torch.float64)
    s = s.detach().to(torch.float64)
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(s).all())):
        raise ConfigurationError("curvature and weights must be finite; got NaN or inf entries")
    if bool((s < 0).any()):
        raise ConfigurationError("s holds squared weights and must be >= 0")
    clamped = int((h < 0).sum())
    h = h.clamp_min(0.0)
    rows, cols = _prune(h, s, icml=variant == "icml")
    shape = (int(h.shape[0]), int(h.shape[1]))
    removed_r, removed_c = shape[0] - int(rows.sum()), shape[1] - int(cols.sum())
    if variant == "icml":
        # Rows never need removing: a row with zero curvature or weight adds exactly 0 to every term.
        # Terms C_jj = sum_i H_ij S_ij do not depend on beta and survive the removal of column j.
        constant = float((h * s).sum())
        hh, ss = h[:, cols], s[:, cols]
        removed_r = 0
        if hh.shape[1] <= 1:
            return LayerSharpness(math.sqrt(constant), 0, 0.0, True, clamped, removed_r, removed_c, shape)
        value, it, grad, conv = _solve_icml(hh, ss, constant=constant, tol=tol, max_iter=max_iter)
    else:
        hh, ss = h[rows][:, cols], s[rows][:, cols]
        if hh.numel() == 0:
            return LayerSharpness(0.0, 0, 0.0, True, clamped, removed_r, removed_c, shape)
        value, it, grad, conv = _solve_arxiv(hh, ss, tol=tol, max_iter=max_iter)
    return LayerSharpness(value, it, grad, conv, clamped, removed_r, removed_c, shape)


HessianInput = Union[HessianDiagonal, Mapping[str, Tensor]]


def normalized_sharpness(
    model: nn.Module,
    data: Any = None,
    *,
    variant: str = "arxiv",
    hessian: Optional[HessianInput] = None,
    layers: Optional[Sequence[str]] = None,
    strict: bool = False,
    require_hessian: bool = False,
    method: str = "auto",
    tol: float = 1e-10,
    max_iter: int = 10_000,
    batch_size: int = 1024,
    chunk_size: Optional[int] = None,
    progress: bool = False,
) -> NormalizedSharpness:
    """Normalized sharpness of the Linear, Conv1d/2d/3d and Embedding weights of ``model``.

    Args:
        model: the network (eval mode; its weights are read, never changed).
        data: training data (as for :func:`sturdy.flatness.hessian_diagonal`); needed unless ``hessian`` is given.
        variant: ``"arxiv"`` or ``"icml"`` (module docstring).
        hessian: a precomputed :class:`HessianDiagonal` or mapping parameter name -> diagonal; default:
            ``hessian_diagonal(model, data, method=method)`` of the covered weights.
        layers: module names to include; default every covered layer with a trainable weight.
        strict: refuse (instead of warning about) trainable matrices outside the covered layers.
        require_hessian: refuse a curvature that is not (an estimate of) the Hessian diagonal, e.g. the GGN
            diagonal of a GELU network (use ``method="hutchinson"`` for a stochastic Hessian diagonal).
        method: method of the diagonal when it is computed here (``"auto"``: exact GGN up to
            :data:`sturdy.flatness.curvature.MC_CLASS_THRESHOLD` classes, Monte Carlo above).
        tol, max_iter: solver stopping rule (relative objective change) and cap, per layer.
        batch_size, chunk_size, progress: passed to :func:`hessian_diagonal`.

    Returns:
        :class:`NormalizedSharpness`; the sum over layers, with per-layer details, what the curvature was,
        what was skipped, and the Monte-Carlo uncertainty when there is one.
    """
    check_model(model)
    if variant not in VARIANTS:
        raise ConfigurationError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    chosen, skipped = select_weight_layers(model, layers, strict=strict)
    names = [f"{n}.weight" if n else "weight" for n, _ in chosen]
    if hessian is None:
        if data is None:
            raise ConfigurationError("pass the training data (data=...) or a precomputed hessian=...")
        hessian = hessian_diagonal(model, data, method=method, parameters=names, batch_size=batch_size,
                                   chunk_size=chunk_size, progress=progress)
    diag, hd = _curvature(hessian, names, require_hessian=require_hessian)

    def solve_all(diagonal: Mapping[str, Tensor]) -> Dict[str, LayerSharpness]:
        return {
            module_name: solve_layer(*layer_matrices(module, diagonal[pname]), variant=variant, tol=tol,
                                     max_iter=max_iter)
            for (module_name, module), pname in zip(chosen, names)
        }

    plug_in = solve_all(diag)
    if hd is not None and hd.method == "ggn-exact":
        return _result(plug_in, plug_in, hd, variant=variant, skipped=skipped, stderr=0.0, half_width=0.0)
    if hd is not None and hd.replicates:
        per_layer, stderr, half_width = jackknife_layers(hd.replicates, names, plug_in, solve_all)
        return _result(per_layer, plug_in, hd, variant=variant, skipped=skipped, stderr=stderr, half_width=half_width)
    return _result(plug_in, plug_in, hd, variant=variant, skipped=skipped, stderr=None, half_width=0.0)


def _curvature(
    hessian: HessianInput, names: List[str], *, require_hessian: bool
) -> Tuple[Dict[str, Tensor], Optional[HessianDiagonal]]:
    """The diagonal by parameter name, and the :class:`HessianDiagonal` it came from (``None``: a mapping)."""
    if isinstance(hessian, HessianDiagonal):
        diag, hd = hessian.diagonal, hessian
    elif isinstance(hessian, Mapping):
        diag, hd = dict(hessian), None
    else:
        raise ConfigurationError(
            "hessian must be a HessianDiagonal or a mapping of parameter names to tensors, "
            f"got {type(hessian).__name__}"
        )
    if require_hessian and not (hd is not None and hd.is_hessian):
        why = (f"the traced operators ({', '.join(hd.reasons)}) make it the GGN diagonal only" if hd is not None
               else "a plain mapping says nothing about it")
        raise ConfigurationError(
            f"require_hessian=True but the curvature is not the Hessian diagonal: {why}; use "
            "hessian_diagonal(..., method='hutchinson') for a stochastic Hessian diagonal, or drop require_hessian"
        )
    missing = [n for n in names if n not in diag]
    if missing:
        raise ConfigurationError(f"the curvature diagonal lacks parameter(s) {', '.join(missing)}; recompute it")
    return diag, hd


def _result(
    per_layer: Dict[str, LayerSharpness],
    plug_in: Dict[str, LayerSharpness],
    hd: Optional[HessianDiagonal],
    *,
    variant: str,
    skipped: Tuple[str, ...],
    stderr: Optional[float],
    half_width: float,
) -> NormalizedSharpness:
    """The network's value from the (possibly bias-corrected) ``per_layer`` results."""
    value = float(sum(r.value for r in per_layer.values()))
    return NormalizedSharpness(
        value=value,
        per_layer=per_layer,
        iterations=sum(r.iterations for r in per_layer.values()),
        grad_norm=max(r.grad_norm for r in per_layer.values()),
        clamped_entries=sum(r.clamped_entries for r in per_layer.values()),
        variant=variant,
        hessian_method=hd.method if hd is not None else "given",
        quantity=hd.quantity if hd is not None else "given",
        is_hessian=hd.is_hessian if hd is not None else None,
        skipped=skipped,
        stderr=stderr,
        interval=None if stderr is None else (value - half_width, value + half_width),
        plug_in_value=float(sum(r.value for r in plug_in.values())),
    )
