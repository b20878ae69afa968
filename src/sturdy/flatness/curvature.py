"""Hessian diagonals, Hessian traces and top eigenvalues of the training loss.

The training loss is ``L(w) = (1/N) sum_n loss(f(x_n; w), y_n)`` over every sample of ``data``
(**mean** reduction; batching never changes the value). The model is evaluated in eval mode.

Two diagonals are offered by :func:`hessian_diagonal`:

* ``"ggn-exact"``: the exact diagonal of the generalised Gauss-Newton matrix of the cross-entropy
  loss, ``G = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` (``J_n`` the Jacobian of the logits
  with respect to the parameters, ``p_n`` the softmax). The softmax Hessian factorises as
  ``diag(p) - p p^T = S S^T`` with columns ``s_c = sqrt(p_c) (e_c - p)``, so
  ``diag(G) = (1/N) sum_n sum_c (J_n^T s_{n,c})^2``: one backward pass per class, and the squared
  per-sample gradients come from the activations and output gradients that per-layer hooks see
  (fast paths for ``nn.Linear`` and ``nn.Conv2d``; ``torch.func`` per-sample gradients for every
  other parameter, and for weights tied across modules). For networks that are piecewise linear in each
  single parameter (ReLU/max-pool MLPs and CNNs, eval-mode BatchNorm, every weight used by one layer)
  the logits have zero second derivative along each coordinate, so ``diag(G)`` **equals the Hessian
  diagonal** of the cross-entropy loss (almost everywhere); with tied weights it is the GGN diagonal.
* ``"hutchinson"``: ``E_v[v * (H v)]`` with Rademacher probes ``v`` and Hessian-vector products by
  double backward, for any loss; it reports the standard error of the mean over probes.

Memory bound of ``"ggn-exact"``: one forward/backward graph of ``chunk_size`` samples, plus for each
``nn.Conv2d`` the unfolded input (``chunk_size x C_in k_h k_w x L`` values) and the per-sample
gradients (``chunk_size x numel(weight)`` values), plus one accumulator of the parameters' size.
For the digits grid models with the default ``chunk_size=512`` this is under 200 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    collect_batches,
    default_loss,
    eval_mode,
    model_device_dtype,
    trainable_parameters,
)

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


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of the Hessian trace: ``value`` +- ``stderr`` (standard error over ``probes``)."""

    value: float
    stderr: float
    probes: int


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


# ----------------------------------------------------------------------------- exact GGN diagonal


def _per_sample_linear(module: nn.Linear, a: Tensor, d: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    n = a.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])
    d3 = d.reshape(n, -1, d.shape[-1])
    gw = torch.bmm(d3.transpose(1, 2), a3)
    gb = d3.sum(1) if module.bias is not None else None
    return gw, gb


def _conv_fast(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _unfold(module: nn.Conv2d, a: Tensor) -> Tensor:
    """Unfolded input as a contiguous ``(n, L, C_in * kh * kw)`` tensor (reused for every class)."""
    u = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return u.transpose(1, 2).contiguous()


def _per_sample_conv(module: nn.Conv2d, u: Tensor, d: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    n = d.shape[0]
    d3 = d.reshape(n, d.shape[1], -1)
    gw = torch.bmm(d3, u).reshape(n, *module.weight.shape)
    gb = d3.sum(2) if module.bias is not None else None
    return gw, gb


class _Recorder:
    """Forward hooks on Linear/Conv2d layers keeping (input, output) of each call.

    The hook returns a clone of the output to the rest of the network so that in-place operations
    downstream (``ReLU(inplace=True)``) cannot overwrite the recorded output tensor.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.records: Dict[nn.Module, List[Tuple[Tensor, Tensor]]] = {m: [] for m in modules}
        self.active = False
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, inputs: Tuple[Any, ...], output: Tensor) -> Optional[Tensor]:
        if not self.active:
            return None
        self.records[module].append((inputs[0].detach(), output))
        return output.clone()

    def clear(self) -> None:
        for calls in self.records.values():
            calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _ggn_exact(
    model: nn.Module,
    batches: List[Tuple[Tensor, Tensor]],
    params: List[Tuple[str, nn.Parameter]],
    *,
    chunk_size: int,
    progress: bool,
    backend: str = "hooks",
) -> Dict[str, Tensor]:
    name_of = {id(p): n for n, p in params}
    acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in params}
    fast: List[nn.Module] = []
    covered: set = set()
    # A parameter shared by several modules (tied weights) needs its per-sample gradients summed over the
    # modules before squaring: it goes to the torch.func path, which sees the whole network.
    owners: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in model.modules() if backend == "hooks" else ():
        if isinstance(module, nn.Linear) or _conv_fast(module):
            own = [p for p in (module.weight, module.bias) if p is not None and id(p) in name_of]
            if own and all(owners[id(p)] == 1 for p in own):
                fast.append(module)
                covered.update(id(p) for p in own)
    fallback = [(n, p) for n, p in params if id(p) not in covered]
    recorder = _Recorder(fast)
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
            calls = [(m, i, o) for m, recs in recorder.records.items() for i, o in recs if o.requires_grad]
            unfolded = {idx: _unfold(m, a) for idx, (m, a, _) in enumerate(calls) if isinstance(m, nn.Conv2d)}
            with torch.no_grad():
                p = torch.softmax(logits.detach(), dim=1)
            num_classes = p.shape[1]
            for c in range(num_classes):
                v = -p * p[:, c : c + 1].sqrt()
                v[:, c] += p[:, c].sqrt()
                last = c == num_classes - 1
                if calls:
                    deltas = torch.autograd.grad(
                        logits, [o for _, _, o in calls], grad_outputs=v, retain_graph=not last, allow_unused=True
                    )
                    _accumulate_fast(calls, deltas, unfolded, acc, name_of)
                if fallback:
                    _accumulate_fallback(model, fallback, x, v, acc)
    finally:
        recorder.remove()
    return acc


def _accumulate_fast(
    calls: List[Tuple[nn.Module, Tensor, Tensor]],
    deltas: Sequence[Optional[Tensor]],
    unfolded: Dict[int, Tensor],
    acc: Dict[str, Tensor],
    name_of: Dict[int, str],
) -> None:
    with torch.no_grad():
        per_module: Dict[nn.Module, List[int]] = {}
        for idx, (m, _, _) in enumerate(calls):
            per_module.setdefault(m, []).append(idx)
        for m, idxs in per_module.items():
            idxs = [i for i in idxs if deltas[i] is not None]
            if not idxs:
                continue
            wname = name_of.get(id(m.weight))
            bname = name_of.get(id(m.bias)) if m.bias is not None else None
            if isinstance(m, nn.Linear) and len(idxs) == 1 and calls[idxs[0]][1].dim() == 2:
                # Fast path: sum_n (d_n a_n^T)^2 = (d^2)^T (a^2); no per-sample gradient is formed.
                a, d = calls[idxs[0]][1], deltas[idxs[0]]
                if wname is not None:
                    acc[wname] += (d * d).t() @ (a * a)
                if bname is not None:
                    acc[bname] += (d * d).sum(0)
                continue
            gw_sum: Optional[Tensor] = None
            gb_sum: Optional[Tensor] = None
            for i in idxs:
                if isinstance(m, nn.Linear):
                    gw, gb = _per_sample_linear(m, calls[i][1], deltas[i])
                else:
                    gw, gb = _per_sample_conv(m, unfolded[i], deltas[i])
                gw_sum = gw if gw_sum is None else gw_sum + gw
                if gb is not None:
                    gb_sum = gb if gb_sum is None else gb_sum + gb
            if wname is not None and gw_sum is not None:
                acc[wname] += gw_sum.pow_(2).sum(0)
            if bname is not None and gb_sum is not None:
                acc[bname] += gb_sum.pow_(2).sum(0)


def _accumulate_fallback(
    model: nn.Module, fallback: List[Tuple[str, nn.Parameter]], x: Tensor, v: Tensor, acc: Dict[str, Tensor]
) -> None:
    """Squared per-sample ``J^T v`` for parameters without a fast path, by ``torch.func``."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in fallback]
    fixed = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in names}
    free = {n: p.detach() for n, p in fallback}

    def scalar(free_params: Dict[str, Tensor], x1: Tensor, v1: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **free_params}, (x1.unsqueeze(0),))
        return (out.squeeze(0) * v1).sum()

    per_sample = vmap(grad(scalar), in_dims=(None, 0, 0))(free, x, v)
    with torch.no_grad():
        for n in names:
            acc[n] += (per_sample[n] ** 2).sum(0)


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
        backend: ``"hooks"`` (per-layer fast paths, ``torch.func`` for the rest) or ``"func"`` (``torch.func``
            per-sample gradients for every parameter: slower, for cross-checks).
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
