"""Lipschitz-margin training loss (Tsuzuku et al. 2018) and the target-radius warm-up.

Logits ``f``, label ``y``. The loss is the mean cross-entropy on logits where every non-target
logit is raised by the margin that certifies radius ``c``:

* global form: ``f_i + sqrt(2) c L``;
* pairwise form: ``f_i + c L_body ||w_y - w_i||_2`` (``w`` the rows of the last linear layer).

With ``clip_factor=True`` (the original code's option) the added term of sample ``n`` is scaled
by ``clip(M_n / added, 0, 1)`` computed without gradient, ``M_n = f_y - max_{i != y} f_i`` the
sample's margin: misclassified samples get no added term, others at most their current margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.results import SupportsLipschitz
from sturdy.validation import check_number

__all__ = ["lmt_loss", "lmt_logits", "CWarmup", "FORMS"]

FORMS = ("pairwise", "global")


def lmt_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    c: float,
    bound: SupportsLipschitz,
    form: str = "pairwise",
    clip_factor: bool = False,
) -> torch.Tensor:
    """Logits with every non-target logit raised by the margin certifying radius ``c`` (see module doc)."""
    if form not in FORMS:
        raise ConfigurationError(f"form must be 'pairwise' or 'global', got {form!r}")
    check_number(c, "c", low=0, hint="c is the target L2 radius")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ConfigurationError(
            f"logits must be (N, classes) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not isinstance(bound, SupportsLipschitz):
        raise ConfigurationError(
            "bound must provide lipschitz, body and last_weight: a LipschitzEstimate (LipschitzTracker()) or a "
            f"LipschitzBound (lipschitz_bound()), got {type(bound).__name__}"
        )
    lip, body, weight = bound.lipschitz, bound.body, bound.last_weight
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    if form == "global":
        lip_t = torch.as_tensor(lip, dtype=logits.dtype, device=logits.device)
        added = (math.sqrt(2.0) * c * lip_t) * (1.0 - onehot)
    else:
        if body is None or weight is None:
            raise ConfigurationError(
                "the pairwise form needs a model whose logits come from a final linear layer; use form='global'"
            )
        w = torch.as_tensor(weight, device=logits.device).to(logits.dtype)
        if w.shape[0] != logits.shape[1]:
            raise ConfigurationError(f"last layer has {w.shape[0]} rows but logits have {logits.shape[1]} classes")
        k = w.shape[0]
        eye = torch.eye(k, dtype=w.dtype, device=w.device)
        # (K, K) row distances ||w_j - w_i||, with a safe gradient on the diagonal (masked anyway)
        pair = ((w.unsqueeze(1) - w.unsqueeze(0)).pow(2).sum(-1) + eye).clamp_min(1e-30).sqrt() * (1.0 - eye)
        dist = pair[targets]  # (N, classes)
        body_t = torch.as_tensor(body, dtype=logits.dtype, device=logits.device)
        added = c * body_t * dist
    if clip_factor:
        with torch.no_grad():
            target_logit = logits.gather(1, targets[:, None])
            others = logits.masked_fill(onehot.bool(), float("-inf"))
            margin = target_logit - others.max(dim=1, keepdim=True).values
            factor = (margin / added.clamp_min(1e-12)).clamp(0.0, 1.0)
        added = added * factor
    return logits + added


def lmt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    c: float,
    bound: SupportsLipschitz,
    form: str = "pairwise",
    clip_factor: bool = False,
) -> torch.Tensor:
    """Lipschitz-margin training loss (mean cross-entropy over the batch).

    Args:
        logits: ``(N, classes)``.
        targets: ``(N,)`` int64 labels.
        c: target L2 radius (input units; pixels in ``[0, 1]``).
        bound: anything with ``lipschitz``, ``body`` and ``last_weight``
            (:class:`~sturdy.lipschitz.results.SupportsLipschitz`): a
            :class:`~sturdy.lipschitz.LipschitzEstimate` (training, differentiable) or a
            :class:`~sturdy.lipschitz.LipschitzBound` (constants).
        form: ``"pairwise"`` (``c L_body ||w_y - w_i||``) or ``"global"`` (``sqrt(2) c L``).
        clip_factor: scale the added term by ``clip(M / added, 0, 1)`` (no gradient).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> b = SimpleNamespace(lipschitz=torch.tensor(1.0), body=None, last_weight=None)
        >>> z, y = torch.zeros(1, 2), torch.tensor([0])
        >>> float(lmt_loss(z, y, c=0.0, bound=b, form="global")) == float(torch.log(torch.tensor(2.0)))
        True
    """
    return F.cross_entropy(lmt_logits(logits, targets, c=c, bound=bound, form=form, clip_factor=clip_factor), targets)


@dataclass(frozen=True)
class CWarmup:
    """Linear warm-up of the target radius: ``c * min(1, t / warmup_epochs)`` with ``t`` the
    fractional epoch (``epoch + step_in_epoch / steps_per_epoch``); constant ``c`` when
    ``warmup_epochs == 0``.

    Example:
        >>> CWarmup(c=0.4, warmup_epochs=2)(epoch=1, step=5, steps_per_epoch=10)
        0.30000000000000004
    """

    c: float
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        check_number(self.c, "c", low=0, hint="c is the target L2 radius")
        if not self.warmup_epochs >= 0:
            raise ConfigurationError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")

    def __call__(self, *, epoch: int, step: int = 0, steps_per_epoch: Optional[int] = None) -> float:
        """``c`` at ``epoch`` (0-based) and ``step`` within that epoch."""
        if self.warmup_epochs == 0:
            return float(self.c)
        frac = epoch + (step / steps_per_epoch if steps_per_epoch else 0.0)
        return float(self.c) * min(1.0, frac / self.warmup_epochs)
