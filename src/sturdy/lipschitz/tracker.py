"""Training-time Lipschitz estimate: persistent power iteration on the true operators.

:class:`LipschitzTracker` traces the model once (:mod:`.graph`, same composition as the guaranteed
bound) and keeps one power-iteration vector per weight operator as a buffer, so the vectors are
checkpointed and, under DDP, replicated. Its estimates are differentiable in the weights and are
*lower* estimates of the true norms: fine for training, never used for a certificate.

BatchNorm rule *(choice)*: a BatchNorm is bounded with its running statistics (eval mode), which is
the map that will be certified; the statistics of the training batch do not enter the estimate.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.graph import build_program, compose, model_dtype_device
from sturdy.lipschitz.norms import guaranteed_norm
from sturdy.lipschitz.operators import LinearLayerOp, LinearOp
from sturdy.lipschitz.results import LipschitzEstimate

__all__ = ["LipschitzTracker"]


class LipschitzTracker(nn.Module):
    """Training-time Lipschitz estimate with persistent power iteration.

    Each call does ``iterations`` power iterations per weight operator (conv, linear, folded
    conv+BN) on the true operator (real input shape, padding, stride; ``conv_transpose2d`` as
    adjoint) and returns a :class:`LipschitzEstimate` whose values are differentiable in the
    weights through ``||W u||`` with ``u`` held constant. The vectors ``u`` are buffers (saved in
    ``state_dict``); they start from a seeded random vector followed by ``warmup_iterations``
    iterations, so every DDP rank builds identical vectors; with ``sync`` they are averaged over ranks
    after each update and stay identical. Estimates are lower bounds of the true norms: never use them to certify.

    Args:
        model: the network (its parameters are used live, never copied).
        input_shape: shape of one input batch, e.g. ``(1, 1, 8, 8)``.
        iterations: power iterations per call (1 in training).
        warmup_iterations: iterations run at construction.
        seed: seed of the start vectors.
        sync: under ``torch.distributed``, average the vectors over ranks after each update (one small
            all-reduce per step), so they stay identical even when folded BatchNorm statistics differ per rank.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> tracker = LipschitzTracker(net, input_shape=(1, 4))
        >>> est = tracker()
        >>> est.lipschitz.requires_grad, sorted(tracker.state_dict())
        (True, ['u__1', 'u__3'])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        iterations: int = 1,
        warmup_iterations: int = 30,
        seed: int = 0,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if iterations < 1 or warmup_iterations < 0:
            raise ConfigurationError(
                f"iterations must be >= 1 and warmup_iterations >= 0, got {iterations} and {warmup_iterations}"
            )
        self._program = build_program(model, input_shape)
        self.iterations = int(iterations)
        self.sync = bool(sync)
        self._fixed: Dict[str, float] = {}
        self._power: Dict[str, Tuple[str, LinearOp]] = {}
        self._closed: Dict[str, LinearOp] = {}
        gen = torch.Generator().manual_seed(int(seed))
        dtype, device = model_dtype_device(model)
        for s in self._program.steps:
            if s.kind != "op":
                continue
            op = s.op
            assert op is not None
            if not op.parametric:
                self._fixed[s.name] = guaranteed_norm(op)[0]
            elif op.closed_form_norm() is not None:
                self._closed[s.name] = op
            else:
                buf = "u__" + s.path.replace(".", "_").replace("+", "__")
                u = torch.randn((1, *op.in_shape), generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)
                self.register_buffer(buf, u / u.norm())
                self._power[s.name] = (buf, op)
        with torch.no_grad():
            for _ in range(warmup_iterations):
                self._iterate()

    @torch.no_grad()
    def _iterate(self) -> None:
        for buf, op in self._power.values():
            u, w = getattr(self, buf), op.weight()
            w = w.detach() if w is not None else None
            v = op.adjoint(op.apply(u, w), w)
            u.copy_(v / v.norm().clamp_min(1e-30))

    def forward(self) -> LipschitzEstimate:
        """One step: estimates from the current vectors (differentiable), then update the vectors."""
        norms: Dict[str, Any] = dict(self._fixed)
        for name, op in self._closed.items():
            norms[name] = op.closed_form_norm()
        updates: List[Tuple[str, torch.Tensor]] = []
        for name, (buf, op) in self._power.items():
            u = getattr(self, buf)
            weight = op.weight()  # differentiable; computed once for the forward and the adjoint
            with torch.no_grad():
                frozen = weight.detach() if weight is not None else None
                for _ in range(self.iterations - 1):
                    v = op.adjoint(op.apply(u, frozen), frozen)
                    u = v / v.norm().clamp_min(1e-30)
            w = op.apply(u, weight)
            norms[name] = w.norm()
            with torch.no_grad():  # next step's vector: u <- A^T A u (normalised below)
                updates.append((buf, op.adjoint(w.detach(), frozen)))
        if updates:
            with torch.no_grad():
                vs = [v for _, v in updates]
                scale = torch._foreach_norm(vs)
                torch._foreach_clamp_min_(scale, 1e-30)
                torch._foreach_div_(vs, scale)
            for buf, v in updates:  # new tensors: the old vectors stay intact for backward
                self._buffers[buf] = v
        if self.sync:
            self._average_vectors()
        ref = next(iter(self.buffers()), None)
        one = torch.ones((), dtype=ref.dtype if ref is not None else torch.float32,
                         device=ref.device if ref is not None else None)
        bound = compose(self._program, norms, one)
        last = self._program.last_linear
        body = weight = None
        if last is not None:
            body = bound[last.inputs[0]]
            assert isinstance(last.op, LinearLayerOp)
            weight = last.op.weight()
        total = bound[self._program.output]
        return LipschitzEstimate(lipschitz=total, body=body, last_weight=weight)

    def norms(self) -> Dict[str, float]:
        """Current per-operator estimates ``{path: ||A u||}`` (no update, no gradient)."""
        out: Dict[str, float] = {}
        by_name = {s.name: s for s in self._program.steps}
        with torch.no_grad():
            for name, (buf, op) in self._power.items():
                out[by_name[name].path] = float(op.apply(getattr(self, buf)).norm())
            for name, op in self._closed.items():
                out[by_name[name].path] = float(op.closed_form_norm())
            for name, value in self._fixed.items():
                out[by_name[name].path] = value
        return out

    @torch.no_grad()
    def _average_vectors(self) -> None:
        # Under DDP every rank holds the same weights, but eval-mode BatchNorm statistics (folded into the
        # operators) are updated from each rank's own batch, so the vectors would drift apart: average them.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        bufs = [getattr(self, buf) for buf, _ in self._power.values()]
        if world == 1 or not bufs:
            return
        flat = torch.cat([b.flatten() for b in bufs])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def broadcast_(self, src: int = 0) -> None:
        """Copy the vectors of rank ``src`` to every rank (no-op without ``torch.distributed``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for b in self.buffers():
                torch.distributed.broadcast(b, src)
