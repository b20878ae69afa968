"""The compiled kernels (numba) against the numpy reference path: identical bits everywhere."""

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sturdy.compression import accel, codec
from sturdy.compression.compressor import variance_select
from sturdy.errors import DataError

pytest.importorskip("numba")

COMPILED = accel.kernels()


@contextmanager
def _path(compiled: bool):
    """Run the compiled kernels (``True``) or the numpy reference path (``False``) inside the block."""
    assert COMPILED is not None, "numba is installed but the kernels did not load (STURDY_NUMBA=0?)"
    with mock.patch.object(accel, "kernels", (lambda: COMPILED) if compiled else (lambda: None)):
        yield


def _case(seed, n, *, zeros=0.3, spread=7.0, density=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(-spread, 1, generator=gen)
    r[torch.rand(n, generator=gen) < zeros] = 0
    v = torch.rand(n, generator=gen) * r * r / density
    return r, v


def _both(r, v, **kw):
    out = {}
    for on in (False, True):
        r_, v_ = r.clone(), v.clone()
        with _path(on):
            out[on] = (variance_select(r_, v_, quantize="4bit", **kw), r_, v_)
    return out[False], out[True]


@pytest.mark.parametrize(
    "n, alpha, zeta, boundaries, density",
    [
        (5000, 4.0, 0.999, [0, 7, 7, 1200, 4000, 5000], 1.0),  # empty segment, sparse: Rice-coded gaps
        (5000, 0.3, 0.9, [0, 7, 7, 1200, 4000, 5000], 1.0),  # dense: the bitmap
        (5000, 0.0, 0.999, None, 1.0),  # alpha 0 sends every nonzero element
        (5000, 2.0, 1.0, [0, 5000], 0.05),  # one segment given explicitly, very sparse (large Rice k)
        (1, 1.0, 0.5, None, 1.0),
        (0, 1.0, 0.5, None, 1.0),
        (70000, 4.0, 0.999, [0, 100, 65636, 70000], 1.0),
    ],
)
def test_selection_and_payload_equal_the_numpy_path(n, alpha, zeta, boundaries, density):
    r, v = _case(n + 3, n, density=density)
    b = None if boundaries is None else torch.tensor(boundaries)
    (ref, r_ref, v_ref), (fast, r_fast, v_fast) = _both(r, v, alpha=alpha, zeta=zeta, boundaries=b)
    assert torch.equal(r_ref, r_fast) and torch.equal(v_ref, v_fast)
    assert torch.equal(ref.payload, fast.payload)
    assert torch.equal(ref.indices, fast.indices) and torch.equal(ref.values, fast.values)
    assert ref.wanted_bytes == fast.wanted_bytes
    if n >= 5000:
        assert fast.count > 0


def test_sub_level_elements_stay_in_the_residual_in_both_paths():
    """Magnitudes below scale * 2^-7 are not sent (and their variance only decays) in both paths."""
    r = torch.tensor([1.0, 1e-3, -2e-3, 0.5, 1e-30, -1.0], dtype=torch.float32)
    v = torch.zeros(6)
    (ref, r_ref, v_ref), (fast, r_fast, v_fast) = _both(r, v, alpha=1.0, zeta=0.5,
                                                         boundaries=torch.tensor([0, 3, 6]))
    assert fast.indices.tolist() == ref.indices.tolist() == [0, 3, 5]
    assert torch.equal(r_ref, r_fast) and torch.equal(v_ref, v_fast) and torch.equal(ref.payload, fast.payload)


@st.composite
def payloads(draw):
    length = draw(st.integers(1, 400))
    p = draw(st.sampled_from([0.01, 0.1, 0.5, 1.0]))
    mask = np.array(draw(st.lists(st.floats(0, 1), min_size=length, max_size=length))) < p
    indices = torch.from_numpy(np.flatnonzero(mask).astype(np.int64))
    n = indices.numel()
    codes = torch.tensor(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)), dtype=torch.int64)
    segments = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, length), min_size=segments - 1, max_size=segments - 1)))
    boundaries = torch.tensor([0, *cuts, length])
    magnitudes = st.floats(2.0**-100, 2.0**100, width=32)
    scales = torch.tensor(draw(st.lists(magnitudes, min_size=segments, max_size=segments)))
    payload = codec.encode(indices, codes, length=length, value_format="4bit", scale=scales)
    return length, payload, boundaries


def _decode_both(payload, length, boundaries, dtype):
    results = []
    for on in (False, True):
        out = torch.linspace(-1, 1, length, dtype=dtype)
        before = out.clone()
        try:
            with _path(on):
                codec.decode_add_(out, payload, boundaries=boundaries)
            results.append(("ok", out))
        except DataError:
            assert torch.equal(out, before), "a failed decode changed its output"
            results.append(("error", None))
    return results


@settings(max_examples=150, deadline=None)
@given(payloads(), st.sampled_from([torch.float32, torch.float64]))
def test_decode_add_equals_the_numpy_path(case, dtype):
    length, payload, boundaries = case
    (ref_status, ref), (fast_status, fast) = _decode_both(payload, length, boundaries, dtype)
    assert ref_status == fast_status == "ok"
    assert torch.equal(ref, fast)


@settings(max_examples=300, deadline=None)
@given(payloads(), st.data())
def test_damaged_payloads_fail_alike_and_leave_the_output_unchanged(case, data):
    length, payload, boundaries = case
    if payload.numel() == 0:
        return
    damaged = payload.clone()
    damaged[data.draw(st.integers(0, payload.numel() - 1))] = data.draw(st.integers(0, 255))
    (ref_status, ref), (fast_status, fast) = _decode_both(damaged, length, boundaries, torch.float32)
    assert ref_status == fast_status
    if ref_status == "ok":  # a damaged scale may decode to NaN: alike means NaN in the same places
        torch.testing.assert_close(ref, fast, rtol=0.0, atol=0.0, equal_nan=True)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("STURDY_NUMBA", "0")
    monkeypatch.setattr(accel, "_resolved", [])
    assert accel.kernels() is None and not accel.available()
    monkeypatch.setenv("STURDY_NUMBA", "1")
    monkeypatch.setattr(accel, "_resolved", [])
    assert accel.available()


def test_falls_back_to_numpy_without_numba_and_warns_when_the_kernels_cannot_load(monkeypatch):
    import importlib.util
    import sys
    import warnings

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(accel, "_resolved", [])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else real_find_spec(name, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numba not installed: the numpy path, silently
        assert accel.kernels() is None
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(accel, "_resolved", [])
    monkeypatch.setitem(sys.modules, "sturdy.compression._numba_kernels", None)  # its import fails
    with pytest.warns(RuntimeWarning, match="numba kernels unavailable"):
        assert accel.kernels() is None
    r, v = _case(5, 300)
    selection = variance_select(r, v, alpha=1.0, zeta=0.9, quantize="4bit")  # the numpy path runs
    assert selection.count > 0


def test_a_payload_with_a_non_finite_scale_or_value_is_refused():
    import struct

    codes = torch.tensor([0, 9, 2], dtype=torch.uint8)
    for fmt, vals, scale in (("4bit", codes, 0.5), ("float32", torch.tensor([0.5, -0.25, 1.0]), 0.0)):
        payload = codec.encode(torch.tensor([1, 4, 7]), vals, length=10, value_format=fmt, scale=scale)
        codec.decode(payload, length=10)  # intact: decodes
        damaged = payload.clone()
        at = codec.HEADER_BYTES if fmt == "4bit" else payload.numel() - 4  # the scale, or the last value
        damaged[at : at + 4] = torch.tensor(list(struct.pack("<f", float("nan"))), dtype=torch.uint8)
        with pytest.raises(DataError, match="NaN or infinite"):
            codec.decode(damaged, length=10)
