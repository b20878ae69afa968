"""Norm-product baselines of Jiang et al. (2020): ``log_prod_of_spec`` and ``log_prod_of_fro``.

Weights of ``nn.Linear`` and ``nn.Conv2d`` layers, conv weights reshaped to ``(out, in * kh * kw)``,
in float64. Neither measure runs the model.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import weight_layers
from sturdy.flatness.registry import Measure
from sturdy.validation import check_model

__all__ = ["log_spectral_product", "log_frobenius_product"]


def _matrices(model: nn.Module) -> List[Tuple[str, Tensor]]:
    layers = weight_layers(model)
    if not layers:
        raise ConfigurationError("norm-product measures need at least one nn.Linear or nn.Conv2d layer")
    return [(n, m.weight.detach().to(torch.float64).reshape(m.weight.shape[0], -1)) for n, m in layers]


def log_spectral_product(model: nn.Module) -> Measure:
    """``sum_l log ||W_l||_2^2`` over Linear/Conv2d weights (conv reshaped to ``(out, in*kh*kw)``), float64.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
        ...     _ = net[2].weight.fill_(1.0)
        >>> round(log_spectral_product(net).value, 6) == round(2 * math.log(3.0) + math.log(2.0), 6)
        True
    """
    check_model(model)
    norms = {n: float(torch.linalg.matrix_norm(w, ord=2)) for n, w in _matrices(model)}
    return Measure("log_spectral_product", float(sum(2 * math.log(v) for v in norms.values())), {"per_layer": norms})


def log_frobenius_product(model: nn.Module) -> Measure:
    """``sum_l log ||W_l||_F^2`` over Linear/Conv2d weights, float64."""
    check_model(model)
    norms = {n: float(torch.linalg.matrix_norm(w, ord="fro")) for n, w in _matrices(model)}
    return Measure("log_frobenius_product", float(sum(2 * math.log(v) for v in norms.values())), {"per_layer": norms})
