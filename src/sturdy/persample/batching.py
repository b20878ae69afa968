"""Which module calls are per-sample, and exact squared gradients for those that are not.

Every rule of :mod:`sturdy.persample` reads dimension 0 of a module's input and output as the samples.
That holds only when the call *follows the batch*: a positional ``nn.Embedding`` called with shared
indices (``self.pos(torch.arange(T))[None]``), a Linear applied to a learned query, a module applied to
a reshaped ``(B * T, d)`` input or a time-major ``(T, B, d)`` one all have another leading dimension,
and a rule would read it as samples (measured on a small positional-embedding model: the GGN diagonal
of its weight summed to 4x the truth, its compression statistic was 77% off). A call follows the batch when

* its input and output have the batch size ``B`` in dimension 0 (an input broadcast to ``B`` before the
  call is fine: each sample then has its own output rows), and
* run on one sample (a probe of the model at batch size 1 in eval mode, buffers and random state left
  as they were), its input and output have 1 there: this catches shared inputs whose length happens to
  equal ``B`` (``torch.arange(T)`` with ``T == B``).

A call that does not follow the batch is computed exactly instead: its parameters' per-sample gradients
are taken through the network from the model's output (:func:`output_per_sample_squares`: one batched
vector-Jacobian product per chunk of samples, the output gradient restricted to one sample each), or,
in the GGN diagonal, by ``torch.func`` through the network.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from sturdy.persample.chunking import chunks, samples_per_chunk
from sturdy.utils import eval_mode

__all__ = ["follows_batch", "batch_followers", "first_tensor", "output_per_sample_squares"]


def follows_batch(a: Any, output: Any, batch: int) -> bool:
    """Whether a call with input ``a`` and ``output`` has ``batch`` samples in dimension 0 of both.

    A batch of one sample is always followed (its only sample's gradient is the whole gradient). An input
    broadcast to the batch before the call (``arange(T)[None].expand(B, T)``, stride 0) follows it: every
    sample gets its own output rows, and the rules pair each sample's input with its own output gradient.
    """
    if batch <= 1:
        return True
    for t in (a, output):
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch:
            return False
    return True


def first_tensor(args: Sequence[Any], kwargs: Optional[Mapping[str, Any]] = None) -> Optional[Tensor]:
    """The first tensor among positional then keyword arguments (the batch a model was called with)."""
    for value in list(args) + list((kwargs or {}).values()):
        if isinstance(value, Tensor):
            return value
    return None


def batch_followers(
    model: nn.Module, modules: Iterable[nn.Module], args: Sequence[Any], kwargs: Optional[Mapping[str, Any]],
    batch: int,
) -> Set[int]:
    """Ids of ``modules`` whose every call has leading dimension 1 (input and output) on one sample.

    The probe calls ``model`` once with every tensor argument of leading dimension ``batch`` cut to its
    first sample, in eval mode under ``torch.no_grad()`` with the random state forked, so it changes no
    buffer, mode or random stream. A module not called is not in the result (nothing is known about
    it); a model that fails on one sample gives the empty set, so that every call takes the exact path.
    """
    watched = list(modules)
    seen: Dict[int, bool] = {}

    def cut(value: Any) -> Any:
        return value[:1] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch else value

    def hook(module: nn.Module, hook_args: Tuple[Any, ...], output: Any) -> None:
        ok = len(hook_args) >= 1 and _leading(hook_args[0]) == 1 and _leading(output) == 1
        seen[id(module)] = seen.get(id(module), True) and ok

    handles = [m.register_forward_hook(hook) for m in watched]
    x = first_tensor(args, kwargs)
    devices = [x.device.index or 0] if x is not None and x.device.type == "cuda" else []
    try:
        with torch.no_grad(), eval_mode(model), torch.random.fork_rng(devices=devices):
            model(*[cut(a) for a in args], **{k: cut(v) for k, v in (kwargs or {}).items()})
    except (RuntimeError, ValueError, IndexError, TypeError):
        return set()
    finally:
        for h in handles:
            h.remove()
    return {key for key, ok in seen.items() if ok}


def _leading(t: Any) -> int:
    return int(t.shape[0]) if isinstance(t, Tensor) and t.dim() > 0 else -1


def output_per_sample_squares(
    output: Tensor, delta: Tensor, params: Sequence[Tensor], budget: int
) -> Tuple[Tensor, ...]:
    """``sum_x (d <output, delta restricted to sample x> / d p)^2`` for each of ``params``.

    ``output`` is a model's output (samples in dimension 0) whose graph is still alive, ``delta`` the
    gradient of the loss with respect to it; the per-sample gradients are vector-Jacobian products
    through the graph the forward pass built (its dropout masks and normalisation statistics), batched
    over a chunk of samples (``is_grads_batched``), one sample at a time where that cannot be batched.
    The graph is retained. ``budget`` bounds the bytes of one chunk's per-sample gradients.
    """
    n = int(output.shape[0])
    squares = [torch.zeros_like(p) for p in params]
    per_sample = sum(p.numel() for p in params) + output.numel()
    chunk = min(n, samples_per_chunk(budget, per_sample, output.element_size()))
    batched = True
    for sl in chunks(n, chunk):
        rows = torch.arange(sl.stop - sl.start, device=output.device)
        cotangents = delta.new_zeros((len(rows), *delta.shape))
        cotangents[rows, rows + sl.start] = delta[sl]
        grads: Sequence[Optional[Tensor]] = ()
        if batched:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    grads = torch.autograd.grad(output, list(params), cotangents, retain_graph=True,
                                                allow_unused=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                batched = False  # an operator without a batching rule: one sample at a time (exact, slower)
        if batched:
            for acc, g in zip(squares, grads):
                if g is not None:
                    acc.add_(g.square().sum(0))
            continue
        for cot in cotangents:
            single = torch.autograd.grad(output, list(params), cot, retain_graph=True, allow_unused=True)
            for acc, g in zip(squares, single):
                if g is not None:
                    acc.addcmul_(g, g)
    return tuple(squares)
