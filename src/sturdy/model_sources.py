"""Where a model comes from: the registry, the user's own code, torchvision or timm; its weights; its normalisation.

:func:`load_model` turns a *model source* into a ready :class:`LoadedModel`, the same way for every command:

* ``NAME``: a model of the registry (:func:`sturdy.models.create_model`); it needs ``input_shape`` and
  ``num_classes``.
* ``path/to/file.py:FACTORY`` or ``package.module:FACTORY``: the user's own code. The file or module is
  imported and ``FACTORY(**model_args)`` is called (a function or an ``nn.Module`` class; a dotted
  ``FACTORY`` reaches attributes, ``module:Net.build``). A factory that names a ``num_classes``,
  ``in_shape`` or ``input_shape`` parameter receives those values unless ``model_args`` gives them. **This runs
  the user's code, like any Python import: load only code you trust.** A file's folder is importable while the
  file is imported (sibling modules).
* ``torchvision:NAME`` and ``timm:NAME``: ``torchvision.models.get_model(NAME, **model_args)`` and
  ``timm.create_model(NAME, pretrained=False, **model_args)`` when those packages are installed (randomly
  initialised: give ``weights``; nothing is downloaded). ``num_classes`` is passed to both, timm's ``in_chans``
  is the input shape's channels, and the input shape's size is passed as timm's ``img_size`` or torchvision's
  ``image_size`` to the models that take one (vision transformers built for one size; a convolutional network
  that takes none is built without it). Default input shapes: 3x224x224 for torchvision, the model's
  ``pretrained_cfg`` for timm.

Without ``input_shape`` the model must tell its own: an ``input_shape`` or ``in_shape`` attribute of ``(C, H,
W)`` (or the defaults above).

The factory is called first on the meta device (no memory, no random numbers drawn): ``weights`` are
shape-checked against that model and its logits against ``num_classes`` (one forward on zeros of the input
shape) before anything is allocated; then it is called for real. A model that cannot be built or run on the
meta device is checked the same way after it is built (a CPU forward on one zero image).

``weights`` (read with ``torch.load(weights_only=True)``: a weights file cannot run code) is a plain
``state_dict``, a ``torch.save``'d dict holding one under ``"state_dict"``, ``"model_state_dict"`` or
``"model"`` (a sturdy checkpoint, ``model.pt`` from ``sturdy train``, is read this way), with a ``module.``
prefix on every name (DDP) removed. Weights saved from a normalised model (names ``normalize.*`` and
``model.*``, as :func:`load_model` builds it) carry their normalisation: it is used when ``normalize`` is not
given, and must agree with it otherwise.

``normalize`` (:func:`sturdy.normalize.parse_normalization`: a preset or ``"MEAN,STD"``) becomes the first module
of the returned model, so every analysis works on images in ``[0, 1]``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from sturdy.checkpoints import check_state_dict_shapes, read_state_dict
from sturdy.errors import CheckpointError, ConfigurationError, SturdyError
from sturdy.model_hubs import hub_builder
from sturdy.models import create_model
from sturdy.normalize import Normalization, normalized, parse_normalization
from sturdy.training.devices import resolve_device
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_input_shape

__all__ = ["LoadedModel", "load_model", "SPEC_FORMS"]

SPEC_FORMS = "NAME (the registry), path/to/file.py:FACTORY, package.module:FACTORY, torchvision:NAME or timm:NAME"
_HUBS = ("torchvision", "timm")
_NOT_READ = ("hf", "huggingface", "onnx", "keras", "tf", "tensorflow", "jax")
_ADVICE = "give the weights of this model, or the model (and model arguments) these weights were saved from"
Builder = Callable[[], nn.Module]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for every analysis (images in ``[0, 1]``), and what it was made from.

    Attributes:
        model: the network; ``nn.Sequential(normalize=Normalize, model=...)`` when a normalisation is given.
        spec: the model source as given.
        model_args: the keyword arguments its factory was called with (as given).
        weights_sha256: SHA-256 of the weights file, ``None`` without one.
        normalization: the normalisation in front of the model, ``None`` without one.
        input_shape: ``(1, C, H, W)`` (with the batch dimension, docs/design.md Conventions 13).
        num_classes: number of logits.
        kind: ``"registry"``, ``"file"``, ``"module"``, ``"torchvision"`` or ``"timm"``.
        weights: the weights file as given, ``None`` without one.
    """

    model: nn.Module
    spec: str
    model_args: Dict[str, Any]
    weights_sha256: Optional[str]
    normalization: Optional[Normalization]
    input_shape: Tuple[int, ...]
    num_classes: int
    kind: str = "registry"
    weights: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """What a result records of its model (everything but the network itself)."""
        return {"spec": self.spec, "kind": self.kind, "model_args": dict(self.model_args), "weights": self.weights,
                "weights_sha256": self.weights_sha256, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes,
                "normalization": None if self.normalization is None else self.normalization.to_dict()}


def load_model(
    spec: str,
    *,
    model_args: Optional[Mapping[str, Any]] = None,
    weights: Union[str, os.PathLike, None] = None,
    normalize: Union[str, Normalization, None] = None,
    input_shape: Union[str, Sequence[int], None] = None,
    num_classes: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
) -> LoadedModel:
    """Build the model of a model source, load its weights and put its normalisation in front (module docstring).

    Args:
        spec: the model source (:data:`SPEC_FORMS`).
        model_args: keyword arguments of the factory.
        weights: a weights file (``state_dict`` or sturdy checkpoint); ``None`` keeps the factory's weights.
        normalize: a preset or ``"MEAN,STD"`` (:func:`sturdy.normalize.parse_normalization`).
        input_shape: ``(C, H, W)`` or ``(1, C, H, W)`` (or ``"C,H,W"``); required where the model cannot tell.
        num_classes: expected number of logits (required by the registry; checked for every source).
        device: where the model goes (``"auto"``: CUDA when available).

    Raises:
        ConfigurationError: an unknown or malformed spec, a missing model file or module, a factory that is
            missing, raises, returns no ``nn.Module`` or gives logits of another shape than ``(1, num_classes)``,
            an unknown input shape, a normalisation for another number of channels.
        CheckpointError: a missing, unreadable or unsafe weights file, or weights of another architecture.
        MissingDependencyError: ``torchvision:``/``timm:`` without the package.
    """
    args = _checked_args(model_args)
    norm = parse_normalization(normalize)
    shape = _parse_shape(input_shape)
    classes = _checked_classes(num_classes)
    dev = resolve_device(device)
    kind, make = _builder(spec, args, shape, classes)
    state, sha = read_state_dict(weights) if weights is not None else (None, None)
    shell = _meta_build(make, spec)
    model = None if shell is not None else _build(make, spec)
    reference = shell if shell is not None else model
    assert reference is not None
    shape = shape or _shape_from_model(reference, kind, spec)
    if state is not None:
        state, norm = _match_state(reference, state, norm, str(weights))
    if norm is not None:  # after the weights: a normalisation saved with them is checked too
        norm.check_channels(shape[1])
    count = _probe(shell, shape, spec, classes, meta=True) if shell is not None else None
    model = model if model is not None else _build(make, spec)
    count = count if count is not None else _probe(model, shape, spec, classes, meta=False)
    assert count is not None
    if state is not None:
        _load(model, state, str(weights))
    if norm is not None:
        model = normalized(model, norm)
    return LoadedModel(model=model.to(dev), spec=spec, model_args=args, weights_sha256=sha, normalization=norm,
                       input_shape=shape, num_classes=count, kind=kind,
                       weights=None if weights is None else str(weights))


# ----------------------------------------------------------------------------------------- settings


def _checked_args(model_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if model_args is None:
        return {}
    if not isinstance(model_args, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in model_args):
        raise ConfigurationError(f"model arguments must map names to values, got {model_args!r}")
    return dict(model_args)


def _parse_shape(shape: Union[str, Sequence[int], None]) -> Optional[Tuple[int, ...]]:
    if shape is None:
        return None
    if isinstance(shape, str):
        try:
            shape = [int(v) for v in shape.replace("x", ",").split(",")]
        except ValueError:
            raise ConfigurationError(f"input shape {shape!r} is not C,H,W (e.g. 3,32,32)") from None
    return check_input_shape(shape)


def _checked_classes(num_classes: Optional[int]) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigurationError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
    return num_classes


# ----------------------------------------------------------------------------------------- sources


def _builder(spec: str, args: Dict[str, Any], shape: Optional[Tuple[int, ...]],
             classes: Optional[int]) -> Tuple[str, Builder]:
    """The kind of source and a function building its model (imports the user's code)."""
    kind, target, name = _parse_spec(spec)
    if kind == "registry":
        return kind, _registry_builder(target, args, shape, classes)
    if kind in _HUBS:
        return kind, hub_builder(kind, name, args, shape, classes)
    module = _import_file(target, spec) if kind == "file" else _import_module(target, spec)
    factory = _factory(module, name, spec)
    kwargs = dict(args)
    params = _parameters(factory)
    if classes is not None and "num_classes" in params:
        kwargs.setdefault("num_classes", classes)
    for key in ("in_shape", "input_shape"):
        if shape is not None and key in params:
            kwargs.setdefault(key, tuple(shape[1:]))
    return kind, lambda: factory(**kwargs)


def _parse_spec(spec: str) -> Tuple[str, str, str]:
    """``(kind, target, factory name)`` of a model source."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigurationError(f"a model source is {SPEC_FORMS}; got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec.endswith(".py"):
            raise ConfigurationError(f"model {spec!r} names a file but no factory: write {spec}:FACTORY")
        return "registry", spec, ""
    target, _, name = spec.rpartition(":")
    prefix = target.lower()
    if prefix in _HUBS and name:
        return prefix, "", name
    if prefix in _NOT_READ:
        raise ConfigurationError(f"model source {spec!r}: {target!r} models are not read by sturdy; wrap the model in "
                                 f"a Python factory (file.py:FACTORY); model sources are {SPEC_FORMS}")
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigurationError(f"model source {spec!r} has no valid factory name after ':'; model sources are "
                                 f"{SPEC_FORMS}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return "file", target, name
    if target and all(part.isidentifier() for part in target.split(".")):
        return "module", target, name
    raise ConfigurationError(f"unknown kind of model source {spec!r}; model sources are {SPEC_FORMS}")


def _registry_builder(name: str, args: Dict[str, Any], shape: Optional[Tuple[int, ...]],
                      classes: Optional[int]) -> Builder:
    if shape is None or classes is None:
        raise ConfigurationError(f"model {name!r} of the registry needs an input shape (C,H,W) and a number of "
                                 "classes")
    clash = sorted({"in_shape", "num_classes"} & set(args))
    if clash:
        raise ConfigurationError(f"give {', '.join(clash)} of model {name!r} as the input shape and number of "
                                 "classes, not as model arguments")
    return lambda: create_model(name, in_shape=shape[1:], num_classes=classes, **args)


def _import_file(target: str, spec: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise ConfigurationError(f"model file not found: {target!r} (from model source {spec!r})")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    name = f"sturdy_user_model_{''.join(c if c.isalnum() else '_' for c in resolved.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigurationError(f"model file {target!r} cannot be imported as Python (from model source {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code fails in its own ways: say so in one line
        sys.modules.pop(name, None)
        raise ConfigurationError(f"importing model file {target!r} failed: {_one_line(exc)}") from exc
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise ConfigurationError(f"cannot import module {target!r} of model source {spec!r}: it is not on the "
                                     f"Python path (install it or add its folder to PYTHONPATH); model sources are "
                                     f"{SPEC_FORMS}") from exc
        raise ConfigurationError(f"importing module {target!r} failed: {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's code fails in its own ways: say so in one line
        raise ConfigurationError(f"importing module {target!r} failed: {_one_line(exc)}") from exc


def _factory(module: ModuleType, name: str, spec: str) -> Callable[..., Any]:
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            known = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise ConfigurationError(f"model source {spec!r}: no factory {name!r} there; it defines "
                                     f"{', '.join(known) or 'no public function or class'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigurationError(f"model source {spec!r}: {name!r} is not a factory (not callable: a value of type "
                                 f"{type(obj).__name__})")
    return obj


def _parameters(factory: Callable[..., Any]) -> Tuple[str, ...]:
    try:
        return tuple(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return ()


# ----------------------------------------------------------------------------------------- building and checks


def _build(make: Builder, spec: str) -> nn.Module:
    try:
        model = make()
    except Exception as exc:  # noqa: BLE001 - the user's code fails in its own ways: say so in one line
        if isinstance(exc, SturdyError) and ":" not in spec:  # the registry's own errors name the model already
            raise
        raise ConfigurationError(f"the factory of model {spec!r} raised {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"the factory of model {spec!r} returned a {type(model).__name__}, not a "
                                 "torch.nn.Module")
    return model


def _meta_build(make: Builder, spec: str) -> Optional[nn.Module]:
    """The model on the meta device, ``None`` when it cannot be built there (it is then checked once built)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = make()
    except Exception:  # noqa: BLE001 - built for real next, where the error (if any) is reported
        return None
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"the factory of model {spec!r} returned a {type(model).__name__}, not a "
                                 "torch.nn.Module")
    return model


def _shape_from_model(model: nn.Module, kind: str, spec: str) -> Tuple[int, ...]:
    for attr in ("input_shape", "in_shape"):
        value = getattr(model, attr, None)
        if isinstance(value, (tuple, list, torch.Size)):
            return check_input_shape(value)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return check_input_shape(cfg["input_size"])
    if kind == "torchvision":
        return (1, 3, 224, 224)
    raise ConfigurationError(f"model {spec!r} does not tell its input shape: give it (C,H,W), e.g. 3,32,32")


def _probe(model: nn.Module, shape: Tuple[int, ...], spec: str, classes: Optional[int], *, meta: bool) -> Optional[int]:
    """The number of logits of one forward pass on zeros (``None``: it cannot run on the meta device)."""
    device, dtype = model_device_dtype(model)
    if meta:
        device = torch.device("meta")
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(shape, device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - the user's model fails in its own ways: say so in one line
        if meta:
            return None
        raise ConfigurationError(f"model {spec!r} fails on an input of shape {tuple(shape)}: {_one_line(exc)}; "
                                 "check the input shape") from exc
    if not isinstance(out, torch.Tensor):
        raise ConfigurationError(f"model {spec!r} returns a {type(out).__name__}, not a tensor of logits")
    want = f"(1, {classes})" if classes is not None else "(1, classes)"
    if out.dim() != 2 or out.shape[0] != 1 or (classes is not None and out.shape[1] != classes) or out.shape[1] < 2:
        raise ConfigurationError(f"model {spec!r} gives logits of shape {tuple(out.shape)} for one input of shape "
                                 f"{tuple(shape)}; expected {want}")
    return int(out.shape[1])


# ----------------------------------------------------------------------------------------- weights


def _match_state(model: nn.Module, state: Dict[str, torch.Tensor], norm: Optional[Normalization],
                 source: str) -> Tuple[Dict[str, torch.Tensor], Optional[Normalization]]:
    """``state`` checked against ``model`` (shapes only), split from its normalisation when it holds one."""
    own = set(model.state_dict())
    stored = {"normalize.mean", "normalize.std"}
    if set(state) != own and stored <= set(state) and all(k in stored or k.startswith("model.") for k in state):
        try:
            mean, std = (tuple(float(f"{v:.7g}") for v in state[f"normalize.{k}"].flatten().tolist())
                         for k in ("mean", "std"))  # float32 buffers, read back as written
            saved = Normalization(mean, std)
        except ConfigurationError as exc:
            raise CheckpointError(f"weights file {source!r} holds an invalid normalisation: {exc}") from exc
        if norm is not None and not _same(norm, saved):
            raise ConfigurationError(f"the normalisation given (mean {norm.mean}, std {norm.std}) differs from the "
                                     f"one saved with weights {source!r} (mean {saved.mean}, std {saved.std})")
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        norm = norm if norm is not None else saved
    check_state_dict_shapes(model, state, source=source, advice=_ADVICE)
    return state, norm


def _same(a: Normalization, b: Normalization, rel: float = 1e-6) -> bool:
    def close(u: Tuple[float, ...], v: Tuple[float, ...]) -> bool:
        n = max(len(u), len(v))
        uu, vv = (u * n if len(u) == 1 else u), (v * n if len(v) == 1 else v)
        return len(uu) == len(vv) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(uu, vv))

    return close(a.mean, b.mean) and close(a.std, b.std)


def _load(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {source!r} does not fit the model: {_one_line(exc)[:300]}; "
                              f"{_ADVICE}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
