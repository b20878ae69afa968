"""Model sources (sturdy.model_sources): the registry, a user's file or module, torchvision/timm, weights files,
normalisation in front of the model, and every bad input refused in one line with the right error."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.data import ImageDataset
from sturdy.errors import CheckpointError, ConfigurationError, MissingDependencyError, SturdyError
from sturdy.model_sources import load_model
from sturdy.normalize import PRESETS, Normalization, Normalize, parse_normalization
from sturdy.persample import SquaredGradientHooks, per_sample_squared_gradients
from sturdy.training import TrainConfig, train

EXACT = dict(rtol=0.0, atol=0.0)  # the same weights give bit-identical logits
REL_TOL = 1e-9  # per-sample squared gradients against the loop (float64)

USER_FILE = """
import torch
from torch import nn
from helper import hidden_width   # a sibling module of the file

CALLS = []

def make(width=hidden_width(), num_classes=3):
    CALLS.append(torch.empty(0).device.type)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, num_classes))

def raises(**kwargs):
    raise RuntimeError("no GPU here")

def not_a_module():
    return [1, 2, 3]

def three_d(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, num_classes, 1))

def fixed():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))

LIMIT = 3
"""

PACKAGE_FILE = """
import torch
from torch import nn

CALLS = []

class Net(nn.Module):
    input_shape = (1, 4, 4)

    def __init__(self, classes=4):
        super().__init__()
        CALLS.append(torch.empty(0).device.type)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))

    @classmethod
    def small(cls):
        return cls(classes=2)
"""


def _user_file(tmp_path: Path) -> Path:
    (tmp_path / "helper.py").write_text("def hidden_width():\n    return 6\n")
    path = tmp_path / "my_net.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(PACKAGE_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)
    return f"{name}.nets"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, SturdyError)
    return text


# ----------------------------------------------------------------------------------------- sources


def test_user_file_factory_called_with_the_model_args(tmp_path):
    path = _user_file(tmp_path)
    loaded = load_model(f"{path}:make", model_args={"width": 5}, input_shape=(3, 2, 2), num_classes=4)
    assert loaded.kind == "file" and loaded.num_classes == 4 and loaded.input_shape == (1, 3, 2, 2)
    assert loaded.model[1].out_features == 5 and loaded.model[3].out_features == 4  # num_classes passed on
    assert loaded.model(torch.rand(7, 3, 2, 2)).shape == (7, 4)
    record = json.loads(json.dumps(loaded.to_dict()))
    assert record["spec"] == f"{path}:make" and record["model_args"] == {"width": 5}
    assert record["weights_sha256"] is None and record["normalization"] is None


def test_user_file_defaults_and_sibling_imports(tmp_path):
    path = _user_file(tmp_path)
    loaded = load_model(f"{path}:make", input_shape="3,2,2")
    assert loaded.num_classes == 3 and loaded.model[1].out_features == 6  # the factory's own defaults


def test_module_factory_with_its_own_input_shape(tmp_path, monkeypatch):
    module = _package(tmp_path, monkeypatch, "userpkg_a")
    loaded = load_model(f"{module}:Net", num_classes=4)  # no input shape: the class tells it
    assert loaded.kind == "module" and loaded.input_shape == (1, 1, 4, 4)
    assert loaded.model(torch.rand(2, 1, 4, 4)).shape == (2, 4)
    small = load_model(f"{module}:Net.small")
    assert small.num_classes == 2


def test_registry_as_before():
    loaded = load_model("cnn", model_args={"channels": (4,), "width": 8}, input_shape=(1, 8, 8), num_classes=10)
    assert loaded.kind == "registry" and loaded.model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_torchvision_and_timm_when_installed(monkeypatch):
    seen = {}

    def get_model(name, **kwargs):
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        seen["torchvision"] = (name, kwargs)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, kwargs.get("num_classes", 1000)))

    def create_model(name, **kwargs):
        seen["timm"] = (name, kwargs)
        net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(kwargs.get("in_chans", 3), 7))
        net.pretrained_cfg = {"input_size": (3, 16, 16)}
        return net

    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=types.SimpleNamespace(
        get_model=get_model)))
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    tv = load_model("torchvision:resnet18", num_classes=5)
    assert tv.input_shape == (1, 3, 224, 224) and tv.num_classes == 5 and seen["torchvision"] == ("resnet18",
                                                                                                  {"num_classes": 5})
    tm = load_model("timm:vit_tiny", model_args={"drop_rate": 0.1})
    assert tm.input_shape == (1, 3, 16, 16) and tm.num_classes == 7
    assert seen["timm"] == ("vit_tiny", {"drop_rate": 0.1, "pretrained": False})
    with pytest.raises(ConfigurationError) as exc:
        load_model("torchvision:resnet7", num_classes=5)
    assert "'torchvision:resnet7' raised ValueError: Unknown model resnet7" in _one_line(exc)


def test_hub_models_are_told_the_image_size_when_they_take_it(monkeypatch):
    seen = []

    def vit(num_classes, img_size=224, in_chans=3, pretrained=False):  # built for one size, like a ViT
        seen.append(("vit", img_size, in_chans))
        net = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, num_classes))
        net.pretrained_cfg = {"input_size": (3, 224, 224)}
        return net

    def cnn(num_classes, in_chans=3, pretrained=False):  # any size, no size argument
        seen.append(("cnn", in_chans))
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_chans, num_classes))

    def create_model(name, **kwargs):
        return {"vit": vit, "cnn": cnn}[name](**kwargs)

    def get_model(name, **kwargs):
        if "image_size" in kwargs and name == "resnet18":
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'image_size'")
        side = kwargs.pop("image_size", 224)
        seen.append((name, side))
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(kwargs["num_classes"])) if name == "vit_b_16" else \
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, kwargs["num_classes"]))

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=types.SimpleNamespace(
        get_model=get_model)))
    assert load_model("timm:vit", input_shape=(1, 8, 8), num_classes=3).model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert seen[-1] == ("vit", 8, 1)
    assert load_model("timm:vit", input_shape=(1, 8, 8), num_classes=3, model_args={"img_size": 8}).num_classes == 3
    assert load_model("timm:cnn", input_shape=(1, 8, 8), num_classes=3).num_classes == 3 and seen[-1] == ("cnn", 1)
    assert load_model("torchvision:vit_b_16", input_shape=(3, 8, 8), num_classes=3).num_classes == 3
    assert seen[-1] == ("vit_b_16", 8)
    assert load_model("torchvision:resnet18", input_shape=(3, 8, 8), num_classes=3).num_classes == 3
    assert seen[-1] == ("resnet18", 224)  # built without the size it does not take
    load_model("torchvision:vit_b_16", input_shape=(3, 8, 6), num_classes=3)  # not square: no image_size
    assert seen[-1] == ("vit_b_16", 224)


@pytest.mark.parametrize("hub", ["torchvision", "timm"])
def test_torchvision_and_timm_missing(monkeypatch, hub):
    monkeypatch.setitem(sys.modules, hub, None)
    with pytest.raises(MissingDependencyError) as exc:
        load_model(f"{hub}:resnet18", num_classes=10)
    assert f"needs the {hub} package" in _one_line(exc)


# ----------------------------------------------------------------------------------------- weights


def _net_file(tmp_path: Path) -> str:
    return f"{_user_file(tmp_path)}:make"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp"])
def test_state_dict_round_trip(tmp_path, wrap):
    spec = _net_file(tmp_path)
    source = load_model(spec, input_shape=(3, 2, 2), num_classes=4)
    state = source.model.state_dict()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "ddp": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "weights.pt"
    torch.save(saved, path)
    loaded = load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=path)
    x = torch.rand(5, 3, 2, 2)
    torch.testing.assert_close(loaded.model(x), source.model(x), **EXACT)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.to_dict()["weights"] == str(path)


def test_weights_are_read_from_disk_once_and_hashed_in_that_read(tmp_path, monkeypatch):
    import builtins

    from sturdy.checkpoints import file_sha256

    spec = _net_file(tmp_path)
    path = tmp_path / "weights.pt"
    torch.save(load_model(spec, input_shape=(3, 2, 2), num_classes=4).model.state_dict(), path)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(args[0] if args else kwargs.get("mode", "r"))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    loaded = load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=path)
    assert file_sha256(path) == loaded.weights_sha256  # the training record's hash: no new read
    monkeypatch.setattr(builtins, "open", real_open)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert opened == ["rb", "rb"]  # the zip check (its trailer) and the one read that loads and hashes
    before = path.stat().st_mtime_ns
    torch.save({k: v + 1 for k, v in loaded.model.state_dict().items()}, path)  # changed: hashed anew
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a later time even where clocks are coarse
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sturdy_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    data = ImageDataset(torch.rand(32, 1, 8, 8), torch.arange(32) % 3, num_classes=3)
    made = load_model("mlp", model_args={"width": 8, "depth": 1}, input_shape=(1, 8, 8), num_classes=3)
    ckpt = tmp_path / "model.pt"
    train(made.model, data, config=TrainConfig(epochs=1, batch_size=16, device="cpu"), checkpoint_path=ckpt,
          progress=False)
    loaded = load_model("mlp", model_args={"width": 8, "depth": 1}, input_shape=(1, 8, 8), num_classes=3,
                        weights=ckpt)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(data.images), made.model.eval()(data.images), **EXACT)


def test_weights_of_a_normalised_model_carry_their_normalisation(tmp_path):
    spec = _net_file(tmp_path)
    source = load_model(spec, input_shape=(3, 2, 2), num_classes=4, normalize="cifar10")
    path = tmp_path / "normalised.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=path)
    assert loaded.normalization is not None and loaded.normalization.mean == PRESETS["cifar10"][0]
    x = torch.rand(5, 3, 2, 2)
    torch.testing.assert_close(loaded.model(x), source.model(x), **EXACT)
    assert load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=path, normalize="cifar10").num_classes == 4
    with pytest.raises(ConfigurationError) as exc:
        load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=path, normalize="imagenet")
    assert "differs from the one saved with weights" in _one_line(exc)


def test_weights_of_another_architecture_are_refused_before_allocation(tmp_path, monkeypatch):
    module = _package(tmp_path, monkeypatch, "userpkg_b")
    path = tmp_path / "other.pt"
    torch.save(load_model(f"{module}:Net", model_args={"classes": 3}).model.state_dict(), path)
    calls = importlib.import_module(module).CALLS
    calls.clear()
    with pytest.raises(CheckpointError) as exc:
        load_model(f"{module}:Net", model_args={"classes": 5}, weights=path)
    assert "fc.weight is (3, 32) there, (5, 32) here" in _one_line(exc)
    assert calls == ["meta"]  # checked on the meta device: the real model was never built


def test_missing_unreadable_and_nan_weights(tmp_path):
    spec = _net_file(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        load_model(spec, input_shape=(3, 2, 2), weights=tmp_path / "nope.pt")
    assert "not found" in _one_line(exc)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_model(spec, input_shape=(3, 2, 2), weights=tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(spec, input_shape=(3, 2, 2), weights=tmp_path / "nostate.pt")
    assert "neither a state_dict" in _one_line(exc)
    state = load_model(spec, input_shape=(3, 2, 2)).model.state_dict()
    state["1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(spec, input_shape=(3, 2, 2), weights=tmp_path / "nan.pt")
    assert "1.weight" in _one_line(exc)


# ----------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset):
    norm = parse_normalization(preset)
    assert norm is not None and (norm.mean, norm.std) == PRESETS[preset] and norm.preset == preset


@pytest.mark.parametrize("text, mean, std", [("0.5,0.25", (0.5,), (0.25,)), ("0.5;0.25", (0.5,), (0.25,)),
                                             ("0.1,0.2,0.3;0.4,0.5,0.6", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
                                             ("0.5;0.1,0.2,0.3", (0.5,), (0.1, 0.2, 0.3))])
def test_custom_normalisation(text, mean, std):
    assert parse_normalization(text) == Normalization(mean, std)


@pytest.mark.parametrize("text, words", [("0.1,0.2,0.3", "has 3 values"), ("0.5,0", "positive"),
                                         ("a,b", "unknown normalisation"), ("1;2;3", "semicolons"),
                                         ("0.1,0.2;0.3,0.4,0.5", "2 means but 3"), ("0.5,nan", "non-finite"),
                                         ("imagenett", "unknown normalisation")])
def test_bad_normalisation(text, words):
    with pytest.raises(ConfigurationError) as exc:
        parse_normalization(text)
    assert words in _one_line(exc)


def test_normalisation_is_the_first_module(tmp_path):
    spec = _net_file(tmp_path)
    plain = load_model(spec, input_shape=(3, 2, 2), num_classes=4)
    torch.save(plain.model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(spec, input_shape=(3, 2, 2), num_classes=4, weights=tmp_path / "w.pt",
                        normalize="0.1,0.2,0.3;0.4,0.5,0.6")
    first = next(iter(loaded.model.children()))
    assert isinstance(first, Normalize) and not list(first.parameters())
    x = torch.rand(4, 3, 2, 2)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.model(x), plain.model((x - mean) / std))
    assert loaded.to_dict()["normalization"] == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "preset": None}


def test_normalisation_with_the_wrong_number_of_channels(tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        load_model("mlp", input_shape=(1, 8, 8), num_classes=10, normalize="imagenet")
    assert "3 channels" in _one_line(exc) and "input has 1" in str(exc.value)
    assert load_model("mlp", input_shape=(1, 8, 8), num_classes=10, normalize="0.5,0.5").normalization is not None


def test_normalisation_saved_with_the_weights_for_the_wrong_number_of_channels(tmp_path):
    plain = load_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    state = {"normalize.mean": torch.tensor([0.5, 0.5]), "normalize.std": torch.tensor([1.0, 1.0]),
             **{f"model.{k}": v for k, v in plain.model.state_dict().items()}}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigurationError) as exc:
        load_model("mlp", input_shape=(1, 8, 8), num_classes=10, weights=tmp_path / "w.pt")
    assert "2 channels" in _one_line(exc) and "input has 1" in str(exc.value)


def test_per_sample_engine_skips_the_parameter_free_normalisation():
    torch.manual_seed(0)
    model = load_model("cnn", model_args={"channels": (3,), "width": 6}, input_shape=(3, 4, 4), num_classes=3,
                       normalize="imagenet").model.double()
    x, y = torch.rand(6, 3, 4, 4, dtype=torch.float64), torch.arange(6) % 3
    reference = per_sample_squared_gradients(model, x, y, F.cross_entropy)
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {}

    def store(tracked, result):
        for attr, value in result.items():
            fast[names[id(tracked.params[attr])]] = value

    hooks = SquaredGradientHooks(model, on_result=store, budget=lambda tracked: 2**30)
    F.cross_entropy(model(x), y).backward()
    hooks.remove()
    assert set(fast) == set(reference) and not any(k.startswith("normalize") for k in fast)
    for name, value in reference.items():
        torch.testing.assert_close(fast[name], value, rtol=REL_TOL, atol=1e-12)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("factory, words", [
    ("raises", "raised RuntimeError: no GPU here"),
    ("not_a_module", "returned a list, not a torch.nn.Module"),
    ("three_d", "logits of shape (1, 4, 2, 2)"),
    ("fixed", "logits of shape (1, 5) for one input of shape (1, 3, 2, 2); expected (1, 4)"),
    ("missing", "no factory 'missing' there; it defines fixed, make, not_a_module, raises, three_d"),
    ("LIMIT", "'LIMIT' is not a factory (not callable: a value of type int)"),
])
def test_bad_factories(tmp_path, factory, words):
    spec = f"{_user_file(tmp_path)}:{factory}"
    with pytest.raises(ConfigurationError) as exc:
        load_model(spec, input_shape=(3, 2, 2), num_classes=4)
    text = _one_line(exc)
    assert words in text and (factory == "LIMIT" or factory in text)


def test_wrong_input_shape_is_named(tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        load_model(_net_file(tmp_path), input_shape=(3, 4, 4))
    assert "fails on an input of shape (1, 3, 4, 4)" in _one_line(exc)


@pytest.mark.parametrize("spec, words", [
    ("onnx:model.onnx", "not read by sturdy"), ("1bad:make", "unknown kind of model source"),
    ("net.py", "no factory"), ("no_such_module_xyz:make", "not on the Python path"), ("", "a model source is"),
    ("no_such_model", "unknown model 'no_such_model'"), ("nets.py:", "no valid factory name"),
])
def test_bad_specs(spec, words):
    with pytest.raises(ConfigurationError) as exc:
        load_model(spec, input_shape=(1, 8, 8), num_classes=10)
    assert words in _one_line(exc)


def test_missing_file_and_broken_file(tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        load_model(f"{tmp_path / 'absent.py'}:make", input_shape=(3, 2, 2))
    assert "model file not found" in _one_line(exc)
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n")
    with pytest.raises(ConfigurationError) as exc:
        load_model(f"{broken}:make", input_shape=(3, 2, 2))
    assert "importing model file" in _one_line(exc) and "SyntaxError" in str(exc.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"spec": "cnn", "num_classes": 10}, "needs an input shape"),
    ({"spec": "cnn", "input_shape": (1, 8, 8), "num_classes": 1}, "num_classes must be"),
    ({"spec": "cnn", "input_shape": "1,8", "num_classes": 10}, "input_shape must be"),
    ({"spec": "cnn", "input_shape": "a,b,c", "num_classes": 10}, "is not C,H,W"),
    ({"spec": "cnn", "input_shape": (1, 8, 8), "num_classes": 10, "model_args": {"num_classes": 3}}, "not as model"),
    ({"spec": "cnn", "input_shape": (1, 8, 8), "num_classes": 10, "device": "tpu"}, "invalid device"),
])
def test_bad_settings(kwargs, words):
    with pytest.raises(ConfigurationError) as exc:
        load_model(**kwargs)
    assert words in _one_line(exc)


def test_a_model_that_does_not_tell_its_shape(tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        load_model(_net_file(tmp_path))
    assert "does not tell its input shape" in _one_line(exc)
