"""Perturbation baselines: PAC-Bayes flatness, its magnitude-aware variant, adaptive average sharpness.

Each evaluates the training loss (or error) of ``model`` at weights ``w + u`` for seeded Gaussian
``u`` without modifying the model (``torch.func.functional_call``, eval mode restored afterwards).
Monte-Carlo expectations use antithetic pairs ``(z, -z)`` (the first-order term cancels exactly);
every draw is seeded and made on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    default_loss,
    loss_batches,
    trainable_parameters,
)
from sturdy.flatness.registry import Measure
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_model, check_number

__all__ = ["pacbayes_flatness", "adaptive_average_sharpness"]


class _Perturber:
    """Evaluates the training loss or error of ``model`` with weights ``w + scale * z_s`` (functional, no mutation)."""

    def __init__(self, model: nn.Module, data: Any, *, batch_size: int, loss_fn: LossFn, criterion: str,
                 samples: int, seed: int) -> None:
        if criterion not in ("loss", "error"):
            raise ConfigurationError(f"criterion must be 'loss' or 'error', got {criterion!r}")
        check_positive_int("samples", samples)
        self.model = model
        self.device, self.dtype = model_device_dtype(model)
        self.params = trainable_parameters(model)
        self.buffers = dict(model.named_buffers())
        self.batches = loss_batches(model, data, batch_size=batch_size, device=self.device, dtype=self.dtype,
                                    loss_fn=None if loss_fn is default_loss else loss_fn)
        self.n = sum(int(x.shape[0]) for x, _ in self.batches)
        self.loss_fn = loss_fn
        self.criterion = criterion
        self.samples = samples
        self.seed = seed
        self.base = self.evaluate(None)

    def noise(self, s: int) -> List[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + s)
        return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
                for _, p in self.params]

    @torch.no_grad()
    def evaluate(self, delta: Optional[List[Tensor]]) -> float:
        from torch.func import functional_call

        state = {n: p.detach() if delta is None else p.detach() + d for (n, p), d in
                 zip(self.params, delta if delta is not None else [None] * len(self.params))}
        state.update(self.buffers)
        total = 0.0
        with eval_mode(self.model):
            for x, y in self.batches:
                out = functional_call(self.model, state, (x,))
                if self.criterion == "loss":
                    total += float(self.loss_fn(out, y)) * x.shape[0]
                else:
                    total += float((out.argmax(1) != y).sum())
        return total / self.n

    def increase(self, scales: Sequence[Tensor], sigma: float) -> Tuple[float, float]:
        """Mean and standard error of ``L(w + sigma * scale * z) - L(w)`` over antithetic pairs."""
        values = []
        for s in range(self.samples):
            z = self.noise(s)
            plus = self.evaluate([sigma * c * zi for c, zi in zip(scales, z)])
            minus = self.evaluate([-sigma * c * zi for c, zi in zip(scales, z)])
            values.append(0.5 * (plus + minus) - self.base)
        t = torch.tensor(values, dtype=torch.float64)
        err = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        return float(t.mean()), err


def pacbayes_flatness(
    model: nn.Module,
    data: Any,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    criterion: str = "error",
    noise_floor: float = 1e-3,
    samples: int = 8,
    steps: int = 24,
    sigma_range: Tuple[float, float] = (1e-6, 1e2),
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> Measure:
    """PAC-Bayes flatness of Jiang et al. (2020): ``1 / sigma^2`` for the largest admissible ``sigma``.

    ``sigma`` is found by bisection in log space so that the Monte-Carlo estimate of
    ``E_z[L(w + u)] - L(w)`` stays at most ``target``, with ``u = sigma * z`` (plain) or
    ``u_i = sqrt(sigma^2 w_i^2 + noise_floor^2) z_i`` (``magnitude_aware``, *choice* ``noise_floor = 1e-3``),
    ``z ~ N(0, I)`` over every trainable parameter. The same seeded draws are used at every bisection step.

    Args:
        model: network (eval mode, not modified); data: its training data.
        magnitude_aware: use the magnitude-aware noise.
        target: admissible increase of the criterion (Jiang et al.: 0.1 of training error).
        criterion: ``"error"`` (0-1 training error, as in Jiang et al.) or ``"loss"`` (``loss_fn``).
        noise_floor: standard deviation of the additive, weight-independent noise of the magnitude-aware
            variant (Jiang et al.'s epsilon).
        samples: antithetic pairs per evaluation; steps: bisection steps.
        sigma_range: ``(low, high)`` search range of ``sigma``.
        seed: seed of the draws; batch_size: samples per forward; loss_fn: ``(outputs, targets) -> mean``.
        progress: show a tqdm bar over bisection steps.

    Returns:
        :class:`Measure` with value ``1 / sigma^2`` and details ``sigma``, ``increase``, ``saturated``
        (``"low"``/``"high"`` when the answer sits at an end of ``sigma_range``, else ``""``).
    """
    check_model(model)
    check_number(target, "target", low=0, low_open=True)
    lo, hi = sigma_range
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigurationError(f"sigma_range must satisfy 0 < low < high < inf, got {sigma_range!r}")
    check_positive_int("steps", steps)
    pert = _Perturber(model, data, batch_size=batch_size, loss_fn=loss_fn or default_loss, criterion=criterion,
                      samples=samples, seed=seed)
    weights = [p.detach() for _, p in pert.params]
    name = "pacbayes_mag_flatness" if magnitude_aware else "pacbayes_flatness"

    def increase(sigma: float) -> float:
        if magnitude_aware:
            scales = [(w * w + (noise_floor / sigma) ** 2).sqrt() for w in weights]
        else:
            scales = [torch.ones((), dtype=w.dtype, device=w.device) for w in weights]
        return pert.increase(scales, sigma)[0]

    saturated = ""
    inc_hi = increase(hi)
    if inc_hi <= target:
        sigma, inc, saturated = hi, inc_hi, "high"
    else:
        inc_lo = increase(lo)
        if inc_lo > target:
            sigma, inc, saturated = lo, inc_lo, "low"
        else:
            log_lo, log_hi, inc = math.log(lo), math.log(hi), inc_lo
            for _ in tqdm(range(steps), desc=name, unit="step", disable=not progress):
                mid = 0.5 * (log_lo + log_hi)
                value = increase(math.exp(mid))
                if value <= target:
                    log_lo, inc = mid, value
                else:
                    log_hi = mid
            sigma = math.exp(log_lo)
    return Measure(name, 1.0 / sigma**2, {
        "sigma": sigma, "increase": inc, "target": target, "criterion": criterion, "saturated": saturated,
        "base": pert.base,
    })


def adaptive_average_sharpness(
    model: nn.Module,
    data: Any,
    *,
    rho: float = 0.1,
    samples: int = 16,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> Measure:
    """Adaptive average sharpness ``E_z[L(w + rho |w| * z)] - L(w)``, ``z ~ N(0, I)`` (element-wise ``|w|``).

    Invariant to node-wise rescaling only in the first-order sense; it uses the training loss
    (``loss_fn``, default cross-entropy) and ``samples`` antithetic pairs; details hold the standard error.
    """
    check_model(model)
    check_number(rho, "rho", low=0, low_open=True)
    pert = _Perturber(model, data, batch_size=batch_size, loss_fn=loss_fn or default_loss, criterion="loss",
                      samples=samples, seed=seed)
    scales = [p.detach().abs() for _, p in pert.params]
    value, err = pert.increase(scales, rho)
    return Measure("adaptive_average_sharpness", value, {"stderr": err, "rho": rho, "samples": samples,
                                                         "base": pert.base})
