"""torchvision and timm as model sources (``torchvision:NAME``, ``timm:NAME`` of :mod:`sturdy.model_sources`).

``torchvision.models.get_model(NAME, **model_args)`` and ``timm.create_model(NAME, pretrained=False,
**model_args)``, randomly initialised (nothing is downloaded: weights come from ``--weights``). ``num_classes`` is
passed to both, timm's ``in_chans`` is the input's channels, and the input's size is passed as timm's ``img_size``
or torchvision's ``image_size`` (square images) to the models that take one (vision transformers, built for one
size); a model without that argument (a convolutional network, any size) is built without it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from sturdy.errors import MissingDependencyError

__all__ = ["hub_builder"]

Builder = Callable[[], nn.Module]


def hub_builder(kind: str, name: str, args: Dict[str, Any], shape: Optional[Tuple[int, ...]],
                classes: Optional[int]) -> Builder:
    """A function building ``timm:NAME`` or ``torchvision:NAME`` (module docstring).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    try:
        hub = importlib.import_module(kind)
    except ImportError as exc:
        extra = "pip install 'sturdy[vision]' (or torchvision)" if kind == "torchvision" else "pip install timm"
        raise MissingDependencyError(f"model {kind}:{name} needs the {kind} package: {extra}") from exc
    kwargs = dict(args)
    if classes is not None:
        kwargs.setdefault("num_classes", classes)
    if kind == "timm":
        if shape is not None:
            kwargs.setdefault("in_chans", shape[1])
        kwargs.setdefault("pretrained", False)
        return _sized(lambda **kw: hub.create_model(name, **kw), kwargs, "img_size", shape)
    return _sized(lambda **kw: hub.models.get_model(name, **kw), kwargs, "image_size", shape)


def _sized(create: Callable[..., nn.Module], kwargs: Dict[str, Any], key: str,
           shape: Optional[Tuple[int, ...]]) -> Builder:
    """``create(**kwargs)``, told the image size (``key``: timm's ``img_size``, torchvision's ``image_size``) when
    the input shape is known, for the models built for one size (vision transformers); a model that takes no such
    argument (a convolutional network, any size) is built without it."""
    if shape is None or key in kwargs or (key == "image_size" and shape[2] != shape[3]):
        return lambda: create(**kwargs)
    size = shape[2] if shape[2] == shape[3] else (shape[2], shape[3])

    def make() -> nn.Module:
        try:
            return create(**kwargs, **{key: size})
        except TypeError as exc:
            if key not in str(exc):
                raise
        return create(**kwargs)

    return make
