"""Wire format round trips, quantiser rules and selection rules against brute-force loops."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sturdy.compression import codec
from sturdy.compression.compressor import strom_select, topk_select, variance_select
from sturdy.errors import ConfigurationError, DataError

SUM_TOL = dict(rtol=1e-5, atol=1e-6)


@st.composite
def selections(draw):
    length = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["empty", "full", "sparse", "dense", "random"]))
    if mode == "empty":
        mask = [False] * length
    elif mode == "full":
        mask = [True] * length
    else:
        p = {"sparse": 0.02, "dense": 0.7, "random": draw(st.floats(0, 1))}[mode]
        mask = draw(st.lists(st.floats(0, 1), min_size=length, max_size=length))
        mask = [u < p for u in mask]
    indices = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.int64)
    values = torch.tensor(
        draw(st.lists(st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_size=len(indices),
                      max_size=len(indices))),
        dtype=torch.float32,
    )
    return length, indices, values


def gaps_of(indices):
    """Index gaps ``i_k - i_{k-1} - 1`` (the first index itself first), one by one."""
    return [int(indices[0])] + [int(b - a - 1) for a, b in zip(indices[:-1], indices[1:])]


def rice_bytes(gaps, k):
    """Bytes of the Rice code of ``gaps`` with parameter ``k``, bit by bit: unary quotient, then k bits."""
    code = "".join("1" * (g >> k) + "0" for g in gaps) + "".join(format(g & ((1 << k) - 1), f"0{k}b") if k else ""
                                                             for g in gaps)
    return math.ceil(len(code) / 8)


@settings(max_examples=60, deadline=None)
@given(selections())
def test_float32_round_trip_is_exact(sel):
    length, indices, values = sel
    payload = codec.encode(indices, values, length=length, value_format="float32")
    decoded = codec.decode(payload, length=length)
    assert torch.equal(decoded.indices, indices)
    assert torch.equal(decoded.values, values.reshape(-1))
    if indices.numel() == 0:
        assert payload.numel() == 0
    else:
        gaps = gaps_of(indices)
        delta_bytes = min(rice_bytes(gaps, k) for k in range(codec.MAX_RICE_K + 1))  # every Rice parameter
        index_bytes = min(delta_bytes, (length + 7) // 8)  # the smaller of the two
        assert payload.numel() == codec.HEADER_BYTES + index_bytes + 4 * indices.numel()


@settings(max_examples=60, deadline=None)
@given(selections())
def test_4bit_round_trip_returns_the_quantised_values(sel):
    length, indices, values = sel
    if values.numel():
        scale = values.abs().max()
        codes, quantised, ok = (torch.from_numpy(a) for a in codec.quantize_down(values.numpy(), scale.numpy()))
        indices, codes, quantised = indices[ok], codes[ok], quantised[ok]
    else:
        scale, codes, quantised = torch.tensor(0.0), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    payload = codec.encode(indices, codes, length=length, value_format="4bit", scale=float(scale))
    decoded = codec.decode(payload, length=length)
    assert torch.equal(decoded.indices, indices)
    assert torch.equal(decoded.values, quantised)
    if indices.numel():
        index_bytes = payload.numel() - codec.HEADER_BYTES - 4 - (indices.numel() + 1) // 2
        assert index_bytes <= (length + 7) // 8


@settings(max_examples=40, deadline=None)
@given(selections(), st.floats(1e-4, 10))
def test_sign_round_trip(sel, tau):
    length, indices, values = sel
    tau32 = float(torch.tensor(tau, dtype=torch.float32))
    payload = codec.encode(indices, values, length=length, value_format="sign", scale=tau32)
    decoded = codec.decode(payload, length=length)
    assert torch.equal(decoded.indices, indices)
    assert torch.equal(decoded.values, torch.where(values < 0, -tau32, tau32))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=1, max_size=50))
def test_quantize_down_never_rounds_up_and_picks_the_largest_level(raw):
    values = torch.tensor(raw, dtype=torch.float32)
    scale = values.abs().max()
    codes, quantised, ok = codec.quantize_down(values.numpy(), scale.numpy())
    mag = values.abs()
    levels = [float(scale) * 2.0**-e for e in range(codec.NUM_LEVELS)]
    for j in range(values.numel()):
        below = [lv for lv in levels if lv <= float(mag[j])]
        if float(mag[j]) == 0 or not below:
            assert not ok[j]
            continue
        assert ok[j]
        assert abs(float(quantised[j])) == max(below)  # brute force: the largest level not above |v|
        assert math.copysign(1, float(quantised[j])) == math.copysign(1, float(values[j]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=50), st.integers(1, 4))
def test_per_segment_scales_equal_one_scale_per_value(raw, segments):
    """Scales given once per segment (with segment ids) quantise like the same scales given per value."""
    values = np.array(raw, dtype=np.float32)
    seg = np.arange(values.size) % segments
    scales = np.zeros(segments, dtype=np.float32)
    np.maximum.at(scales, seg, np.abs(values))
    by_segment = codec.quantize_down(values, scales, seg)
    per_value = codec.quantize_down(values, scales[seg])
    assert np.array_equal(by_segment[2], per_value[2])
    ok = by_segment[2]
    for a, b in zip(by_segment[:2], per_value[:2]):
        assert np.array_equal(a[ok], b[ok])


def test_bitmap_is_chosen_for_dense_selections_and_delta_for_sparse_ones():
    length = 1000
    dense = torch.arange(0, length, 2)
    sparse = torch.tensor([3, 500, 999])
    p_dense = codec.encode(dense, torch.ones(dense.numel()), length=length, value_format="float32")
    p_sparse = codec.encode(sparse, torch.ones(3), length=length, value_format="float32")
    assert (int(p_dense[0]) >> 2) & 1 == 1 and (int(p_sparse[0]) >> 2) & 1 == 0
    assert p_dense.numel() == codec.HEADER_BYTES + 125 + 4 * dense.numel()
    # gaps 3, 496, 498: Rice k = 8 spends 3 * 9 bits plus quotients 0, 1, 1 in unary: 29 bits, 4 bytes
    assert p_sparse.numel() == codec.HEADER_BYTES + 4 + 12
    assert int(p_sparse[0]) >> 3 == 8


def test_encode_validation_and_corrupt_payloads():
    with pytest.raises(ConfigurationError, match="unknown value_format"):
        codec.encode(torch.tensor([0]), torch.ones(1), length=2, value_format="8bit")
    with pytest.raises(ConfigurationError, match="strictly increasing"):
        codec.encode(torch.tensor([1, 1]), torch.ones(2), length=3, value_format="float32")
    with pytest.raises(ConfigurationError, match=r"indices must lie in \[0, 3\)"):
        codec.encode(torch.tensor([0, 3]), torch.ones(2), length=3, value_format="float32")
    with pytest.raises(ConfigurationError, match="2 indices but 1 values"):
        codec.encode(torch.tensor([0, 1]), torch.ones(1), length=3, value_format="float32")
    with pytest.raises(DataError, match="shorter than the 13-byte header"):
        codec.decode(torch.zeros(5, dtype=torch.uint8), length=3)
    good = codec.encode(torch.tensor([0, 2]), torch.ones(2), length=3, value_format="float32")
    with pytest.raises(DataError, match="corrupt payload"):
        codec.decode(good[:-4], length=3)


def _variance_reference(r, v, alpha, zeta):
    """Element-by-element loop of docs/design.md section 4 with float32 values."""
    r, v = r.clone(), v.clone()
    sent = torch.zeros_like(r)
    for i in range(r.numel()):
        if r[i] ** 2 > alpha * v[i]:
            sent[i] = r[i]
            r[i] = 0.0
            v[i] = 0.0
        else:
            v[i] = v[i] * zeta
    return sent, r, v


@pytest.mark.parametrize("alpha", [0.5, 2.0, 8.0])
def test_variance_select_matches_element_loop(alpha):
    torch.manual_seed(0)
    r = torch.randn(200, dtype=torch.float64)
    v = torch.rand(200, dtype=torch.float64) * 2
    ref_sent, ref_r, ref_v = _variance_reference(r, v, alpha, 0.9)
    r_fast, v_fast = r.clone(), v.clone()
    sel = variance_select(r_fast, v_fast, alpha=alpha, zeta=0.9, quantize=None)
    sent = torch.zeros_like(r)
    sent[sel.indices] = sel.values
    torch.testing.assert_close(sent, ref_sent, rtol=0, atol=0)
    torch.testing.assert_close(r_fast, ref_r, rtol=0, atol=0)
    torch.testing.assert_close(v_fast, ref_v, rtol=0, atol=0)
    decoded = codec.decode(sel.payload, length=200)
    torch.testing.assert_close(decoded.values.double(), sel.values.float().double())


def test_variance_select_4bit_keeps_sub_level_elements_and_conserves():
    r = torch.tensor([1.0, -0.3, 1e-4, 0.0, 0.02, -0.9])
    v = torch.zeros(6)
    before = r.clone()
    sel = variance_select(r, v, alpha=1.0, zeta=0.5, quantize="4bit")
    sent = torch.zeros(6)
    sent[sel.indices] = sel.values
    assert sel.indices.tolist() == [0, 1, 4, 5]  # 1e-4 < 1 * 2^-7: stays, 0 fails r^2 > 0
    torch.testing.assert_close(sent + r, before, rtol=0, atol=0)
    assert bool((sent.abs() <= before.abs()).all()) and bool((torch.sign(r) * torch.sign(before) >= 0).all())
    torch.testing.assert_close(sent[[0, 1, 4, 5]], torch.tensor([1.0, -0.25, 2**-6, -0.5]), rtol=0, atol=0)
    assert float(r[2]) == pytest.approx(1e-4)
    torch.testing.assert_close(codec.decode(sel.payload, length=6).values, sel.values)


def test_4bit_scales_are_per_segment():
    """One scale per parameter: a small bias keeps its precision next to a large weight gradient."""
    r = torch.tensor([4.0, -1.0, 3.0, 0.01, -0.003])
    boundaries = torch.tensor([0, 3, 5])
    before = r.clone()
    sel = variance_select(r, torch.zeros(5), alpha=1.0, zeta=1.0, quantize="4bit", boundaries=boundaries)
    assert sel.indices.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(sel.values, torch.tensor([4.0, -1.0, 2.0, 0.01, -0.01 / 4]), rtol=0, atol=0)
    torch.testing.assert_close(sel.values + r, before, rtol=0, atol=0)
    decoded = codec.decode(sel.payload, length=5, boundaries=boundaries)
    torch.testing.assert_close(decoded.values, sel.values, rtol=0, atol=0)
    with pytest.raises(DataError, match="needs the 3 segment boundaries"):
        codec.decode(sel.payload, length=5)


def test_alpha_at_least_batch_size_sends_nothing_at_the_first_step():
    """Cauchy-Schwarz: (sum_x g)^2 <= b sum_x g^2, so r^2 > alpha v is impossible for alpha >= b."""
    torch.manual_seed(1)
    b = 8
    per_sample = torch.randn(b, 50)
    r = per_sample.mean(0)
    v = (per_sample**2).sum(0) / b**2
    sel = variance_select(r.clone(), v.clone(), alpha=float(b), zeta=1.0, quantize=None)
    assert sel.count == 0 and sel.payload.numel() == 0
    sel = variance_select(r.clone(), v.clone(), alpha=1.0, zeta=1.0, quantize=None)
    assert sel.count > 0


def test_strom_and_topk_conserve_and_select_like_a_loop():
    torch.manual_seed(2)
    r = torch.randn(100)
    before = r.clone()
    sel = strom_select(r, tau=0.5)
    assert sel.indices.tolist() == [i for i in range(100) if abs(float(before[i])) > 0.5]
    sent = torch.zeros(100)
    sent[sel.indices] = sel.values
    torch.testing.assert_close(sent + r, before, **SUM_TOL)
    torch.testing.assert_close(codec.decode(sel.payload, length=100).values, sel.values)

    r = before.clone()
    sel = topk_select(r, ratio=0.05)
    expected = sorted(sorted(range(100), key=lambda i: -abs(float(before[i])))[:5])
    assert sel.indices.tolist() == expected
    sent = torch.zeros(100)
    sent[sel.indices] = sel.values
    torch.testing.assert_close(sent + r, before, rtol=0, atol=0)


def test_variance_select_truncates_to_a_byte_budget_by_priority():
    torch.manual_seed(3)
    r = torch.randn(400)
    v = torch.rand(400) * 0.5
    before_r, before_v = r.clone(), v.clone()
    full = variance_select(r.clone(), v.clone(), alpha=1.0, zeta=0.9, quantize="4bit")
    budget = full.payload.numel() // 3
    sel = variance_select(r, v, alpha=1.0, zeta=0.9, quantize="4bit", max_bytes=budget)
    assert 0 < sel.payload.numel() <= budget and 0 < sel.count < full.count
    assert sel.wanted_bytes == full.payload.numel()
    assert set(sel.indices.tolist()) <= set(full.indices.tolist())
    priority = before_r**2 / before_v
    dropped = sorted(set(full.indices.tolist()) - set(sel.indices.tolist()))
    assert float(priority[sel.indices].min()) >= float(priority[dropped].max())  # the most significant are sent
    sent = torch.zeros(400)
    sent[sel.indices] = sel.values
    torch.testing.assert_close(sent + r, before_r, rtol=0, atol=0)  # nothing lost
    torch.testing.assert_close(v[dropped], before_v[dropped] * 0.9)  # unsent: decayed, not reset
    empty = variance_select(before_r.clone(), before_v.clone(), alpha=1.0, zeta=0.9, quantize="4bit", max_bytes=5)
    assert empty.count == 0 and empty.wanted_bytes == full.payload.numel()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 4.0])
def test_variance_select_numpy_path_equals_torch_path(alpha):
    """The CPU fast path (4-bit, no byte budget) gives the same bits as the generic torch path."""
    gen = torch.Generator().manual_seed(11)
    n = 5000
    r = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(-6, 1, generator=gen)
    r[torch.rand(n, generator=gen) < 0.3] = 0
    v = torch.rand(n, generator=gen) * r * r
    boundaries = torch.tensor([0, 7, 7, 1200, 4000, n])  # an empty segment included
    for b in (boundaries, None):
        r1, v1, r2, v2 = r.clone(), v.clone(), r.clone(), v.clone()
        fast = variance_select(r1, v1, alpha=alpha, zeta=0.999, quantize="4bit", boundaries=b)
        generic = variance_select(r2, v2, alpha=alpha, zeta=0.999, quantize="4bit", boundaries=b, max_bytes=10**9)
        assert torch.equal(r1, r2) and torch.equal(v1, v2)
        assert torch.equal(fast.payload, generic.payload) and torch.equal(fast.indices, generic.indices)
        assert torch.equal(fast.values, generic.values) and fast.count > 0


def test_delta_indices_of_very_different_gaps_round_trip():
    indices = torch.tensor([0, 1, 130, 20000, 20001, 3_000_000, 300_000_000], dtype=torch.int64)
    values = torch.arange(1.0, 8.0)
    payload = codec.encode(indices, values, length=300_000_001, value_format="float32")
    gaps = gaps_of(indices)
    index_bytes = min(rice_bytes(gaps, k) for k in range(codec.MAX_RICE_K + 1))  # Rice, not a 37.5 MB bitmap
    assert payload.numel() == codec.HEADER_BYTES + index_bytes + 4 * indices.numel()
    decoded = codec.decode(payload, length=300_000_001)
    assert torch.equal(decoded.indices, indices) and torch.equal(decoded.values, values)


@settings(max_examples=200, deadline=None)
@given(selections(), st.sampled_from(codec.VALUE_FORMATS), st.data())
def test_damaged_payloads_decode_or_raise_data_error(sel, value_format, data):
    """A payload with one damaged byte either decodes (to something) or raises DataError, never another error."""
    length, indices, values = sel
    if value_format == "4bit":
        n = indices.numel()
        values = torch.tensor(data.draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)), dtype=torch.int64)
    payload = codec.encode(indices, values, length=length, value_format=value_format, scale=0.5)
    if payload.numel() == 0:
        return
    damaged = payload.clone()
    position = data.draw(st.integers(0, payload.numel() - 1))
    damaged[position] = data.draw(st.integers(0, 255))
    try:
        decoded = codec.decode(damaged, length=length)
    except DataError:
        return
    assert decoded.indices.numel() == decoded.values.numel()
