"""Subsets of the frequency grid: a stride, a radial band, or an explicit list.

A heat map of a 224 x 224 model has 25,200 distinct directions; a subset measures fewer and the map shows
which were measured (``FourierHeatmap.measured``; unmeasured values are NaN, plots grey them out).
Frequencies are named by their *centred* (signed) coordinates ``(kc, lc)``, ``kc = k`` for
``k <= H // 2`` else ``k - H`` (likewise ``lc``), the coordinates of the centred maps. Every helper returns
canonical frequencies (rows of :func:`~sturdy.fourier.half_plane`, in its order) as a ``(F, 2)`` long
tensor, ready for ``fourier_heatmap(..., frequencies=...)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError
from sturdy.fourier.basis import canonical_index_map, half_plane
from sturdy.fourier.limits import check_stride

__all__ = ["centred_coordinates", "strided_frequencies", "band_frequencies", "canonical_rows"]

FrequencyList = Union[Tensor, Sequence[Sequence[int]]]


def centred_coordinates(frequencies: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Signed coordinates ``(kc, lc)`` of frequencies ``(F, 2)`` (``kc`` in ``(-H/2, H/2]``)."""
    k = frequencies[:, 0] % height
    l = frequencies[:, 1] % width  # noqa: E741
    return torch.where(k > height // 2, k - height, k), torch.where(l > width // 2, l - width, l)


def canonical_rows(frequencies: FrequencyList, height: int, width: int) -> Tensor:
    """Sorted unique rows of :func:`~sturdy.fourier.half_plane` spanning the given ``(k, l)`` (any integers).

    Raises:
        ConfigurationError: not a ``(F, 2)`` integer list.
    """
    try:
        freq = torch.as_tensor(frequencies)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ConfigurationError("frequencies must be (F, 2) integers (k, l) of at most 64 bits, e.g. [(0, 1)]; "
                                 "any representative modulo the image size names the same frequency") from None
    if freq.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if freq.dtype.is_floating_point or freq.dtype.is_complex or freq.dtype == torch.bool:
        raise ConfigurationError(f"frequencies must be integers (k, l), got dtype {freq.dtype}")
    if freq.dim() != 2 or freq.shape[1] != 2:
        raise ConfigurationError(f"frequencies must have shape (F, 2) (rows (k, l)), got {tuple(freq.shape)}")
    index = canonical_index_map(height, width)
    return torch.unique(index[freq[:, 0].long() % height, freq[:, 1].long() % width])


def strided_frequencies(height: int, width: int, stride: int) -> Tensor:
    """Canonical frequencies whose centred coordinates are both multiples of ``stride``.

    ``stride=2`` keeps about a quarter of the grid, symmetric around ``(0, 0)``.

    Examples:
        >>> strided_frequencies(4, 4, 2).tolist()
        [[0, 0], [0, 2], [2, 0], [2, 2]]
    """
    stride = check_stride(stride, height, width)
    freqs = half_plane(height, width)
    kc, lc = centred_coordinates(freqs, height, width)
    return freqs[(kc % stride == 0) & (lc % stride == 0)]


def band_frequencies(height: int, width: int, low: float, high: Optional[float] = None) -> Tensor:
    """Canonical frequencies with radius ``low <= sqrt(kc^2 + lc^2) < high`` (cycles per image).

    ``high=None`` keeps every radius from ``low`` up.

    Examples:
        >>> band_frequencies(8, 8, 0, 1.5).tolist()
        [[0, 0], [0, 1], [1, 0], [1, 1], [7, 1]]
    """
    if high is None:
        high = float("inf")
    if not 0 <= low < high:
        raise ConfigurationError(f"a radial band needs 0 <= low < high, got low={low!r}, high={high!r}")
    freqs = half_plane(height, width)
    kc, lc = centred_coordinates(freqs, height, width)
    radius = torch.sqrt(kc.double() ** 2 + lc.double() ** 2)
    return freqs[(radius >= low) & (radius < high)]
