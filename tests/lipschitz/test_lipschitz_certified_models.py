"""Networks built for certificates (docs/design.md section 1): their constants are proved by the rules of the
certificate, never assumed, and checked here against a dense SVD and a power iteration."""

from __future__ import annotations

import pytest
import torch

from sturdy.lipschitz import certify, lipschitz_bound, pgd_l2
from sturdy.models import AOLLinear, create_model

from .lipschitz_reference import dense_operator, jacobian_norms

SVD_REL = 1e-6  # the bound of a layer vs the dense SVD of the operator it applies


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16)])
def test_an_aol_layer_is_1_lipschitz_by_svd_power_iteration_and_bound(shape):
    torch.manual_seed(0)
    layer = AOLLinear(shape[1], shape[0]).double()
    with torch.no_grad():
        layer.weight.normal_()  # any weight: the rescaling makes it a contraction
    matrix = dense_operator(lambda t: layer(t) - layer.bias, (shape[1],))
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    u = torch.randn(shape[1], 1, dtype=torch.float64)
    for _ in range(200):
        u = matrix.T @ (matrix @ u)
        u = u / u.norm()
    assert float((matrix @ u).norm()) <= exact * (1 + SVD_REL) <= 1 + SVD_REL
    bound = lipschitz_bound(layer, input_shape=(1, shape[1]))
    assert exact * (1 - SVD_REL) <= bound.upper <= 1 + SVD_REL  # proved by the bound's own SVD, not assumed


@pytest.mark.parametrize("name, kwargs", [("aol", {"width": 32, "depth": 2}), ("liresnet", {"width": 4, "depth": 2})])
def test_certified_architectures_get_sound_bounds_and_certificates(name, kwargs):
    torch.manual_seed(1)
    model = create_model(name, in_shape=(1, 8, 8), num_classes=10, **kwargs).eval()
    x = torch.rand(12, 1, 8, 8)
    bound = lipschitz_bound(model, input_shape=(1, 1, 8, 8))
    assert bound.upper >= float(jacobian_norms(model, x).max()) * (1 - SVD_REL)
    y = model(x).argmax(1)
    cert = certify(model, x, y, bound=bound)
    idx = (cert.radius > 0).nonzero().flatten()
    attack = pgd_l2(model, x[idx], y[idx], eps=cert.radius[idx].float() * 0.999, steps=40, restarts=2)
    assert int(attack.success.sum()) == 0
    if name == "aol":
        assert all(layer.upper <= 1 + SVD_REL for layer in bound.per_layer if layer.kind == "linear")


def test_the_post_activation_resnet_folds_every_batchnorm_for_bound_and_tracker():
    from sturdy.lipschitz import LipschitzTracker

    torch.manual_seed(2)
    model = create_model("resnet", in_shape=(1, 8, 8), num_classes=10, widths=(4, 8), layout="post").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_var.uniform_(0.1, 2.0)
                m.weight.uniform_(0.5, 1.5)
    bound = lipschitz_bound(model, input_shape=(1, 1, 8, 8))
    kinds = [layer.kind for layer in bound.per_layer]
    assert "batchnorm" not in kinds and kinds.count("conv2d+bn") == 6  # folded: one norm per conv+BN pair
    pre = create_model("resnet", in_shape=(1, 8, 8), num_classes=10, widths=(4, 8), layout="pre").eval()
    assert "batchnorm" in [layer.kind for layer in lipschitz_bound(pre, input_shape=(1, 1, 8, 8)).per_layer]
    tracker = LipschitzTracker(model, input_shape=(1, 1, 8, 8), warmup_iterations=300)
    estimate = tracker.current_estimate()
    assert estimate <= bound.upper * (1 + 1e-6) and estimate >= 0.9 * bound.upper  # the same (folded) constant
    x = torch.rand(8, 1, 8, 8)
    assert bound.upper >= float(jacobian_norms(model, x).max()) * (1 - SVD_REL)
