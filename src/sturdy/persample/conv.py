"""``nn.Conv2d`` (any padding / padding mode / stride / dilation / groups): per-sample gradients from the
input unfolded per chunk of samples through a channels-last copy, one batched product per chunk into a
reused buffer, whose squares are summed by a matrix-vector product."""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.persample.chunking import sum_of_squared_products
from sturdy.persample.registry import register_squared_grad

__all__ = ["conv2d_rule"]


def _padded_input(module: nn.Conv2d, a: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
    """Return the input padded as the convolution sees it, and the padding left for unfold."""
    if module.padding_mode != "zeros":
        return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return a, (0, 0)
        pads: List[int] = []  # 'same' (stride 1): total dilation*(k-1), extra on the right/bottom
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(a, pads), (0, 0)
    return a, tuple(module.padding)  # type: ignore[return-value]


def _unfold_channels_last(
    inputs: Tensor, module: nn.Module, padding: Tuple[int, int], out_hw: Tuple[int, int]
) -> Tensor:
    """Unfolded ``inputs`` as ``(c * groups, L, kh * kw * C/groups)`` with the columns ordered (kh, kw, channel).

    The chunk is copied once into a zero-padded channels-last buffer; the patches are then a strided
    view of it whose innermost run (``kw`` neighbouring pixels of all channels of a group) is
    contiguous, so the one copy that ``reshape`` makes is several times faster than ``F.unfold``.
    """
    c, channels, h, w = inputs.shape
    (ph, pw), (oh, ow) = padding, out_hw
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    groups = module.groups
    cg = channels // groups
    buf = inputs.new_zeros(c, h + 2 * ph, w + 2 * pw, channels)
    buf[:, ph : ph + h, pw : pw + w, :] = inputs.permute(0, 2, 3, 1)
    s0, s1, s2, _ = buf.stride()
    patches = buf.as_strided((c, groups, oh, ow, kh, kw, cg), (s0, cg, sh * s1, sw * s2, dh * s1, dw * s2, 1))
    return patches.reshape(c * groups, oh * ow, kh * kw * cg)


@register_squared_grad(nn.Conv2d)
def conv2d_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Squared per-sample gradients of a Conv2d layer, chunked to ``budget`` bytes."""
    out: Dict[str, Tensor] = {}
    n = a.shape[0]
    groups = module.groups
    c_out = module.out_channels
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = delta.sum((2, 3)).square_().sum(0)
    if not module.weight.requires_grad:
        return out
    padded, padding = _padded_input(module, a)
    out_hw = (delta.shape[2], delta.shape[3])
    positions = out_hw[0] * out_hw[1]
    k = module.weight.numel() // c_out  # Cin/G * kh * kw (from the shape: no tensor op on the parameter)
    d_flat = delta.reshape(n * groups, c_out // groups, positions)  # per sample and group: (Cout/G, L)
    padded_pixels = (padded.shape[2] + 2 * padding[0]) * (padded.shape[3] + 2 * padding[1]) * padded.shape[1]

    def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
        for left, inputs in zip(d_flat.split(chunk * groups), padded.split(chunk)):
            # built in the yield so that no reference outlives the chunk
            yield left, _unfold_channels_last(inputs, module, padding, out_hw)

    weight = sum_of_squared_products(pairs, n, (c_out // groups, k), budget, a, groups=groups,
                                     extra_per_sample=groups * k * positions + padded_pixels)
    # columns are ordered (kh, kw, Cin/G); the weight is (Cout, Cin/G, kh, kw)
    kh, kw = module.kernel_size
    out["weight"] = weight.view(c_out, kh, kw, k // (kh * kw)).permute(0, 3, 1, 2).contiguous()
    return out
