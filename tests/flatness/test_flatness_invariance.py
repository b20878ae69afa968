"""The rescaling-invariance check: normalized sharpness unchanged, trace and norm products moved, mode kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sturdy.errors import DataError, UnsupportedModuleError
from sturdy.flatness import (
    InvarianceRow,
    RescalingInvariance,
    check_rescaling_invariance,
    hessian_diagonal,
    log_spectral_product,
    normalized_sharpness,
)
from sturdy.flatness.invariance import OUTPUT_DIFFERENCE
from sturdy.models import create_model

from .conftest import tiny_cnn, tiny_data

INVARIANCE_RTOL = 1e-6
OUTPUT_ATOL = 1e-10
REFERENCE_RTOL = 1e-12


def test_normalized_sharpness_invariant_baselines_not():
    model = tiny_cnn(4)
    x, y = tiny_data((2, 4, 4), n=20)
    inv = check_rescaling_invariance(model, (x, y), seed=3)
    assert isinstance(inv, RescalingInvariance)
    assert inv.samples == 20 and (inv.seed, inv.low, inv.high) == (3, 0.1, 10.0)
    for variant in ("arxiv", "icml"):
        row = inv.rows[f"normalized sharpness ({variant})"]
        assert row.original > 0 and row.ratio == pytest.approx(1.0, rel=INVARIANCE_RTOL)
    assert inv.rows["Hessian trace (exact GGN)"].ratio != pytest.approx(1.0, rel=0.1)
    assert inv.rows["product of spectral norms"].ratio != pytest.approx(1.0, rel=0.1)
    assert inv.output_difference < OUTPUT_ATOL
    assert inv.rows[OUTPUT_DIFFERENCE] == InvarianceRow(0.0, inv.output_difference, None)


def test_original_values_match_the_direct_computation():
    model = tiny_cnn(5)
    x, y = tiny_data((2, 4, 4), n=12)
    inv = check_rescaling_invariance(model, (x, y), seed=1)
    hd = hessian_diagonal(model, (x, y))
    assert inv.rows["normalized sharpness (arxiv)"].original == pytest.approx(
        normalized_sharpness(model, hessian=hd).value, rel=REFERENCE_RTOL)
    assert inv.rows["Hessian trace (exact GGN)"].original == pytest.approx(hd.trace(), rel=REFERENCE_RTOL)
    assert inv.rows["product of spectral norms"].original == pytest.approx(
        math.exp(log_spectral_product(model).value / 2), rel=REFERENCE_RTOL)


def test_model_mode_and_weights_are_kept_and_result_serialises():
    torch.manual_seed(0)
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, width=16)  # float32
    model.train()
    model[1].eval()  # mixed flags: every submodule's flag must come back
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))
    inv = check_rescaling_invariance(model, (x, y))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32
    d = inv.to_dict()
    json.dumps(d)
    assert set(d) == {"rows", "output_difference", "samples", "seed", "low", "high"}
    assert d["rows"][OUTPUT_DIFFERENCE]["ratio"] is None
    assert inv.table()[0][0] == "normalized sharpness (arxiv)" and len(inv.table()) == len(inv.rows)


def test_refusals():
    x, y = tiny_data((2, 4, 4), n=4)
    with pytest.raises(DataError, match="same number of samples"):
        check_rescaling_invariance(tiny_cnn(0), (x, y[:2]))
    with pytest.raises(DataError, match="an \\(inputs, targets\\) pair of tensors"):
        check_rescaling_invariance(tiny_cnn(0), [(x, y)])
    bn = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 8), width=16, batchnorm=True)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        check_rescaling_invariance(bn, (torch.rand(3, 1, 8, 8), torch.randint(0, 10, (3,))))
