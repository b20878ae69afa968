"""Chunking helpers of the per-sample rules: how many samples fit a memory budget, and the batched
sum of squared per-sample matrix products that the Linear and Conv2d rules share."""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch
from torch import Tensor

__all__ = ["samples_per_chunk", "chunks", "sum_of_squared_products"]


def samples_per_chunk(budget: int, per_sample_elements: int, element_size: int = 4) -> int:
    """How many samples fit ``budget`` bytes when each needs ``per_sample_elements`` (at least one)."""
    return max(1, budget // max(1, per_sample_elements * element_size))


def chunks(n: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk`` of ``n`` samples."""
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


def sum_of_squared_products(
    pairs: Callable[[int], Iterator[Tuple[Tensor, Tensor]]],
    n: int,
    shape: Tuple[int, int],
    budget: int,
    like: Tensor,
    *,
    groups: int = 1,
    extra_per_sample: int = 0,
) -> Tensor:
    """``sum_x (left_x right_x)^2`` (elementwise square of each sample's matrix product), flat.

    ``pairs(chunk)`` yields, for consecutive chunks of ``chunk`` samples (the last one may be
    shorter), ``left`` ``(c * groups, o, t)`` and ``right`` ``(c * groups, t, i)``; the result has
    ``groups * o * i`` elements (sample ``x``'s products of its groups, concatenated). The products of
    a chunk go to one buffer that every chunk reuses, and their squares are added to the result by a
    matrix-vector product (no temporary per chunk). ``budget`` bounds the bytes of that buffer plus
    ``extra_per_sample`` elements per sample that ``pairs`` allocates (e.g. an unfolded input).
    """
    o, i = shape
    per_sample = groups * o * i
    chunk = min(n, samples_per_chunk(budget, per_sample + extra_per_sample, like.element_size()))
    buf = torch.empty(chunk * groups, o, i, dtype=like.dtype, device=like.device)
    ones = torch.ones(chunk, dtype=like.dtype, device=like.device)
    total = torch.zeros(per_sample, dtype=like.dtype, device=like.device)
    for left, right in pairs(chunk):
        rows = left.shape[0]
        products = buf if rows == buf.shape[0] else buf[:rows]
        torch.bmm(left, right, out=products)
        del left, right  # free this chunk's inputs before the next chunk is built
        c = rows // groups
        if c == 1:
            flat = products.view(per_sample)
            total.addcmul_(flat, flat)
        else:
            total.addmv_(products.square_().view(c, per_sample).t(), ones if c == chunk else ones[:c])
    return total
