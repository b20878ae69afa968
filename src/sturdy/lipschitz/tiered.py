"""Tiered certificates: a local bound over the L2 ball around a point certifies more than the global bound
(docs/design.md, section 1 "Tiered certificates").

For a point ``x`` and a ball radius ``R``, every node ``h`` of the traced program moves by at most
``L_h(R) R`` in L2 (hence in every coordinate) while the input stays in ``B(x, R)``, with ``L_h(R)`` the bound of
the map input -> ``h`` valid on that ball. A ReLU unit whose input at ``x`` is below ``-L_h(R) R`` is constant (0)
on the whole ball, so ``ReLU(A z + b)`` moves by at most ``||D A|| ||z - z'||`` with ``D`` the rows of ``A`` that
may be active: the operator feeding the ReLU is bounded without its inactive rows. Composing in graph order gives
``L(R)`` and ``L_body(R)``, valid on ``B(x, R)`` (by induction over the graph: every mask is decided with bounds
that hold on the ball).

``||D A||`` comes from the Gram matrix on the operator's smaller side (``A^T D A`` or ``D A A^T D``), built for
all points of a batch at once from a dense float64 matrix prepared once per certify call (only for operators
whose smaller side is at most :data:`TIERED_MAX_GRAM_SIDE`; others keep their global bound). Its largest
eigenvalue is bounded soundly: a few batched power-iteration steps from the unmasked operator's top vector give
an estimate ``e``, and a batched Cholesky factorisation of ``e (1 + ESTIMATE_MARGIN) I - G`` certifies
``lambda_max(G) <= e (1 + ESTIMATE_MARGIN)`` (an eigensolve where it fails); an absolute slack covers the
rounding of the Gram matrix, the factorisation and the eigensolver. The value is never above the operator's
global bound.

A radius ``r`` computed from the local bounds (global or pairwise form: the global radius scaled by
``L / L(R)``) certifies ``min(R, r)``: the segment from ``x`` to any ``x + d`` with ``||d|| < min(R, r)`` stays in
the ball. ``R`` follows the fixed-point iteration ``R <- r(R)`` from the global radius, for all points of a batch
together; the best ``min(R, r(R))`` seen is the tiered radius, never below the global one.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.fx

from sturdy.lipschitz.graph import Program, Step
from sturdy.lipschitz.norms import CHOLESKY_MARGIN, _gram_relative_error, guaranteed_norm
from sturdy.lipschitz.operators import LinearOp
from sturdy.lipschitz.results import LipschitzBound

__all__ = ["LocalBounds", "tiered_radii", "TIERED_ITERATIONS", "TIERED_MAX_DENSE_ENTRIES", "TIERED_MAX_GRAM_SIDE"]

TIERED_ITERATIONS = 6  # fixed-point steps R <- r(R) per point
TIERED_MAX_DENSE_ENTRIES = 1 << 21  # largest operator whose rows are masked
TIERED_MAX_GRAM_SIDE = 256  # largest smaller side of a masked operator (one Gram matrix of this side per point)
ESTIMATE_MARGIN = 1e-6  # the Cholesky certificate tests the power estimate raised by this (bound loose by <= half)
_POWER_STEPS = 10
_CHUNK_ENTRIES = 1 << 24  # temporary float64 entries of one chunk of masked Gram matrices (128 MiB)
_ACTIVE_SLACK = 1e-9  # relative slack of the activity test (float64 rounding of value + deviation)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, keep: Set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: Dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep and isinstance(out, torch.Tensor):
            # a copy: a later in-place operation (relu_) must not overwrite what this node computed
            self.values[n.name] = out.detach().flatten(1).to(torch.float64, copy=True)
        return out


class _MaskedNorm:
    """Guaranteed upper bounds of ``||D_p A||_2`` for a batch of row masks ``D_p`` of one dense operator ``A``."""

    def __init__(self, dense: torch.Tensor, norm: float) -> None:
        rows, cols = dense.shape
        self.dense, self.norm = dense, norm
        self.row_side = rows <= cols  # Gram on the smaller side: D A A^T D (rows) or A^T D A (columns)
        self.gram = dense @ dense.T if self.row_side else dense.T @ dense
        # forming (and, column side, downdating) the Gram matrix, the factorisation and the eigensolver each err
        # by at most _gram_relative_error * ||A||^2 (norms.py); twice that for the downdate's second product
        self.slack = 2.0 * _gram_relative_error(rows, cols) * max(norm, float(dense.abs().max())) ** 2 * 2.0
        self.start = torch.linalg.eigh(self.gram)[1][:, -1]  # the unmasked operator's top vector: warm start
        self._outer: Optional[torch.Tensor] = None

    def __call__(self, active: torch.Tensor) -> torch.Tensor:
        """Bounds ``(P,)`` float64 for masks ``active`` ``(P, rows)`` (True: the row may be active)."""
        if self.row_side:
            m = active.to(torch.float64)
            g = self.gram[None] * (m[:, :, None] * m[:, None, :])
            start = self.start[None] * m + 1e-3 * m  # stays in the masked subspace, never zero when rows remain
        else:
            g = self._column_gram(active)
            start = self.start[None].expand(active.shape[0], -1) + 1e-3
        lam = _lambda_max_upper(g, start)
        return (lam + self.slack).clamp_min(0.0).sqrt().clamp_max(self.norm)

    def _column_gram(self, active: torch.Tensor) -> torch.Tensor:
        """``A^T D_p A``: the full Gram matrix less the inactive rows' products when few rows are inactive, else
        one matrix product of the masks with every row's outer product (or the masked rows' products), in chunks
        of points of at most ``_CHUNK_ENTRIES`` temporary entries."""
        inactive = ~active
        rows, cols = self.dense.shape
        k = int(inactive.sum(dim=1).max())
        if k == 0:
            return self.gram[None].expand(active.shape[0], -1, -1).clone()
        if 4 * k <= rows:
            order = torch.argsort(inactive.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
            step = max(1, _CHUNK_ENTRIES // (k * cols))
            parts = []
            for lo in range(0, active.shape[0], step):
                o = order[lo : lo + step]
                r = self.dense[o] * inactive[lo : lo + step].gather(1, o)[..., None].to(torch.float64)
                parts.append(self.gram[None] - r.mT @ r)
            return torch.cat(parts)
        if rows * cols * cols <= _CHUNK_ENTRIES:
            iu = torch.triu_indices(cols, cols, device=self.dense.device)
            if self._outer is None:  # every row's outer product, its upper triangle: (rows, cols (cols + 1) / 2)
                self._outer = self.dense[:, iu[0]] * self.dense[:, iu[1]]
            upper = active.to(torch.float64) @ self._outer
            g = torch.zeros((active.shape[0], cols, cols), dtype=upper.dtype, device=upper.device)
            g[:, iu[0], iu[1]] = upper
            g[:, iu[1], iu[0]] = upper
            return g
        step = max(1, _CHUNK_ENTRIES // (rows * cols))
        parts = []
        for lo in range(0, active.shape[0], step):
            a = self.dense[None] * active[lo : lo + step, :, None].to(torch.float64)
            parts.append(a.mT @ a)
        return torch.cat(parts)


def _lambda_max_upper(g: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Upper bounds (up to the caller's rounding slack) of ``lambda_max`` of a batch of PSD matrices ``g``."""
    v = start[..., None]
    for _ in range(_POWER_STEPS):
        v = g @ v
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    est = (v.mT @ g @ v).flatten().clamp_min(0.0)
    t = est * (1.0 + ESTIMATE_MARGIN)
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    _, info = torch.linalg.cholesky_ex(t[:, None, None] * eye - g)
    failed = (info != 0).nonzero().flatten()
    if failed.numel():
        t[failed] = torch.linalg.eigvalsh(g[failed])[:, -1].clamp_min(0.0) * (1.0 + CHOLESKY_MARGIN)
    return t


class LocalBounds:
    """Local Lipschitz bounds of one traced program around given points (see the module doc); built once per
    model and bound (the operators' global norms come from ``bound``, the masked Gram matrices are prepared
    here)."""

    def __init__(self, program: Program, bound: LipschitzBound) -> None:
        if program.graph_module is None:
            raise ValueError("the program carries no traced graph")  # internal: build_program sets it
        self.program, self.bound = program, bound
        self.by_name = {s.name: s for s in program.steps}
        self.norms = _global_norms(program, bound)
        self.feeds: Dict[str, Tuple[Step, _MaskedNorm]] = {}  # ReLU input node -> (its operator, masked norms)
        engines: Dict[str, Optional[_MaskedNorm]] = {}
        for s in program.steps:
            if s.kind != "factor" or not s.relu:
                continue
            op_step = self._feeding_op(s.inputs[0])
            if op_step is None:
                continue
            if op_step.name not in engines:
                engines[op_step.name] = self._engine(op_step)
            engine = engines[op_step.name]
            if engine is not None:
                self.feeds[s.inputs[0]] = (op_step, engine)

    def _engine(self, step: Step) -> Optional[_MaskedNorm]:
        op: LinearOp = step.op  # type: ignore[assignment]
        size = op.dense_size()
        if size > TIERED_MAX_DENSE_ENTRIES:
            return None
        dense = op.dense_matrix(dtype=torch.float64, device=op.param_device())
        if min(dense.shape) > TIERED_MAX_GRAM_SIDE:
            return None
        return _MaskedNorm(dense, self.norms[step.name])

    def _feeding_op(self, name: str) -> Optional[Step]:
        """The linear operator step producing ``name``, through folded BatchNorm steps."""
        step = self.by_name.get(name)
        while step is not None and step.kind == "factor" and step.op_kind == "folded":
            step = self.by_name.get(step.inputs[0])
        return step if step is not None and step.kind == "op" else None

    @torch.no_grad()
    def node_values(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The inputs of the masked ReLUs on the batch ``x`` (flattened, float64; the traced graph, eval mode)."""
        gm = self.program.graph_module
        assert gm is not None
        recorder = _Recorder(gm, set(self.feeds))
        recorder.run(x)
        return recorder.values

    def bounds_on_ball(self, values: Dict[str, torch.Tensor], ball: torch.Tensor, *,
                       memo: Optional[Dict[str, Any]] = None, points: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(L(R), L_body(R))`` for every point (row of ``values``), valid on its ball of radius ``ball[p]``.

        With ``memo`` (a dict kept across calls) and ``points`` (each row's index among all points of the memo),
        a masked operator is bounded again only for the points whose mask changed since their last call."""
        one = torch.ones_like(ball)
        bound: Dict[str, Optional[torch.Tensor]] = {}
        for s in self.program.steps:
            bound[s.name] = self._step_bound(s, bound, values, ball, one, memo, points)
        last = self.program.last_linear
        body = bound[last.inputs[0]] if last is not None else None
        total = bound[self.program.output]
        return (total if total is not None else torch.zeros_like(ball)), body

    def _step_bound(self, s: Step, bound: Dict[str, Optional[torch.Tensor]], values: Dict[str, torch.Tensor],
                    ball: torch.Tensor, one: torch.Tensor, memo: Optional[Dict[str, Any]],
                    points: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if s.kind == "input":
            return one
        if s.kind == "const":
            return None
        if s.kind in ("sum", "concat"):
            weights = s.weights or (1.0,) * len(s.inputs)
            parts = [bound[i] * w for i, w in zip(s.inputs, weights) if bound[i] is not None]  # type: ignore[operator]
            if not parts:
                return None
            return sum(parts[1:], parts[0]) if s.kind == "sum" else sum(p * p for p in parts).sqrt()
        prev = bound[s.inputs[0]]
        if prev is None:
            return None
        if s.kind == "op":
            return prev * self.norms[s.name]
        out = prev * s.factor
        feed = self.feeds.get(s.inputs[0]) if s.relu else None
        if feed is not None and bound[feed[0].inputs[0]] is not None:
            out = torch.minimum(out, self._relu_bound(s, feed, bound, values, ball, memo, points))
        return out

    def _relu_bound(self, s: Step, feed: Tuple[Step, _MaskedNorm], bound: Dict[str, Optional[torch.Tensor]],
                    values: Dict[str, torch.Tensor], ball: torch.Tensor, memo: Optional[Dict[str, Any]],
                    points: Optional[torch.Tensor]) -> torch.Tensor:
        """The bound after a ReLU fed by a linear operator, without the rows that stay inactive on each ball."""
        op_step, engine = feed
        q = s.inputs[0]
        h = values[q]
        deviation = bound[q] * ball  # type: ignore[operator]
        active = h + (deviation * (1 + _ACTIVE_SLACK))[:, None] >= 0
        below = bound[op_step.inputs[0]]
        assert below is not None
        if memo is None or points is None:
            memo, points = {}, torch.arange(active.shape[0], device=active.device)
        if q not in memo:  # every point starts with every row active: the operator's global norm
            n = int(points.max()) + 1
            memo[q] = (torch.ones((n, active.shape[1]), dtype=torch.bool, device=active.device),
                       torch.full((n,), self.norms[op_step.name], dtype=ball.dtype, device=ball.device))
        masks, norms = memo[q]
        changed = (masks[points] != active).any(dim=1)
        if bool(changed.any()):
            rows, new = points[changed], active[changed]
            norm = torch.full((new.shape[0],), self.norms[op_step.name], dtype=ball.dtype, device=ball.device)
            masked = ~new.all(dim=1)
            if bool(masked.any()):
                norm[masked] = engine(new[masked])
            masks[rows], norms[rows] = new, norm
        return below * norms[points]


def _global_norms(program: Program, bound: LipschitzBound) -> Dict[str, float]:
    """Every operator's guaranteed norm: the bound's own (its layers follow the program's operators in order;
    the certificate checked the bound's fingerprint against the model), else computed."""
    ops = [s for s in program.steps if s.kind == "op"]
    layers = [layer for layer in bound.per_layer if layer.method != "constant"]
    if len(layers) == len(ops) and all(layer.path == s.path for layer, s in zip(layers, ops)):
        return {s.name: float(layer.upper) for s, layer in zip(ops, layers)}
    return {s.name: guaranteed_norm(s.op)[0] for s in ops}  # type: ignore[arg-type]


def tiered_radii(local: LocalBounds, x: torch.Tensor, logits: torch.Tensor, radius: torch.Tensor,
                 correct: torch.Tensor, *, form: str) -> torch.Tensor:
    """Tiered radii of every correctly predicted point of the batch ``x`` (others keep 0), at least the global
    ``radius`` (computed with ``local.bound`` from ``logits``); all points of the batch iterate together."""
    out = radius.to(torch.float64, copy=True)
    ref = local.bound.upper if form == "global" else local.bound.upper_body
    todo = (correct.to(out.device) & (out > 0) & torch.isfinite(out)).nonzero().flatten()
    if todo.numel() == 0 or not local.feeds or ref is None or not ref > 0:
        return out
    values = {k: v[todo.to(v.device)] for k, v in local.node_values(x).items()}
    base = out[todo].to(x.device)
    ball, best = base.clone(), base.clone()
    live = torch.ones_like(ball, dtype=torch.bool)
    memo: Dict[str, Any] = {}  # each point's last mask and masked norm per operator: unchanged masks are reused
    for _ in range(TIERED_ITERATIONS):
        idx = live.nonzero().flatten()
        if idx.numel() == 0:
            break
        total, body = local.bounds_on_ball({k: v[idx] for k, v in values.items()}, ball[idx], memo=memo, points=idx)
        local_l = total if form == "global" else body
        assert local_l is not None
        r = torch.where(local_l > 0, base[idx] * (ref / local_l.clamp_min(1e-300)), math.inf)
        best[idx] = torch.maximum(best[idx], torch.minimum(ball[idx], r))
        settled = ((r - ball[idx]).abs() <= 1e-6 * ball[idx]) | ~torch.isfinite(r)
        ball[idx] = torch.where(torch.isfinite(r), r, ball[idx])
        live[idx[settled]] = False
    out[todo] = best.to(out.device)
    return out
