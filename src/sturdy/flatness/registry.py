"""The result types of the generalisation measures and the registry they are looked up in.

A registered measure is a function ``fn(model, data, *, seed, progress, batch_size, hessian, **settings)
-> Measure``; the settings it accepts are read from a signature (``inspect``) when it is registered, so
that :func:`check_settings` can refuse unknown settings before anything is computed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from sturdy.errors import ConfigurationError

__all__ = [
    "Measure",
    "MeasureSet",
    "MeasureSpec",
    "register_measure",
    "available_measures",
    "measure_spec",
    "check_settings",
    "STANDARD_ARGUMENTS",
]

STANDARD_ARGUMENTS = ("seed", "progress", "batch_size", "hessian")
"""Keywords every registered measure receives from :func:`sturdy.flatness.compute_measures` (not settings)."""


@dataclass(frozen=True)
class Measure:
    """One measure's value with JSON-able details (solver iterations, standard errors, ...)."""

    name: str
    value: float
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., "value": ..., "details": {...}}`` (plain JSON types; details copied)."""
        return {"name": self.name, "value": self.value, "details": copy.deepcopy(self.details)}


@dataclass(frozen=True)
class MeasureSet(MappingABC):
    """Several measures of one model: a read-only mapping ``name -> Measure`` in computation order."""

    measures: Mapping[str, Measure]

    def __getitem__(self, name: str) -> Measure:
        return self.measures[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.measures)

    def __len__(self) -> int:
        return len(self.measures)

    def to_dict(self) -> Dict[str, Any]:
        """``{name: {"value": ..., "details": {...}}}`` (plain JSON types; the name is the key)."""
        return {n: {"value": m.value, "details": copy.deepcopy(m.details)} for n, m in self.measures.items()}


@dataclass(frozen=True)
class MeasureSpec:
    """A registered measure.

    Attributes:
        name: registry key.
        fn: ``fn(model, data, *, seed, progress, batch_size, hessian, **settings) -> Measure``.
        description: one line for reports.
        uses_hessian: whether ``fn`` uses the exact GGN diagonal of all parameters (shared by
            :func:`sturdy.flatness.compute_measures` so it is computed once).
        settings: keyword settings ``fn`` accepts, or ``None`` when any keyword is accepted.
    """

    name: str
    fn: Callable[..., Measure]
    description: str
    uses_hessian: bool = False
    settings: Optional[Tuple[str, ...]] = None


_MEASURES: Dict[str, MeasureSpec] = {}


def _keywords(fn: Callable[..., Any], exclude: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """Keyword parameters of ``fn`` after its first two (model, data), minus ``exclude``; ``None`` with ``**kw``."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params[2:] if p.kind in kinds and p.name not in exclude)


def register_measure(
    name: str,
    *,
    description: str,
    uses_hessian: bool = False,
    settings_of: Optional[Callable[..., Any]] = None,
    fixed: Sequence[str] = (),
) -> Callable[[Callable[..., Measure]], Callable[..., Measure]]:
    """Decorator adding ``fn(model, data, *, seed, progress, batch_size, hessian, **settings) -> Measure``.

    Args:
        name: registry key; description: one line for reports.
        uses_hessian: ``fn`` reads the shared exact GGN diagonal (``hessian=``).
        settings_of: the function whose keyword parameters are the accepted settings, when ``fn``
            forwards ``**settings`` to it (default: ``fn`` itself).
        fixed: keywords of ``settings_of`` that ``fn`` sets itself (not settings).
    """

    def deco(fn: Callable[..., Measure]) -> Callable[..., Measure]:
        if name in _MEASURES:
            raise ConfigurationError(f"a measure named {name!r} is already registered")
        accepted = _keywords(settings_of or fn, exclude=tuple(STANDARD_ARGUMENTS) + tuple(fixed))
        _MEASURES[name] = MeasureSpec(name, fn, description, uses_hessian, accepted)
        return fn

    return deco


def available_measures() -> Tuple[str, ...]:
    """Registered measure names, in registration order."""
    return tuple(_MEASURES)


def measure_spec(name: str) -> MeasureSpec:
    """The :class:`MeasureSpec` registered under ``name``."""
    if name not in _MEASURES:
        raise ConfigurationError(f"unknown measure {name!r}; known measures: {', '.join(_MEASURES)}")
    return _MEASURES[name]


def check_settings(spec: MeasureSpec, settings: Mapping[str, Any]) -> None:
    """Refuse settings that ``spec`` does not accept (read from its signature, not from a failed call)."""
    if spec.settings is None:
        return
    unknown = sorted(set(settings) - set(spec.settings))
    if unknown:
        accepted = ", ".join(spec.settings) or "none"
        raise ConfigurationError(
            f"measure {spec.name!r} does not accept the settings {', '.join(unknown)} (accepted: {accepted})"
        )
