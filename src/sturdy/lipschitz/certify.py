"""Certified L2 radii from logit margins and a guaranteed Lipschitz bound.

For prediction ``p = argmax f(x)``:

* global form: ``radius = (f_p - max_{i != p} f_i) / (sqrt(2) L)``;
* pairwise form (default, tighter): ``radius = min_{i != p} (f_p - f_i) / (L_body ||w_p - w_i||_2)``.

No input ``x + d`` with ``||d||_2 < radius`` changes the prediction (model in eval mode; the
certificate is over all of R^n, it does not use the ``[0, 1]`` pixel range). Wrong predictions get
radius 0. Margins are computed in float64 from the model's logits (float32 rounding of the forward
pass itself is not accounted for).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sturdy.datasource import data_source
from sturdy.errors import ConfigurationError, DataError
from sturdy.lipschitz.bounds import lipschitz_bound
from sturdy.lipschitz.graph import build_program, check_input_shape
from sturdy.lipschitz.margins import certified_radius
from sturdy.lipschitz.proof import SELF_CHECK_POINTS, check_batch_rows, check_lipschitz_pairs, model_fingerprint
from sturdy.lipschitz.results import LipschitzBound
from sturdy.lipschitz.tiered import LocalBounds, tiered_radii
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_finite_output, check_model, check_model_inputs, check_number

__all__ = ["Certificate", "certify", "certified_radius"]


@dataclass(frozen=True)
class Certificate:
    """Per-sample certified L2 radii.

    Attributes:
        radius: float64 ``(N,)``; 0 for wrong predictions and ties.
        predicted: int64 ``(N,)`` predicted classes.
        correct: bool ``(N,)``.
        bound: the :class:`LipschitzBound` used.
        form: ``"pairwise"`` or ``"global"``.
        global_radius: with ``tiered``, the radii of the global bound alone (``radius`` then holds the tiered
            ones, never smaller); ``None`` otherwise.
        seconds: time of each tier (``{"global": ..., "tiered": ...}``).
    """

    radius: torch.Tensor
    predicted: torch.Tensor
    correct: torch.Tensor
    bound: LipschitzBound
    form: str
    global_radius: Optional[torch.Tensor] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.double().mean()) if self.correct.numel() else 0.0

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of samples predicted correctly with certified radius ``> eps`` (L2)."""
        check_number(eps, "eps", low=0)
        if self.radius.numel() == 0:
            return 0.0
        return float(((self.radius > eps) & self.correct).double().mean())

    def radius_quantiles(self, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> Dict[str, float]:
        """Quantiles of the radius over all samples (wrong ones count as 0)."""
        r = self.radius.double()
        if r.numel() == 0:
            return {}
        return {f"q{int(round(q * 100)):02d}": float(torch.quantile(r, q)) for q in qs}

    def to_dict(self, eps: Sequence[float] = (0.1, 0.25, 0.5, 1.0)) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "form": self.form,
            "n": int(self.radius.numel()),
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {str(e): self.certified_accuracy(e) for e in eps},
            "radius_quantiles": self.radius_quantiles(),
            "median_radius": float(self.radius.double().median()) if self.radius.numel() else 0.0,
        }
        if self.global_radius is not None:
            n = max(int(self.radius.numel()), 1)
            hit = (self.global_radius[:, None] > torch.tensor(list(eps), dtype=torch.float64)) & self.correct[:, None]
            out["global_certified_accuracy"] = {str(e): float(hit[:, j].double().mean()) for j, e in enumerate(eps)}
            out["seconds_per_point"] = {tier: t / n for tier, t in self.seconds.items()}
        return out


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigurationError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 2 or y.shape != x.shape[:1]:
        raise ConfigurationError(
            f"x must be a batch (N, ...) and y labels (N,); got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[0] == 0:  # dtype and finiteness: check_model_inputs, the entry point's first check
        raise DataError(f"x holds no inputs (shape {tuple(x.shape)}); certify at least one")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ConfigurationError(f"y must hold integer class labels (int64), got dtype {y.dtype}")


def _check_labels(y: torch.Tensor, logits: torch.Tensor, n: int, where: str = "") -> None:
    k = logits.shape[1] if logits.dim() == 2 else None
    if k is None or logits.shape[0] != n:
        raise ConfigurationError(
            f"the model must return logits (N, classes) for N inputs; for {n} inputs it returned shape "
            f"{tuple(logits.shape)} (does it mix the samples of a batch?)"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ConfigurationError(
            f"{where}labels must lie in [0, {k - 1}] for a model with {k} classes, got labels in [{int(y.min())}, "
            f"{int(y.max())}]"
        )


def certify(
    model: nn.Module,
    x: Any,
    y: Optional[torch.Tensor] = None,
    *,
    input_shape: Optional[Sequence[int]] = None,
    form: str = "pairwise",
    bound: Optional[LipschitzBound] = None,
    batch_size: int = 1024,
    self_check: bool = True,
    seed: int = 0,
    tiered: bool = False,
    count: Optional[int] = None,
) -> Certificate:
    """Certify the predictions of ``model`` (in eval mode) on ``x`` against L2 perturbations.

    Before a certificate is issued, behaviour is checked where structure cannot show it (docs/design.md,
    section 1): a given ``bound`` must carry this model's fingerprint (same weights, buffers, structure and
    input shape); a few rows of every batch are recomputed alone (a sample's logits must not depend on the other
    samples of its batch); and, with ``self_check``, a sampled search for inputs that disprove the bound
    (:func:`sturdy.lipschitz.proof.check_lipschitz_pairs`) runs on a few of the points.

    Args:
        model: a traceable classifier.
        x: inputs ``(N, ...)`` (images in ``[0, 1]`` by the project's convention) with labels ``y``; or, without
            ``y``, any data of the contract of :mod:`sturdy.datasource` (an ``ImageDataset``, a ``Dataset`` of
            ``(x, y)`` pairs, a ``DataLoader`` or another iterable of batches), read once, one batch on the
            device at a time; the radii equal those of the same samples given as tensors in the same batches.
        y: int64 labels ``(N,)`` of tensor inputs ``x``.
        input_shape: shape of one input batch for the bound; must match ``x`` (default ``(1, *x.shape[1:])``).
        form: ``"pairwise"`` (default) or ``"global"``.
        bound: a precomputed :func:`lipschitz_bound` of this model with its current weights (computed when
            ``None``).
        batch_size: inference batch size.
        self_check: run the sampled self-check of the bound (a few forward and backward passes).
        seed: seed of the sampled checks.
        tiered: for every correctly predicted point, also a local bound over the L2 ball around it
            (:mod:`sturdy.lipschitz.tiered`: ReLUs that stay inactive on the ball are removed); the radius is the
            larger of the two, ``global_radius`` keeps the global one. Computed batch by batch in the same pass.
        count: the number of samples of streamed data, when known (a pass of another count is refused).

    Returns:
        A :class:`Certificate`; radius 0 for wrong predictions.

    Raises:
        ConfigurationError: a model on the meta device, labels not integers or out of range, ``input_shape``
            or the bound's shape differing from ``x``, a bound computed for other weights or another model.
        DataError: ``x`` holds no inputs, is not floating point (e.g. uint8 images in 0..255) or not
            finite, or the model's logits are not finite (:mod:`sturdy.validation`); a streamed batch that breaks
            the contract (named by its index), or a sample count other than ``count``.
        UnsupportedModuleError: the model has an operator without a sound rule (named with the reason), or its
            logits for a sample depend on the other samples of the batch.
        SoundnessError: the self-check found inputs that disprove the bound.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]])); _ = net.bias.zero_()
        >>> cert = certify(net, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        >>> round(float(cert.radius[0]), 6)  # (1 - 0) / ||(1, -1)||
        0.707107
    """
    if isinstance(x, torch.Tensor) or y is not None:
        check_model_inputs(model, x, name="x")
        _check_data(x, y)
    else:
        check_model(model)
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = model_device_dtype(model)
    batches = data_source(x, y, batch_size=batch_size, count=count).batches(device=device, dtype=dtype,
                                                                           model=model)
    first = next(batches)  # the sample shape of a stream: its first batch, read before the bound is computed
    shape = _input_shape(first[0], input_shape)
    if bound is None:
        bound = lipschitz_bound(model, input_shape=shape)
    else:
        _check_bound(bound, model, shape)
    with eval_mode(model):
        passed = _certify_pass(model, itertools.chain([first], batches), shape=shape, bound=bound, form=form,
                               seed=seed, tiered=tiered)
        radius, predicted, correct, local, seconds, points = passed
        if self_check:
            t0 = time.perf_counter()
            check_lipschitz_pairs(model, points, bound, seed=seed)
            seconds["global"] += time.perf_counter() - t0
    if not tiered:
        return Certificate(radius=radius, predicted=predicted, correct=correct, bound=bound, form=form,
                           seconds=seconds)
    return Certificate(radius=local, predicted=predicted, correct=correct, bound=bound, form=form,
                       global_radius=radius, seconds=seconds)


def _certify_pass(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
                  shape: Tuple[int, ...], bound: LipschitzBound, form: str, seed: int, tiered: bool) -> tuple:
    """One pass over the batches (one on the device at a time): global radii, predictions, with ``tiered`` the
    tiered radii, the time of each tier, and :data:`SELF_CHECK_POINTS` points drawn uniformly for the
    self-check (:class:`_Reservoir`)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    points = _Reservoir(SELF_CHECK_POINTS, torch.Generator(device="cpu").manual_seed(int(seed) + 1))
    seconds = {"global": 0.0, **({"tiered": 0.0} if tiered else {})}
    t0 = time.perf_counter()
    local_bounds = LocalBounds(build_program(model, shape), bound) if tiered else None
    if tiered:
        seconds["tiered"] += time.perf_counter() - t0
    preds, radii, labels, local = [], [], [], []
    seen = 0
    for index, (batch, yb) in enumerate(batches):
        t0 = time.perf_counter()
        if tuple(batch.shape[1:]) != shape[1:]:
            raise DataError(f"a batch holds samples of shape {tuple(batch.shape[1:])} after {shape[1:]}; every "
                            "sample of the data must have one shape (resize them)")
        with torch.no_grad():
            logits = check_finite_output(model(batch))  # before the rows are compared
            _check_labels(yb, logits, batch.shape[0],
                          f"batch {index} (samples {seen} to {seen + batch.shape[0] - 1}): ")
            seen += int(batch.shape[0])
            check_batch_rows(model, batch, logits, generator=gen)
            r = certified_radius(logits, bound=bound, form=form)
            pred = logits.argmax(dim=1)
        points.offer(batch)
        right = pred == yb
        r = torch.where(right, r, torch.zeros_like(r))
        radii.append(r.cpu())
        preds.append(pred.cpu())
        labels.append(right.cpu())
        t1 = time.perf_counter()
        seconds["global"] += t1 - t0
        if local_bounds is not None:
            local.append(tiered_radii(local_bounds, batch, logits, r, right, form=form).cpu())
            seconds["tiered"] += time.perf_counter() - t1
    radius, predicted, correct = torch.cat(radii), torch.cat(preds), torch.cat(labels)
    return radius, predicted, correct, torch.cat(local) if tiered else None, seconds, points.stacked()


class _Reservoir:
    """``k`` samples drawn uniformly from a stream of batches of unknown length (Vitter's algorithm R, one
    random number per sample after the first ``k``, drawn from ``generator``)."""

    def __init__(self, k: int, generator: torch.Generator) -> None:
        self.k, self.generator, self.seen = k, generator, 0
        self.items: List[torch.Tensor] = []

    def offer(self, batch: torch.Tensor) -> None:
        n = int(batch.shape[0])
        fill = min(n, self.k - len(self.items))
        self.items.extend(batch[i].clone() for i in range(fill))
        if fill < n:
            index = torch.arange(self.seen + fill, self.seen + n, dtype=torch.float64)
            slot = (torch.rand(n - fill, generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            for i in (slot < self.k).nonzero().flatten().tolist():
                self.items[int(slot[i])] = batch[fill + i].clone()
        self.seen += n

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.items)


def _input_shape(x: torch.Tensor, input_shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """The bound's input shape: ``(1, *x.shape[1:])``; a given ``input_shape`` must describe the same samples."""
    shape = (1, *x.shape[1:])
    if input_shape is None:
        return shape
    given = check_input_shape(input_shape)
    if given[1:] != shape[1:]:
        raise ConfigurationError(
            f"input_shape {tuple(input_shape)} describes samples {given[1:]} but x holds samples {shape[1:]}; a bound "
            "holds only for the shape it was computed for: omit input_shape (it is taken from x) or resize x"
        )
    return shape


def _check_bound(bound: LipschitzBound, model: nn.Module, shape: Tuple[int, ...]) -> None:
    if not isinstance(bound, LipschitzBound):
        raise ConfigurationError(
            f"bound must be a LipschitzBound from lipschitz_bound(), got {type(bound).__name__} (a training-time "
            "estimate is never a certificate)"
        )
    if tuple(bound.input_shape[1:]) != shape[1:]:
        raise ConfigurationError(
            f"the bound was computed for inputs {tuple(bound.input_shape[1:])} but x has samples {shape[1:]}; "
            "recompute it with lipschitz_bound(model, input_shape=(1, *x.shape[1:]))"
        )
    if bound.fingerprint != model_fingerprint(model, shape):
        raise ConfigurationError(
            f"the bound was computed for another model or for other weights than {type(model).__name__} has now "
            "(its fingerprint differs: weights, buffers, modules or hooks changed since); recompute it with "
            "lipschitz_bound(model, input_shape=(1, *x.shape[1:])) or pass bound=None"
        )
