"""Global bounds of whole networks against local Jacobian norms; tracker; losses."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz import CWarmup, LipschitzTracker, lipschitz_bound, lmt_logits, lmt_loss, operator_norm
from sturdy.lipschitz.results import SupportsLipschitz
from sturdy.models import create_model

from .lipschitz_reference import adversarial_lipschitz, exact_norm, jacobian_norms, randomize_batchnorm

SOUND_SLACK = 1e-9  # bound >= local norm, up to float64 rounding of the reference Jacobian
CONVERGED_REL_TOL = 1e-4  # tracker estimate vs. exact norm after many iterations
LOSS_TOL = 1e-6


class _ResBlock(nn.Module):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = act
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(self.act(self.bn1(self.conv1(F.relu(self.bn(x))))))
        return x + y


class _CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        z = torch.cat([torch.tanh(self.a(x)), F.gelu(self.b(x))], dim=1)
        return self.head(torch.flatten(self.pool(z), 1))


def _random_nets():
    torch.manual_seed(1)
    yield "resblock-elu", (1, 2, 4, 4), nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), _ResBlock(3, nn.ELU()), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    )
    yield "resblock-sigmoid", (1, 1, 5, 5), nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), _ResBlock(2, nn.Sigmoid()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2, 3),
    )
    yield "cat-maxpool", (1, 1, 4, 4), _CatNet()
    yield "mlp-bn-leaky", (1, 6), nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3)
    )
    yield "resnet", (1, 1, 4, 4), create_model("resnet", in_shape=(1, 4, 4), num_classes=3, widths=(2, 3),
                                                blocks_per_stage=1)


@pytest.mark.parametrize("name, shape, net", list(_random_nets()), ids=lambda v: v if isinstance(v, str) else "")
def test_global_bound_dominates_local_jacobians(name, shape, net):
    net = randomize_batchnorm(net, seed=3).eval()
    bound = lipschitz_bound(net, input_shape=shape)
    assert bound.estimate <= bound.upper
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([s * torch.randn((16, *shape[1:]), generator=gen) for s in (0.1, 1.0, 5.0)])
    local = float(jacobian_norms(net, xs).max())
    adversarial = adversarial_lipschitz(net, shape[1:], starts=6, steps=40)
    assert local > 0 and adversarial > 0
    assert bound.upper >= local * (1 - SOUND_SLACK), (bound.upper, local)
    assert bound.upper >= adversarial * (1 - SOUND_SLACK), (bound.upper, adversarial)
    # the structured (FFT/Hoelder) path must be sound too
    structured = lipschitz_bound(net, input_shape=shape, dense_max_entries=0)
    assert structured.upper >= bound.upper * (1 - SOUND_SLACK)


def test_linear_network_bound_is_exact():
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    b = lipschitz_bound(net, input_shape=(1, 2, 3))
    torch.testing.assert_close(b.upper, exact_norm(net, (2, 3)), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(b.upper_body, 1.0)
    torch.testing.assert_close(b.last_weight, net[1].weight.detach().double())


def test_non_linear_output_has_no_body():
    b = lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), input_shape=(1, 3))
    assert b.upper_body is None and b.last_weight is None


def _cnn():
    torch.manual_seed(0)
    return randomize_batchnorm(create_model("cnn", in_shape=(1, 6, 6), num_classes=4, channels=(3, 4), width=8,
                                            batchnorm=True))


def test_tracker_converges_to_exact_norms_and_bound():
    net = _cnn().eval()
    tracker = LipschitzTracker(net, input_shape=(1, 1, 6, 6), warmup_iterations=400)
    est = tracker()
    exact = {
        "0+1": exact_norm(nn.Sequential(net[0], net[1]), (1, 6, 6)),
        "4+5": exact_norm(nn.Sequential(net[4], net[5]), (3, 3, 3)),
        "9": exact_norm(net[9], (net[9].in_features,)),
        "11": exact_norm(net[11], (net[11].in_features,)),
    }
    norms = tracker.norms()
    for path, value in exact.items():
        torch.testing.assert_close(norms[path], value, rtol=CONVERGED_REL_TOL, atol=0.0)
    bound = lipschitz_bound(net, input_shape=(1, 1, 6, 6))
    torch.testing.assert_close(float(est.lipschitz.detach()), bound.upper, rtol=CONVERGED_REL_TOL, atol=0.0)
    torch.testing.assert_close(float(est.body.detach()), bound.upper_body, rtol=CONVERGED_REL_TOL, atol=0.0)


def test_tracker_gradient_flows_to_weights():
    net = _cnn()
    tracker = LipschitzTracker(net, input_shape=(1, 1, 6, 6))
    est = tracker()
    est.lipschitz.backward()
    for p in (net[0].weight, net[1].weight, net[4].weight, net[9].weight, net[11].weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_tracker_buffers_survive_save_and_load():
    net = _cnn()
    a = LipschitzTracker(net, input_shape=(1, 1, 6, 6), warmup_iterations=2, seed=1)
    for _ in range(3):
        a()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LipschitzTracker(net, input_shape=(1, 1, 6, 6), warmup_iterations=0, seed=7)
    assert any(not torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        ea, eb = a(), b()
        assert torch.equal(ea.lipschitz.detach(), eb.lipschitz.detach())
    for x, y in zip(a.buffers(), b.buffers()):
        assert torch.equal(x, y)
    assert len(a.state_dict()) == 4  # one vector per conv(+bn) and linear layer


def test_tracker_validates_arguments():
    with pytest.raises(ConfigurationError, match="iterations must be >= 1"):
        LipschitzTracker(nn.Linear(2, 2), input_shape=(1, 2), iterations=0)


def _brute_force_lmt(logits, targets, *, c, lip, body, weight, form):
    rows = []
    for z, y in zip(logits, targets):
        adj = []
        for i in range(z.shape[0]):
            if i == y:
                adj.append(z[i])
            elif form == "global":
                adj.append(z[i] + math.sqrt(2) * c * lip)
            else:
                adj.append(z[i] + c * body * torch.linalg.vector_norm(weight[y] - weight[i]))
        rows.append(-torch.log_softmax(torch.stack(adj), 0)[y])
    return torch.stack(rows).mean()


@pytest.mark.parametrize("form", ["pairwise", "global"])
def test_lmt_loss_matches_brute_force(form):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (7,), generator=gen)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    from types import SimpleNamespace

    f64 = torch.float64
    bound = SimpleNamespace(lipschitz=torch.tensor(2.0, dtype=f64), body=torch.tensor(1.5, dtype=f64),
                            last_weight=weight)
    got = lmt_loss(logits, targets, c=0.3, bound=bound, form=form)
    ref = _brute_force_lmt(logits, targets, c=0.3, lip=2.0, body=1.5, weight=weight, form=form)
    torch.testing.assert_close(got, ref, rtol=LOSS_TOL, atol=LOSS_TOL)
    plain = lmt_loss(logits, targets, c=0.0, bound=bound, form=form)
    torch.testing.assert_close(plain, F.cross_entropy(logits, targets), rtol=LOSS_TOL, atol=LOSS_TOL)


def test_lmt_clip_factor_caps_added_term_at_margin():
    from types import SimpleNamespace

    bound = SimpleNamespace(lipschitz=torch.tensor(1.0), body=None, last_weight=None)
    logits = torch.tensor([[2.0, 1.5, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 0])
    adj = lmt_logits(logits, targets, c=1.0, bound=bound, form="global", clip_factor=True)
    # sample 0: margin 0.5 < added sqrt(2): factor 0.5 / sqrt(2), so the runner-up now ties the target
    torch.testing.assert_close(adj[0], torch.tensor([2.0, 2.0, 0.5]))
    # sample 1 is misclassified (margin < 0): factor 0, logits unchanged
    torch.testing.assert_close(adj[1], logits[1])


def test_lmt_loss_validation_messages():
    from types import SimpleNamespace

    b = SimpleNamespace(lipschitz=torch.tensor(1.0), body=None, last_weight=None)
    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ConfigurationError, match="use form='global'"):
        lmt_loss(z, y, c=0.1, bound=b, form="pairwise")
    with pytest.raises(ConfigurationError, match="form must be"):
        lmt_loss(z, y, c=0.1, bound=b, form="both")
    with pytest.raises(ConfigurationError, match=r"c must be a finite number in \[0, inf\], got -1.0; c is the target"):
        lmt_loss(z, y, c=-1.0, bound=b, form="global")
    with pytest.raises(ConfigurationError, match="LipschitzEstimate"):
        lmt_loss(z, y, c=0.1, bound=object(), form="global")


def test_c_warmup_schedule():
    w = CWarmup(c=0.5, warmup_epochs=2)
    assert w(epoch=0, step=0, steps_per_epoch=10) == 0.0
    torch.testing.assert_close(w(epoch=1, step=0, steps_per_epoch=10), 0.25)
    assert w(epoch=5) == 0.5
    assert CWarmup(c=0.5)(epoch=0) == 0.5
    with pytest.raises(ConfigurationError, match="warmup_epochs"):
        CWarmup(c=0.5, warmup_epochs=-1)


def test_operator_norm_matches_tracker_for_linear():
    lin = nn.Linear(5, 4)
    tr = LipschitzTracker(nn.Sequential(lin), input_shape=(1, 5), warmup_iterations=300)
    torch.testing.assert_close(tr.norms()["0"], operator_norm(lin, input_shape=(1, 5)).upper,
                               rtol=CONVERGED_REL_TOL, atol=0.0)


def test_tracker_several_iterations_per_step():
    net = _cnn().eval()
    one = LipschitzTracker(net, input_shape=(1, 1, 6, 6), warmup_iterations=0, iterations=1, seed=3)
    many = LipschitzTracker(net, input_shape=(1, 1, 6, 6), warmup_iterations=0, iterations=300, seed=3)
    bound = lipschitz_bound(net, input_shape=(1, 1, 6, 6))
    est_one, est_many = float(one().lipschitz.detach()), float(many().lipschitz.detach())
    assert est_one <= est_many * (1 + CONVERGED_REL_TOL)
    torch.testing.assert_close(est_many, bound.upper, rtol=CONVERGED_REL_TOL, atol=0.0)


def test_bound_and_estimate_share_one_protocol():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    bound = lipschitz_bound(net, input_shape=(1, 6))
    est = LipschitzTracker(net, input_shape=(1, 6), warmup_iterations=300)()
    for b in (bound, est):
        assert isinstance(b, SupportsLipschitz)
    assert (bound.lipschitz, bound.body) == (bound.upper, bound.upper_body)
    z, y = torch.randn(5, 3, dtype=torch.float64), torch.arange(5) % 3
    for form in ("pairwise", "global"):
        # the converged estimate equals the exact norms of this net, hence the guaranteed bound up to its slack
        torch.testing.assert_close(lmt_loss(z, y, c=0.2, bound=bound, form=form),
                                   lmt_loss(z, y, c=0.2, bound=est, form=form).detach(),
                                   rtol=CONVERGED_REL_TOL, atol=0.0)
    assert set(est.to_dict()) == {"lipschitz", "body"}
    assert set(operator_norm(net[1], input_shape=(1, 6)).to_dict()) == {"upper", "estimate", "method"}
