"""How the Fourier analyses call the model: batch size (fixed or chosen online), autocast, memory format.

**Automatic batch size** (``batch_size=None``, the default of every analysis): the best batch size of plain
inference depends on the model, the image size and the device (on a CPU a small model is fastest at a batch
whose activations fit the caches, a GPU wants thousands; figures in BENCHMARKS.md).
:class:`BatchSizer` finds it *online*, on the analysis' own work, so no model call is wasted and no query
of a black-box attack is spent on probing: the first steps run at growing powers of two (CPU from 16,
CUDA from 128), each size twice, keeping the faster of the two (the first pays the new shape's set-up;
a busy machine adds noise); the growth stops once two sizes in a row are slower than 0.85 x the best seen,
when the next size would exceed the memory cap, or when the probe has used an eighth of the work. The
rest runs at the fastest size measured. Timings include the perturbation arithmetic, so the size is the
best for the whole step. Results do not depend on the batch size (every (frequency, image) pair is
evaluated the same way whatever the slicing).

**Inference options** (:class:`ModelRunner`): ``autocast`` runs the model under
``torch.autocast(device_type, dtype)`` (``torch.bfloat16`` or ``torch.float16``), ``channels_last``
hands it ``channels_last`` images; a ``torch.compile``d module or function is called as given. The
perturbations, clipping and applied budgets are always computed in float32 (or float64 for a float64
model) and rates are integer counts divided once at the end, whatever the model runs in.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError
from sturdy.fourier._common import Model, call_model, check_label_range

__all__ = ["AUTOCAST_DTYPES", "BatchSizer", "ModelRunner", "work_dtype"]

AUTOCAST_DTYPES: Tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

PROBE_FRACTION = 1 / 8
"""Largest share of the work the online probe may run at sizes other than the best."""
SLOWER_STOP = 0.85
"""The probe stops growing once two sizes in a row reach less than this fraction of the best throughput."""
INPUT_BYTES_CAP = 1 << 30
"""Largest perturbed-image batch (bytes of model input) the probe tries."""
_START = {"cpu": 16, "cuda": 128}
_LARGEST = {"cpu": 4096, "cuda": 16384}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the perturbation arithmetic for a model in ``dtype``: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ModelRunner:
    """Calls a model the way its user runs inference, and returns predicted labels.

    Args:
        model: classifier (``nn.Module``, ``torch.compile``d module or any callable).
        device: where the images live.
        model_dtype: the dtype the model's parameters hold (images are cast to it when it differs from
            the perturbation dtype, e.g. a bfloat16 model).
        autocast: ``None`` or ``torch.bfloat16`` / ``torch.float16``: run under ``torch.autocast``.
        channels_last: hand the model ``channels_last`` images.
    """

    def __init__(
        self,
        model: Model,
        *,
        device: torch.device,
        model_dtype: torch.dtype,
        autocast: Optional[torch.dtype] = None,
        channels_last: bool = False,
    ) -> None:
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ConfigurationError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        if not isinstance(channels_last, bool):
            raise ConfigurationError(f"channels_last must be a bool, got {channels_last!r}")
        self.model = model
        self.device = torch.device(device)
        self.model_dtype = model_dtype
        self.autocast = autocast
        self.channels_last = channels_last

    def logits(self, images: Tensor) -> Tensor:
        """``model(images)`` under the configured autocast / memory format (validated output shape)."""
        if images.dtype != self.model_dtype and self.model_dtype.is_floating_point:
            images = images.to(self.model_dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return call_model(self.model, images)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast):
            return call_model(self.model, images)

    def labels(self, images: Tensor) -> Tensor:
        """Predicted labels ``argmax logits`` (long, on the images' device)."""
        return self.logits(images).argmax(dim=1)

    def predict(self, x: Tensor, *, batch_size: int, y: Optional[Tensor] = None) -> Tensor:
        """Labels of ``x`` in batches of ``batch_size``; with ``y``, checks (first batch) that they name classes."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            logits = self.logits(x[i : i + batch_size])
            if i == 0 and y is not None:
                check_label_range(y, logits)
            out.append(logits.argmax(dim=1))
        return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchSizer:
    """The batch size of each step: fixed, or chosen online (see the module docstring).

    Usage: ``b = sizer.next(remaining)``, run the step on ``b`` items between ``sizer.start()`` and
    ``sizer.stop(b)``. One sizer may serve several calls of an analysis (the attack's rounds).

    Args:
        batch_size: a positive int (fixed), or ``None`` (automatic).
        device: the device the model runs on (sets the probe's start and cap).
        total: the number of items the work holds (sets the probe's budget).
        item_bytes: bytes of one model input (caps the probed sizes at :data:`INPUT_BYTES_CAP`).
    """

    def __init__(self, batch_size: Optional[int], *, device: torch.device, total: int, item_bytes: int) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigurationError(f"batch_size must be a positive int or None (automatic), got {batch_size!r}")
        self.device = torch.device(device)
        self.fixed = batch_size
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        cap = max(1, INPUT_BYTES_CAP // max(1, item_bytes))
        self.largest = min(_LARGEST[kind], 1 << int(math.log2(cap)))
        self.size = min(_START[kind], self.largest)
        self.budget = max(1, int(total * PROBE_FRACTION))
        self.probed = 0
        self.rates: List[Tuple[int, float]] = []
        self._times: List[float] = []
        self._t0 = 0.0
        self.tuning = batch_size is None

    @property
    def best(self) -> int:
        """The fastest size measured so far (the fixed size when one was given)."""
        if self.fixed is not None:
            return self.fixed
        if not self.rates:
            return self.size
        return max(self.rates, key=lambda r: r[1])[0]

    def next(self, remaining: int) -> int:
        """Items of the next step (at most ``remaining``)."""
        if self.fixed is not None:
            return min(self.fixed, remaining)
        return max(1, min(self.size if self.tuning else self.best, remaining))

    def start(self) -> None:
        """Mark the start of a step (synchronises CUDA while probing)."""
        if self.tuning:
            _sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self, items: int) -> None:
        """Record a step of ``items`` items; moves the probe on."""
        if not self.tuning:
            return
        _sync(self.device)
        seconds = time.perf_counter() - self._t0
        self.probed += items
        if items < self.size:  # a short last step says nothing about the size
            return
        self._times.append(seconds)
        if len(self._times) < 2:
            return
        self.rates.append((self.size, items / max(min(self._times), 1e-9)))  # the faster repeat: less noise
        self._times = []
        best_rate = max(r for _, r in self.rates)
        slower = len(self.rates) >= 3 and all(r < SLOWER_STOP * best_rate for _, r in self.rates[-2:])
        if slower or self.size * 2 > self.largest or self.probed + 4 * self.size > self.budget:
            self.tuning = False
        else:
            self.size *= 2

    def shrink(self) -> bool:
        """After an out-of-memory error at the current size: halve it and stop probing.

        Returns ``False`` when the size is fixed or already 1 (the caller then re-raises the error).
        """
        current = self.size if self.tuning else self.best
        if self.fixed is not None or current <= 1:
            return False
        self.largest = current // 2
        self.rates = [(b, r) for b, r in self.rates if b <= self.largest]
        self.size = min(self.size, self.largest)
        self.tuning = False
        return True

    def to_dict(self) -> dict:
        """JSON-able summary: chosen size, whether automatic, and the probe's measured rates."""
        return {"batch_size": self.best, "automatic": self.fixed is None,
                "probe": [[b, r] for b, r in self.rates]}
