"""The fast guaranteed block-norm routine, circular-padded convolutions and the warm-started power iteration,
against dense SVD references (float64, small sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz import guaranteed_norm, lipschitz_bound, operator_norm
from sturdy.lipschitz.graph import build_program
from sturdy.lipschitz.norms import (
    CHOLESKY_MARGIN,
    conv2d_circular_norm,
    conv2d_fft_norm,
    max_singular_value_upper,
    power_iteration,
)

from .lipschitz_reference import exact_norm

EXACT_REL_TOL = 1e-8  # guaranteed bounds exceed the exact value by ~CHOLESKY_MARGIN / 2 plus rounding
SOUND_SLACK = 1e-12  # bounds must be >= the float64 reference up to its own rounding


def _blocks(seed: int, shape, *, complex_: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    if complex_:
        b = torch.complex(b, torch.randn(shape, generator=gen, dtype=torch.float64))
    return b


@pytest.mark.parametrize("shape", [(7, 3, 5), (40, 6, 2), (9, 8, 8), (2, 3, 1, 4)])
@pytest.mark.parametrize("complex_", [False, True])
def test_block_bound_is_exact_max_singular_value(shape, complex_):
    b = _blocks(0, shape, complex_=complex_)
    exact = float(torch.linalg.svdvals(b).max())
    got = max_singular_value_upper(b, max_chunk_entries=64)  # several chunks
    assert got >= exact * (1 - SOUND_SLACK)
    torch.testing.assert_close(got, exact, rtol=EXACT_REL_TOL, atol=0.0)


def test_block_bound_ties_scaled_copies_and_zero_blocks():
    base = _blocks(1, (1, 6, 4), complex_=True)
    # many blocks whose norms are within 1e-12 of each other: the Cholesky test must not wrongly pass or fail
    b = torch.cat([base * (1 + 1e-12 * k) for k in range(30)] + [torch.zeros(5, 6, 4, dtype=base.dtype)])
    exact = float(torch.linalg.svdvals(b).max())
    got = max_singular_value_upper(b)
    assert exact * (1 - SOUND_SLACK) <= got <= exact * (1 + CHOLESKY_MARGIN)
    assert max_singular_value_upper(torch.zeros(3, 2, 2)) == 0.0
    bound, (index, v) = max_singular_value_upper(b, return_vector=True)
    torch.testing.assert_close(float(torch.linalg.vector_norm(b[index] @ v)), exact, rtol=1e-9, atol=0.0)


def test_block_bound_refuses_nan():
    b = _blocks(2, (4, 3, 3), complex_=False)
    b[2, 1, 1] = float("nan")
    with pytest.raises(ConfigurationError, match="NaN or infinity"):
        max_singular_value_upper(b)


CIRCULAR_CASES = [
    # (c_in, c_out, k, stride, padding, dilation, groups, H, W, exact)
    (3, 8, 3, 1, 1, 1, 1, 6, 5, True),
    (2, 4, 3, 2, 1, 1, 2, 6, 8, True),
    (2, 3, 5, 1, 2, 1, 1, 4, 7, True),  # the kernel wraps around a 4-pixel axis: taps share cells
    (2, 2, 3, 1, 2, 2, 1, 6, 6, True),
    (3, 2, 3, 1, 0, 1, 1, 6, 5, False),  # no padding: a crop of the circulant
    (2, 3, 3, 2, 1, 1, 1, 7, 6, False),  # stride does not divide H: stride-1 circulant, rows selected
    (1, 2, 2, 2, 0, 1, 1, 6, 6, True),
]


@pytest.mark.parametrize("case", CIRCULAR_CASES)
def test_circular_conv_circulant_bound(case):
    c_in, c_out, k, s, p, d, g, h, w, exact_expected = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, padding_mode="circular", bias=False)
    exact = exact_norm(conv, (c_in, h, w))
    res = conv2d_circular_norm(conv.weight, input_hw=(h, w), pads=(p, p, p, p), dilation=(d, d), groups=g,
                               stride=(s, s))
    assert res is not None
    bound, is_exact = res
    assert is_exact == exact_expected
    assert bound >= exact * (1 - SOUND_SLACK)
    if is_exact:
        torch.testing.assert_close(bound, exact, rtol=EXACT_REL_TOL, atol=0.0)
    got = operator_norm(conv, input_shape=(1, c_in, h, w), dense_max_entries=0)
    assert got.upper >= exact * (1 - SOUND_SLACK)
    if is_exact:
        assert got.method == "fft-circulant"
    else:  # the smaller of the circulant crop and the padded FFT bound
        assert got.method in ("fft-circulant", "fft+pad") and got.upper <= bound


def test_circular_conv_uses_the_exact_bound_at_any_size():
    # 3 -> 8 channels at 32x32: too large for the dense path; the padded FFT bound gave twice the norm
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular", bias=False)
    got = operator_norm(conv, input_shape=(1, 3, 32, 32))
    assert got.method == "fft-circulant"
    # independent reference: full 2-D DFT of the kernel on the 32x32 torus, every block's SVD
    kernel = torch.zeros(8, 3, 32, 32, dtype=torch.float64)
    kernel[:, :, :3, :3] = conv.weight.detach().double()
    reference = float(torch.linalg.svdvals(torch.fft.fft2(kernel).permute(2, 3, 0, 1)).max())
    torch.testing.assert_close(got.upper, reference, rtol=EXACT_REL_TOL, atol=0.0)
    padded = operator_norm(conv, input_shape=(1, 3, 32, 32), dense_max_entries=0)
    assert padded.upper <= got.upper * (1 + 1e-6)  # never the looser fft+pad bound
    assert got.estimate <= got.upper


@pytest.mark.parametrize("case", [(3, 8, 3, 1, 1, 9, 9), (4, 6, 3, 2, 1, 10, 8), (2, 5, 1, 2, 0, 7, 7)])
def test_fft_bound_sound_and_power_iteration_warm_start(case):
    c_in, c_out, k, s, p, h, w = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=False)
    exact = exact_norm(conv, (c_in, h, w))
    fft = conv2d_fft_norm(conv.weight, input_hw=(h, w), pads=(p, p, p, p), stride=(s, s))
    assert fft >= exact * (1 - SOUND_SLACK)
    program = build_program(conv, (1, c_in, h, w))
    op = next(st.op for st in program.steps if st.kind == "op")
    upper, method = guaranteed_norm(op, dense_max_entries=0)
    assert method == "fft" and upper == pytest.approx(fft, rel=1e-12)
    est = power_iteration(op, iterations=30)
    assert est <= exact * (1 + 1e-9)  # a lower estimate, evaluated in float64
    assert est >= 0.97 * exact  # the circulant's top singular vector is a good start


def test_wide_resnet_bound_per_layer_sound_on_small_input():
    # whole-network path (polyphase strided convs, 1x1 shortcuts, folded BatchNorm) at a size the dense SVD
    # can check per layer
    from sturdy.models import create_model

    torch.manual_seed(0)
    model = create_model("wrn", in_shape=(3, 8, 8), num_classes=4, depth=10, widen=1).eval()
    fast = lipschitz_bound(model, input_shape=(1, 3, 8, 8), dense_max_entries=0)
    dense = lipschitz_bound(model, input_shape=(1, 3, 8, 8))
    for a, b in zip(fast.per_layer, dense.per_layer):
        assert a.upper >= b.upper / (1 + 1e-9) * (1 - SOUND_SLACK), a.path
        assert a.estimate <= b.upper * (1 + 1e-9), a.path
    assert fast.upper >= dense.upper * (1 - 1e-9)


def test_tracker_batches_same_shape_convolutions_without_changing_the_estimate():
    from sturdy.lipschitz import LipschitzTracker
    from sturdy.models import create_model

    torch.manual_seed(0)
    model = create_model("wrn", in_shape=(3, 8, 8), num_classes=4, depth=16, widen=1).double().train()
    batched = LipschitzTracker(model, input_shape=(1, 3, 8, 8), iterations=2)
    single = LipschitzTracker(model, input_shape=(1, 3, 8, 8), iterations=2, batch_shapes=False)
    assert len(batched._groups) < len(single._groups) == len(list(single.buffers()))
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    for _ in range(3):
        with batched.batch_statistics(model):
            model(x)
        a = batched()
        with single.batch_statistics(model):
            model(x)
        b = single()
        torch.testing.assert_close(a.lipschitz, b.lipschitz, rtol=1e-10, atol=0.0)
        ga = torch.autograd.grad(a.lipschitz, list(model.parameters()), allow_unused=True)
        gb = torch.autograd.grad(b.lipschitz, list(model.parameters()), allow_unused=True)
        for u, v in zip(ga, gb):
            if u is not None or v is not None:
                torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-12)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[key], value, rtol=1e-9, atol=1e-12)
