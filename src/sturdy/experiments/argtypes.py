"""argparse value types shared by the ``sturdy`` commands (each raises a one-line, specific message)."""

from __future__ import annotations

import argparse
import ast
import math
from typing import Optional, Tuple

from sturdy.validation import MAX_SEED

__all__ = ["phase_arg", "frequency_arg", "MAX_FREQUENCY", "model_arg",
           "positive_int", "non_negative_int", "positive_float", "finite_float", "bounded_int", "seed_int",
           "batch_size_int", "MAX_BATCH_SIZE"]

MAX_BATCH_SIZE = 2**24
"""Largest ``--batch-size`` of any command: more images than any data set held in memory here."""


def _parse(text: str, kind: type, expected: str):
    try:
        return kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _parse(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _parse(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text[:40]!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf, no literal that overflows a float)."""
    value = _parse(text, float, "a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:40]!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _parse(text, float, "a positive number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text[:40]!r}")
    return value


def bounded_int(low: int, high: int):
    """An argparse type accepting integers in ``[low, high]``."""

    expected = f"a positive integer (at most {high})" if low == 1 else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        value = _parse(text, int, expected)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


seed_int = bounded_int(0, MAX_SEED)
"""The ``--seed`` of every command: an integer in ``[0, MAX_SEED]`` (see :data:`sturdy.validation.MAX_SEED`)."""

batch_size_int = bounded_int(1, MAX_BATCH_SIZE)
"""The ``--batch-size`` of every command: an integer in ``[1, MAX_BATCH_SIZE]``."""


def phase_arg(text: str) -> Optional[float]:
    """A phase in radians, or ``None`` for ``random``."""
    if text == "random":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite phase in radians or 'random', got {text[:40]!r}")
    return value


MAX_FREQUENCY = 2**31  # --frequencies K,L: any representative modulo the image size, of a size torch can index


def frequency_arg(text: str) -> Tuple[int, int]:
    """A frequency ``K,L`` (integers below :data:`MAX_FREQUENCY` in magnitude)."""
    try:
        k, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frequency as K,L (two integers), got {text[:40]!r}") from None
    if max(abs(k), abs(col)) >= MAX_FREQUENCY:
        raise argparse.ArgumentTypeError(f"expected K and L of magnitude below {MAX_FREQUENCY} (they are taken modulo "
                                         f"the image size: give e.g. 0..H-1 and 0..W-1), got {text[:40]!r}")
    return k, col


def model_arg(text: str) -> tuple:
    """``KEY=VALUE`` of ``--model-arg``: the value as a Python literal when it is one (``channels=(16,32)``), else a
    string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width=256 or channels=(16,32)), got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key, parsed
