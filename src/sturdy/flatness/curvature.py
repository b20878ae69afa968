"""Curvature of the training loss: GGN and Hessian diagonals, Hessian traces and top eigenvalues.

The training loss is ``L(w) = (1/N) sum_n loss(f(x_n; w), y_n)`` over every sample of ``data``
(**mean** reduction; batching never changes the value). The model is evaluated in eval mode.

:func:`hessian_diagonal` offers, by ``method``:

* ``"ggn-exact"``: the exact diagonal of the generalised Gauss-Newton matrix of the cross-entropy loss,
  ``G = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n``, one backward pass per class
  (:mod:`sturdy.flatness.ggn`: the per-sample rules of :mod:`sturdy.persample` applied to the columns of
  the softmax Hessian's factor).
* ``"ggn-mc"``: a Monte-Carlo estimate of the same diagonal from labels drawn from the model's softmax,
  ``mc_samples`` per input, whatever the class count, with standard errors (entries, per-parameter sums).
* ``"auto"`` (default): ``"ggn-exact"`` up to :data:`MC_CLASS_THRESHOLD` classes, ``"ggn-mc"`` above.
* ``"hutchinson"``: ``E_v[v * (H v)]`` with Rademacher probes ``v`` and Hessian-vector products by
  double backward: the **Hessian** diagonal, for any loss, with the standard error over probes.

The GGN diagonal is the Hessian diagonal only when the logits are piecewise linear in each single
parameter (ReLU/max-pool MLPs and CNNs, eval-mode BatchNorm, every weight in one factor of every
product). Each result says which it is: ``quantity`` is ``"ggn_diagonal"`` or ``"hessian_diagonal"`` and
``is_hessian`` is decided from the operators autograd traced (:mod:`sturdy.flatness.exactness`); a GELU,
tanh or LayerNorm network, or tied weights, give ``is_hessian=False``. A BatchNorm that normalises with
batch statistics in eval mode (``track_running_stats=False``) makes samples interact and is refused by
the GGN methods.

Memory of the GGN methods, bounded whatever the data size: the forward graph of one chunk of samples
and the output gradients of one block of columns together take at most ``memory_budget`` bytes (the
chunk has as many samples as that allows, ``chunk_size`` overrides it, see
:func:`sturdy.flatness.ggn.plan_memory`); the rules' per-sample tensors take one chunk of at most
16 MiB (:data:`sturdy.flatness.ggn.RULE_CHUNK_BYTES`); the accumulators take the parameters' size
(``groups`` times for ``"ggn-mc"``); the data is read in one pass, one batch of ``batch_size`` samples
on the device at a time (a ``DataLoader`` is iterated once, as given). The peak of the extra tensor
memory is about ``memory_budget + 16 MiB`` plus the accumulators and one batch; the process's resident
set can exceed it by what the C allocator keeps after ``free`` and by the libraries' one-time start-up
(measured in BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    default_loss,
    loss_batches,
    stream_classification_batches,
    trainable_parameters,
)
from sturdy.flatness.ggn import exact_columns, ggn_columns, monte_carlo_columns
from sturdy.flatness.hvp import (
    EigenEstimate,
    TraceEstimate,
    batch_gradient,
    hutchinson_trace,
    hvp,
    probe_seed,
    rademacher,
    top_hessian_eigenvalue,
)
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_model

__all__ = [
    "HessianDiagonal",
    "TraceEstimate",
    "EigenEstimate",
    "hessian_diagonal",
    "hutchinson_trace",
    "top_hessian_eigenvalue",
    "HESSIAN_METHODS",
    "MC_CLASS_THRESHOLD",
    "DEFAULT_MEMORY_BUDGET",
]

HESSIAN_METHODS = ("auto", "ggn-exact", "ggn-mc", "hutchinson")
MC_CLASS_THRESHOLD = 100
"""``method="auto"`` takes the exact GGN diagonal up to this many classes and ``"ggn-mc"`` above."""
DEFAULT_MEMORY_BUDGET = 2**30
"""Default ``memory_budget`` of the GGN methods in bytes (module docstring)."""


@dataclass(frozen=True)
class HessianDiagonal:
    """A curvature diagonal of the mean training loss, per parameter: the GGN's or the Hessian's.

    Attributes:
        diagonal: parameter name -> tensor of the parameter's shape (float, on the model's device).
        stderr: parameter name -> standard error of each entry (zeros for ``"ggn-exact"``).
        method: ``"ggn-exact"``, ``"ggn-mc"`` or ``"hutchinson"``.
        num_samples: number of data samples the loss averages over.
        probes: Rademacher probes (``"hutchinson"``) or sampled labels per input (``"ggn-mc"``); 0 otherwise.
        quantity: ``"ggn_diagonal"`` (GGN methods) or ``"hessian_diagonal"`` (Hutchinson).
        is_hessian: whether ``diagonal`` is (an estimate of) the Hessian's diagonal: always for
            Hutchinson; for the GGN methods when the traced operators prove the GGN diagonal equal to it.
        reasons: the operators that keep the GGN diagonal from being the Hessian's (empty when ``is_hessian``).
        num_classes: width of the logits (0 for Hutchinson).
        sum_stderr: parameter name -> standard error of the sum of its entries (0 for ``"ggn-exact"``).
        replicates: for ``"ggn-mc"``, parameter name -> ``(groups, *shape)`` diagonals of independent groups
            of sampled labels (their mean is ``diagonal``), for the uncertainty of derived quantities.
    """

    diagonal: Dict[str, Tensor]
    stderr: Dict[str, Tensor]
    method: str
    num_samples: int
    probes: int
    quantity: str = "ggn_diagonal"
    is_hessian: bool = False
    reasons: Tuple[str, ...] = ()
    num_classes: int = 0
    sum_stderr: Dict[str, float] = field(default_factory=dict)
    replicates: Optional[Dict[str, Tensor]] = None

    def trace(self) -> float:
        """Sum of every diagonal entry (the GGN's or Hessian's trace over the covered parameters)."""
        return float(sum(float(d.sum()) for d in self.diagonal.values()))

    def trace_stderr(self) -> float:
        """Standard error of :meth:`trace`: exact over groups for ``"ggn-mc"``; for Hutchinson an indication
        (probe errors treated as independent across entries; :func:`hutchinson_trace` gives the exact one)."""
        if self.replicates:
            traces = sum(r.flatten(1).sum(1).double() for r in self.replicates.values())
            return float(traces.std() / math.sqrt(traces.numel())) if traces.numel() > 1 else math.nan
        return float(math.sqrt(sum(float((s**2).sum()) for s in self.stderr.values())))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (tensors as nested lists; ``replicates`` left out)."""
        return {
            "diagonal": {n: d.tolist() for n, d in self.diagonal.items()},
            "stderr": {n: s.tolist() for n, s in self.stderr.items()},
            "method": self.method, "num_samples": self.num_samples, "probes": self.probes,
            "quantity": self.quantity, "is_hessian": self.is_hessian, "reasons": list(self.reasons),
            "num_classes": self.num_classes, "sum_stderr": dict(self.sum_stderr),
        }


def _hutchinson_diagonal(
    model: nn.Module,
    batches: List[Tuple[Tensor, Tensor]],
    params: List[Tuple[str, nn.Parameter]],
    *,
    probes: int,
    probe_chunk: int,
    seed: int,
    num_samples: int,
    loss_fn: LossFn,
    progress: bool,
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    tensors = [p for _, p in params]
    total = [torch.zeros_like(p) for p in tensors]
    total_sq = [torch.zeros_like(p) for p in tensors]
    bar = tqdm(total=probes * len(batches), desc="hutchinson", unit="hvp", disable=not progress)
    for start in range(0, probes, probe_chunk):
        ks = list(range(start, min(start + probe_chunk, probes)))
        acc = {k: [torch.zeros_like(p) for p in tensors] for k in ks}
        for x, y in batches:
            grads = batch_gradient(model, x, y, tensors, loss_fn)
            for j, k in enumerate(ks):
                v = rademacher(tensors, seed=probe_seed(seed, k))
                hv = hvp(grads, tensors, v, retain=j < len(ks) - 1)
                for a, vi, hi in zip(acc[k], v, hv):
                    a += vi * hi
                bar.update(1)
        for k in ks:
            for t, t2, a in zip(total, total_sq, acc[k]):
                est = a / num_samples
                t += est
                t2 += est * est
    bar.close()
    diag, err = {}, {}
    for (n, _), t, t2 in zip(params, total, total_sq):
        mean = t / probes
        var = ((t2 - probes * mean * mean) / (probes - 1)).clamp_min(0)
        diag[n] = mean
        err[n] = (var / probes).sqrt()
    return diag, err


# ----------------------------------------------------------------------------- public functions


def _select(model: nn.Module, names: Optional[Sequence[str]]) -> List[Tuple[str, nn.Parameter]]:
    params = trainable_parameters(model)
    if names is None:
        return params
    known = dict(params)
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigurationError(
            f"unknown or frozen parameter name(s) {', '.join(map(repr, missing))}; trainable parameters are: "
            + ", ".join(known)
        )
    return [(n, known[n]) for n in names]


def hessian_diagonal(
    model: nn.Module,
    data: Any,
    *,
    method: str = "auto",
    probes: int = 100,
    mc_samples: int = 16,
    mc_groups: int = 8,
    seed: int = 0,
    parameters: Optional[Sequence[str]] = None,
    batch_size: int = 1024,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    probe_chunk: int = 16,
    loss_fn: Optional[LossFn] = None,
    backend: str = "hooks",
    progress: bool = False,
) -> HessianDiagonal:
    """A curvature diagonal of the mean training loss for every trainable parameter: GGN or Hessian.

    Args:
        model: network mapping inputs to logits ``(N, classes)``; evaluated in eval mode.
        data: ``(inputs, targets)`` tensors, an ``ImageDataset``, a Dataset or an iterable of batches;
            for the cross-entropy loss the targets must be class indices of the model's outputs.
        method: ``"auto"`` (``"ggn-exact"`` up to :data:`MC_CLASS_THRESHOLD` classes, else ``"ggn-mc"``),
            ``"ggn-exact"`` (exact GGN diagonal of the cross-entropy loss; the Hessian's for piecewise-linear
            networks, see ``is_hessian``), ``"ggn-mc"`` (its Monte-Carlo estimate) or ``"hutchinson"``
            (stochastic Hessian diagonal, any loss).
        probes: Rademacher probes of ``"hutchinson"`` (>= 2, for the standard error).
        mc_samples: labels drawn per input by ``"ggn-mc"`` (>= 2); its cost is about that of the exact
            diagonal of ``mc_samples`` classes: ``min(mc_samples, classes)`` backward passes (fewer classes
            than draws: the output gradients of the draws are combinations of the classes') and one
            evaluation of the per-sample rules for all draws that keeps the groups apart, where a Linear
            layer with 2-D input takes ``groups`` times the flops of the exact diagonal's one product with
            its squared input (docs/design.md section 3; measured: 0.9-1.1x on convolutional networks, up
            to 1.5x on wide MLPs, BENCHMARKS.md).
        mc_groups: groups the draws are split into for standard errors (the largest divisor of
            ``mc_samples`` not above it is used; at least 2); intervals have ``groups - 1`` degrees of freedom.
        seed: seed of the probes and of the sampled labels (drawn on the CPU: identical on CPU and CUDA).
        parameters: names (as in ``named_parameters``) to restrict to; default every trainable one.
        batch_size: samples per forward pass of ``"hutchinson"`` and per read of ``data`` (memory only).
        chunk_size: samples per forward/backward pass of the GGN methods; default: as many as
            ``memory_budget`` allows (module docstring).
        memory_budget: bytes for the forward graph of one chunk and one block of output gradients of the
            GGN methods (module docstring; default 1 GiB).
        probe_chunk: probes sharing one pass over the data in ``"hutchinson"``; memory grows with it.
        loss_fn: ``loss_fn(outputs, targets) -> batch mean``; only for ``"hutchinson"`` (the GGN methods
            are defined for the cross-entropy loss).
        backend: ``"hooks"`` (the per-layer rules of :mod:`sturdy.persample`; ``torch.func`` through the
            network for shared modules and tied weights) or ``"func"`` (``torch.func`` per-sample gradients
            through the network for every parameter: slower, for cross-checks).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`HessianDiagonal` (same type for every method; ``quantity`` and ``is_hessian`` say what it is).

    Raises:
        DataError: targets that are not class indices of the model's outputs (cross-entropy), inputs and
            targets of different lengths, NaN or inf inputs, empty data.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
        >>> hd = hessian_diagonal(net, (x, y))
        >>> hd.diagonal["weight"].shape, hd.method, hd.quantity, hd.is_hessian
        (torch.Size([2, 3]), 'ggn-exact', 'ggn_diagonal', True)
    """
    check_model(model)
    if method not in HESSIAN_METHODS:
        raise ConfigurationError(f"method must be one of {', '.join(HESSIAN_METHODS)}, got {method!r}")
    if backend not in ("hooks", "func"):
        raise ConfigurationError(f"backend must be 'hooks' or 'func', got {backend!r}")
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_positive_int("memory_budget", memory_budget)
    check_positive_int("probe_chunk", probe_chunk)
    if method == "hutchinson":
        check_positive_int("probes", probes, minimum=2)
    elif loss_fn is not None:
        raise ConfigurationError(
            f"method={method!r} (the GGN diagonal) is defined for the cross-entropy loss only; drop loss_fn or use "
            "method='hutchinson'"
        )
    if method in ("auto", "ggn-mc"):
        check_positive_int("mc_samples", mc_samples, minimum=2)
        check_positive_int("mc_groups", mc_groups, minimum=2)
    device, dtype = model_device_dtype(model)
    params = _select(model, parameters)
    with eval_mode(model):
        if method == "hutchinson":
            batches = loss_batches(model, data, batch_size=batch_size, device=device, dtype=dtype, loss_fn=loss_fn)
            num_samples = sum(int(x.shape[0]) for x, _ in batches)
            diag, err = _hutchinson_diagonal(
                model, batches, params, probes=probes, probe_chunk=probe_chunk, seed=seed,
                num_samples=num_samples, loss_fn=loss_fn or default_loss, progress=progress,
            )
            return HessianDiagonal(diag, err, method, num_samples, probes, quantity="hessian_diagonal",
                                   is_hessian=True, sum_stderr={n: _sum_stderr(e) for n, e in err.items()})
        batches, num_classes, total = stream_classification_batches(model, data, batch_size=batch_size,
                                                                    device=device, dtype=dtype)
        if method == "auto":
            method = "ggn-exact" if num_classes <= MC_CLASS_THRESHOLD else "ggn-mc"
        if method == "ggn-exact":
            columns, groups, used = exact_columns, 1, 0
        else:
            groups = max(g for g in range(1, min(mc_groups, mc_samples) + 1) if mc_samples % g == 0)
            if groups < 2:
                groups = mc_samples  # a prime number of samples: one group per sample
            columns, used = monte_carlo_columns(mc_samples, seed), mc_samples
        result = ggn_columns(model, batches, params, columns, groups=groups, memory_budget=memory_budget,
                             chunk_size=chunk_size, progress=progress, backend=backend, desc=method, total=total)
        num_samples = result.num_samples
    diag, err, sum_err, replicates = _summarise_groups(result.groups, groups, num_samples)
    return HessianDiagonal(
        diag, err, method, num_samples, used, quantity="ggn_diagonal", is_hessian=result.exactness.is_hessian,
        reasons=result.exactness.reasons, num_classes=result.num_classes, sum_stderr=sum_err, replicates=replicates,
    )


def _summarise_groups(
    sums: Dict[str, Tensor], groups: int, num_samples: int
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, float], Optional[Dict[str, Tensor]]]:
    """Diagonal, entry standard errors, per-parameter sum standard errors and replicates from the
    accumulated ``(groups, *shape)`` sums (scaled in place into each group's own estimate)."""
    diag: Dict[str, Tensor] = {}
    err: Dict[str, Tensor] = {}
    sum_err: Dict[str, float] = {}
    if groups == 1:
        for n, acc in sums.items():
            diag[n] = acc[0] / num_samples
            err[n] = torch.zeros_like(diag[n])
            sum_err[n] = 0.0
        return diag, err, sum_err, None
    replicates: Dict[str, Tensor] = {}
    for n, acc in sums.items():
        reps = acc.mul_(groups / num_samples)  # in place: each group's own estimate of the diagonal
        replicates[n] = reps
        diag[n] = reps.mean(0)
        err[n] = _group_stderr(reps, diag[n])
        totals = reps.flatten(1).sum(1).double()
        sum_err[n] = float(totals.std() / math.sqrt(groups))
    return diag, err, sum_err, replicates


def _group_stderr(reps: Tensor, mean: Tensor) -> Tensor:
    """Standard error of the mean of ``G`` group estimates ``reps`` ``(G, *shape)``, entry by entry.

    Two passes (the mean is given), one contiguous group at a time: ``Tensor.std(0)`` reduces across the
    leading dimension element by element and costs many times more on large layers.
    """
    groups = reps.shape[0]
    squares = torch.zeros_like(mean)
    for rep in reps:
        dev = rep - mean
        squares.addcmul_(dev, dev)
    return squares.div_((groups - 1) * groups).sqrt_()


def _sum_stderr(entry_stderr: Tensor) -> float:
    """Standard error of a sum of entries with independent errors (an indication for Hutchinson)."""
    return float(math.sqrt(float((entry_stderr.double() ** 2).sum())))
