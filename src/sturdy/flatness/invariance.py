"""Check that normalized sharpness survives node-wise rescaling while the baselines do not.

:func:`check_rescaling_invariance` compares a network with a function-identical, node-wise rescaled
copy (:func:`sturdy.flatness.rescale_nodes`), both in float64: the network outputs, both variants of
normalized sharpness, the exact GGN trace and the spectral and Frobenius norm products.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import DataError
from sturdy.flatness.curvature import hessian_diagonal
from sturdy.flatness.normalized import VARIANTS, normalized_sharpness
from sturdy.flatness.norms import log_frobenius_product, log_spectral_product
from sturdy.flatness.rescale import rescale_nodes
from sturdy.utils import eval_mode
from sturdy.validation import check_inputs, check_model

__all__ = ["InvarianceRow", "RescalingInvariance", "check_rescaling_invariance", "OUTPUT_DIFFERENCE"]

OUTPUT_DIFFERENCE = "max |output difference|"
"""Row name of the largest absolute difference between the two networks' outputs."""


@dataclass(frozen=True)
class InvarianceRow:
    """One quantity before and after rescaling; ``ratio = rescaled / original`` (``None`` when undefined)."""

    original: float
    rescaled: float
    ratio: Optional[float]

    def to_dict(self) -> Dict[str, Optional[float]]:
        return {"original": self.original, "rescaled": self.rescaled, "ratio": self.ratio}


@dataclass(frozen=True)
class RescalingInvariance:
    """Result of :func:`check_rescaling_invariance`.

    Attributes:
        rows: quantity -> :class:`InvarianceRow`: ``"normalized sharpness (arxiv)"``,
            ``"normalized sharpness (icml)"``, ``"Hessian trace (exact GGN)"``, ``"product of spectral
            norms"``, ``"product of Frobenius norms"`` (products, not logs, so that the ratio is the factor
            of change) and :data:`OUTPUT_DIFFERENCE` (original 0, rescaled the difference, no ratio).
        output_difference: largest absolute difference between the outputs of the two networks.
        samples: number of samples used; seed, low, high: the rescaling factors' seed and range.
    """

    rows: Dict[str, InvarianceRow]
    output_difference: float
    samples: int
    seed: int
    low: float
    high: float

    def table(self) -> List[List[Any]]:
        """``[quantity, original, rescaled, ratio]`` per row, for reports."""
        return [[k, r.original, r.rescaled, r.ratio] for k, r in self.rows.items()]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types; ``rows`` maps quantity -> ``{"original", "rescaled", "ratio"}``."""
        return {"rows": {k: r.to_dict() for k, r in self.rows.items()}, "output_difference": self.output_difference,
                "samples": self.samples, "seed": self.seed, "low": self.low, "high": self.high}


def _row(a: float, b: float) -> InvarianceRow:
    return InvarianceRow(a, b, b / a if a != 0 else None)


def check_rescaling_invariance(
    model: nn.Module,
    data: Tuple[Tensor, Tensor],
    *,
    seed: int = 0,
    low: float = 0.1,
    high: float = 10.0,
) -> RescalingInvariance:
    """Compare ``model`` with a node-wise rescaled copy, both in float64 and in eval mode.

    Args:
        model: a ReLU MLP/CNN that :func:`sturdy.flatness.rescale_nodes` supports (not modified; its
            mode is restored).
        data: ``(inputs, targets)`` tensors; the curvature is that of the mean cross-entropy on them.
        seed, low, high: seed and range ``[low, high]`` of the log-uniform rescaling factors.

    Returns:
        A :class:`RescalingInvariance`; for a supported network the normalized-sharpness ratios are 1 (to
        rounding) and the output difference is at rounding level, while the trace and norm products move.

    Raises:
        UnsupportedModuleError, ConfigurationError: from :func:`rescale_nodes` for unsupported networks.
        DataError: ``data`` is not a pair of tensors with the same number of samples, or its inputs break
            the dtype and finiteness rules of :mod:`sturdy.validation`.
    """
    check_model(model)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise DataError("check_rescaling_invariance needs data as an (inputs, targets) pair of tensors")
    if data[0].shape[0] != data[1].shape[0]:
        raise DataError(
            f"inputs and targets must have the same number of samples, got {data[0].shape[0]} and {data[1].shape[0]}"
        )
    check_inputs(data[0], model=model)
    with eval_mode(model):
        base = copy.deepcopy(model).double()  # the copy keeps eval mode; ``model`` is restored on exit
    scaled = rescale_nodes(base, seed=seed, low=low, high=high)
    device = next(base.parameters()).device
    x, y = data[0].to(device=device, dtype=torch.float64), data[1].to(device)
    with torch.no_grad():
        out_diff = float((base(x) - scaled(x)).abs().max())
    hd_a, hd_b = hessian_diagonal(base, (x, y)), hessian_diagonal(scaled, (x, y))
    rows: Dict[str, InvarianceRow] = {}
    for variant in VARIANTS:
        rows[f"normalized sharpness ({variant})"] = _row(
            normalized_sharpness(base, hessian=hd_a, variant=variant).value,
            normalized_sharpness(scaled, hessian=hd_b, variant=variant).value,
        )
    rows["Hessian trace (exact GGN)"] = _row(hd_a.trace(), hd_b.trace())
    rows["product of spectral norms"] = _row(_product(log_spectral_product(base).value),
                                             _product(log_spectral_product(scaled).value))
    rows["product of Frobenius norms"] = _row(_product(log_frobenius_product(base).value),
                                              _product(log_frobenius_product(scaled).value))
    rows[OUTPUT_DIFFERENCE] = InvarianceRow(0.0, out_diff, None)
    return RescalingInvariance(rows, out_diff, int(x.shape[0]), seed, low, high)


def _product(log_sum_of_squares: float) -> float:
    """``prod_l ||W_l||`` from ``sum_l log ||W_l||^2``."""
    return math.exp(log_sum_of_squares / 2)
