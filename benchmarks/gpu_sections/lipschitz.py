"""GPU section of the Lipschitz part: LMT training step / standard step (WRN-16-4, batch 128) and the time of
the guaranteed bound.

Both steps: forward, loss, backward, Adam step, on the same model and batch; the LMT step is the real
objective of ``sturdy train --method lmt`` (tracker with one power iteration per operator, same-shape
convolutions batched into grouped convolutions, BatchNorm batch statistics recorded during the forward).
Steps are interleaved after a warm-up, each timed between ``torch.cuda.synchronize`` calls; the ratio of the
medians is reported, and the same ratio with the per-layer (unbatched) power iterations for comparison.
``smoke=True`` runs tiny sizes on any device in seconds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from sturdy.lipschitz import lipschitz_bound, lmt_objective
from sturdy.models import create_model

TARGET = 1.10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: Dict[str, Callable[[], None]], *, warmup: int, steps: int, device: torch.device) -> Dict:
    times: Dict[str, list] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(*, device: torch.device, smoke: bool) -> Dict[str, Any]:
    """LMT step / standard step and the bound time (see the module doc)."""
    torch.manual_seed(0)
    size, batch = (4, 8) if smoke else (32, 128)
    kwargs = {"depth": 10, "widen": 1} if smoke else {"depth": 16, "widen": 4}
    warmup, steps = (2, 3) if smoke else (20, 60)
    shape = (3, size, size)
    model = create_model("wrn", in_shape=shape, num_classes=10, **kwargs).to(device).train()
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    objectives = {}
    for name, batched in (("lmt", True), ("lmt_unbatched", False)):
        obj = lmt_objective(model, input_shape=(1, *shape), steps_per_epoch=10 ** 6, c=0.3)
        if not batched:
            from sturdy.lipschitz import LipschitzTracker

            obj.tracker = LipschitzTracker(model, input_shape=(1, *shape), batch_shapes=False).to(device)
        objectives[name] = obj

    def standard() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def lmt_step(name: str) -> Callable[[], None]:
        obj = objectives[name]

        def step() -> None:
            loss, _ = obj(model, x, y, epoch=0, step=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    med = _interleaved({"standard": standard, "lmt": lmt_step("lmt"), "lmt_unbatched": lmt_step("lmt_unbatched")},
                       warmup=warmup, steps=steps, device=device)
    ratio = med["lmt"] / med["standard"]
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    bound = lipschitz_bound(model, input_shape=(1, *shape))
    _sync(device)
    bound_seconds = time.perf_counter() - t0
    return {
        "model": f"wrn-{kwargs['depth']}-{kwargs['widen']}",
        "input_shape": [batch, *shape],
        "median_step_seconds": med,
        "ratio_lmt_over_standard": ratio,
        "ratio_unbatched_over_standard": med["lmt_unbatched"] / med["standard"],
        "bound_seconds": bound_seconds,
        "bound_upper": bound.upper,
        "bound_estimate": bound.estimate,
        "power_iteration_operators": len(list(objectives["lmt"].tracker.buffers())),
        "power_iteration_groups": len(objectives["lmt"].tracker._groups),
        "targets": {
            "lmt_step_over_standard_step": {"value": ratio, "target": f"<= {TARGET}", "met": ratio <= TARGET},
        },
    }
