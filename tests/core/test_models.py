import pytest
import torch
import torch.fx
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.models import available_models, create_model

FX_TOL = dict(rtol=1e-6, atol=1e-6)

SHAPES = {
    "linear": [(1, 8, 8)],
    "mlp": [(1, 8, 8), (3, 5, 7)],
    "cnn": [(1, 8, 8), (3, 9, 6)],
    "resnet": [(1, 8, 8), (3, 16, 16)],
    "wrn": [(3, 32, 32)],
    "resnet18": [(3, 32, 32)],
    "resnet50": [(3, 32, 32)],
}
SMALL = {"wrn": dict(depth=10, widen=1)}


def test_registry_has_the_reference_models():
    assert set(SHAPES) <= set(available_models())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_and_fx_trace(name):
    for in_shape in SHAPES[name]:
        torch.manual_seed(0)
        model = create_model(name, in_shape=in_shape, num_classes=7, **SMALL.get(name, {})).eval()
        x = torch.rand(3, *in_shape)
        out = model(x)
        assert out.shape == (3, 7)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), out, **FX_TOL)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and linears[-1].out_features == 7  # classifier is the last Linear


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
def test_cnn_options(pool):
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, pool=pool, batchnorm=True, channels=(4, 8))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigurationError, match="unknown model 'vgg'; known models: aol, cnn"):
        create_model("vgg", in_shape=(1, 8, 8), num_classes=10)


def test_unknown_option_lists_options():
    with pytest.raises(ConfigurationError, match="model 'mlp' has no option.*depth, width"):
        create_model("mlp", in_shape=(1, 8, 8), num_classes=10, channels=3)


def test_bad_shapes_and_values():
    with pytest.raises(ConfigurationError, match="in_shape must be"):
        create_model("mlp", in_shape=(8, 8), num_classes=10)
    with pytest.raises(ConfigurationError, match="num_classes must be >= 2"):
        create_model("mlp", in_shape=(1, 8, 8), num_classes=1)
    with pytest.raises(ConfigurationError, match="wrn depth must be 6n\\+4"):
        create_model("wrn", in_shape=(3, 32, 32), num_classes=10, depth=15)
    with pytest.raises(ConfigurationError, match="pool must be"):
        create_model("cnn", in_shape=(1, 8, 8), num_classes=10, pool="median")


def test_wrn16_4_size():
    model = create_model("wrn", in_shape=(3, 32, 32), num_classes=10, depth=16, widen=4)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.6e6 < n_params < 2.9e6  # WRN-16-4 has about 2.75M parameters


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnets_match_the_paper_sizes(name, params):
    # parameter counts of the reference ImageNet models (1000 classes, BatchNorm, option-B projections)
    model = create_model(name, in_shape=(3, 224, 224), num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnets_without_batchnorm(name):
    torch.manual_seed(0)
    model = create_model(name, in_shape=(3, 32, 32), num_classes=5, batchnorm=False).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_resnet50_stride_placement():
    paper = create_model("resnet50", in_shape=(3, 64, 64), num_classes=10)
    v15 = create_model("resnet50", in_shape=(3, 64, 64), num_classes=10, stride_in_3x3=True)
    assert paper.layer2[0].conv1.stride == (2, 2) and paper.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    x = torch.rand(1, 3, 64, 64)
    assert paper.eval()(x).shape == v15.eval()(x).shape == (1, 10)
