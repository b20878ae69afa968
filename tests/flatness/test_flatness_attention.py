"""Second derivatives through attention: ``scaled_dot_product_attention`` (vision transformers, timm and torchvision)
picks fused kernels with no double backward on CPU; the curvature products run it on its math kernel, and give the
Hessian-vector product of the same attention written out by hand (softmax(QK^T / sqrt(d)) V)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.flatness._data import default_loss
from sturdy.flatness.hvp import batch_gradient, hvp
from sturdy.flatness.operator import CurvatureOperator

HVP_TOL = dict(rtol=1e-4, atol=1e-5)  # float32 (the fused kernels serve float32): the two differ by rounding only


class _Attention(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        q, k, v = self.qkv(x.reshape(-1, 1, 5, 4)).chunk(3, dim=-1)  # (batch, heads, tokens, features)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v
        return self.head(out.flatten(1))


def _pair():
    torch.manual_seed(0)
    fused = _Attention(fused=True)
    plain = _Attention(fused=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_hessian_vector_products_through_fused_attention_match_the_written_out_one():
    fused, plain = _pair()
    x, y = torch.randn(6, 20), torch.arange(6) % 3
    vec = [torch.randn_like(p) for p in fused.parameters()]
    got, want = ([*hvp(batch_gradient(m, x, y, list(m.parameters()), default_loss), list(m.parameters()), vec,
                       retain=False)] for m in (fused, plain))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **HVP_TOL)
    assert any(float(w.abs().max()) > 1e-3 for w in want)  # the products are not trivially zero


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_the_curvature_operator_runs_through_fused_attention(curvature):
    fused, plain = _pair()
    x, y = torch.randn(6, 20), torch.arange(6) % 3
    data = torch.utils.data.TensorDataset(x, y)
    ops = [CurvatureOperator(m, data, curvature=curvature, batch_size=4, loss_fn=None) for m in (fused, plain)]
    size = sum(p.numel() for p in fused.parameters())
    vectors = torch.randn(size, 2, dtype=torch.float64)
    torch.testing.assert_close(ops[0].matmat(vectors), ops[1].matmat(vectors), **HVP_TOL)
