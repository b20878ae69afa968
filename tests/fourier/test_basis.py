"""Basis directions: unit norm, exact DFT support, orthogonality, direct formula, odd/non-square sizes."""

from __future__ import annotations

import math

import pytest
import torch

from sturdy.errors import ConfigurationError
from sturdy.fourier import (
    DEFAULT_PHASE,
    canonical_index_map,
    fourier_basis,
    fourier_basis_batch,
    half_plane,
    is_self_conjugate,
    to_full_map,
)

ABS_TOL = 1e-10  # float64 round-off of an irfft2 of a tiny image
SUPPORT_TOL = 1e-9  # DFT magnitude treated as zero (float64)
F32_TOL = 1e-5  # float32 directions against the float64 formula

SIZES = [(8, 8), (7, 5), (6, 9), (5, 6), (1, 4), (5, 1), (2, 2), (3, 3), (4, 7)]


def direct(height: int, width: int, k: int, l: int, phase: float) -> torch.Tensor:  # noqa: E741
    """cos(theta + phase) normalised, straight from docs/design.md section 2, in float64."""
    p, q = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    theta = 2 * math.pi * (k * p.double() / height + l * q.double() / width)
    u = torch.cos(theta + phase)
    if is_self_conjugate(height, width, k % height, l % width):
        u = torch.cos(theta) * (1.0 if math.cos(phase) >= -1e-9 else -1.0)
    return u / u.norm()


def n_self_conjugate(height: int, width: int) -> int:
    return (1 + (height % 2 == 0)) * (1 + (width % 2 == 0))


@pytest.mark.parametrize("height,width", SIZES)
def test_half_plane_lists_each_direction_once(height, width):
    freqs = half_plane(height, width)
    assert freqs.shape == ((height * width + n_self_conjugate(height, width)) // 2, 2)
    seen = set()
    for k, l in freqs.tolist():  # noqa: E741
        key = frozenset({(k, l), ((-k) % height, (-l) % width)})
        assert key not in seen
        seen.add(key)
    index = canonical_index_map(height, width)
    assert int(index.min()) == 0 and int(index.max()) == freqs.shape[0] - 1
    for k in range(height):
        for l in range(width):  # noqa: E741
            assert int(index[k, l]) == int(index[(-k) % height, (-l) % width])


@pytest.mark.parametrize("height,width", SIZES)
def test_directions_are_real_unit_and_match_the_direct_formula(height, width):
    freqs = half_plane(height, width)
    gen = torch.Generator().manual_seed(1)
    phases = torch.rand(freqs.shape[0], generator=gen, dtype=torch.float64) * 2 * math.pi
    u = fourier_basis_batch(height, width, freqs, phases, dtype=torch.float64)
    assert u.dtype == torch.float64 and u.shape == (freqs.shape[0], height, width)
    torch.testing.assert_close(u.norm(dim=(1, 2)), torch.ones(freqs.shape[0], dtype=torch.float64))
    for i, (k, l) in enumerate(freqs.tolist()):  # noqa: E741
        torch.testing.assert_close(u[i], direct(height, width, k, l, float(phases[i])), atol=ABS_TOL, rtol=0)


@pytest.mark.parametrize("height,width", [(7, 5), (6, 8)])
def test_frequencies_outside_the_half_plane_are_conjugates(height, width):
    """Any (k, l), negative or with l > W // 2, gives cos(theta + phi) with that (k, l)."""
    for k, l, phase in [(-1, 3, 0.3), (2, width - 1, 1.0), (height + 1, -2, -2.0), (0, width - 1, 0.7)]:  # noqa: E741
        got = fourier_basis(height, width, k, l, phase=phase, dtype=torch.float64)
        torch.testing.assert_close(got, direct(height, width, k, l, phase), atol=ABS_TOL, rtol=0)


@pytest.mark.parametrize("height,width", SIZES)
def test_dft_support_is_exactly_the_conjugate_pair(height, width):
    freqs = half_plane(height, width)
    u = fourier_basis_batch(height, width, freqs, DEFAULT_PHASE, dtype=torch.float64)
    spectrum = torch.fft.fft2(u).abs()
    for i, (k, l) in enumerate(freqs.tolist()):  # noqa: E741
        expected = torch.zeros(height, width, dtype=torch.bool)
        expected[k, l] = True
        expected[(-k) % height, (-l) % width] = True
        assert torch.equal(spectrum[i] > SUPPORT_TOL, expected), (k, l)


@pytest.mark.parametrize("height,width", SIZES)
def test_distinct_directions_are_orthonormal(height, width):
    freqs = half_plane(height, width)
    u = fourier_basis_batch(height, width, freqs, dtype=torch.float64).flatten(1)
    gram = u @ u.T
    torch.testing.assert_close(gram, torch.eye(freqs.shape[0], dtype=torch.float64), atol=ABS_TOL, rtol=0)


def test_phase_spans_the_two_dimensional_subspace():
    """u_phi = cos(phi) u_0 + sin(phi) u_{pi/2} and u_0 is orthogonal to u_{pi/2} (non-self-conjugate)."""
    height, width, k, l = 6, 7, 2, 3  # noqa: E741
    u0 = fourier_basis(height, width, k, l, phase=0.0, dtype=torch.float64)
    u90 = fourier_basis(height, width, k, l, phase=math.pi / 2, dtype=torch.float64)
    assert abs(float((u0 * u90).sum())) < ABS_TOL
    for phi in (0.4, 2.0, -1.3):
        got = fourier_basis(height, width, k, l, phase=phi, dtype=torch.float64)
        torch.testing.assert_close(got, math.cos(phi) * u0 + math.sin(phi) * u90, atol=ABS_TOL, rtol=0)


@pytest.mark.parametrize("height,width", [(8, 8), (6, 5), (5, 4), (3, 3)])
def test_self_conjugate_frequencies_are_one_dimensional(height, width):
    selfs = [(k, l) for k in range(height) for l in range(width) if is_self_conjugate(height, width, k, l)]  # noqa: E741
    assert len(selfs) == n_self_conjugate(height, width)
    for k, l in selfs:  # noqa: E741
        base = fourier_basis(height, width, k, l, phase=0.0, dtype=torch.float64)
        assert set(base.flatten().sign().tolist()) <= {-1.0, 1.0}  # +-1/sqrt(HW): a checkerboard or constant
        for j in range(8):
            phi = j * math.pi / 4
            got = fourier_basis(height, width, k, l, phase=phi, dtype=torch.float64)
            sign = 1.0 if math.cos(phi) >= -1e-9 else -1.0
            torch.testing.assert_close(got, sign * base, atol=ABS_TOL, rtol=0)


def test_float32_and_device_follow_the_arguments():
    u = fourier_basis(9, 4, 3, 1, dtype=torch.float32, device="cpu")
    assert u.dtype == torch.float32 and u.device.type == "cpu"
    torch.testing.assert_close(u.double(), direct(9, 4, 3, 1, DEFAULT_PHASE), atol=F32_TOL, rtol=0)


def test_full_map_is_symmetric_and_centred():
    height, width = 5, 6
    freqs = half_plane(height, width)
    values = torch.arange(freqs.shape[0], dtype=torch.float64)
    raw = to_full_map(values, height, width, centered=False)
    for k in range(height):
        for l in range(width):  # noqa: E741
            assert raw[k, l] == raw[(-k) % height, (-l) % width]
    centred = to_full_map(values, height, width)
    assert centred[height // 2, width // 2] == raw[0, 0] == 0.0
    with pytest.raises(ConfigurationError, match="one per half-plane frequency"):
        to_full_map(values[:-1], height, width)


def test_bad_arguments_are_rejected():
    with pytest.raises(ConfigurationError, match="height must be a positive int"):
        fourier_basis(0, 4, 0, 0)
    with pytest.raises(ConfigurationError, match="k must be an int"):
        fourier_basis(4, 4, 1.5, 0)
    with pytest.raises(ConfigurationError, match="frequencies must be integers"):
        fourier_basis_batch(4, 4, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ConfigurationError, match=r"phases must be a scalar or have shape \(2,\)"):
        fourier_basis_batch(4, 4, [[1, 0], [0, 1]], torch.zeros(3))
    with pytest.raises(ConfigurationError, match="real floating dtype"):
        fourier_basis(4, 4, 1, 0, dtype=torch.int64)
