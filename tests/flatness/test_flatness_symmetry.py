"""Attention symmetries: random per-head transforms leave the function and the balanced normalized sharpness
unchanged, while plain normalized sharpness (and the same matrices unbalanced) move."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.flatness import (
    available_measures,
    balance_attention,
    balanced_normalized_sharpness,
    compute_measures,
    linear_heads,
    normalized_sharpness,
    register_attention,
    transform_attention,
)

FUNCTION_TOL = 1e-12  # float64: the transforms (condition number up to 10) keep the outputs to rounding
INVARIANCE_RTOL = 1e-8  # balanced value of transformed copies (QR, SVD and the solver's 1e-12 stopping rule)
MOVES_RTOL = 1e-3  # plain normalized sharpness moves by more than this (measured: 2-10%)
SEEDS = (1, 2, 3)


class HandWritten(nn.Module):
    """Multi-head self-attention written out: four Linear projections, heads split by reshaping."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


@register_attention(HandWritten)
def _hand_written(module: nn.Module) -> object:
    return linear_heads(module.q, module.k, module.v, module.o, module.heads)


class Classifier(nn.Module):
    def __init__(self, kind: str, dim: int = 8, heads: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(3, dim)
        self.attention = (nn.MultiheadAttention(dim, heads, batch_first=True) if kind == "torch"
                          else HandWritten(dim, heads))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        a = self.attention(h, h, h)[0] if self.kind == "torch" else self.attention(h)
        return self.head((h + a).mean(1))


def _problem(kind: str):
    torch.manual_seed(0)
    model = Classifier(kind).double().eval()
    x = torch.randn(24, 5, 3, dtype=torch.float64)
    return model, (x, torch.randint(0, 4, (24,)))


@pytest.mark.parametrize("kind", ["torch", "hand-written"])
def test_balanced_sharpness_does_not_move_under_attention_symmetries(kind):
    model, data = _problem(kind)
    base = balanced_normalized_sharpness(model, data)
    unbalanced = balanced_normalized_sharpness(model, data, balance=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in_proj_weight is outside plain normalized sharpness
        plain = normalized_sharpness(model, data).value
    assert base.heads == 4 and base.balanced and base.value > 0  # 2 heads x (query-key, value-output)
    for seed in SEEDS:
        moved = transform_attention(model, seed=seed)
        torch.testing.assert_close(moved(data[0]), model(data[0]), rtol=0, atol=FUNCTION_TOL)
        assert balanced_normalized_sharpness(moved, data).value == pytest.approx(base.value, rel=INVARIANCE_RTOL)
        assert abs(balanced_normalized_sharpness(moved, data, balance=False).value - unbalanced.value) > \
            MOVES_RTOL * unbalanced.value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert abs(normalized_sharpness(moved, data).value - plain) > MOVES_RTOL * plain


def test_balanced_form_is_balanced_and_keeps_the_function():
    model, data = _problem("torch")
    balanced = balance_attention(model)
    torch.testing.assert_close(balanced(data[0]), model(data[0]), rtol=0, atol=FUNCTION_TOL)
    w = balanced.attention.in_proj_weight.detach()
    for h in range(2):
        q, k = w[h * 4:(h + 1) * 4].t(), w[8 + h * 4:8 + (h + 1) * 4].t()  # E x d per head
        torch.testing.assert_close(q.t() @ q, k.t() @ k)  # P^T P = Q^T Q = S
        gram = q.t() @ q
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()))  # diagonal
    assert model.attention.in_proj_weight.data_ptr() != w.data_ptr()  # a copy: the model is not modified


def test_without_attention_it_is_normalized_sharpness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    result = balanced_normalized_sharpness(model, (x, y))
    assert result.heads == 0
    assert result.value == pytest.approx(normalized_sharpness(model, (x, y)).value, rel=1e-12)


def test_registered_measure_and_its_settings():
    model, data = _problem("hand-written")
    assert "balanced_normalized_sharpness" in available_measures()
    ms = compute_measures(model, data, names=["balanced_normalized_sharpness"],
                          settings={"balanced_normalized_sharpness": {"variant": "icml"}})
    m = ms["balanced_normalized_sharpness"]
    assert m.details["heads"] == 4 and m.details["variant"] == "icml" and m.details["curvature"] == "ggn_diagonal"
    with pytest.raises(ConfigurationError, match="does not accept the settings rho"):
        compute_measures(model, data, names=["balanced_normalized_sharpness"],
                         settings={"balanced_normalized_sharpness": {"rho": 1.0}})


def test_refusals():
    model, data = _problem("torch")
    with pytest.raises(ConfigurationError, match="variant must be one of"):
        balanced_normalized_sharpness(model, data, variant="adam")
    with pytest.raises(ConfigurationError, match="condition must be a finite number >= 1"):
        transform_attention(model, condition=0.5)
    odd = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    with pytest.raises(UnsupportedModuleError, match="add_bias_kv"):
        balance_attention(odd)
    low_rank = Classifier("torch").double()
    with torch.no_grad():
        low_rank.attention.in_proj_weight[:4] = 0.0  # head 0's queries: a zero query-key product
    with pytest.raises(ConfigurationError, match="rank-deficient"):
        balance_attention(low_rank)
