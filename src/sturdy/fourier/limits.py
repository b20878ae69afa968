"""Bounds of the Fourier analyses' count options, derived from the image size and the memory budget.

Each check runs before any work and raises a one-line :class:`~sturdy.errors.ConfigurationError` that
gives the bound and where it comes from (through :func:`sturdy.validation.check_count`):

* ``shifts`` (random circular shifts per image): at most ``H * W``, the distinct circular shifts of an
  ``H x W`` image;
* ``phases`` (SFA phases ``2 pi j / phases``): the candidate table (frequencies x phases x channel sign
  patterns) must fit :data:`~sturdy.validation.MEMORY_BUDGET_BYTES`;
* ``stride`` (strided heat-map subsets): at most ``max(H, W)``; a larger stride keeps only ``(0, 0)`` too;
* ``save_every`` (heat-map saves): at most the number of distinct frequencies of the image;
* ``draws`` (random-noise baseline): at most :data:`MAX_DRAWS`;
* ``rounds`` (combination attack): at most the number of distinct frequencies (each round adds at most one atom;
  more rounds than directions revisit the same ones), ``pool``: the atoms of one round and their weighted
  mixtures must fit the memory budget.

Example:
    >>> check_shifts(64, 8, 8)
    64
"""

from __future__ import annotations

from typing import Any

from sturdy.validation import check_count, memory_bound

__all__ = ["check_shifts", "check_phases", "max_phases", "check_stride", "check_save_every", "CANDIDATE_BYTES",
           "MAX_SIGN_CHANNELS", "check_draws", "check_rounds", "check_pool", "MAX_DRAWS"]

MAX_DRAWS = 4096
"""Most random-noise draws of the baseline: each draw is one pass of the model over the held-out images."""

CANDIDATE_BYTES = 64
"""Host bytes one SFA candidate costs while the table is built and searched, plus 8 per channel."""

MAX_SIGN_CHANNELS = 8
"""Most channels whose sign patterns the SFA searches (more: all signs +1, ``search_signs=False``)."""


def _frequencies(height: int, width: int) -> int:
    """An upper bound on the distinct Fourier directions of an ``H x W`` image (the rfft half plane)."""
    return height * (width // 2 + 1)


def check_shifts(shifts: Any, height: int, width: int) -> int:
    """``shifts`` in ``[0, H * W]``: an ``H x W`` image has ``H * W`` distinct circular shifts."""
    return check_count(shifts, "shifts", low=0, high=height * width,
                       why=f"a {height}x{width} image has {height * width} distinct circular shifts")


def max_phases(channels: int, height: int, width: int, *, search_signs: bool = True) -> int:
    """The most SFA phases whose candidate table fits the memory budget for ``(C, H, W)`` images."""
    patterns = 2 ** max(channels - 1, 0) if search_signs and channels <= MAX_SIGN_CHANNELS else 1
    per_phase = _frequencies(height, width) * patterns
    return max(1, memory_bound(CANDIDATE_BYTES + 8 * channels) // per_phase)


def check_phases(phases: Any, channels: int, height: int, width: int, *, search_signs: bool = True) -> int:
    """``phases`` in ``[1, max_phases(...)]`` (see :func:`max_phases`)."""
    high = max_phases(channels, height, width, search_signs=search_signs)
    return check_count(phases, "phases", high=high,
                       why=f"more candidate perturbations of {channels}x{height}x{width} images than fit the "
                       "memory budget; 8 is the usual choice")


def check_stride(stride: Any, height: int, width: int) -> int:
    """``stride`` in ``[1, max(H, W)]``: a larger stride selects only ``(0, 0)``, as ``max(H, W)`` does."""
    side = max(height, width)
    return check_count(stride, "stride", high=side,
                       why=f"a {height}x{width} image has no frequency of centred coordinate beyond {side}")


def check_save_every(save_every: Any, n_freq: int) -> int:
    """``save_every`` in ``[1, n_freq]``: a heat map of an image has ``n_freq`` distinct frequencies."""
    return check_count(save_every, "save_every", high=n_freq,
                       why=f"the images have {n_freq} distinct frequencies to measure")


def check_draws(draws: Any) -> int:
    """``draws`` in ``[1, MAX_DRAWS]``."""
    return check_count(draws, "draws", high=MAX_DRAWS,
                       why="each draw is one pass of the model over the held-out images; a few dozen settle the mean")


def check_rounds(rounds: Any, height: int, width: int) -> int:
    """``rounds`` in ``[0, distinct frequencies]``: each round adds at most one Fourier atom to the perturbation."""
    return check_count(rounds, "rounds", low=0, high=_frequencies(height, width),
                       why=f"a {height}x{width} image has at most {_frequencies(height, width)} distinct Fourier "
                       "directions and each round adds at most one")


def check_pool(pool: Any, mixtures: int, channels: int, height: int, width: int) -> int:
    """``pool`` atoms per round: their ``mixtures`` weighted copies (float32 images) must fit the memory budget."""
    high = memory_bound(4 * max(1, mixtures) * channels * height * width)
    return check_count(pool, "pool", high=high,
                       why=f"the {mixtures} weighted mixtures of every atom of a round must fit the memory budget")
