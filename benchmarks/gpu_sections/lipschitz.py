"""GPU section of the Lipschitz part: LMT training step / standard step (WRN-16-4, batch 128) and the time of
the guaranteed bound.

Both steps: forward, loss, backward, Adam step, on the same model and batch; the LMT step is the real
objective of ``sturdy train --method lmt`` (tracker with one power iteration per operator, same-shape
convolutions batched into grouped convolutions, BatchNorm batch statistics recorded during the forward).
Steps are interleaved after a warm-up, each timed between ``torch.cuda.synchronize`` calls; the ratio of the
medians is reported, and the same ratio with the per-layer (unbatched) power iterations for comparison, and
with the tracker's step under ``torch.compile`` (its compile time reported apart). A profile of one step of
each kind counts the kernel launches and names the operators that cost the most device time, so the figure
says where the LMT overhead goes.
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


def _compiled_objective(model: torch.nn.Module, shape: tuple, device: torch.device) -> Dict[str, Any]:
    """An LMT objective whose tracker step runs under ``torch.compile`` (first calls compile: timed apart)."""
    try:
        obj = lmt_objective(model, input_shape=(1, *shape), steps_per_epoch=10 ** 6, c=0.3)
        obj.tracker.forward = torch.compile(obj.tracker.forward)  # type: ignore[method-assign]
        x = torch.rand(2, *shape, device=device)
        y = torch.zeros(2, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        for _ in range(2):  # with and without recorded batch statistics
            loss, _ = obj(model, x, y, epoch=0, step=0)
            loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        return {"objective": obj, "compile_seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - the compiled variant is informative; its failure is reported
        return {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}


def _profile(fn: Callable[[], None], device: torch.device) -> Dict[str, Any]:
    """Kernel launches of one step and the operators with the most device (or host) self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
    return {
        "host_ops": int(sum(e.count for e in events if e.key.startswith("aten::"))),
        "launches": int(sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                 "cudaLaunchKernelExC", "cuLaunchKernelEx"))),
        "top": [{"op": e.key[:80], "count": int(e.count), "self_ms": getattr(e, key, 0.0) / 1e3} for e in top],
    }


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

    fns = {"standard": standard, "lmt": lmt_step("lmt"), "lmt_unbatched": lmt_step("lmt_unbatched")}
    compiled = _compiled_objective(model, shape, device)
    if "error" not in compiled:
        objectives["lmt_compiled"] = compiled.pop("objective")
        fns["lmt_compiled"] = lmt_step("lmt_compiled")
    med = _interleaved(fns, warmup=warmup, steps=steps, device=device)
    ratio = med["lmt"] / med["standard"]
    profiles = {name: _profile(fns[name], device) for name in ("standard", "lmt")}
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
        "ratio_compiled_over_standard": med["lmt_compiled"] / med["standard"] if "lmt_compiled" in med else None,
        "compiled": compiled,
        "profiles": profiles,
        "bound_seconds": bound_seconds,
        "bound_upper": bound.upper,
        "bound_estimate": bound.estimate,
        "power_iteration_operators": len(list(objectives["lmt"].tracker.buffers())),
        "power_iteration_groups": len(objectives["lmt"].tracker._groups),
        "targets": {
            "lmt_step_over_standard_step": {"value": ratio, "target": f"<= {TARGET}", "met": ratio <= TARGET},
        },
    }
