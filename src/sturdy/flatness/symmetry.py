"""Attention's symmetries, and a normalized sharpness invariant under them (the balanced form).

In nn.Linear notation (``y = x W^T + b``) head ``h`` of a multi-head attention block owns rows ``r_h`` of the
query, key and value weights and columns ``r_h`` of the output weight. Its scores depend on the query-key
pair only through ``W_Q[r_h]^T W_K[r_h]`` and its output on the value-output pair only through
``W_O[:, r_h] W_V[r_h]``, so for any invertible ``A`` and ``B`` (``d_head x d_head``, per head)

    W_Q[r_h] <- A^T W_Q[r_h],  b_Q[r_h] <- A^T b_Q[r_h],   W_K[r_h] <- A^{-1} W_K[r_h],  b_K[r_h] <- A^{-1} b_K[r_h],
    W_V[r_h] <- B W_V[r_h],    b_V[r_h] <- B b_V[r_h],     W_O[:, r_h] <- W_O[:, r_h] B^{-1}

leave the function unchanged (a ``GL(d_head)^2`` symmetry per head; the geodesic-sharpness paper,
arXiv:2505.05409, measures sharpness in the quotient by it). Normalized and adaptive sharpness absorb only
its diagonal part, so they move along these transformations.

**Balanced form.** Write a pair as two ``E x d`` matrices, ``P = W_Q[r_h]^T`` (or ``W_V[r_h]^T``) and
``Q = W_K[r_h]^T`` (or ``W_O[:, r_h]``): the symmetry is ``P <- P A``, ``Q <- Q A^{-T}``, and ``M = P Q^T``
is invariant. With thin QR factorisations ``P = Q_1 R_1``, ``Q = Q_2 R_2`` and the SVD
``R_1 R_2^T = U S V^T``, the transform ``A* = R_1^{-1} U S^{1/2}`` gives ``P A* = Q_1 U S^{1/2}`` and
``Q A*^{-T} = Q_2 V S^{1/2}``: the balanced factors of the SVD of ``M`` (``P^T P = Q^T Q = S``), which depend
on ``M`` alone, up to the signs of singular-vector pairs (a sign flip of row ``i`` of both matrices: a
diagonal rescaling, which normalized sharpness absorbs exactly). :func:`balance_attention` applies ``A*``
(biases with it) to every head: same function, and every symmetry-transformed copy of a model has the same
balanced form.

:func:`balanced_normalized_sharpness` is the normalized sharpness (GGN diagonal at the balanced weights)
of every covered layer (Linear, Conv, Embedding) and of every attention projection matrix that is not a
covered layer's weight (each of the query, key and value blocks of ``nn.MultiheadAttention``'s
``in_proj_weight`` as its own ``E x E`` matrix) of the balanced model: exactly invariant under the attention
symmetries, and normalized sharpness itself on a network without attention.

Attention blocks are found through a registry: ``nn.MultiheadAttention`` is registered; a hand-written block
registers ``@register_attention(MyBlock)`` with a function returning its heads, usually
:func:`linear_heads` of its four ``nn.Linear`` projections.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.flatness._data import check_positive_int, skipped_weights, weight_layers
from sturdy.flatness.curvature import HessianDiagonal, hessian_diagonal
from sturdy.flatness.jackknife import jackknife_layers
from sturdy.flatness.normalized import VARIANTS, LayerSharpness, layer_matrices, solve_layer
from sturdy.validation import check_model, check_seed

__all__ = ["Side", "HeadPair", "AttentionBlock", "register_attention", "linear_heads", "attention_blocks",
           "balance_attention", "transform_attention", "BalancedSharpness", "balanced_normalized_sharpness",
           "RANK_TOL"]

RANK_TOL = 1e-10
"""Smallest singular value of a pair's product, relative to its largest, that the balanced form accepts."""


@dataclass(frozen=True)
class Side:
    """One side of a head pair as an ``E x d`` matrix: rows ``index`` of ``weight`` transposed (``rows=True``:
    a query, key or value block) or its columns ``index`` (an output block); ``bias``: its ``d`` bias entries."""

    weight: Tensor
    index: slice
    rows: bool
    bias: Optional[Tensor] = None

    def matrix(self) -> Tensor:
        return (self.weight[self.index].t() if self.rows else self.weight[:, self.index]).detach()

    def assign(self, value: Tensor, bias: Optional[Tensor]) -> None:
        with torch.no_grad():
            if self.rows:
                self.weight[self.index] = value.t()
            else:
                self.weight[:, self.index] = value
            if self.bias is not None and bias is not None:
                self.bias[self.index] = bias


@dataclass(frozen=True)
class HeadPair:
    """Two sides whose product ``P Q^T`` is invariant under ``P <- P A``, ``Q <- Q A^{-T}``."""

    first: Side
    second: Side


@dataclass(frozen=True)
class AttentionBlock:
    """The head pairs of one attention module and its projection matrices outside covered layers
    (parameter attribute, rows or ``None`` for all): those the balanced measure adds to the covered layers."""

    pairs: List[HeadPair]
    matrices: List[Tuple[str, Optional[slice]]] = field(default_factory=list)


_ATTENTION: Dict[type, Callable[[nn.Module], AttentionBlock]] = {}


def register_attention(*module_types: type) -> Callable[[Callable[[nn.Module], AttentionBlock]],
                                                          Callable[[nn.Module], AttentionBlock]]:
    """Register ``fn(module) -> AttentionBlock`` for attention module types (subclasses too)."""

    def decorator(fn: Callable[[nn.Module], AttentionBlock]) -> Callable[[nn.Module], AttentionBlock]:
        for module_type in module_types:
            _ATTENTION[module_type] = fn
        return fn

    return decorator


def _heads(q: Tuple[Tensor, Optional[Tensor]], k: Tuple[Tensor, Optional[Tensor]],
           v: Tuple[Tensor, Optional[Tensor]], o: Tensor, num_heads: int, what: str) -> List[HeadPair]:
    width = q[0].shape[0]
    if num_heads < 1 or width % num_heads or k[0].shape[0] != width or v[0].shape[0] != o.shape[1]:
        raise UnsupportedModuleError(f"{what}: query/key rows ({width}, {k[0].shape[0]}) and value rows/output "
                                     f"columns ({v[0].shape[0]}, {o.shape[1]}) must split into {num_heads} heads")
    qk, vo = width // num_heads, v[0].shape[0] // num_heads
    pairs = []
    for h in range(num_heads):
        r, s = slice(h * qk, (h + 1) * qk), slice(h * vo, (h + 1) * vo)
        pairs.append(HeadPair(Side(q[0], r, True, q[1]), Side(k[0], r, True, k[1])))
        pairs.append(HeadPair(Side(v[0], s, True, v[1]), Side(o, s, False)))
    return pairs


def linear_heads(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear,
                 num_heads: int) -> AttentionBlock:
    """The heads of a block with four ``nn.Linear`` projections (head ``h``: rows/columns ``h d .. (h+1) d``)."""
    pairs = _heads((query.weight, query.bias), (key.weight, key.bias), (value.weight, value.bias), output.weight,
                   num_heads, "attention block")
    return AttentionBlock(pairs)


@register_attention(nn.MultiheadAttention)
def _multihead(module: nn.Module) -> AttentionBlock:
    if module.bias_k is not None or module.bias_v is not None:
        raise UnsupportedModuleError("nn.MultiheadAttention with add_bias_kv=True is not supported by the balanced "
                                     "form (its extra key/value rows would need the heads' transforms too)",
                                     module=module)
    e, heads = module.embed_dim, module.num_heads
    bias = module.in_proj_bias
    parts = [slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)]
    biases = [None if bias is None else bias[p] for p in parts]
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        weights = [w[p] for p in parts]
        matrices = [("in_proj_weight", p) for p in parts]
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        matrices = [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", None)]
    pairs = _heads((weights[0], biases[0]), (weights[1], biases[1]), (weights[2], biases[2]),
                   module.out_proj.weight, heads, "nn.MultiheadAttention")
    return AttentionBlock(pairs, [(n, p) for n, p in matrices if getattr(module, n).requires_grad])


def attention_blocks(model: nn.Module) -> List[Tuple[str, AttentionBlock]]:
    """``(module name, block)`` of every registered attention module of ``model``, in ``named_modules`` order."""
    out = []
    for name, module in model.named_modules():
        for klass in type(module).__mro__:
            if klass in _ATTENTION:
                out.append((name, _ATTENTION[klass](module)))
                break
    return out


def _apply(pair: HeadPair, a: Tensor) -> None:
    """``P <- P A``, ``Q <- Q A^{-T}`` (biases with them), in the parameters' dtype."""
    first, second = pair.first, pair.second
    inv_t = torch.linalg.inv(a).t()
    for side, t in ((first, a), (second, inv_t)):
        m = side.matrix().to(torch.float64)
        b = None if side.bias is None else side.bias[side.index].detach().to(torch.float64) @ t
        side.assign((m @ t).to(side.weight.dtype), None if b is None else b.to(side.weight.dtype))


def _balancing(pair: HeadPair, where: str) -> Tensor:
    """``A* = R_1^{-1} U S^{1/2}`` of the pair (module docstring), float64."""
    q1, r1 = torch.linalg.qr(pair.first.matrix().to(torch.float64))
    _, r2 = torch.linalg.qr(pair.second.matrix().to(torch.float64))
    u, s, _ = torch.linalg.svd(r1 @ r2.t())
    if s.numel() == 0 or float(s[-1]) <= RANK_TOL * float(s[0]):
        raise ConfigurationError(f"{where}: a head's query-key or value-output product is rank-deficient (singular "
                                 "values down to 0), so its balanced form is not unique")
    return torch.linalg.solve_triangular(r1, u * s.sqrt(), upper=True)


def balance_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every registered attention head in its balanced form (module docstring).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> net = nn.MultiheadAttention(8, 2, batch_first=True).double()
        >>> x = torch.randn(3, 5, 8, dtype=torch.float64)
        >>> balanced = balance_attention(net)
        >>> torch.allclose(balanced(x, x, x)[0], net(x, x, x)[0])
        True
    """
    check_model(model)
    out = copy.deepcopy(model)
    for name, block in attention_blocks(out):
        for pair in block.pairs:
            _apply(pair, _balancing(pair, f"attention module {name!r}"))
    return out


def transform_attention(model: nn.Module, *, seed: int = 0, condition: float = 10.0) -> nn.Module:
    """A copy of ``model`` with a random invertible ``A`` applied to every head pair (module docstring):
    ``A = U diag(exp(t)) V`` with Haar-random orthogonal ``U, V`` and ``t`` uniform in ``[-log c / 2, log c / 2]``
    (condition number at most ``condition``), drawn on the CPU from ``seed``. The function is unchanged."""
    check_model(model)
    check_seed(seed)
    if not (isinstance(condition, (int, float)) and math.isfinite(condition) and condition >= 1):
        raise ConfigurationError(f"condition must be a finite number >= 1, got {condition!r}")
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for _, block in attention_blocks(out):
        for pair in block.pairs:
            d = pair.first.matrix().shape[1]
            u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            t = (torch.rand(d, generator=gen, dtype=torch.float64) - 0.5) * math.log(condition)
            _apply(pair, u @ torch.diag(t.exp()) @ v)
    return out


@dataclass(frozen=True)
class BalancedSharpness:
    """Normalized sharpness of the balanced model.

    Attributes:
        value: sum over layers and attention matrices. per_layer: layer or ``module.param[rows]`` -> value.
        variant: ``"arxiv"`` or ``"icml"``. balanced: whether the heads were balanced first.
        heads: head pairs balanced (query-key and value-output pairs of every head).
        quantity, hessian_method, is_hessian: the curvature used (as in normalized sharpness).
        skipped: trainable matrices left out. stderr, interval: the Monte-Carlo uncertainty (jackknife over
            the groups of sampled labels; 0 and a point for the exact diagonal).
    """

    value: float
    per_layer: Dict[str, float]
    variant: str
    balanced: bool
    heads: int
    quantity: str
    hessian_method: str
    is_hessian: bool
    skipped: Tuple[str, ...]
    stderr: float
    interval: Tuple[float, float]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        out = dict(self.__dict__)
        out["per_layer"], out["skipped"], out["interval"] = dict(self.per_layer), list(self.skipped), list(
            self.interval)
        return out


def _pieces(model: nn.Module) -> Tuple[List[Tuple[str, str, Optional[nn.Module], Optional[slice]]], int]:
    """``(label, parameter name, covered module or None, rows)`` of every matrix measured, and the head pairs."""
    pieces: List[Tuple[str, str, Optional[nn.Module], Optional[slice]]] = [
        (n, f"{n}.weight" if n else "weight", m, None) for n, m in weight_layers(model)]
    heads = 0
    for name, block in attention_blocks(model):
        heads += len(block.pairs)
        for attr, rows in block.matrices:
            pname = f"{name}.{attr}" if name else attr
            label = pname if rows is None else f"{pname}[{rows.start}:{rows.stop}]"
            pieces.append((label, pname, None, rows))
    return pieces, heads


def balanced_normalized_sharpness(
    model: nn.Module,
    data: Any = None,
    *,
    variant: str = "arxiv",
    balance: bool = True,
    hessian: Optional[HessianDiagonal] = None,
    method: str = "auto",
    tol: float = 1e-10,
    max_iter: int = 10_000,
    batch_size: int = 1024,
    progress: bool = False,
) -> BalancedSharpness:
    """Normalized sharpness of ``model`` after balancing its attention heads (module docstring).

    Args:
        model: the network (eval mode; not modified: the balanced copy is measured).
        data: training data (as for :func:`sturdy.flatness.hessian_diagonal`).
        variant: ``"arxiv"`` or ``"icml"`` (:mod:`sturdy.flatness.normalized`).
        balance: balance the heads first (``False``: the same matrices at the given weights, which moves
            along the attention symmetries: the comparison).
        hessian: a GGN diagonal of ``model`` to reuse; used only when nothing was balanced (a balanced
            copy has other weights and gets its own diagonal).
        method: method of the diagonal computed here (``"auto"``: exact up to 100 classes).
        tol, max_iter: the per-matrix solver's stopping rule. batch_size, progress: of the diagonal.

    Returns:
        A :class:`BalancedSharpness`.
    """
    check_model(model)
    if variant not in VARIANTS:
        raise ConfigurationError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not isinstance(balance, bool):
        raise ConfigurationError(f"balance must be True or False, got {balance!r}")
    check_positive_int("max_iter", max_iter)
    net = balance_attention(model) if balance else model
    pieces, heads = _pieces(net)
    if not pieces:
        raise ConfigurationError("the balanced normalized sharpness needs a Linear, Conv, Embedding or attention "
                                 "weight that is trainable")
    names = list(dict.fromkeys(p for _, p, _, _ in pieces))
    if hessian is None or (balance and heads):
        if data is None:
            raise ConfigurationError("pass the training data (data=...)")
        hessian = hessian_diagonal(net, data, method=method, parameters=names, batch_size=batch_size,
                                   progress=progress)
    missing = [n for n in names if n not in hessian.diagonal]
    if missing:
        raise ConfigurationError(f"the hessian given lacks the parameter(s) {', '.join(missing)}")
    params = dict(net.named_parameters())

    def solve_all(diagonal: Dict[str, Tensor]) -> Dict[str, LayerSharpness]:
        out = {}
        for label, pname, module, rows in pieces:
            if module is not None:
                h, s = layer_matrices(module, diagonal[pname])
            else:
                sl = slice(None) if rows is None else rows
                h, s = diagonal[pname][sl].to(torch.float64), params[pname].detach()[sl].to(torch.float64) ** 2
            out[label] = solve_layer(h, s, variant=variant, tol=tol, max_iter=max_iter)
        return out

    plug_in = solve_all(dict(hessian.diagonal))
    per_layer, stderr, half = plug_in, 0.0, 0.0
    if hessian.replicates:
        per_layer, stderr, half = jackknife_layers(hessian.replicates, names, plug_in, solve_all)
    value = float(sum(r.value for r in per_layer.values()))
    covered = {p for _, p, _, _ in pieces}
    skipped = tuple(n for n in skipped_weights(net) if n not in covered)
    return BalancedSharpness(value, {k: r.value for k, r in per_layer.items()}, variant, balance, heads,
                             hessian.quantity, hessian.method, hessian.is_hessian, skipped, stderr,
                             (value - half, value + half))
