"""Input normalisation as the first module of a model, so that every analysis works on images in ``[0, 1]``.

A model trained on normalised inputs (``(x - mean) / std`` per channel) is wrapped as
``nn.Sequential(normalize=Normalize(mean, std), model=model)``: attacks, Fourier perturbations and
certificates then act on the pixels themselves, and the Lipschitz bound of the wrapped model includes the
``1 / std`` factor of the normalisation (a per-channel scale, registered in :mod:`sturdy.lipschitz`).

Spelling of a normalisation (:func:`parse_normalization`):

* a preset: ``imagenet``, ``cifar10`` or ``mnist`` (:data:`PRESETS`);
* ``"MEAN,STD"``: one value each, for every channel (``"0.5,0.25"``);
* ``"M1,M2,M3;S1,S2,S3"``: one value per channel each, the means before the semicolon, the standard
  deviations after it (``"0.485,0.456,0.406;0.229,0.224,0.225"``); a single value on either side applies
  to every channel.

Example:
    >>> norm = parse_normalization("0.5,0.25")
    >>> norm.module()(torch.ones(1, 3, 2, 2))[0, :, 0, 0]
    tensor([2., 2., 2.])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from sturdy.errors import ConfigurationError

__all__ = ["Normalize", "Normalization", "PRESETS", "parse_normalization", "normalized"]

# per-channel mean and standard deviation of each data set's training images, pixels in [0, 1]
PRESETS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
}

_SYNTAX = ("a preset (" + ", ".join(PRESETS) + "), 'MEAN,STD' (one value each) or 'M1,M2,M3;S1,S2,S3' (one value "
           "per channel each)")


class Normalize(nn.Module):
    """``x -> (x - mean_c) / std_c`` along dimension 1 (the channels) of a batch of images in ``[0, 1]``.

    ``mean`` and ``std`` are buffers of shape ``(C,)``, or ``(1,)`` for every channel alike; they are saved in
    the ``state_dict``. No parameters: the map is fixed.

    Raises:
        ConfigurationError: empty, non-finite values, a standard deviation that is not positive, or two lists of
            different lengths (neither of length 1).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = _checked(mean, std)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self) -> str:
        mean, std = (tuple(round(v, 4) for v in t.tolist()) for t in (self.mean, self.std))
        return f"mean={mean}, std={std}"


def _checked(mean: Sequence[float], std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        m = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        s = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"a normalisation needs numbers for mean and std, got {mean!r} and {std!r}") from exc
    if m.numel() == 0 or s.numel() == 0:
        raise ConfigurationError("a normalisation needs at least one mean and one standard deviation")
    if m.numel() != s.numel() and min(m.numel(), s.numel()) != 1:
        raise ConfigurationError(f"a normalisation has {m.numel()} means but {s.numel()} standard deviations; give "
                                 "one value per channel each (or one value for every channel)")
    if not bool(torch.isfinite(m).all()) or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ConfigurationError(f"a normalisation needs finite means and positive finite standard deviations, got "
                                 f"mean {tuple(m.tolist())}, std {tuple(s.tolist())}")
    return m, s


@dataclass(frozen=True)
class Normalization:
    """What a :class:`Normalize` module computes, as recorded in results.

    Attributes:
        mean: per-channel means (one value: every channel).
        std: per-channel standard deviations (one value: every channel).
        preset: the preset's name when it came from one, else ``None``.
    """

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        _checked(self.mean, self.std)

    @property
    def channels(self) -> int:
        """Channels it is written for (1: any number of channels)."""
        return max(len(self.mean), len(self.std))

    def check_channels(self, channels: int) -> None:
        """Refuse a normalisation for another number of channels than the model's input has.

        Raises:
            ConfigurationError: naming both counts.
        """
        if self.channels not in (1, channels):
            raise ConfigurationError(
                f"the normalisation has {self.channels} channels (mean {self.mean}, std {self.std}) but the model's "
                f"input has {channels}; give {channels} values each (or one value for every channel)"
            )

    def module(self) -> Normalize:
        """A fresh :class:`Normalize` computing it."""
        return Normalize(self.mean, self.std)

    def to_dict(self) -> Dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "preset": self.preset}

    @classmethod
    def from_module(cls, module: Normalize) -> Normalization:
        """The normalisation a module computes (e.g. one read back from saved weights)."""
        return cls(tuple(module.mean.tolist()), tuple(module.std.tolist()))


def parse_normalization(spec: Union[str, Normalization, None]) -> Optional[Normalization]:
    """A normalisation from its spelling (see the module docstring); ``None`` and ``"none"`` give ``None``.

    Raises:
        ConfigurationError: an unknown preset, a malformed list, or invalid values.
    """
    if spec is None or isinstance(spec, Normalization):
        return spec
    text = str(spec).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() in PRESETS:
        mean, std = PRESETS[text.lower()]
        return Normalization(mean, std, preset=text.lower())
    if ";" in text:
        halves = text.split(";")
        if len(halves) != 2:
            raise ConfigurationError(f"normalisation {text!r} has {len(halves) - 1} semicolons; expected {_SYNTAX}")
        mean, std = _numbers(halves[0], text), _numbers(halves[1], text)
    else:
        values = _numbers(text, text)
        if len(values) != 2:
            raise ConfigurationError(f"normalisation {text!r} has {len(values)} values; expected {_SYNTAX}")
        mean, std = values[:1], values[1:]
    return Normalization(mean, std)


def _numbers(part: str, text: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(v) for v in part.split(","))
    except ValueError:
        raise ConfigurationError(f"unknown normalisation {text!r}; expected {_SYNTAX}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigurationError(f"normalisation {text!r} holds a non-finite value")
    return values


def normalized(model: nn.Module, normalization: Normalization) -> nn.Sequential:
    """``model`` behind the normalisation: ``nn.Sequential(normalize=Normalize(...), model=model)``.

    The normalisation's buffers follow the model's device and its floating-point dtype.
    """
    module = normalization.module()
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        module = module.to(device=ref.device, dtype=ref.dtype)
    return nn.Sequential(OrderedDict([("normalize", module), ("model", model)]))
