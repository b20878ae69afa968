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
    with pytest.raises(ConfigurationError, match="unknown model 'vgg'; known models: cnn"):
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
