"""Honest exactness, coverage of layers and input validation at the public boundary (float64, tiny nets)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.flatness import (
    compute_measures,
    hessian_diagonal,
    hutchinson_trace,
    normalized_sharpness,
    top_hessian_eigenvalue,
)
from sturdy.flatness.exactness import analyse_graph
from sturdy.flatness.normalized import layer_matrices

from .conftest import tiny_cnn, tiny_data, tiny_mlp
from .flatness_reference import ggn_diagonal_reference, hessian_diagonal_reference

EXACT_ATOL = 1e-12  # GGN diagonal vs dense references, float64 (entries are O(0.1))
EXACT_RTOL = 1e-10
TRACE_GAP = 0.02  # relative gap between GGN and Hessian traces that a GELU net must show


def _gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3)).double()


def _assert_close(result, reference):
    assert set(result) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(result[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


# ----------------------------------------------------------------------------- 1. exactness


def test_gelu_mlp_gives_the_ggn_diagonal_and_says_it_is_not_the_hessian():
    model = _gelu_mlp()
    x, y = tiny_data((1, 3, 4), n=8)
    hd = hessian_diagonal(model, (x, y))
    _assert_close(hd.diagonal, ggn_diagonal_reference(model, x, y))
    hess = hessian_diagonal_reference(model, x, y)
    ggn_trace, hess_trace = hd.trace(), float(sum(h.sum() for h in hess.values()))
    assert abs(ggn_trace - hess_trace) > TRACE_GAP * abs(hess_trace)  # the two differ: naming matters
    assert hd.quantity == "ggn_diagonal" and hd.is_hessian is False and hd.reasons == ("Gelu",)
    assert hd.to_dict()["is_hessian"] is False and hd.to_dict()["quantity"] == "ggn_diagonal"
    ns = normalized_sharpness(model, (x, y))
    assert ns.is_hessian is False and ns.quantity == "ggn_diagonal" and ns.to_dict()["is_hessian"] is False
    with pytest.raises(ConfigurationError, match=r"require_hessian=True .*\(Gelu\).*method='hutchinson'"):
        normalized_sharpness(model, (x, y), require_hessian=True)
    hutch = hessian_diagonal(model, (x, y), method="hutchinson", probes=4)
    assert hutch.quantity == "hessian_diagonal" and hutch.is_hessian
    normalized_sharpness(model, hessian=hutch, require_hessian=True)  # a (stochastic) Hessian diagonal passes
    measures = compute_measures(model, (x, y), names=["normalized_sharpness", "ggn_trace"])
    assert measures["normalized_sharpness"].details["is_hessian"] is False
    assert measures["ggn_trace"].details["reasons"] == ["Gelu"]


@pytest.mark.parametrize(
    "make,shape", [(lambda: tiny_mlp(1, inplace=True), (1, 3, 4)), (lambda: tiny_cnn(1), (2, 4, 4))]
)
def test_relu_networks_are_proven_hessian(make, shape):
    model = make()
    x, y = tiny_data(shape, n=6)
    hd = hessian_diagonal(model, (x, y), chunk_size=4)
    assert hd.is_hessian is True and hd.reasons == ()
    _assert_close(hd.diagonal, hessian_diagonal_reference(model, x, y))
    assert normalized_sharpness(model, (x, y), require_hessian=True).is_hessian is True


class _TiedSquare(nn.Module):
    """One Linear applied twice: the logits are quadratic in its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x.flatten(1))))))


@pytest.mark.parametrize("make,reason", [
    (lambda: _TiedSquare(), "(one parameter reaches two factors)"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)), "NativeLayerNorm"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), "Tanh"),
])
def test_operators_that_break_exactness_are_named(make, reason):
    torch.manual_seed(2)
    model = make().double()
    x, y = tiny_data((1, 2, 2), n=5)
    hd = hessian_diagonal(model, (x, y))
    assert hd.is_hessian is False and any(reason in r for r in hd.reasons)
    _assert_close(hd.diagonal, ggn_diagonal_reference(model, x, y))


def test_graph_analysis_of_products_and_divisions():
    w = nn.Parameter(torch.randn(3, dtype=torch.float64))
    v = nn.Parameter(torch.randn(3, dtype=torch.float64))
    assert analyse_graph((w * v).sum(0, keepdim=True)).is_hessian  # bilinear in two parameters
    assert not analyse_graph((w * w).sum(0, keepdim=True)).is_hessian  # quadratic in one
    assert analyse_graph(w / 2.0).is_hessian
    assert analyse_graph(torch.relu(w) - w.abs()).is_hessian
    assert analyse_graph(w / v).reasons == ("Div (a parameter in the denominator)",)


# ----------------------------------------------------------------------------- 2. coverage


class _Sequence(nn.Module):
    """Embedding -> Conv1d (grouped, dilated) -> depthwise Conv1d -> Linear: every layer has a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.depthwise = nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=False)
        self.head = nn.Linear(6 * 5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # (N, 4, T)
        h = torch.relu(self.depthwise(torch.relu(self.conv(h))))
        return self.head(h.flatten(1))


def test_embedding_and_grouped_dilated_conv1d_are_covered_and_exact():
    torch.manual_seed(3)
    model = _Sequence().double()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 6, (7, 5), generator=gen), torch.randint(0, 3, (7,), generator=gen)
    hd = hessian_diagonal(model, (x, y), chunk_size=3)
    _assert_close(hd.diagonal, ggn_diagonal_reference(model, x, y))
    assert hd.is_hessian  # embedding lookups, convolutions and ReLUs: piecewise linear
    _assert_close(hd.diagonal, hessian_diagonal_reference(model, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to warn about
        ns = normalized_sharpness(model, (x, y), strict=True)
    assert set(ns.per_layer) == {"embed", "conv", "depthwise", "head"} and ns.skipped == ()
    assert ns.per_layer["embed"].shape == (4, 6)  # (dim, tokens)
    assert ns.per_layer["conv"].shape == (6, 4) and ns.per_layer["depthwise"].shape == (6, 6)


def test_grouped_layer_matrices_are_block_diagonal():
    conv = nn.Conv2d(4, 6, 3, groups=2).double()
    h = torch.rand_like(conv.weight)
    hh, ss = layer_matrices(conv, h)
    assert hh.shape == (6, 4)
    torch.testing.assert_close(hh[:3, :2], h[:3].sum((2, 3)))
    torch.testing.assert_close(hh[3:, 2:], h[3:].sum((2, 3)))
    assert float(hh[:3, 2:].abs().sum() + hh[3:, :2].abs().sum() + ss[:3, 2:].abs().sum()) == 0.0


class _WithBareMatrix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 4, dtype=torch.float64) / 2)
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x.flatten(1) @ self.proj))


def test_uncovered_matrices_are_listed_with_a_warning_or_refused():
    torch.manual_seed(5)
    model = _WithBareMatrix()
    x, y = tiny_data((1, 2, 2), n=5)
    with pytest.warns(UserWarning, match="trainable matrices proj are not covered"):
        ns = normalized_sharpness(model, (x, y))
    assert ns.skipped == ("proj",) and list(ns.per_layer) == ["head"] and ns.to_dict()["skipped"] == ["proj"]
    with pytest.raises(ConfigurationError, match=r"proj are not covered \(strict=True\)"):
        normalized_sharpness(model, (x, y), strict=True)
    assert "proj" in hessian_diagonal(model, (x, y)).diagonal  # the diagonal itself covers every parameter


# ----------------------------------------------------------------------------- 3. validation


def _bad_data():
    x, y = tiny_data((1, 3, 4), n=6)
    nan_x = x.clone()
    nan_x[4, 0, 1, 1] = float("nan")
    inf_x = x.clone()
    inf_x[2, 0, 0, 0] = float("inf")
    return {
        "out of range": ((x, y + 5), r"class indices in \[0, 2\] for a model with 3 outputs, got values in \[5, 7\]"),
        "negative": ((x, y - 3), r"class indices in \[0, 2\].*got values in \[-3,"),
        "float labels": ((x, y.double()), "integer class indices, got dtype torch.float64; convert with y.long()"),
        "bool labels": ((x, y > 0), "integer class indices, got dtype torch.bool"),
        "2-D labels": ((x, y[:, None]), r"shape \(N,\), one class index per sample, got shape \(6, 1\)"),
        "lengths": ((x, y[:4]), "same number of samples, got 6 and 4"),
        "nan": ((nan_x, y), "NaN or inf values .*the first is sample 4"),
        "inf": ((inf_x, y), "NaN or inf values .*the first is sample 2"),
        "loader nan": ([(x[:3], y[:3]), (nan_x[3:], y[3:])], r"batch 1 \(samples 3 to 5\).*the first is sample 4"),
    }


@pytest.mark.parametrize("case", sorted(_bad_data()))
def test_public_functions_refuse_bad_data_with_actionable_messages(case):
    model = tiny_mlp(0)
    data, message = _bad_data()[case]
    calls = [
        lambda: hessian_diagonal(model, data),
        lambda: hessian_diagonal(model, data, method="ggn-mc", mc_samples=4),
        lambda: hessian_diagonal(model, data, method="hutchinson", probes=2),
        lambda: normalized_sharpness(model, data),
        lambda: hutchinson_trace(model, data, probes=2),
        lambda: top_hessian_eigenvalue(model, data, iterations=2),
        lambda: compute_measures(model, data, names=["log_spectral_product", "pacbayes_flatness"]),
    ]
    for call in calls:
        with pytest.raises(DataError, match=message):
            call()


def test_custom_losses_keep_float_targets():
    model = nn.Linear(3, 1).double()
    x, y = tiny_data((3,), n=5)
    mse = lambda out, t: ((out.squeeze(1) - t) ** 2).mean()  # noqa: E731
    est = hutchinson_trace(model, (x, y.double()), probes=2, loss_fn=mse)
    assert est.value > 0
    with pytest.raises(DataError, match="NaN or inf"):
        hutchinson_trace(model, (x * float("nan"), y.double()), probes=2, loss_fn=mse)
