"""Hessian diagonals, traces and eigenvalues against dense autograd Hessians (float64, tiny nets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, DataError, UnsupportedModuleError
from sturdy.flatness import ggn, hessian_diagonal, hutchinson_trace, top_hessian_eigenvalue

from .conftest import tiny_cnn, tiny_data, tiny_mlp
from .flatness_reference import full_hessian, ggn_diagonal_reference, hessian_diagonal_reference

EXACT_ATOL = 1e-12  # ggn-exact vs dense Hessian diagonal, float64 (entries are O(0.1))
EXACT_RTOL = 1e-10
HUTCHINSON_Z = 3.0  # an entry within 3 standard errors of the truth ...
HUTCHINSON_COVERAGE = 0.95  # ... for at least 95% of the entries
TRACE_Z = 4.0  # a trace estimate within 4 standard errors
EIG_RTOL = 1e-4  # power iteration stops at relative change 1e-6


class _Shared(nn.Module):
    """Uses one Linear twice (weight sharing) and a Linear on a (N, T, F) input (per-sample sums over T)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.seq(x.reshape(x.shape[0], 4, 3))).sum(1)
        h = torch.relu(self.shared(torch.relu(self.shared(h))))
        return self.head(h)


class _WithNorm(nn.Module):
    """Conv + eval-mode BatchNorm (its rule) + a bare parameter of the model itself (torch.func through the net)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0]))
        self.head = nn.Linear(3 * 4 * 4, 3)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(0.2, 0.6)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))) * self.scale[None, :, None, None]
        return self.head(h.flatten(1))


class _Tied(nn.Module):
    """Two Linear modules sharing one weight (tied weights): per-sample gradients add before squaring."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


CASES = {
    "mlp-inplace-relu": (lambda: tiny_mlp(0, inplace=True), (1, 3, 4)),
    "cnn": (lambda: tiny_cnn(0), (2, 4, 4)),
    "shared-and-3d-linear": (lambda: _Shared().double(), (12,)),
    "batchnorm-and-bare-parameter": (lambda: _WithNorm().double(), (2, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ggn_exact_equals_dense_hessian_diagonal(case):
    make, shape = CASES[case]
    model = make()
    x, y = tiny_data(shape, n=7)
    result = hessian_diagonal(model, (x, y), chunk_size=3, batch_size=5)
    reference = hessian_diagonal_reference(model, x, y)
    assert set(result.diagonal) == set(reference)
    assert max(float(r.abs().max()) for r in reference.values()) > 1e-3  # the case is not degenerate
    for name, ref in reference.items():
        torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)
        assert float(result.stderr[name].abs().max()) == 0.0
    assert result.method == "ggn-exact" and result.num_samples == 7 and result.probes == 0
    as_dict = result.to_dict()
    assert as_dict["num_samples"] == 7 and set(as_dict["diagonal"]) == set(reference)


def test_tied_weights_match_dense_ggn_diagonal():
    """A weight used by two layers makes the logits quadratic in it: the GGN diagonal (not the Hessian's) is exact."""
    model = _Tied().double()
    x, y = tiny_data((1, 2, 2), n=7)
    reference = ggn_diagonal_reference(model, x, y)
    for backend in ("hooks", "func"):
        result = hessian_diagonal(model, (x, y), backend=backend)
        for name, ref in reference.items():
            torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)
    hess = hessian_diagonal_reference(model, x, y)
    assert not torch.allclose(hess["a.weight"], reference["a.weight"], atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_ggn_reference_equals_dense_hessian_when_proven(case):
    """Where the traced operators prove it (not for the module applied twice), the GGN diagonal is the Hessian's."""
    make, shape = CASES[case]
    model = make()
    x, y = tiny_data(shape, n=5)
    hd = hessian_diagonal(model, (x, y))
    assert hd.is_hessian == (case != "shared-and-3d-linear")
    if not hd.is_hessian:
        assert hd.reasons == ("Addmm (one parameter reaches two factors)",)
        return
    ggn, hess = ggn_diagonal_reference(model, x, y), hessian_diagonal_reference(model, x, y)
    for name in hess:
        torch.testing.assert_close(ggn[name], hess[name], atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


@pytest.mark.parametrize("case", ["mlp-inplace-relu", "cnn"])
def test_torch_func_backend_equals_dense_hessian_diagonal(case):
    make, shape = CASES[case]
    model = make()
    x, y = tiny_data(shape, n=5)
    result = hessian_diagonal(model, (x, y), backend="func", chunk_size=2)
    for name, ref in hessian_diagonal_reference(model, x, y).items():
        torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


class _Scale(nn.Module):
    """A per-channel scale: no registered rule, so the torch.func fallback rule takes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain[None, :, None]


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4),
        nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3),
    ).double()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.rand(8, 2, 4, 4, dtype=torch.float64) * 2 - 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.1, 0.5)
    return model


def _no_whole_network_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a parameter took the whole-network torch.func path")

    monkeypatch.setattr(ggn, "func_squared_gradients", refuse)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_ggn_exact_with_batchnorm_takes_its_rule_and_equals_dense_hessian(mode, monkeypatch):
    """BatchNorm is evaluated with its running statistics whatever mode the model is handed in."""
    model = _bn_net()
    model.train(mode == "train")
    x, y = tiny_data((2, 4, 4), n=7)
    reference = hessian_diagonal_reference(model, x, y)
    _no_whole_network_pass(monkeypatch)
    result = hessian_diagonal(model, (x, y), chunk_size=3)
    assert model.training == (mode == "train")
    assert max(float(reference[n].abs().max()) for n in ("1.weight", "5.bias")) > 1e-3
    for name, ref in reference.items():
        torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


def test_ggn_exact_with_modules_only_torch_func_covers_equals_dense_ggn(monkeypatch):
    """Conv1d, LayerNorm and a custom module take the per-module torch.func rule (no whole-network pass)."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), _Scale(3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(15), nn.Linear(15, 3)
    ).double()
    x, y = tiny_data((2, 5), n=6)
    reference = ggn_diagonal_reference(model, x, y)
    _no_whole_network_pass(monkeypatch)
    result = hessian_diagonal(model, (x, y), chunk_size=4)
    assert set(result.diagonal) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)
    # piecewise linear in each parameter up to the LayerNorm: there the GGN is exactly the Hessian's diagonal
    hess = hessian_diagonal_reference(model, x, y)
    for name in ("4.weight", "4.bias", "5.weight"):
        torch.testing.assert_close(result.diagonal[name], hess[name], atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


def test_ggn_exact_refuses_batchnorm_with_batch_statistics():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    x, y = tiny_data((4,), n=6)
    with pytest.raises(UnsupportedModuleError, match="module '2' .*statistics of its batch.*method='hutchinson'"):
        hessian_diagonal(model, (x, y))
    hessian_diagonal(model, (x, y), method="hutchinson", probes=2)


def test_ggn_exact_independent_of_batching_and_restores_mode():
    model = tiny_cnn(1)
    model.train()
    x, y = tiny_data((2, 4, 4), n=11)
    a = hessian_diagonal(model, (x, y), chunk_size=2, batch_size=4)
    b = hessian_diagonal(model, (x, y), chunk_size=64, batch_size=64)
    for name in a.diagonal:
        torch.testing.assert_close(a.diagonal[name], b.diagonal[name], atol=EXACT_ATOL, rtol=EXACT_RTOL)
    assert model.training


def test_ggn_exact_on_dataset_and_parameter_subset():
    from sturdy.data import ImageDataset

    model = tiny_cnn(2)
    x, y = tiny_data((2, 4, 4), n=6)
    ds = ImageDataset(x.float(), y, 3)
    sub = hessian_diagonal(model, ds, parameters=["0.weight"])
    full = hessian_diagonal(model, (x, y))
    assert list(sub.diagonal) == ["0.weight"]
    torch.testing.assert_close(sub.diagonal["0.weight"], full.diagonal["0.weight"], atol=1e-6, rtol=1e-5)


class _GRUClassifier(nn.Module):
    """A recurrent classifier whose GRU ``torch.func.vmap`` cannot batch (in-place updates)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def test_module_vmap_cannot_batch_is_computed_one_sample_at_a_time_and_equals_dense_ggn():
    torch.manual_seed(0)
    model = _GRUClassifier().double()
    x, y = tiny_data((5, 3), n=6)
    with pytest.warns(RuntimeWarning, match="vmap cannot batch .*one sample at a time"):
        result = hessian_diagonal(model, (x, y))
    assert not result.is_hessian  # sigmoid and tanh gates
    reference = ggn_diagonal_reference(model, x, y)
    for name, ref in reference.items():
        torch.testing.assert_close(result.diagonal[name], ref, atol=EXACT_ATOL, rtol=EXACT_RTOL, msg=name)


def test_ggn_reads_an_iterable_once_one_batch_at_a_time():
    """The GGN methods stream the data: batch k+1 is read only after the model has seen batch k."""
    model = tiny_cnn(3)
    x, y = tiny_data((2, 4, 4), n=12)
    log = []
    model.register_forward_pre_hook(lambda m, args: log.append(("forward", args[0].shape[0])))

    class Batches:
        passes = 0

        def __iter__(self):
            Batches.passes += 1
            for start in range(0, 12, 4):
                log.append(("read", start))
                yield x[start : start + 4], y[start : start + 4]

    streamed = hessian_diagonal(model, Batches(), chunk_size=4)
    assert Batches.passes == 1
    reads = [i for i, event in enumerate(log) if event[0] == "read"]
    for earlier, later in zip(reads, reads[1:]):
        assert any(event[0] == "forward" for event in log[earlier + 1 : later])  # no read-ahead
    whole = hessian_diagonal(model, (x, y))
    assert streamed.num_samples == 12
    for name in whole.diagonal:
        torch.testing.assert_close(streamed.diagonal[name], whole.diagonal[name], atol=EXACT_ATOL, rtol=EXACT_RTOL)


def test_ggn_checks_tensor_data_before_any_work_and_a_stream_as_it_is_read():
    model = tiny_mlp(0)
    x, y = tiny_data((1, 3, 4), n=10)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    bad_x = x.clone()
    bad_x[-1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf.*sample 9"):
        hessian_diagonal(model, (bad_x, y), batch_size=2)
    bad_y = y.clone()
    bad_y[-1] = 7
    with pytest.raises(DataError, match=r"class indices in \[0, 2\].*\[0, 7\]"):
        hessian_diagonal(model, (x, bad_y), batch_size=2)
    assert calls == [2]  # only the probe of the output width ran
    loader = [(x[:5], y[:5]), (x[5:], bad_y[5:])]
    with pytest.raises(DataError, match=r"class indices in \[0, 2\]"):
        hessian_diagonal(model, loader)


def test_hutchinson_within_reported_error():
    model = tiny_mlp(3)
    x, y = tiny_data((1, 3, 4), n=8)
    exact = hessian_diagonal_reference(model, x, y)
    est = hessian_diagonal(model, (x, y), method="hutchinson", probes=400, seed=5, probe_chunk=64)
    z = torch.cat([((est.diagonal[n] - exact[n]).abs() / est.stderr[n].clamp_min(1e-300)).reshape(-1) for n in exact])
    covered = torch.cat([
        ((est.diagonal[n] - exact[n]).abs() <= HUTCHINSON_Z * est.stderr[n] + 1e-12).reshape(-1) for n in exact
    ])
    assert float(covered.double().mean()) >= HUTCHINSON_COVERAGE, float(z.max())
    assert est.probes == 400 and est.method == "hutchinson"


def test_hutchinson_trace_and_top_eigenvalue_match_dense_hessian():
    model = tiny_cnn(4)
    x, y = tiny_data((2, 4, 4), n=10)
    dense = full_hessian(model, x, y)
    true_trace = float(dense.diagonal().sum())
    est = hutchinson_trace(model, (x, y), probes=300, seed=1, batch_size=4)
    assert abs(est.value - true_trace) <= TRACE_Z * est.stderr
    assert est.to_dict() == {"value": est.value, "stderr": est.stderr, "probes": 300}
    assert est.stderr > 0
    eigs = torch.linalg.eigvalsh(dense)
    top = float(eigs[eigs.abs().argmax()])
    eig = top_hessian_eigenvalue(model, (x, y), iterations=2000, tol=1e-9, batch_size=4)
    assert eig.converged and eig.to_dict()["converged"] is True
    assert abs(eig.value - top) <= EIG_RTOL * abs(top)


def test_quadratic_loss_trace_and_eigenvalue():
    """MSE linear regression: H = 2 X^T X / N exactly; Rademacher probes of a diagonal H have zero variance."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))  # N = 3 samples
    y = torch.zeros(3, 1, dtype=torch.float64)

    def mse(out, target):
        return F.mse_loss(out, target)

    hess = 2 * torch.diag(torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)) / 3
    est = hutchinson_trace(model, (x, y), probes=5, loss_fn=mse)
    assert est.value == pytest.approx(float(hess.trace()), rel=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)
    eig = top_hessian_eigenvalue(model, (x, y), loss_fn=mse, iterations=500, tol=1e-12)
    assert eig.value == pytest.approx(6.0, rel=1e-6)
    diag = hessian_diagonal(model, (x, y), method="hutchinson", probes=3, loss_fn=mse)
    torch.testing.assert_close(diag.diagonal["weight"], hess.diagonal().reshape(1, 3), atol=1e-12, rtol=0)


def test_validation_messages():
    model = tiny_mlp(0)
    x, y = tiny_data((1, 3, 4))
    with pytest.raises(ConfigurationError, match="method must be one of auto, ggn-exact, ggn-mc, hutchinson"):
        hessian_diagonal(model, (x, y), method="exact")
    with pytest.raises(ConfigurationError, match="probes must be an integer >= 2"):
        hessian_diagonal(model, (x, y), method="hutchinson", probes=1)
    with pytest.raises(ConfigurationError, match="defined for the cross-entropy loss only"):
        hessian_diagonal(model, (x, y), loss_fn=F.cross_entropy)
    with pytest.raises(ConfigurationError, match="unknown or frozen parameter name.*'nope'"):
        hessian_diagonal(model, (x, y), parameters=["nope"])
    with pytest.raises(DataError, match="same number of samples"):
        hessian_diagonal(model, (x, y[:2]))
    with pytest.raises(DataError, match="holds no samples"):
        hessian_diagonal(model, (x[:0], y[:0]))
    with pytest.raises(DataError, match="cannot read samples from a int"):
        hessian_diagonal(model, 3)
    with pytest.raises(ConfigurationError, match="backend must be 'hooks' or 'func'"):
        hessian_diagonal(model, (x, y), backend="jax")
    with pytest.raises(ConfigurationError, match="chunk_size must be an integer >= 1"):
        hessian_diagonal(model, (x, y), chunk_size=0)
    with pytest.raises(ConfigurationError, match=r"tol must be a finite number in \(0, inf\]"):
        top_hessian_eigenvalue(model, (x, y), tol=0.0)


@pytest.mark.slow
def test_hutchinson_standard_error_is_calibrated():
    """Over many seeds, about 95% of trace estimates fall within 2 reported standard errors of the truth."""
    model = tiny_cnn(7)
    x, y = tiny_data((2, 4, 4), n=10)
    truth = float(full_hessian(model, x, y).diagonal().sum())
    hits = [abs(est.value - truth) <= 2 * est.stderr
            for est in (hutchinson_trace(model, (x, y), probes=50, seed=s) for s in range(200))]
    assert 0.88 <= sum(hits) / len(hits) <= 0.99
