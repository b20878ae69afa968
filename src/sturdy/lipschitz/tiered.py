"""Tiered certificates: a local bound over the L2 ball around a point certifies more than the global bound
(docs/design.md, section 1 "Tiered certificates").

For a point ``x`` and a ball radius ``R``, every node ``h`` of the traced program moves by at most
``L_h(R) R`` in L2 (hence in every coordinate) while the input stays in ``B(x, R)``, with ``L_h(R)`` the bound of
the map input -> ``h`` valid on that ball. A ReLU unit whose input at ``x`` is below ``-L_h(R) R`` is constant (0)
on the whole ball, so ``ReLU(A z + b)`` moves by at most ``||D A|| ||z - z'||`` with ``D`` the rows of ``A`` that
may be active: the operator feeding the ReLU is bounded without its inactive rows (a dense float64 SVD when the
operator is small enough, else its global bound). Composing in graph order gives ``L(R)`` and ``L_body(R)``, valid
on ``B(x, R)`` (by induction over the graph: every mask is decided with bounds that hold on the ball).

A radius ``r`` computed from them (global or pairwise form) certifies ``min(R, r)``: the segment from ``x`` to
any ``x + d`` with ``||d|| < min(R, r)`` stays in the ball. ``R`` follows the fixed-point iteration
``R <- r(R)`` from the global radius; the best ``min(R, r(R))`` seen is the tiered radius, never below the
global one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx

from sturdy.lipschitz.graph import Program, Step
from sturdy.lipschitz.margins import certified_radius
from sturdy.lipschitz.norms import DENSE_SAFETY, dense_spectral_norm, guaranteed_norm
from sturdy.lipschitz.operators import LinearOp
from sturdy.lipschitz.results import LipschitzBound

__all__ = ["LocalBounds", "tiered_radii", "TIERED_ITERATIONS", "TIERED_MAX_DENSE_ENTRIES"]

TIERED_ITERATIONS = 6  # fixed-point steps R <- r(R) per point
TIERED_MAX_DENSE_ENTRIES = 1 << 21  # largest operator whose rows are masked (a dense SVD per mask)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: Dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        # a copy: a later in-place operation (relu_) must not overwrite what this node computed
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


class LocalBounds:
    """Local Lipschitz bounds of one traced program around given points (see the module doc)."""

    def __init__(self, program: Program, bound: LipschitzBound) -> None:
        if program.graph_module is None:
            raise ValueError("the program carries no traced graph")  # internal: build_program sets it
        self.program, self.bound = program, bound
        self.by_name = {s.name: s for s in program.steps}
        self.norms = {s.name: guaranteed_norm(s.op)[0] for s in program.steps if s.op is not None}
        self._dense: Dict[str, Optional[torch.Tensor]] = {}
        self._masked: Dict[Tuple[str, bytes], float] = {}

    @torch.no_grad()
    def node_values(self, x: torch.Tensor) -> Dict[str, Any]:
        """Every node's value on the batch ``x`` (the traced graph, eval mode)."""
        gm = self.program.graph_module
        assert gm is not None
        recorder = _Recorder(gm)
        recorder.run(x)
        return recorder.values

    def radius(self, values: Dict[str, Any], index: int, logits: torch.Tensor, base: float, form: str) -> float:
        """Tiered radius of point ``index`` (its node values in ``values``), at least ``base``."""
        best, ball = base, base
        for _ in range(TIERED_ITERATIONS):
            if not (ball > 0 and math.isfinite(ball)):
                break
            total, body = self.bounds_on_ball(values, index, ball)
            local = dataclasses.replace(self.bound, upper=total,
                                        upper_body=body if self.bound.upper_body is not None else None)
            r = float(certified_radius(logits[index : index + 1], bound=local, form=form)[0])
            best = max(best, min(ball, r))
            if abs(r - ball) <= 1e-6 * ball:
                break
            ball = r
        return best

    def bounds_on_ball(self, values: Dict[str, Any], index: int, ball: float) -> Tuple[float, Optional[float]]:
        """``(L(R), L_body(R))`` valid on the ball of radius ``ball`` around point ``index``."""
        bound: Dict[str, Optional[float]] = {}
        for s in self.program.steps:
            bound[s.name] = self._step_bound(s, bound, values, index, ball)
        last = self.program.last_linear
        body = bound[last.inputs[0]] if last is not None else None
        return float(bound[self.program.output] or 0.0), body

    def _step_bound(self, s: Step, bound: Dict[str, Optional[float]], values: Dict[str, Any], index: int,
                    ball: float) -> Optional[float]:
        if s.kind == "input":
            return 1.0
        if s.kind == "const":
            return None
        if s.kind in ("sum", "concat"):
            weights = s.weights or (1.0,) * len(s.inputs)
            parts = [bound[i] * w for i, w in zip(s.inputs, weights) if bound[i] is not None]  # type: ignore[operator]
            return sum(parts) if s.kind == "sum" else math.sqrt(sum(p * p for p in parts))
        prev = bound[s.inputs[0]]
        if prev is None:
            return None
        if s.kind == "op":
            return prev * self.norms[s.name]
        if s.relu:
            masked = self._relu_bound(s, bound, values, index, ball)
            if masked is not None:
                return masked
        return prev * s.factor

    def _relu_bound(self, s: Step, bound: Dict[str, Optional[float]], values: Dict[str, Any], index: int,
                    ball: float) -> Optional[float]:
        """The bound after a ReLU whose input comes from a linear operator, without the rows that stay inactive
        on the ball (``None`` when no operator feeds it directly)."""
        q = s.inputs[0]
        op_step = self._feeding_op(q)
        h = values.get(q)
        if op_step is None or not isinstance(h, torch.Tensor) or bound[op_step.inputs[0]] is None:
            return None
        deviation = float(bound[q]) * ball  # type: ignore[arg-type]
        active = (h[index].flatten().double() + deviation * (1 + 1e-9) >= 0)
        if bool(active.all()):
            return None
        norm = self._masked_norm(op_step, active)
        if norm is None:
            return None
        return float(bound[op_step.inputs[0]]) * norm  # type: ignore[arg-type]

    def _feeding_op(self, name: str) -> Optional[Step]:
        """The linear operator step producing ``name``, through folded BatchNorm steps."""
        step = self.by_name.get(name)
        while step is not None and step.kind == "factor" and step.op_kind == "folded":
            step = self.by_name.get(step.inputs[0])
        return step if step is not None and step.kind == "op" else None

    def _masked_norm(self, step: Step, active: torch.Tensor) -> Optional[float]:
        key = (step.name, active.cpu().numpy().tobytes())
        if key in self._masked:
            return self._masked[key]
        dense = self._dense_of(step)
        if dense is None or dense.shape[0] != active.numel():
            return None
        rows = dense[active.to(dense.device)]
        value = dense_spectral_norm(rows) * DENSE_SAFETY if rows.numel() else 0.0
        value = min(value, self.norms[step.name])  # never above the global bound of the same operator
        self._masked[key] = value
        return value

    def _dense_of(self, step: Step) -> Optional[torch.Tensor]:
        if step.name not in self._dense:
            op: LinearOp = step.op  # type: ignore[assignment]
            small = op.dense_size() <= TIERED_MAX_DENSE_ENTRIES
            self._dense[step.name] = (op.dense_matrix(dtype=torch.float64, device=op.param_device())
                                      if small else None)
        return self._dense[step.name]


def tiered_radii(local: LocalBounds, x: torch.Tensor, logits: torch.Tensor, radius: torch.Tensor,
                 correct: torch.Tensor, *, form: str) -> torch.Tensor:
    """Tiered radii of every correctly predicted point of the batch ``x`` (others keep 0), at least the global
    ``radius``; ``local`` is built once per model and bound (its operator norms and dense matrices are reused)."""
    out = radius.clone()
    todo: List[int] = [int(i) for i in correct.nonzero().flatten()]
    if not todo:
        return out
    values = local.node_values(x)
    for i in todo:
        out[i] = local.radius(values, i, logits, float(radius[i]), form)
    return out
