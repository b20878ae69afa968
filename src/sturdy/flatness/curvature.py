"""Hessian diagonals, Hessian traces and top eigenvalues of the training loss.

The training loss is ``L(w) = (1/N) sum_n loss(f(x_n; w), y_n)`` over every sample of ``data``
(**mean** reduction; batching never changes the value). The model is evaluated in eval mode.

Two diagonals are offered by :func:`hessian_diagonal`:

* ``"ggn-exact"``: the exact diagonal of the generalised Gauss-Newton matrix of the cross-entropy
  loss, ``G = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` (``J_n`` the Jacobian of the logits
  with respect to the parameters, ``p_n`` the softmax). The softmax Hessian factorises as
  ``diag(p) - p p^T = S S^T`` with columns ``s_c = sqrt(p_c) (e_c - p)``, so
  ``diag(G) = (1/N) sum_n sum_c (J_n^T s_{n,c})^2``: one backward pass per class, each giving the
  output gradients of every layer, to which the per-sample squared-gradient rules of
  :mod:`sturdy.persample` apply (Linear, Conv2d, BatchNorm, ``torch.func`` for any other module). A
  module called more than once per forward pass and a weight tied across modules take ``torch.func``
  per-sample gradients through the whole network instead (their per-sample gradients add up before
  squaring). For networks that are piecewise linear in each single parameter (ReLU/max-pool MLPs and
  CNNs, eval-mode BatchNorm, every weight used by one layer) the logits have zero second derivative
  along each coordinate, so ``diag(G)`` **equals the Hessian diagonal** of the cross-entropy loss
  (almost everywhere); with tied weights it is the GGN diagonal.
  A BatchNorm that normalises with batch statistics in eval mode (``track_running_stats=False``) makes
  samples interact and is refused.
* ``"hutchinson"``: ``E_v[v * (H v)]`` with Rademacher probes ``v`` and Hessian-vector products by
  double backward, for any loss; it reports the standard error of the mean over probes.

Memory bound of ``"ggn-exact"``: one forward/backward graph of ``chunk_size`` samples, plus for one
layer at a time its per-sample tensors of the whole chunk (for ``nn.Conv2d`` the unfolded input,
``chunk_size x C_in k_h k_w x L`` values, and the per-sample gradients, ``chunk_size x numel(weight)``
values), plus one accumulator of the parameters' size.
For the digits grid models with the default ``chunk_size=512`` this is under 200 MiB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    collect_batches,
    default_loss,
    eval_mode,
    model_device_dtype,
    trainable_parameters,
)
from sturdy.persample import (
    CallRecorder,
    TrackedModule,
    func_squared_gradients,
    squared_gradients,
    trainable_modules,
    uses_batch_statistics,
)
from sturdy.persample.recorder import Call

__all__ = [
    "HessianDiagonal",
    "TraceEstimate",
    "EigenEstimate",
    "hessian_diagonal",
    "hutchinson_trace",
    "top_hessian_eigenvalue",
    "HESSIAN_METHODS",
]

HESSIAN_METHODS = ("ggn-exact", "hutchinson")


@dataclass(frozen=True)
class HessianDiagonal:
    """Diagonal of the Hessian of the mean training loss, per parameter.

    Attributes:
        diagonal: parameter name -> tensor of the parameter's shape (float, on the model's device).
        stderr: parameter name -> standard error of each entry (zeros for ``"ggn-exact"``).
        method: ``"ggn-exact"`` or ``"hutchinson"``.
        num_samples: number of data samples the loss averages over.
        probes: Rademacher probes used (0 for ``"ggn-exact"``).
    """

    diagonal: Dict[str, Tensor]
    stderr: Dict[str, Tensor]
    method: str
    num_samples: int
    probes: int

    def trace(self) -> float:
        """Sum of every diagonal entry (the Hessian trace over the covered parameters)."""
        return float(sum(float(d.sum()) for d in self.diagonal.values()))

    def trace_stderr(self) -> float:
        """Standard error of :meth:`trace` when probe errors are treated as independent across entries.

        This is only an indication; :func:`hutchinson_trace` gives the exact standard error of a trace.
        """
        return float(math.sqrt(sum(float((s**2).sum()) for s in self.stderr.values())))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (tensors as nested lists)."""
        return {
            "diagonal": {n: d.tolist() for n, d in self.diagonal.items()},
            "stderr": {n: s.tolist() for n, s in self.stderr.items()},
            "method": self.method, "num_samples": self.num_samples, "probes": self.probes,
        }


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of the Hessian trace: ``value`` +- ``stderr`` (standard error over ``probes``)."""

    value: float
    stderr: float
    probes: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)


@dataclass(frozen=True)
class EigenEstimate:
    """Largest-magnitude Hessian eigenvalue by power iteration (the top eigenvalue when the Hessian is PSD).

    Attributes:
        value: Rayleigh quotient ``v^T H v`` of the final unit vector.
        iterations: Hessian-vector products used.
        residual: ``||H v - value v||_2`` at the final vector (0 for an exact eigenvector).
        converged: whether the relative change of ``value`` fell below ``tol``.
    """

    value: float
    iterations: int
    residual: float
    converged: bool

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)


# ----------------------------------------------------------------------------- exact GGN diagonal

# The per-sample tensors of a backward pass form one chunk: ``chunk_size`` bounds them (module doc).
_ONE_CHUNK = 2**62


def _refuse_interacting_samples(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if uses_batch_statistics(module):
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) normalises with the statistics of its batch even in "
                "eval mode (track_running_stats=False): samples interact, so the GGN is not a sum over samples "
                "and method='ggn-exact' does not apply; use method='hutchinson'",
                module=module,
                path=name,
            )


def _hooked_modules(
    model: nn.Module, name_of: Dict[int, str], backend: str
) -> List[TrackedModule]:
    """Modules whose selected parameters take their layer's rule (the others take torch.func on the network).

    A parameter shared by several modules (tied weights) needs its per-sample gradients summed over the
    modules before squaring: it goes to the torch.func path, which sees the whole network.
    """
    if backend != "hooks":
        return []
    owners: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        t
        for t in trainable_modules(model)
        if any(id(p) in name_of for p in t.params.values()) and all(owners[id(p)] == 1 for p in t.params.values())
    ]


def _split_calls(
    calls: List[Call], params: List[Tuple[str, nn.Parameter]], name_of: Dict[int, str]
) -> Tuple[List[Call], Dict[str, Tensor]]:
    """Calls a rule can take (a module called once, as ``module(x)``), and the parameters left to torch.func.

    A module called several times (shared weights) needs its per-sample gradients summed over the calls
    before squaring, which the rules (one call each) do not do: the torch.func path takes it.
    """
    count: Dict[int, int] = {}
    for call in calls:
        count[id(call.tracked)] = count.get(id(call.tracked), 0) + 1
    hooked = [
        call
        for call in calls
        if count[id(call.tracked)] == 1
        and len(call.args) == 1
        and isinstance(call.args[0], Tensor)
        and isinstance(call.output, Tensor)
        and call.output.requires_grad
    ]
    covered = {id(p) for call in hooked for p in call.tracked.params.values()}
    fallback = {n: p.detach() for n, p in params if id(p) not in covered}
    return hooked, fallback


def _ggn_exact(
    model: nn.Module,
    batches: List[Tuple[Tensor, Tensor]],
    params: List[Tuple[str, nn.Parameter]],
    *,
    chunk_size: int,
    progress: bool,
    backend: str = "hooks",
) -> Dict[str, Tensor]:
    """``sum_n sum_c (J_n^T s_{n,c})^2``: the squared-gradient rules applied to each softmax-factor column."""
    _refuse_interacting_samples(model)
    name_of = {id(p): n for n, p in params}
    acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in params}
    recorder = CallRecorder(_hooked_modules(model, name_of, backend))
    chunks = [x[i : i + chunk_size] for x, _ in batches for i in range(0, x.shape[0], chunk_size)]
    try:
        for x in tqdm(chunks, desc="ggn-exact", unit="chunk", disable=not progress):
            recorder.clear()
            recorder.active = True
            with torch.enable_grad():
                logits = model(x)
            recorder.active = False
            if logits.dim() != 2:
                raise ConfigurationError(
                    f"ggn-exact needs logits of shape (N, classes), got {tuple(logits.shape)}; use method='hutchinson'"
                )
            calls, fallback = _split_calls(recorder.calls, params, name_of)
            constants = _constants(model, fallback) if fallback else {}
            with torch.no_grad():
                p = torch.softmax(logits.detach(), dim=1)
            num_classes = p.shape[1]
            for c in range(num_classes):
                v = -p * p[:, c : c + 1].sqrt()
                v[:, c] += p[:, c].sqrt()
                if calls:
                    deltas = torch.autograd.grad(
                        logits, [call.output for call in calls], grad_outputs=v,
                        retain_graph=c < num_classes - 1, allow_unused=True,
                    )
                    for call, delta in zip(calls, deltas):
                        if delta is not None:
                            squares = squared_gradients(call.tracked, call.args[0], delta, _ONE_CHUNK)
                            _add(acc, {name_of.get(id(call.tracked.params[attr])): sq for attr, sq in squares.items()})
                if fallback:
                    _add(acc, func_squared_gradients(model, fallback, x, v, _ONE_CHUNK, constants=constants))
    finally:
        recorder.remove()
    return acc


def _constants(model: nn.Module, free: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Detached parameters and buffers of ``model`` other than ``free`` (torch.func then builds no graph of them)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t.detach() for n, t in named if n not in free}


def _add(acc: Dict[str, Tensor], squares: Dict[Optional[str], Tensor]) -> None:
    """``acc[name] += value`` for every selected parameter name (``None``: not selected)."""
    with torch.no_grad():
        for name, value in squares.items():
            if name is not None:
                acc[name] += value


# ----------------------------------------------------------------------------- Hessian-vector products


def _rademacher(params: Sequence[Tensor], *, seed: int) -> List[Tensor]:
    """Rademacher vectors drawn on the CPU from ``seed`` (identical on every device), one per parameter."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device=p.device, dtype=p.dtype)
        for p in params
    ]


def _probe_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k) % (2**63 - 1)


def _batch_gradient(
    model: nn.Module, x: Tensor, y: Tensor, params: List[Tensor], loss_fn: LossFn
) -> Tuple[Tensor, ...]:
    """Gradient of the batch's **summed** loss, with its graph kept for double backward."""
    with torch.enable_grad():
        loss = loss_fn(model(x), y) * x.shape[0]
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)


def _hvp(grads: Tuple[Tensor, ...], params: List[Tensor], vec: Sequence[Tensor], *, retain: bool) -> List[Tensor]:
    """``H v`` from a gradient graph; entries whose gradient is constant contribute nothing."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad(
        [grads[i] for i in live], params, grad_outputs=[vec[i] for i in live], retain_graph=retain, allow_unused=True
    )
    return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(out, params)]


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
            grads = _batch_gradient(model, x, y, tensors, loss_fn)
            for j, k in enumerate(ks):
                v = _rademacher(tensors, seed=_probe_seed(seed, k))
                hv = _hvp(grads, tensors, v, retain=j < len(ks) - 1)
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
    method: str = "ggn-exact",
    probes: int = 100,
    seed: int = 0,
    parameters: Optional[Sequence[str]] = None,
    batch_size: int = 1024,
    chunk_size: int = 512,
    probe_chunk: int = 16,
    loss_fn: Optional[LossFn] = None,
    backend: str = "hooks",
    progress: bool = False,
) -> HessianDiagonal:
    """Diagonal of the Hessian of the mean training loss with respect to every trainable parameter.

    Args:
        model: network mapping inputs to logits ``(N, classes)``; evaluated in eval mode.
        data: ``(inputs, targets)`` tensors, an ``ImageDataset``, a Dataset or an iterable of batches.
        method: ``"ggn-exact"`` (exact GGN diagonal of the cross-entropy loss; equals the Hessian
            diagonal for piecewise-linear networks) or ``"hutchinson"`` (stochastic, any loss).
        probes: Rademacher probes of ``"hutchinson"`` (>= 2, for the standard error).
        seed: seed of the probes (drawn on the CPU: identical on CPU and CUDA).
        parameters: names (as in ``named_parameters``) to restrict to; default every trainable one.
        batch_size: samples per forward pass (memory only; the value does not depend on it).
        chunk_size: samples per backward pass of ``"ggn-exact"`` (bounds its memory, see module doc).
        probe_chunk: probes sharing one pass over the data in ``"hutchinson"``; memory grows with it.
        loss_fn: ``loss_fn(outputs, targets) -> batch mean``; only for ``"hutchinson"`` (``"ggn-exact"``
            is defined for the cross-entropy loss).
        backend: ``"hooks"`` (the per-layer rules of :mod:`sturdy.persample`; ``torch.func`` through the
            network for shared modules and tied weights) or ``"func"`` (``torch.func`` per-sample gradients
            through the network for every parameter: slower, for cross-checks).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`HessianDiagonal` (same type for both methods).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
        >>> hd = hessian_diagonal(net, (x, y))
        >>> hd.diagonal["weight"].shape, hd.method
        (torch.Size([2, 3]), 'ggn-exact')
    """
    if method not in HESSIAN_METHODS:
        raise ConfigurationError(f"method must be one of {', '.join(HESSIAN_METHODS)}, got {method!r}")
    if backend not in ("hooks", "func"):
        raise ConfigurationError(f"backend must be 'hooks' or 'func', got {backend!r}")
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("probe_chunk", probe_chunk)
    if method == "hutchinson":
        check_positive_int("probes", probes, minimum=2)
    elif loss_fn is not None:
        raise ConfigurationError(
            "method='ggn-exact' is defined for the cross-entropy loss only; drop loss_fn or use method='hutchinson'"
        )
    device, dtype = model_device_dtype(model)
    params = _select(model, parameters)
    batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype)
    num_samples = sum(int(x.shape[0]) for x, _ in batches)
    with eval_mode(model):
        if method == "ggn-exact":
            acc = _ggn_exact(model, batches, params, chunk_size=chunk_size, progress=progress, backend=backend)
            diag = {n: a / num_samples for n, a in acc.items()}
            err = {n: torch.zeros_like(d) for n, d in diag.items()}
            used = 0
        else:
            diag, err = _hutchinson_diagonal(
                model, batches, params, probes=probes, probe_chunk=probe_chunk, seed=seed,
                num_samples=num_samples, loss_fn=loss_fn or default_loss, progress=progress,
            )
            used = probes
    return HessianDiagonal(diagonal=diag, stderr=err, method=method, num_samples=num_samples, probes=used)


def hutchinson_trace(
    model: nn.Module,
    data: Any,
    *,
    probes: int = 100,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> TraceEstimate:
    """Hutchinson estimate ``mean_k v_k^T H v_k`` of the trace of the Hessian of the mean training loss.

    Uses Rademacher probes over every trainable parameter and one double-backward pass per probe
    and batch (the forward and gradient graph of a batch are shared by all probes).

    Args:
        model: the network (eval mode); data: as for :func:`hessian_diagonal`.
        probes: number of probes (>= 2); seed: their seed (drawn on the CPU).
        batch_size: samples per pass; loss_fn: ``loss_fn(outputs, targets) -> batch mean`` (default
            cross-entropy); progress: show a tqdm bar.

    Returns:
        :class:`TraceEstimate` with the standard error over probes.
    """
    check_positive_int("probes", probes, minimum=2)
    device, dtype = model_device_dtype(model)
    tensors = [p for _, p in trainable_parameters(model)]
    batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype)
    num_samples = sum(int(x.shape[0]) for x, _ in batches)
    loss_fn = loss_fn or default_loss
    per_probe = [0.0] * probes
    with eval_mode(model):
        bar = tqdm(total=probes * len(batches), desc="trace", unit="hvp", disable=not progress)
        for x, y in batches:
            grads = _batch_gradient(model, x, y, tensors, loss_fn)
            for k in range(probes):
                v = _rademacher(tensors, seed=_probe_seed(seed, k))
                hv = _hvp(grads, tensors, v, retain=k < probes - 1)
                per_probe[k] += float(sum((vi * hi).sum() for vi, hi in zip(v, hv)))
                bar.update(1)
        bar.close()
    values = torch.tensor(per_probe, dtype=torch.float64) / num_samples
    return TraceEstimate(value=float(values.mean()), stderr=float(values.std() / math.sqrt(probes)), probes=probes)


def top_hessian_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> EigenEstimate:
    """Largest-magnitude eigenvalue of the Hessian of the mean training loss by power iteration on HVPs.

    At a minimum the Hessian is (nearly) positive semi-definite and this is the top eigenvalue.
    Stops when the Rayleigh quotient changes by less than ``tol`` relatively, or after ``iterations``.

    Args:
        model, data, batch_size, loss_fn, progress: as for :func:`hutchinson_trace`.
        iterations: maximum Hessian-vector products; tol: relative stopping tolerance;
        seed: seed of the Gaussian start vector (drawn on the CPU).
    """
    check_positive_int("iterations", iterations)
    if not (math.isfinite(tol) and tol > 0):
        raise ConfigurationError(f"tol must be a finite number > 0, got {tol!r}")
    device, dtype = model_device_dtype(model)
    tensors = [p for _, p in trainable_parameters(model)]
    batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype)
    num_samples = sum(int(x.shape[0]) for x, _ in batches)
    loss_fn = loss_fn or default_loss
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=p.dtype) for p in tensors]

    def normalise(vec: List[Tensor]) -> List[Tensor]:
        norm = math.sqrt(sum(float((t * t).sum()) for t in vec))
        return [t / norm for t in vec] if norm > 0 else vec

    def full_hvp(vec: List[Tensor]) -> List[Tensor]:
        out = [torch.zeros_like(p) for p in tensors]
        for x, y in batches:
            grads = _batch_gradient(model, x, y, tensors, loss_fn)
            for o, h in zip(out, _hvp(grads, tensors, vec, retain=False)):
                o += h / num_samples
        return out

    v = normalise(v)
    value, residual, converged, used = 0.0, float("inf"), False, 0
    with eval_mode(model):
        for used in tqdm(range(1, iterations + 1), desc="top-eigenvalue", unit="hvp", disable=not progress):
            hv = full_hvp(v)
            new = float(sum((a * b).sum() for a, b in zip(v, hv)))
            residual = math.sqrt(sum(float(((h - new * a) ** 2).sum()) for a, h in zip(v, hv)))
            done = used > 1 and abs(new - value) <= tol * max(abs(new), 1e-30)
            value = new
            if done or residual == 0.0:
                converged = True
                break
            v = normalise(hv)
    return EigenEstimate(value=value, iterations=used, residual=residual, converged=converged)
