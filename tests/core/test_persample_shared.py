"""Modules whose input is shared across the batch (or not batch-major) against per-sample loops (float64).

Every rule reads dimension 0 as the samples; a positional embedding of ``torch.arange(T)``, a layer applied
to a learned query, a broadcast (expanded) input, a reshaped ``(B * T, d)`` or time-major input break that.
Each case is checked through the compression statistic (the backward hooks), the GGN diagonal and
normalized sharpness, against loops of one sample at a time.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.compression import attach_squared_gradient_statistics
from sturdy.errors import UnsupportedModuleError
from sturdy.flatness import hessian_diagonal, normalized_sharpness
from sturdy.persample import per_sample_squared_gradients
from sturdy.persample.batching import batch_followers, follows_batch

REL_TOL = 1e-9  # float64 engine vs per-sample loops
ABS_TOL = 1e-12
NS_REL_TOL = 1e-7  # normalized sharpness from the engine's diagonal vs from the loop's (solver tol 1e-10)
BATCH = 6
CLASSES = 3


class PositionalEmbedding(nn.Module):
    """Token plus positional embedding, the standard pattern ``self.pos(torch.arange(T))[None]``."""

    def __init__(self, length: int, *, expand: bool = False) -> None:
        super().__init__()
        self.expand = expand
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(length, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        if self.expand:  # position ids broadcast to the batch: (B, T), stride 0
            h = self.tok(idx) + self.pos(positions[None].expand_as(idx))
        else:
            h = self.tok(idx) + self.pos(positions)[None]
        return self.head(torch.relu(self.norm(h)).mean(1))


class Scale(nn.Module):
    """A layer without a registered rule (the generic rule)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class SharedQuery(nn.Module):
    """Layers applied to a learned query (a parameter-like input shared by every sample)."""

    def __init__(self, inner: str) -> None:
        super().__init__()
        self.inner = inner
        self.query = nn.Parameter(torch.randn(5, 4))
        layers = {"linear": nn.Linear(4, 4), "layernorm": nn.LayerNorm(4), "batchnorm": nn.BatchNorm1d(4),
                  "generic": Scale(4)}
        self.shared = layers[inner]
        self.inp = nn.Linear(4, 4)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        keys = self.shared(self.query)  # (5, 4), the same for every sample
        return self.head(torch.tanh(self.inp(x) @ keys.t()))


class ExpandedInput(nn.Module):
    """A Linear applied to a query broadcast to the batch (stride 0: the rule applies, each row per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4))
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x + self.lin(self.query.expand(x.shape[0], -1))))


class ConvTemplate(nn.Module):
    """A convolution of a learned template image added to every sample's feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.template = nn.Parameter(torch.randn(1, 2, 4, 4))
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.features = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.features(x) + self.conv(self.template)).flatten(1))


class Reshaped(nn.Module):
    """A Linear on the tokens of all samples at once, ``(B * T, d)``, or time-major ``(T, B, d)``."""

    def __init__(self, time_major: bool) -> None:
        super().__init__()
        self.time_major = time_major
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        if self.time_major:
            h = self.lin(x.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.lin(x.reshape(b * t, d)).reshape(b, t, -1)
        return self.head(torch.tanh(h).mean(1))


def _tokens(length: int) -> Tensor:
    return torch.randint(0, 7, (BATCH, length))


CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "embedding-positional": (lambda: PositionalEmbedding(5), lambda: _tokens(5)),
    "embedding-positional-length-equals-batch": (lambda: PositionalEmbedding(BATCH), lambda: _tokens(BATCH)),
    "linear-on-learned-query": (lambda: SharedQuery("linear"), lambda: torch.randn(BATCH, 4)),
    "layernorm-on-learned-query": (lambda: SharedQuery("layernorm"), lambda: torch.randn(BATCH, 4)),
    "batchnorm-on-learned-query": (lambda: SharedQuery("batchnorm"), lambda: torch.randn(BATCH, 4)),
    "generic-on-learned-query": (lambda: SharedQuery("generic"), lambda: torch.randn(BATCH, 4)),
    "linear-on-expanded-query": (ExpandedInput, lambda: torch.randn(BATCH, 4)),
    "embedding-expanded-position-ids": (lambda: PositionalEmbedding(5, expand=True), lambda: _tokens(5)),
    "conv-on-learned-template": (ConvTemplate, lambda: torch.randn(BATCH, 2, 4, 4)),
    "linear-on-reshaped-tokens": (lambda: Reshaped(False), lambda: torch.randn(BATCH, 5, 4)),
    "linear-time-major": (lambda: Reshaped(True), lambda: torch.randn(BATCH, 5, 4)),
    "linear-time-major-length-equals-batch": (lambda: Reshaped(True), lambda: torch.randn(BATCH, BATCH, 4)),
}


def _problem(case: str) -> Tuple[nn.Module, Tensor, Tensor]:
    make, inputs = CASES[case]
    torch.manual_seed(3)
    model = make().double().eval()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode BatchNorm
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, CLASSES, (BATCH,))
    return model, x, y


def _ggn_loop(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """Exact GGN diagonal by one backward pass per (sample, class): ``(1/N) sum_n sum_c (J_n^T v_nc)^2``."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])[0]
        p = torch.softmax(logits.detach(), 0)
        for c in range(logits.shape[0]):
            v = p[c].sqrt() * (torch.eye(logits.shape[0], dtype=p.dtype)[c] - p)
            grads = torch.autograd.grad(logits, list(params.values()), v, retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    out[n] += g * g / x.shape[0]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_compression_statistic_of_shared_inputs_matches_a_per_sample_loop(case):
    model, x, y = _problem(case)
    reference = per_sample_squared_gradients(model, x, y, F.cross_entropy)
    stats = attach_squared_gradient_statistics(model)
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(stats.get(p), reference[name], rtol=REL_TOL, atol=ABS_TOL, msg=name)
    stats.remove()


@pytest.mark.parametrize("case", sorted(CASES))
def test_ggn_diagonal_and_normalized_sharpness_of_shared_inputs_match_a_per_sample_loop(case):
    model, x, y = _problem(case)
    reference = _ggn_loop(model, x, y)
    exact = hessian_diagonal(model, (x, y), method="ggn-exact")
    for name, d in reference.items():
        torch.testing.assert_close(exact.diagonal[name], d, rtol=REL_TOL, atol=ABS_TOL, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bare parameters (the learned queries) are outside the measure
        ns = normalized_sharpness(model, (x, y), method="ggn-exact")
        expected = normalized_sharpness(model, hessian=reference)
    assert ns.value == pytest.approx(expected.value, rel=NS_REL_TOL)


def test_positional_embedding_of_the_issue_no_longer_inflates_its_curvature():
    """Before: the pos weight's GGN diagonal summed to 4x the truth and the statistic was 77% off."""
    model, x, y = _problem("embedding-positional")
    hooked = hessian_diagonal(model, (x, y), method="ggn-exact").diagonal["pos.weight"]
    func = hessian_diagonal(model, (x, y), method="ggn-exact", backend="func").diagonal["pos.weight"]
    torch.testing.assert_close(hooked, func, rtol=REL_TOL, atol=ABS_TOL)


def test_follows_batch_and_the_probe():
    a, out = torch.zeros(4, 3), torch.zeros(4, 2)
    assert follows_batch(a, out, 4) and follows_batch(torch.zeros(5), out, 1)
    assert not follows_batch(torch.zeros(5, 3), out, 4)  # another leading dimension
    assert follows_batch(torch.zeros(1, 3).expand(4, 3), out, 4)  # broadcast before the call: rows per sample
    assert not follows_batch(torch.zeros(()), out, 4)
    model = PositionalEmbedding(4).double()
    x = _tokens(4)
    followers = batch_followers(model, [model.tok, model.pos, model.head], (x,), None, x.shape[0])
    assert followers == {id(model.tok), id(model.head)}  # arange(T) keeps length T at one sample


def test_the_probe_changes_no_state_in_training_mode():
    """Training-mode BatchNorm, dropout: the probe keeps running statistics, modes and the random stream."""
    torch.manual_seed(0)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), SharedQuery("linear")).double()

    plain, hooked = make(), make()
    x = torch.randn(BATCH, 4, dtype=torch.float64)
    stats = attach_squared_gradient_statistics(hooked)
    torch.manual_seed(2)
    out_plain = plain(x)
    torch.manual_seed(2)
    out_hooked = hooked(x)
    torch.testing.assert_close(out_hooked, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(hooked[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
    assert all(m.training for m in hooked.modules())
    out_hooked.sum().backward()
    assert stats.get(hooked[3].shared.weight) is not None
    stats.remove()


def test_a_shared_call_in_a_model_without_a_batch_major_output_is_refused():
    class TupleOut(SharedQuery):
        def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
            return super().forward(x), x

    model = TupleOut("linear").double()
    stats = attach_squared_gradient_statistics(model)
    with pytest.raises(UnsupportedModuleError, match="shared across the batch.*one tensor"):
        model(torch.randn(BATCH, 4, dtype=torch.float64))
    stats.remove()
