"""The one list of parts, read by the command line and the demo (docs/design.md, "Where things go").

Each part's orchestration module (``sturdy.experiments.<part>``) implements :class:`Part`: its sub-commands,
its options of ``sturdy train`` and the plugin they turn into, and its section of the demo.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, List, Optional, Protocol

__all__ = ["Part", "PART_NAMES", "parts", "no_train_arguments", "no_training_plugin"]

PART_NAMES = ("lipschitz", "fourier", "flatness", "compression")


class Part(Protocol):
    """What a part contributes to the command line, to training runs and to the demo."""

    def register_cli(self, subparsers: Any) -> None:
        """Add the part's sub-commands."""

    def add_train_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the part's options of ``sturdy train`` (they land in ``job.options``)."""

    def training_plugin(self, job: Any) -> Optional[Any]:
        """The part's :class:`~sturdy.experiments.train_job.TrainPlugin` for ``job``, or ``None``."""

    def demo_section(self, ctx: Any) -> None:
        """Add the part's section to the demo report and its entry to ``ctx.results``."""


def parts() -> List[Part]:
    """Every part, in :data:`PART_NAMES` order."""
    return [importlib.import_module(f"sturdy.experiments.{name}") for name in PART_NAMES]  # type: ignore[misc]


def no_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``add_train_arguments`` of a part that adds no options to ``sturdy train``."""


def no_training_plugin(job: Any) -> None:
    """The ``training_plugin`` of a part that does not join training runs."""
    return None
