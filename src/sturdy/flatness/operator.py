"""The curvature of the mean training loss as a linear operator on flattened parameter vectors.

``CurvatureOperator.matmat(V)`` applies the Hessian or the generalised Gauss-Newton matrix of the **mean**
training loss ``L(w) = (1/N) sum_n loss(f(x_n; w), y_n)`` to the columns of ``V`` (``(P, m)``, ``P`` the
number of trainable parameters, in the order of ``named_parameters``), one pass over the data for all
``m`` columns (the forward and gradient graph of a batch are shared by the columns). The randomised
estimators (:mod:`sturdy.flatness.sketching`) and the Lanczos methods (:mod:`sturdy.flatness.spectrum`)
read the curvature only through it, and report how many products they used.

* ``"hessian"``: ``H v`` by double backward, for any loss;
* ``"ggn"``: ``G v = (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n v`` for the cross-entropy loss, with
  ``J_n v`` by the double-backward trick (a vector-Jacobian product differentiated with respect to its
  dummy cotangent) and ``J_n^T u`` by one backward pass.

The model must be in eval mode while the operator is used (the public functions do this).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import LossFn, default_loss, loss_batches, trainable_parameters
from sturdy.flatness.hvp import batch_gradient, double_backward_graph, hvp
from sturdy.utils import model_device_dtype
from sturdy.validation import check_int, check_model

__all__ = ["CURVATURES", "CurvatureOperator", "rademacher_matrix"]

CURVATURES = ("hessian", "ggn")


def rademacher_matrix(rows: int, cols: int, *, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(rows, cols)`` Rademacher signs drawn on the CPU from ``seed`` (identical on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8) * 2 - 1).to(dtype)


class CurvatureOperator:
    """Products of the Hessian or GGN of the mean training loss with flattened parameter vectors.

    Vectors are float64 on the CPU outside (the estimators' linear algebra); products run in the model's
    dtype on its device. ``products`` counts the matrix-vector products applied so far. The model, the batch
    size, the curvature and the loss are checked here, before the pass that collects the batches.
    """

    def __init__(self, model: nn.Module, data: Any, *, curvature: str, batch_size: int,
                 loss_fn: Optional[LossFn]) -> None:
        check_model(model)
        check_int(batch_size, "batch_size", low=1)
        if curvature not in CURVATURES:
            raise ConfigurationError(f"curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}")
        if curvature == "ggn" and loss_fn is not None:
            raise ConfigurationError("curvature='ggn' is defined for the cross-entropy loss only; drop loss_fn "
                                     "or use curvature='hessian'")
        self.model = model
        self.curvature = curvature
        self.device, self.dtype = model_device_dtype(model)
        self.params = [p for _, p in trainable_parameters(model)]
        if not self.params:
            raise ConfigurationError("the model has no trainable parameters")
        self.batches = loss_batches(model, data, batch_size=batch_size, device=self.device, dtype=self.dtype,
                                    loss_fn=loss_fn)
        self.num_samples = sum(int(x.shape[0]) for x, _ in self.batches)
        self.loss_fn = loss_fn or default_loss
        self.size = sum(p.numel() for p in self.params)
        self.products = 0

    def _split(self, v: Tensor) -> List[Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(v[start : start + p.numel()].view_as(p).to(device=self.device, dtype=self.dtype))
            start += p.numel()
        return out

    def matmat(self, vectors: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(P, m)`` (float64 on the CPU in and out); one pass over the data."""
        if vectors.dim() != 2 or vectors.shape[0] != self.size:
            raise ConfigurationError(f"vectors must have shape ({self.size}, m), got {tuple(vectors.shape)}")
        cols = [self._split(vectors[:, j]) for j in range(vectors.shape[1])]
        out = torch.zeros(vectors.shape, dtype=torch.float64)
        for x, y in self.batches:
            for j, part in enumerate(self._batch_products(x, y, cols)):
                out[:, j] += torch.cat([t.reshape(-1) for t in part]).to("cpu", torch.float64)
        self.products += vectors.shape[1]
        return out / self.num_samples

    def _batch_products(self, x: Tensor, y: Tensor, cols: Sequence[List[Tensor]]) -> List[List[Tensor]]:
        """The **summed** loss's curvature of one batch times every column."""
        if self.curvature == "hessian":
            grads = batch_gradient(self.model, x, y, self.params, self.loss_fn)
            return [hvp(grads, self.params, v, retain=j < len(cols) - 1) for j, v in enumerate(cols)]
        return self._ggn_products(x, cols)

    def _ggn_products(self, x: Tensor, cols: Sequence[List[Tensor]]) -> List[List[Tensor]]:
        """One forward pass and one vector-Jacobian graph for every column of the batch."""
        with double_backward_graph():
            logits = self.model(x)
            if logits.dim() != 2:
                raise ConfigurationError(f"curvature='ggn' needs logits of shape (N, classes), got "
                                         f"{tuple(logits.shape)}; use curvature='hessian'")
            dummy = torch.zeros_like(logits, requires_grad=True)
            vjp = torch.autograd.grad(logits, self.params, grad_outputs=dummy, create_graph=True,
                                      allow_unused=True, materialize_grads=True)
            live = [i for i, g in enumerate(vjp) if g.requires_grad]
            p = torch.softmax(logits.detach(), dim=1)
            products = []
            for j, v in enumerate(cols):
                jv = torch.autograd.grad([vjp[i] for i in live], dummy, grad_outputs=[v[i] for i in live],
                                         retain_graph=True)[0] if live else torch.zeros_like(logits)
                u = p * jv - p * (p * jv).sum(1, keepdim=True)  # (diag p - p p^T) J v, per sample
                out = torch.autograd.grad(logits, self.params, grad_outputs=u, allow_unused=True,
                                          retain_graph=j < len(cols) - 1)
                products.append([torch.zeros_like(q) if o is None else o.detach() for o, q in zip(out, self.params)])
        return products
