"""Certified radii from logit margins and a Lipschitz bound (the formulas of docs/design.md, section 1).

For prediction ``p = argmax f(x)``: global form ``(f_p - max_{i != p} f_i) / (sqrt(2) L)``; pairwise form
``min_{i != p} (f_p - f_i) / (L_body ||w_p - w_i||_2)``; margins in float64.
"""

from __future__ import annotations

import math

import torch

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.results import LipschitzBound
from sturdy.validation import check_finite_output

__all__ = ["certified_radius"]


def certified_radius(logits: torch.Tensor, *, bound: LipschitzBound, form: str = "pairwise") -> torch.Tensor:
    """Certified radius of the predicted class for each row of ``logits`` (float64, see module doc)."""
    check_finite_output(logits)
    if form not in ("pairwise", "global"):
        raise ConfigurationError(f"form must be 'pairwise' or 'global', got {form!r}")
    z = logits.detach().to(torch.float64)
    n, k = z.shape
    pred = z.argmax(dim=1)
    top = z.gather(1, pred[:, None])
    gaps = top - z  # (N, K), f_p - f_i
    mask = torch.nn.functional.one_hot(pred, k).bool()
    if form == "global":
        others = z.masked_fill(mask, float("-inf")).max(dim=1).values
        margin = (top[:, 0] - others).clamp_min(0.0)
        denom = math.sqrt(2.0) * bound.upper
        return margin / denom if denom > 0 else torch.where(margin > 0, math.inf, 0.0)
    if bound.upper_body is None or bound.last_weight is None:
        raise ConfigurationError(
            "the pairwise certificate needs logits produced by a final linear layer; this model's output is "
            "not, so use form='global'"
        )
    w = bound.last_weight.to(device=z.device, dtype=torch.float64)
    if w.shape[0] != k:
        raise ConfigurationError(f"the bound's last layer has {w.shape[0]} rows but the logits have {k} classes")
    dist = torch.cdist(w, w)  # (K, K), ||w_p - w_i||
    denom = bound.upper_body * dist[pred]  # (N, K)
    ratio = torch.where(denom > 0, gaps / denom.clamp_min(1e-300), torch.where(gaps > 0, math.inf, 0.0))
    ratio = ratio.masked_fill(mask, math.inf)
    return ratio.min(dim=1).values.clamp_min(0.0)
