"""The shared search machinery: the candidate space, the halving schedule, counting and the halving loop."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from sturdy.errors import ConfigurationError
from sturdy.fourier import enumerate_candidates, halving_schedule
from sturdy.fourier.search import count_fooled, plan_queries, successive_halving

from .conftest import tiny_cnn
from .fourier_reference import direct_direction, direct_perturbation


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 5, 4), (3, 3, 3)])
def test_candidates_are_distinct_and_cover_the_search_space(shape):
    channels, height, width = shape
    cands = enumerate_candidates(channels, height, width)
    deltas = []
    for i in range(len(cands)):
        k, l = cands.frequencies[i].tolist()  # noqa: E741
        u = direct_direction(height, width, k, l, float(cands.phases[i]))
        deltas.append(direct_perturbation(u, cands.signs[i].tolist(), eps=1.0, norm="l2", wave="sine").flatten())
    mat = torch.stack(deltas)
    distance = torch.cdist(mat, mat) + torch.eye(len(mat))
    assert float(distance.min()) > 1e-6  # no duplicates
    for k, l in itertools.product(range(height), range(width)):  # noqa: E741
        for j, signs in itertools.product(range(8), itertools.product((1, -1), repeat=channels)):
            u = direct_direction(height, width, k, l, j * math.pi / 4)
            d = direct_perturbation(u, signs, eps=1.0, norm="l2", wave="sine").flatten()
            assert float((mat - d).norm(dim=1).min()) < 1e-9, (k, l, j, signs)


def test_halving_schedule_is_nested_and_cheaper():
    plan = halving_schedule(248, 300, initial_images=16, eta=2)
    assert plan[0] == (248, 16) and plan[-1][1] == 300
    assert all(a[0] >= b[0] and a[1] < b[1] for a, b in zip(plan, plan[1:]))
    assert halving_schedule(3, 100, initial_images=16, eta=2)[-1] == (1, 100)




def test_plan_queries_sums_the_nested_rounds():
    plan = halving_schedule(10, 40, initial_images=4, eta=2)
    expected = sum(keep * (images - prev) for (keep, images), prev in zip(plan, [0] + [m for _, m in plan[:-1]]))
    assert plan_queries(plan) == expected
    assert plan_queries([(7, 9)]) == 63


def test_successive_halving_equals_a_plain_loop_and_counts_queries():
    """The halving loop against a direct re-implementation on a table of per-image outcomes."""
    gen = torch.Generator().manual_seed(3)
    fooled = torch.rand(37, 50, generator=gen) < torch.linspace(0.1, 0.6, 37)[:, None]  # (candidates, images)
    plan = halving_schedule(37, 50, initial_images=4, eta=2)
    order = torch.randperm(50, generator=gen)
    calls = []

    def count(idx, images):
        calls.append(len(idx) * len(images))
        return fooled[idx][:, images].sum(dim=1)

    outcome = successive_halving(count, 37, plan, order)
    alive = list(range(37))
    for r, (keep, _) in enumerate(plan):
        if r > 0:
            scores = {c: int(fooled[c, order[:plan[r - 1][1]]].sum()) for c in alive}
            alive = sorted(sorted(alive, key=lambda c: (-scores[c], c))[:keep])
    final = {c: int(fooled[c, order[: plan[-1][1]]].sum()) for c in alive}
    assert outcome.best == min(alive, key=lambda c: (-final[c], c))
    assert int(outcome.counts[outcome.best]) == final[outcome.best]
    assert outcome.queries == sum(calls) == plan_queries(plan)


def test_count_fooled_matches_a_manual_count_for_any_batch_size():
    shape = (2, 4, 4)
    model = tiny_cnn(shape)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(9, *shape, generator=gen, dtype=torch.float64)
    deltas = 0.5 * torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    images = torch.tensor([0, 2, 3, 5, 8])
    with torch.no_grad():
        clean = model(x).argmax(1)
        expected = torch.stack([(model((x[images] + d).clamp(0, 1)).argmax(1) != clean[images]).sum() for d in deltas])
    for batch_size in (1, 4, 7, 100):
        got = count_fooled(model, x, clean, lambda c0, c1: deltas[c0:c1], 6, images, bounds=(0.0, 1.0),
                           batch_size=batch_size)
        assert torch.equal(got, expected), batch_size


def test_candidates_serialise():
    cands = enumerate_candidates(2, 3, 4, phases=2)
    data = json.loads(json.dumps(cands.to_dict()))
    assert len(data["frequencies"]) == len(data["phases"]) == len(data["signs"]) == len(cands)
    assert all(s in ([1, 1], [1, -1]) for s in data["signs"])


@pytest.mark.parametrize("phases", [0, 1.5, True])
def test_bad_phases_are_refused(phases):
    with pytest.raises(ConfigurationError, match=r"phases must be an integer in \[1, "):
        enumerate_candidates(1, 4, 4, phases=phases)
