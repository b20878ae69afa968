"""The GGN diagonal from columns of the softmax Hessian's factor, through the per-sample rules.

For logits ``f_n`` with softmax ``p_n`` the GGN of the mean cross-entropy is
``G = (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n``. Any set of columns ``v_{n,k}`` with
``sum_k v_{n,k} v_{n,k}^T = diag p_n - p_n p_n^T`` (exactly, or in expectation) gives
``diag G = (1/N) sum_n sum_k (J_n^T v_{n,k})^2``: for each column one backward pass gives the output
gradients of every layer, to which the per-sample squared-gradient rules of :mod:`sturdy.persample`
apply. Two column sets:

* exact (``"ggn-exact"``): ``v_{n,c} = sqrt(p_c) (e_c - p)``, one column per class;
* Monte Carlo (``"ggn-mc"``): ``v_{n,k} = (p_n - e_{y_k}) / sqrt(K)`` with ``y_k ~ p_n`` drawn
  independently, ``K`` columns whatever the class count (``E[(p - e_y)(p - e_y)^T] = diag p - p p^T``).
  The ``K`` draws are split into ``groups`` of equal size whose diagonals are kept apart, so that their
  spread gives standard errors (of each entry, of each parameter's sum, and of anything computed from
  the diagonal, by the jackknife over groups).

Columns are processed in blocks: the output gradients of a block of columns are stacked along a leading
column dimension and handed to each layer's column rule at once, which keeps the groups of the block apart
(a convolution unfolds its input once per block, not once per column or group). A block of more columns
than classes takes its output gradients from those of the ``C`` unit columns: per sample they are linear
in the column, ``delta(v) = sum_c v_c delta(e_c)``, so ``C`` backward passes serve any number of draws.
The samples per forward pass and the block size follow one memory budget (see :func:`plan_memory`); the
rules' per-sample chunks take at most :data:`RULE_CHUNK_BYTES`.

A module called more than once per forward pass, a weight tied across modules and a module whose call
does not follow the batch (a positional embedding of shared indices, a layer applied to a learned query,
a reshaped or time-major input: see :mod:`sturdy.persample.batching`) take ``torch.func`` per-sample
gradients through the whole network (their per-sample gradients add up before squaring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.flatness.exactness import GraphExactness, analyse_graph
from sturdy.persample import (
    CallRecorder,
    TrackedModule,
    column_squared_gradients,
    func_squared_gradients,
    trainable_modules,
    uses_batch_statistics,
)
from sturdy.persample.batching import batch_followers, follows_batch
from sturdy.persample.recorder import Call

__all__ = [
    "GGNAccumulation",
    "ggn_columns",
    "exact_columns",
    "monte_carlo_columns",
    "plan_memory",
    "refuse_interacting_samples",
]

ColumnFn = Callable[[Tensor, int], Tensor]
"""``columns(p, chunk_index) -> (K, n, C)``: the factor columns of a chunk's softmax ``p`` ``(n, C)``."""


@dataclass
class GGNAccumulation:
    """Sums ``sum_n sum_k (J_n^T v_{n,k})^2`` per group of columns, and what the graphs showed.

    Attributes:
        groups: parameter name -> ``(G, *shape)`` sums, one per group of columns.
        exactness: the operators of the traced graphs (:func:`~sturdy.flatness.exactness.analyse_graph`).
        num_classes: width of the logits.
        num_samples: samples summed over.
        chunk_size: samples per forward pass used; column_block: columns per block of the last chunk.
    """

    groups: Dict[str, Tensor]
    exactness: GraphExactness
    num_classes: int
    num_samples: int
    chunk_size: int
    column_block: int


def exact_columns(p: Tensor, chunk_index: int) -> Tensor:
    """``v_c = sqrt(p_c) (e_c - p)`` for every class ``c``: ``(C, n, C)``."""
    sq = p.sqrt()
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return sq.t()[:, :, None] * (eye[:, None, :] - p[None])


def monte_carlo_columns(samples: int, seed: int) -> ColumnFn:
    """``v_k = (p - e_{y_k}) / sqrt(K)``, ``y_k ~ p`` drawn on the CPU from ``(seed, chunk_index)``: ``(K, n, C)``."""

    def columns(p: Tensor, chunk_index: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk_index)
        labels = torch.multinomial(p.detach().to("cpu", torch.float64), samples, replacement=True, generator=gen)
        index = labels.t().to(p.device)[:, :, None]  # (K, n, 1)
        scale = samples**0.5
        # p / sqrt(K) everywhere, then (p_y - 1) / sqrt(K) at the sampled label: no one-hot tensor
        v = (p / scale)[None].expand(samples, *p.shape).contiguous()
        at_label = (p[None].expand(samples, *p.shape).gather(2, index) - 1.0) / scale
        return v.scatter_(2, index, at_label)

    return columns


def refuse_interacting_samples(model: nn.Module) -> None:
    """Refuse BatchNorm layers that normalise with batch statistics in eval mode (samples interact)."""
    for name, module in model.named_modules():
        if uses_batch_statistics(module):
            raise UnsupportedModuleError(
                f"module '{name}' ({type(module).__name__}) normalises with the statistics of its batch even in "
                "eval mode (track_running_stats=False): samples interact, so the GGN is not a sum over samples "
                "and the GGN diagonal does not apply; use method='hutchinson'",
                module=module,
                path=name,
            )


def _hooked_modules(model: nn.Module, name_of: Dict[int, str], backend: str) -> List[TrackedModule]:
    """Modules whose selected parameters take their layer's rule (a weight tied across modules goes to torch.func)."""
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
    calls: List[Call], params: List[Tuple[str, nn.Parameter]], batch: int, followers: Optional[Set[int]]
) -> Tuple[List[Call], Dict[str, Tensor]]:
    """Calls a rule can take (a module called once, as ``module(x)``, following the batch of ``batch``
    samples: :mod:`sturdy.persample.batching`), and the parameters left to torch.func."""
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
        and (batch <= 1 or (follows_batch(call.args[0], call.output, batch)
                            and followers is not None and id(call.tracked.module) in followers))
    ]
    covered = {id(p) for call in hooked for p in call.tracked.params.values()}
    fallback = {n: p.detach() for n, p in params if id(p) not in covered}
    return hooked, fallback


RULE_CHUNK_BYTES = 16 * 2**20
"""Bytes of one chunk of a rule's per-sample tensors (small chunks stay in cache; capped by the budget)."""


def plan_memory(per_sample_bytes: int, budget: int, chunk_size: Optional[int]) -> int:
    """Samples per forward pass: ``chunk_size`` when given, else as many as ``budget`` allows (at most 4096).

    ``per_sample_bytes`` is the bytes of the outputs of the tracked modules for one sample. The forward
    graph keeps about four times that (saved inputs, normalised activations, masks, the recorder's
    clones): a chunk of ``budget // (8 * per_sample_bytes)`` samples keeps it within half of ``budget``;
    a block of output gradients then takes at most a quarter of ``budget`` (one column at least, an
    eighth of ``budget``).
    """
    if chunk_size is not None:
        return chunk_size
    return max(1, min(4096, budget // max(1, 8 * per_sample_bytes)))


def _constants(model: nn.Module, free: Dict[str, Tensor]) -> Dict[str, Tensor]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t.detach() for n, t in named if n not in free}


def ggn_columns(
    model: nn.Module,
    batches: Iterable[Tuple[Tensor, Tensor]],
    params: List[Tuple[str, nn.Parameter]],
    columns: ColumnFn,
    *,
    groups: int = 1,
    memory_budget: int,
    chunk_size: Optional[int],
    progress: bool,
    backend: str = "hooks",
    desc: str = "ggn",
    total: Optional[int] = None,
) -> GGNAccumulation:
    """``sum_n sum_k (J_n^T v_{n,k})^2`` for the columns of ``columns``, split into ``groups`` (module docstring).

    The model must be in eval mode already. Column ``k`` of a chunk belongs to group ``k * groups // K``.
    ``batches`` is read once, one batch at a time; ``total`` (samples, when known) sizes the progress bar.
    """
    refuse_interacting_samples(model)
    name_of = {id(p): n for n, p in params}
    recorder = CallRecorder(_hooked_modules(model, name_of, backend))
    acc = {n: torch.zeros((groups, *p.shape), dtype=p.dtype, device=p.device) for n, p in params}
    exactness = GraphExactness(True, ())
    num_classes, block, chunk = 0, 1, chunk_size or 1
    chunk_index = num_samples = 0
    probes: Dict[Tuple[int, ...], Set[int]] = {}  # input shape -> modules that follow the batch
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
    try:
        for x_batch, _ in batches:
            start = 0
            while start < x_batch.shape[0]:
                if chunk_size is None and chunk_index == 0:
                    chunk = _auto_chunk(model, recorder, x_batch[:1], memory_budget)
                x = x_batch[start : start + chunk]
                start += x.shape[0]
                recorder.clear()
                recorder.active = True
                try:
                    with torch.enable_grad():
                        logits = model(x)
                finally:
                    recorder.active = False
                if logits.dim() != 2:
                    raise ConfigurationError(
                        f"the GGN diagonal needs logits of shape (N, classes), got {tuple(logits.shape)}; "
                        "use method='hutchinson'"
                    )
                exactness = exactness.merge(analyse_graph(logits))
                num_classes = int(logits.shape[1])
                followers = None
                if x.shape[0] > 1 and recorder.calls:
                    key = tuple(x.shape[1:])
                    if key not in probes:
                        probes[key] = batch_followers(model, [c.tracked.module for c in recorder.calls], (x,), None,
                                                      int(x.shape[0]))
                    followers = probes[key]
                calls, fallback = _split_calls(recorder.calls, params, int(x.shape[0]), followers)
                with torch.no_grad():
                    v = columns(torch.softmax(logits.detach(), dim=1), chunk_index)
                block = _accumulate_chunk(model, x, logits, calls, fallback, v, acc, name_of, memory_budget)
                chunk_index += 1
                num_samples += int(x.shape[0])
                bar.update(int(x.shape[0]))
    finally:
        recorder.remove()
        bar.close()
    return GGNAccumulation(acc, exactness, num_classes, num_samples, chunk, block)


def _auto_chunk(model: nn.Module, recorder: CallRecorder, x1: Tensor, budget: int) -> int:
    """Samples per forward pass for ``budget``, from the output bytes of one sample (:func:`plan_memory`)."""
    recorder.clear()
    recorder.active = True
    try:
        with torch.no_grad():
            model(x1)
    finally:
        recorder.active = False
    per_sample = sum(c.output.numel() * c.output.element_size() for c in recorder.calls if isinstance(c.output, Tensor))
    recorder.clear()
    return plan_memory(per_sample, budget, None)


def _accumulate_chunk(
    model: nn.Module,
    x: Tensor,
    logits: Tensor,
    calls: List[Call],
    fallback: Dict[str, Tensor],
    v: Tensor,
    acc: Dict[str, Tensor],
    name_of: Dict[int, str],
    budget: int,
) -> int:
    """Add one chunk's squares to ``acc`` ``(groups, *shape)``; returns the columns per block used.

    A block holds whole groups when one group fits the budget (the rules then keep the groups apart in one
    evaluation: a convolution unfolds its input once for all of them), else part of one group. When a block
    has more columns than there are classes, the output gradients of the ``C`` unit columns ``e_c`` are taken
    once (``C`` backward passes) and each block's are their per-sample combinations (:func:`_mixed_deltas`):
    the output gradients are linear in the column.
    """
    groups = next(iter(acc.values())).shape[0]
    total = v.shape[0]
    if total % groups:
        raise ConfigurationError(f"{total} columns cannot be split into {groups} equal groups")
    per_group = total // groups
    outputs = [call.output for call in calls]
    column_bytes = sum(o.numel() * o.element_size() for o in outputs)
    block = max(1, min(total, budget // max(1, 4 * column_bytes)))
    if block >= per_group:
        block -= block % per_group  # whole groups
        blocks = [range(f, min(f + block, total)) for f in range(0, total, block)]
    else:
        blocks = [range(f, min(f + block, (g + 1) * per_group)) for g in range(groups)
                  for f in range(g * per_group, (g + 1) * per_group, block)]
    rule_budget = min(budget, RULE_CHUNK_BYTES)
    constants = _constants(model, fallback) if fallback else {}
    basis = _basis_deltas(logits, outputs) if calls and v.shape[2] < block else None
    for cols in blocks:
        where = (cols.start // per_group, max(1, len(cols) // per_group))  # (first group, groups in the block)
        if calls:
            stacked = _mixed_deltas(basis, v, cols) if basis is not None else _column_deltas(logits, outputs, v, cols)
            _add_rule_block(acc, where, calls, stacked, name_of, rule_budget)
        for c in cols if fallback else ():
            squares = func_squared_gradients(model, fallback, x, v[c], rule_budget, constants=constants)
            _add(acc, (c // per_group, 1), {n: t[None] for n, t in squares.items()})
    return block


def _column_deltas(logits: Tensor, outputs: List[Tensor], v: Tensor, cols: range) -> List[Optional[Tensor]]:
    """The output gradients of the columns ``cols`` of ``v``, stacked per output, sample-major
    (``(n, len(cols), ...)``: the rules' per-sample views are free); ``None`` for an output without one."""
    total = v.shape[0]
    stacked: List[Optional[Tensor]] = [None] * len(outputs)
    for j, c in enumerate(cols):
        # columns run in order over the whole chunk: the last one frees the graph
        deltas = torch.autograd.grad(logits, outputs, grad_outputs=v[c], retain_graph=c + 1 < total,
                                     allow_unused=True)
        for i, delta in enumerate(deltas):
            if delta is None:
                continue
            if stacked[i] is None:
                # every column fills its slice: the graph, hence which outputs get a gradient,
                # is the same for all columns
                stacked[i] = delta.new_empty((delta.shape[0], len(cols), *delta.shape[1:]))
            stacked[i][:, j].copy_(delta)  # type: ignore[index]
        del deltas
    return stacked


def _basis_deltas(logits: Tensor, outputs: List[Tensor]) -> List[Optional[Tensor]]:
    """The output gradients of the unit columns ``e_c`` (every sample's class ``c``), ``(n, C, ...)`` per output."""
    n, classes = logits.shape
    units = torch.eye(classes, dtype=logits.dtype, device=logits.device)[:, None, :].expand(classes, n, classes)
    return _column_deltas(logits, outputs, units, range(classes))


def _mixed_deltas(basis: List[Optional[Tensor]], v: Tensor, cols: range) -> List[Optional[Tensor]]:
    """The output gradients of the columns ``cols`` of ``v`` from those of the unit columns: per sample,
    ``delta(v_k) = sum_c v_{k,c} delta(e_c)`` (``(n, len(cols), ...)`` per output)."""
    weights = v[cols.start : cols.stop].transpose(0, 1)  # (n, k, C)
    out: List[Optional[Tensor]] = []
    for b in basis:
        if b is None:
            out.append(None)
            continue
        mixed = torch.bmm(weights.to(b.dtype), b.reshape(b.shape[0], b.shape[1], -1))
        out.append(mixed.view(b.shape[0], len(cols), *b.shape[2:]))
    return out


def _add_rule_block(
    acc: Dict[str, Tensor],
    where: Tuple[int, int],
    calls: List[Call],
    stacked: List[Optional[Tensor]],
    name_of: Dict[int, str],
    rule_budget: int,
) -> None:
    """Add the squared gradients of one block of columns, by each call's rule, to ``acc[...][first : first + count]``
    (``where``: ``count`` whole groups from ``first`` on, or part of group ``first`` when ``count`` is 1)."""
    for call, block_deltas in zip(calls, stacked):
        if block_deltas is not None:
            squares = column_squared_gradients(call.tracked, call.args[0], block_deltas.transpose(0, 1), rule_budget,
                                               groups=where[1])
            _add(acc, where, {name_of.get(id(call.tracked.params[a])): s for a, s in squares.items()})


def _add(acc: Dict[str, Tensor], where: Tuple[int, int], squares: Dict[Optional[str], Tensor]) -> None:
    """``acc[name][first : first + count] += value`` (``(count, *shape)``) for every selected parameter name
    (``None``: not selected)."""
    first, count = where
    with torch.no_grad():
        for name, value in squares.items():
            if name is not None:
                acc[name][first : first + count] += value
