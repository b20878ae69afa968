"""``--model torchvision:NAME`` and ``--model timm:NAME`` against the real packages, where they are installed (the
default environment has neither: these tests are then skipped, and tests/core/test_model_sources.py covers the
same paths with stand-ins). Randomly initialised models only: nothing is downloaded.

What they pin down: ``num_classes``, timm's ``in_chans`` and the image size a vision transformer is built for; a
saved ``state_dict`` loaded with ``--weights`` giving the same logits, weights of another head refused; the
Lipschitz bound of a torchvision and a timm ResNet (BatchNorm folded, timm's zero-initialised residual BatchNorm,
in-place ReLU) at least the largest Jacobian norm found, and the layers without a sound rule (LayerNorm, the
squeeze-excitation product, attention) refused in one line; the command line from training to every analysis."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sturdy.cli import main
from sturdy.errors import CheckpointError, SturdyError, UnsupportedModuleError
from sturdy.lipschitz import lipschitz_bound
from sturdy.model_sources import load_model
from sturdy.normalize import normalized, parse_normalization

SOUND_SLACK = 1e-6  # relative: the guaranteed bound against a Jacobian norm computed in float64
EXACT = dict(rtol=0.0, atol=0.0)


def _jacobian_norm(model: torch.nn.Module, x: torch.Tensor) -> float:
    net = copy.deepcopy(model).to(torch.float64).eval()
    jac = torch.autograd.functional.jacobian(lambda t: net(t.unsqueeze(0))[0], x.to(torch.float64))
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Random running statistics and affine parameters (a trained network's BatchNorm is not the identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))


def _sound(model: torch.nn.Module, shape, points: int = 3) -> float:
    bound = lipschitz_bound(model, input_shape=(1, *shape))
    torch.manual_seed(1)
    found = max(_jacobian_norm(model, torch.rand(*shape)) for _ in range(points))
    assert found <= bound.upper * (1 + SOUND_SLACK)
    return bound.upper


# ----------------------------------------------------------------------------------------- torchvision


def test_torchvision_resnet18_classes_weights_and_normalisation(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    loaded = load_model("torchvision:resnet18", num_classes=3, input_shape=(3, 32, 32), normalize="imagenet",
                        weights=tmp_path / "r18.pt")
    assert (loaded.kind, loaded.num_classes, loaded.input_shape) == ("torchvision", 3, (1, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = normalized(source, parse_normalization("imagenet"))(x)
        torch.testing.assert_close(loaded.model.eval()(x), want, **EXACT)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet_head.pt")
    with pytest.raises(CheckpointError, match=r"another architecture \(fc\.weight is \(1000, 512\) there, \(3, 512\)"):
        load_model("torchvision:resnet18", num_classes=3, input_shape=(3, 32, 32),
                   weights=tmp_path / "imagenet_head.pt")
    assert load_model("torchvision:resnet18").input_shape == (1, 3, 224, 224)  # its default size and 1000 classes


def test_torchvision_resnet18_bound_is_sound():
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:resnet18", num_classes=3, input_shape=(3, 8, 8), normalize="imagenet")
    _randomize_batchnorm(loaded.model)
    _sound(loaded.model.eval(), (3, 8, 8))


def test_torchvision_vision_transformer_on_small_images_is_refused_by_the_bound():
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:vit_b_16", num_classes=3, input_shape=(3, 32, 32))
    assert loaded.model(torch.rand(2, 3, 32, 32)).shape == (2, 3)  # built for 32x32 (image_size)
    first_norm = r"no Lipschitz bound for LayerNorm at 'encoder\.layers\.encoder_layer_0\.ln_1'"
    with pytest.raises(UnsupportedModuleError, match=first_norm):
        lipschitz_bound(loaded.model, input_shape=loaded.input_shape)


# ----------------------------------------------------------------------------------------- timm


def test_timm_resnet18_in_chans_weights_and_a_sound_bound(tmp_path):
    timm = pytest.importorskip("timm")
    gray = load_model("timm:resnet18", num_classes=4, input_shape=(1, 16, 16))
    assert gray.model.conv1.in_channels == 1 and gray.model(torch.rand(2, 1, 16, 16)).shape == (2, 4)
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=3, pretrained=False).eval()
    torch.save({"state_dict": source.state_dict(), "epoch": 1}, tmp_path / "timm_r18.pt")
    loaded = load_model("timm:resnet18", num_classes=3, input_shape=(3, 16, 16), weights=tmp_path / "timm_r18.pt")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), source(x), **EXACT)
    # timm zero-initialises the last BatchNorm of each block: those branches are exactly zero operators
    assert _sound(loaded.model.eval(), (3, 16, 16)) > 0
    _randomize_batchnorm(loaded.model)
    _sound(loaded.model.eval(), (3, 16, 16))


@pytest.mark.parametrize("name, refused", [
    ("vit_tiny_patch16_224", "(?i)layer_?norm"),
    ("convnext_atto", "(?i)layer_?norm"),
    ("efficientnet_b0", "depends on the input through 2 arguments"),  # squeeze-excitation: x * gate(x)
])
def test_timm_models_without_a_sound_rule_are_refused_in_one_line(name, refused):
    pytest.importorskip("timm")
    loaded = load_model(f"timm:{name}", num_classes=3, input_shape=(3, 32, 32), normalize="imagenet")
    assert loaded.model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 3)  # ViT: built for 32x32 (img_size)
    with pytest.raises(SturdyError, match=refused) as exc:
        lipschitz_bound(loaded.model, input_shape=loaded.input_shape)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 training and 6 test images, 3x16x16 uint8, 3 classes told apart by their colour."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    labels = np.arange(18) % 3
    pixels = rng.integers(0, 60, (18, 3, 16, 16)).astype(np.uint8)
    pixels[np.arange(18), labels] += 180
    np.savez(root / "colours.npz", train_images=pixels[:12], train_labels=labels[:12], test_images=pixels[12:],
             test_labels=labels[12:])
    return root / "colours.npz"


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_every_command_on_a_hub_model(tmp_path, images, capsys, spec):
    pytest.importorskip(spec.partition(":")[0])
    data = f"npz:{images}"
    run = tmp_path / "run"
    _run(capsys, "train", "--model", spec, "--data", data, "--normalize", "imagenet", "--epochs", "1",
         "--batch-size", "6", "--out", str(run), "--no-progress")
    results = json.loads((run / "results.json").read_text())
    assert results["sources"]["model"]["spec"] == spec and (run / "train_report.html").is_file()
    own = ["--model", spec, "--weights", str(run / "model.pt"), "--data", data]  # normalisation read from weights
    out = json.loads(_run(capsys, "evaluate", *own))
    assert out["sources"]["model"]["normalization"]["std"] == [0.229, 0.224, 0.225]  # the ImageNet preset
    assert out["test_accuracy"] == pytest.approx(json.loads(_run(capsys, "evaluate", "--checkpoint",
                                                                 str(run / "model.pt")))["test_accuracy"])
    _run(capsys, "lipschitz", "certify", *own, "--limit", "4", "--out", str(tmp_path / "cert"), "--no-progress")
    cert = json.loads((tmp_path / "cert" / "certify.json").read_text())
    assert cert["per_layer"][0]["kind"] == "normalize" and cert["lipschitz_upper"] > 0
    _run(capsys, "fourier", "heatmap", *own, "--eps", "2", "--limit", "4", "--stride", "8", "--out",
         str(tmp_path / "heat"), "--no-progress")
    assert (tmp_path / "heat" / "heatmap.json").is_file()
    _run(capsys, "flatness", "measure", *own, "--measures", "normalized_sharpness,hessian_trace", "--limit", "8",
         "--out", str(tmp_path / "flat"), "--no-progress")
    assert set(json.loads((tmp_path / "flat" / "measures.json").read_text())["measures"]) == {
        "normalized_sharpness", "hessian_trace"}


def test_flatness_of_a_vision_transformer(tmp_path, images, capsys):
    pytest.importorskip("timm")  # attention's fused CPU kernel has no second derivative: the math kernel is used
    _run(capsys, "flatness", "measure", "--model", "timm:vit_tiny_patch16_224", "--data", f"npz:{images}",
         "--measures", "hessian_trace", "--limit", "4", "--out", str(tmp_path / "flat"), "--no-progress")
    measures = json.loads((tmp_path / "flat" / "measures.json").read_text())["measures"]
    assert np.isfinite(measures["hessian_trace"]["value"])
