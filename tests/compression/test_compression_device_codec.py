"""The torch (device) codec forced on the CPU against the numpy reference: identical bits everywhere;
and bf16/fp16 buckets through the hooks in a two-rank gloo group."""

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sturdy.compression import (
    TopKState,
    VarianceCompressionState,
    accel,
    attach_squared_gradient_statistics,
    codec,
    device_codec,
    topk_hook,
    variance_hook,
)
from sturdy.compression.compressor import strom_select, topk_select, variance_select
from sturdy.distributed import run_local_workers
from sturdy.errors import DataError


@contextmanager
def _path(device: bool):
    """The torch path forced (``True``) or the numpy reference (``False``: numba switched off too)."""
    with device_codec.forced(device), mock.patch.object(accel, "kernels", lambda: None):
        yield


def _case(seed, n, *, zeros=0.3, spread=7.0, density=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(-spread, 1, generator=gen)
    r[torch.rand(n, generator=gen) < zeros] = 0
    v = torch.rand(n, generator=gen) * r * r / density
    return r, v


def _select_both(r, v, **kw):
    out = []
    for device in (False, True):
        r_, v_ = r.clone(), v.clone()
        with _path(device):
            out.append((variance_select(r_, v_, quantize="4bit", **kw), r_, v_))
    return out


def _assert_same_selection(ref, dev):
    (a, ra, va), (b, rb, vb) = ref, dev
    assert torch.equal(ra, rb) and torch.equal(va, vb)
    assert torch.equal(a.payload, b.payload)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert a.wanted_bytes == b.wanted_bytes


def _mode(payload):
    return "bitmap" if (int(payload[0]) >> 2) & 1 else f"rice k={int(payload[0]) >> 3}"


@pytest.mark.parametrize(
    "n, alpha, zeta, boundaries, density, zeros, spread, mode",
    [
        (5000, 4.0, 0.999, [0, 7, 7, 1200, 4000, 5000], 1.0, 0.3, 7.0, "rice"),  # an empty segment
        (5000, 0.3, 0.9, [0, 7, 7, 1200, 4000, 5000], 100.0, 0.0, 0.5, "bitmap"),  # dense: the bitmap
        (5000, 0.0, 0.999, None, 1.0, 0.3, 7.0, None),  # alpha 0 sends every nonzero element
        (200_000, 2.0, 1.0, [0, 200_000], 0.0005, 0.0, 7.0, "rice"),  # very sparse: a large Rice k
        (1, 1.0, 0.5, None, 1.0, 0.0, 7.0, None),
        (0, 1.0, 0.5, None, 1.0, 0.0, 7.0, None),
        (70000, 4.0, 0.999, [0, 100, 65636, 70000], 1.0, 0.3, 7.0, None),
    ],
)
def test_selection_payload_and_updates_equal_the_reference(n, alpha, zeta, boundaries, density, zeros, spread, mode):
    r, v = _case(n + 3, n, density=density, zeros=zeros, spread=spread)
    b = None if boundaries is None else torch.tensor(boundaries)
    ref, dev = _select_both(r, v, alpha=alpha, zeta=zeta, boundaries=b)
    _assert_same_selection(ref, dev)
    if mode is not None:
        assert _mode(ref[0].payload).startswith(mode)
        if n == 200_000:
            assert int(ref[0].payload[0]) >> 3 >= 8
    if n >= 5000:
        assert dev[0].count > 0


def test_sub_level_magnitudes_stay_in_the_residual():
    r = torch.tensor([1.0, 1e-3, -2e-3, 0.5, 1e-30, -1.0, 2.0**-7, -(2.0**-7) * 0.999])
    ref, dev = _select_both(r, torch.zeros(8), alpha=1.0, zeta=0.5, boundaries=torch.tensor([0, 3, 8]))
    _assert_same_selection(ref, dev)
    assert dev[0].indices.tolist() == [0, 3, 5, 6]


@st.composite
def buckets(draw):
    n = draw(st.integers(0, 600))
    raw = draw(st.lists(st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_size=n, max_size=n))
    r = torch.tensor(raw, dtype=torch.float32).reshape(-1)
    factors = draw(st.lists(st.sampled_from([0.0, 0.01, 0.5, 2.0, 100.0]), min_size=n, max_size=n))
    v = r * r * torch.tensor(factors, dtype=torch.float32).reshape(-1)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    boundaries = draw(st.sampled_from([None, torch.tensor([0, *cuts, n])]))
    return r, v, boundaries


@settings(max_examples=150, deadline=None)
@given(buckets(), st.sampled_from([0.0, 0.5, 1.0, 4.0]), st.sampled_from([0.0, 0.9, 1.0]))
def test_generated_selections_equal_the_reference(bucket, alpha, zeta):
    r, v, boundaries = bucket
    ref, dev = _select_both(r, v, alpha=alpha, zeta=zeta, boundaries=boundaries)
    _assert_same_selection(ref, dev)


@st.composite
def sparse_updates(draw):
    length = draw(st.integers(1, 400))
    p = draw(st.sampled_from([0.005, 0.05, 0.5, 1.0]))
    mask = np.array(draw(st.lists(st.floats(0, 1), min_size=length, max_size=length))) < p
    indices = torch.from_numpy(np.flatnonzero(mask).astype(np.int64))
    return length, indices


@settings(max_examples=150, deadline=None)
@given(sparse_updates(), st.sampled_from(codec.VALUE_FORMATS), st.data())
def test_encode_gives_the_reference_bytes(update, value_format, data):
    length, indices = update
    n = indices.numel()
    if value_format == "4bit":
        values = torch.tensor(data.draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)), dtype=torch.int64)
        scales = torch.tensor([0.5, 2.0, 3.0])
    else:
        values = torch.tensor(data.draw(st.lists(st.floats(-5, 5, width=32), min_size=n, max_size=n)),
                              dtype=torch.float32)
        scales = torch.tensor([0.25]) if value_format == "sign" else torch.zeros(0)
    ref = codec.encode_unchecked(indices, values, length=length, value_format=value_format, scales=scales)
    dev = device_codec.encode(indices, values, length=length, value_format=value_format, scales=scales)
    assert torch.equal(ref, dev)


def test_encode_of_very_different_gaps_and_a_huge_vector():
    indices = torch.tensor([0, 1, 130, 20000, 20001, 3_000_000, 300_000_000], dtype=torch.int64)
    values = torch.arange(1.0, 8.0)
    kw = dict(length=300_000_001, value_format="float32", scales=torch.zeros(0))
    ref = codec.encode_unchecked(indices, values, **kw)
    assert torch.equal(ref, device_codec.encode(indices, values, **kw))
    out = torch.zeros(300_000_001 // 1000 + 1)  # a short vector: the index past its end is refused alike
    with pytest.raises(DataError):
        device_codec.decode_add_(out, ref)


def test_strom_and_topk_payloads_equal_the_reference():
    r, _ = _case(7, 3000)
    for fn, kw in ((strom_select, dict(tau=0.05)), (topk_select, dict(ratio=0.01))):
        out = []
        for device in (False, True):
            r_ = r.clone()
            with _path(device):
                out.append((fn(r_, **kw), r_))
        (a, ra), (b, rb) = out
        assert torch.equal(a.payload, b.payload) and torch.equal(ra, rb) and torch.equal(a.values, b.values)
    r_, v_ = r.clone(), torch.rand(3000) * r * r
    with _path(True):
        a = variance_select(r_, v_.clone(), alpha=1.0, zeta=0.9, quantize=None)
    with _path(False):
        b = variance_select(r.clone(), v_.clone(), alpha=1.0, zeta=0.9, quantize=None)
    assert torch.equal(a.payload, b.payload) and torch.equal(a.values, b.values)


@st.composite
def payloads(draw):
    length, indices = draw(sparse_updates())
    n = indices.numel()
    value_format = draw(st.sampled_from(codec.VALUE_FORMATS))
    segments = draw(st.integers(1, 4)) if value_format == "4bit" else 1
    cuts = sorted(draw(st.lists(st.integers(0, length), min_size=segments - 1, max_size=segments - 1)))
    boundaries = torch.tensor([0, *cuts, length])
    if value_format == "4bit":
        values = torch.tensor(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)), dtype=torch.int64)
        magnitudes = st.floats(2.0**-100, 2.0**100, width=32)
        scales = torch.tensor(draw(st.lists(magnitudes, min_size=segments, max_size=segments)))
    else:
        values = torch.tensor(draw(st.lists(st.floats(-5, 5, width=32), min_size=n, max_size=n)),
                              dtype=torch.float32)
        scales = torch.tensor([0.75]) if value_format == "sign" else torch.zeros(0)
    payload = codec.encode_unchecked(indices, values, length=length, value_format=value_format, scales=scales)
    return length, payload, boundaries


def _decode_both(payload, length, boundaries, dtype):
    results = []
    for device in (False, True):
        out = torch.linspace(-1, 1, length, dtype=dtype)
        out[::3] = -0.0
        before = out.clone()
        try:
            with _path(device):
                codec.decode_add_(out, payload, boundaries=boundaries)
            results.append(("ok", out))
        except DataError:
            assert torch.equal(out, before) and torch.equal(out.signbit(), before.signbit()), "output changed"
            results.append(("error", None))
    return results


@settings(max_examples=150, deadline=None)
@given(payloads(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_decoded_sums_equal_the_reference(case, dtype):
    length, payload, boundaries = case
    (ref_status, ref), (dev_status, dev) = _decode_both(payload, length, boundaries, dtype)
    assert ref_status == dev_status == "ok"
    assert torch.equal(ref, dev)


@settings(max_examples=300, deadline=None)
@given(payloads(), st.data())
def test_damaged_payloads_fail_alike_and_leave_the_output_unchanged(case, data):
    length, payload, boundaries = case
    if payload.numel() == 0:
        return
    damaged = payload.clone()
    damaged[data.draw(st.integers(0, payload.numel() - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[: data.draw(st.integers(0, damaged.numel()))]  # or truncated
    (ref_status, ref), (dev_status, dev) = _decode_both(damaged, length, boundaries, torch.float32)
    assert ref_status == dev_status
    if ref_status == "ok":
        torch.testing.assert_close(ref, dev, rtol=0, atol=0, equal_nan=True)


def test_unchecked_decoding_flags_a_corrupt_payload_without_raising():
    indices = torch.tensor([3, 40, 41])
    payload = codec.encode_unchecked(indices, torch.ones(3), length=50, value_format="float32",
                                     scales=torch.zeros(0))
    assert bool(device_codec.decode_add_unchecked(torch.zeros(50), payload))
    damaged = payload.clone()
    damaged[codec.HEADER_BYTES] = 0xFF  # the unary codes run past the section
    out = torch.zeros(50)
    assert not bool(device_codec.decode_add_unchecked(out, damaged, header=bytes(damaged[:13].tolist())))
    with pytest.raises(DataError, match="corrupt payload"):
        device_codec.decode_add_(out, damaged)


def test_dispatch_by_device_type_and_forcing(monkeypatch):
    assert device_codec.enabled_for(torch.device("cuda", 0)) or device_codec._forced[0] is False
    with device_codec.forced(None):
        assert device_codec.enabled_for(torch.device("cuda"))
        assert not device_codec.enabled_for(torch.device("cpu"))
    with device_codec.forced(True):
        assert device_codec.enabled_for(torch.device("cpu"))
        with mock.patch.object(device_codec, "variance_select_4bit", wraps=device_codec.variance_select_4bit) as spy:
            variance_select(torch.ones(4), torch.zeros(4), alpha=1.0, zeta=0.5, quantize="4bit")
        assert spy.call_count == 1
    with device_codec.forced(False):
        assert not device_codec.enabled_for(torch.device("cuda"))
    with mock.patch.object(device_codec, "variance_select_4bit") as spy:  # CPU buckets: numba/numpy
        variance_select(torch.ones(4), torch.zeros(4), alpha=1.0, zeta=0.5, quantize="4bit")
    assert spy.call_count == 0


# --- two ranks, gloo: bf16/fp16 buckets, the device path through the exchange -----------------------------


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
                          nn.ReLU(), nn.Linear(10, 3))
    return model.to(dtype)


def _batch(rank, step, dtype, b=8):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(b, 1, 6, 6, generator=g).to(dtype), torch.randint(0, 3, (b,), generator=g)


def _train(dtype, method, device_path, rank, steps=12):
    model = _model(dtype)
    if method == "vgc":
        state = VarianceCompressionState(statistics=attach_squared_gradient_statistics(model), alpha=1.0, zeta=0.99)
        hook = variance_hook
    else:
        state, hook = TopKState(ratio=0.1, named_parameters=model.named_parameters()), topk_hook
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    with device_codec.forced(device_path):
        for step in range(steps):
            x, y = _batch(rank, step, dtype)
            opt.zero_grad()
            F.cross_entropy(ddp(x).float(), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    residual_dtypes = {str(t.dtype) for t in state._buffers["residual"].values()}
    return {
        "params": flat.numpy().copy(),  # numpy: a tensor would be shared through a file descriptor
        "grad_dtypes": {str(g.dtype) for g in grads[-1]},
        "residual_dtypes": sorted(residual_dtypes),
        "same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
        "finite": bool(torch.isfinite(flat).all()),
        "sent": state._counters["elements_sent"],
        "elements": state._counters["elements"],
    }


def _mixed_precision_worker(rank, world):
    """Every scenario of one launch: per dtype and method, the torch path forced and the host path."""
    report = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for method in ("vgc", "topk"):
            report[(str(dtype), method)] = {path: _train(dtype, method, path, rank) for path in (True, False)}
    return report


@pytest.mark.distributed
def test_half_precision_buckets_and_the_device_path_in_a_two_rank_gloo_group():
    reports = run_local_workers(_mixed_precision_worker, nproc=2, timeout_s=240.0)
    for rank, report in enumerate(reports):
        for (dtype, method), paths in report.items():
            forced, host = paths[True], paths[False]
            assert np.array_equal(forced["params"], host["params"]), (rank, dtype, method)  # same bits, both paths
            for run in (forced, host):
                assert run["same_on_ranks"] and run["finite"], (rank, dtype, method)
                assert run["grad_dtypes"] == {dtype}, (rank, dtype, method)
                assert run["residual_dtypes"] == ["torch.float32"], (rank, dtype, method)
                assert 0 < run["sent"] < run["elements"], (rank, dtype, method)  # compressed steps ran
    assert np.array_equal(reports[0][("torch.bfloat16", "vgc")][True]["params"],
                          reports[1][("torch.bfloat16", "vgc")][True]["params"])
