"""``nn.Conv1d`` and ``nn.Conv2d`` (any padding / padding mode / stride / dilation / groups): per-sample
gradients from the input unfolded per chunk of samples through a channels-last copy, one batched product
per chunk into a reused buffer, whose squares are summed by a matrix-vector product.

A Conv1d is the Conv2d of height 1 (kernel ``(1, k)``). The column rule takes ``K`` output gradients of
one input at once (a leading column dimension): each chunk of samples is unfolded once and multiplied by
the ``K`` gradients stacked along the output channels.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.persample.chunking import sum_of_squared_products
from sturdy.persample.registry import check_groups, register_column_rule, register_squared_grad

__all__ = ["conv_rule", "conv_column_rule"]

Pair = Tuple[int, int]


def _pair(module: nn.Module, name: str, fill: int = 1) -> Pair:
    """A Conv2d-style pair of ``module.<name>``; a Conv1d's value becomes ``(fill, value)``."""
    value = getattr(module, name)
    return (fill, value[0]) if isinstance(module, nn.Conv1d) else tuple(value)  # type: ignore[return-value]


def _padded_input(module: nn.Module, a: Tensor) -> Tuple[Tensor, Pair]:
    """The input padded as the convolution sees it, as ``(n, C, H, W)``, and the padding left for unfold."""
    one_d = isinstance(module, nn.Conv1d)
    if module.padding_mode != "zeros":
        padded, padding = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    elif isinstance(module.padding, str):
        padded, padding = a, (0, 0)
        if module.padding == "same":  # (stride 1): total dilation*(k-1), extra on the right/bottom
            pads: List[int] = []
            for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            padded = F.pad(a, pads)
    else:
        padded, padding = a, _pair(module, "padding", fill=0)
    return (padded.unsqueeze(2) if one_d else padded), padding


def _unfold_channels_last(
    inputs: Tensor, module: nn.Module, padding: Pair, out_hw: Pair
) -> Tensor:
    """Unfolded ``inputs`` as ``(c * groups, L, kh * kw * C/groups)`` with the columns ordered (kh, kw, channel).

    The chunk is copied once into a zero-padded channels-last buffer; the patches are then a strided
    view of it whose innermost run (``kw`` neighbouring pixels of all channels of a group) is
    contiguous, so the one copy that ``reshape`` makes is several times faster than ``F.unfold``.
    """
    c, channels, h, w = inputs.shape
    (ph, pw), (oh, ow) = padding, out_hw
    kh, kw = _pair(module, "kernel_size")
    (sh, sw), (dh, dw) = _pair(module, "stride"), _pair(module, "dilation")
    groups = module.groups
    cg = channels // groups
    buf = inputs.new_zeros(c, h + 2 * ph, w + 2 * pw, channels)
    buf[:, ph : ph + h, pw : pw + w, :] = inputs.permute(0, 2, 3, 1)
    s0, s1, s2, _ = buf.stride()
    patches = buf.as_strided((c, groups, oh, ow, kh, kw, cg), (s0, cg, sh * s1, sw * s2, dh * s1, dw * s2, 1))
    return patches.reshape(c * groups, oh * ow, kh * kw * cg)


def _conv_squares(module: nn.Module, a: Tensor, deltas: Tensor, budget: int, sets: int = 1) -> Dict[str, Tensor]:
    """``sum_{k, x} g_{k,x}^2`` for output gradients ``deltas`` ``(K, n, C_out, *spatial)``, per each of ``sets``
    equal consecutive sets of the columns: ``(sets, *shape)``."""
    out: Dict[str, Tensor] = {}
    columns, n = deltas.shape[0], deltas.shape[1]
    per_set = check_groups(columns, sets)
    groups = module.groups
    c_out = module.out_channels
    spatial = tuple(range(3, deltas.dim()))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = deltas.sum(spatial).square_().reshape(sets, per_set * n, c_out).sum(1)
    if not module.weight.requires_grad:
        return out
    padded, padding = _padded_input(module, a)
    out_hw = (1, deltas.shape[3]) if deltas.dim() == 4 else (deltas.shape[3], deltas.shape[4])
    positions = out_hw[0] * out_hw[1]
    k = module.weight.numel() // c_out  # Cin/G * kernel (from the shape: no tensor op on the parameter)
    rows = columns * (c_out // groups)
    # (K, n, G, Cout/G, L) -> per sample and group (K * Cout/G, L); a view when K == 1
    d5 = deltas.reshape(columns, n, groups, c_out // groups, positions).permute(1, 2, 0, 3, 4)
    padded_pixels = (padded.shape[2] + 2 * padding[0]) * (padded.shape[3] + 2 * padding[1]) * padded.shape[1]

    def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
        for left, inputs in zip(d5.split(chunk), padded.split(chunk)):
            # built in the yield so that no reference outlives the chunk
            yield left.reshape(-1, rows, positions), _unfold_channels_last(inputs, module, padding, out_hw)

    extra = groups * k * positions + padded_pixels + (columns * c_out * positions if columns > 1 else 0)
    weight = sum_of_squared_products(pairs, n, (rows, k), budget, a, groups=groups, extra_per_sample=extra)
    weight = weight.view(groups, sets, per_set, c_out // groups, k)
    weight = weight[:, :, 0] if per_set == 1 else weight.sum(2)  # (G, sets, Cout/G, k)
    # columns are ordered (kh, kw, Cin/G); the weight is (Cout, Cin/G, kh, kw) or (Cout, Cin/G, kw)
    kh, kw = _pair(module, "kernel_size")
    weight = weight.transpose(0, 1).reshape(sets, c_out, kh, kw, k // (kh * kw)).permute(0, 1, 4, 2, 3)
    out["weight"] = weight.reshape(sets, *module.weight.shape)
    return out


@register_squared_grad(nn.Conv1d, nn.Conv2d)
def conv_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Squared per-sample gradients of a Conv1d/Conv2d layer, chunked to ``budget`` bytes."""
    return {name: value[0] for name, value in _conv_squares(module, a, delta.unsqueeze(0), budget).items()}


@register_column_rule(nn.Conv1d, nn.Conv2d)
def conv_column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int, groups: int = 1) -> Dict[str, Tensor]:
    """:func:`conv_rule` summed over each of ``groups`` equal groups of the columns of ``deltas`` (one unfold per
    chunk of samples for all columns): ``(groups, *shape)``."""
    return _conv_squares(module, a, deltas, budget, groups)


conv2d_rule = conv_rule  # the name of the Conv2d-only rule before Conv1d shared it
