"""Local multi-process runs and process lifecycle: start ``torch.distributed`` workers (gloo on CPU, NCCL
on GPU), join a ``torchrun`` launch, and small collective helpers shared by the parts.

Local runs rendezvous through a :class:`torch.distributed.FileStore` in a fresh temporary folder (no
port to pick, nothing listening on a network interface) and gloo connects over the loopback
interface only. A worker that raises or dies makes the launch fail with
:class:`~sturdy.errors.DistributedError` naming the rank: the other workers fail on their next
collective (gloo notices the closed connection, and the process group's ``timeout`` bounds every
collective), and whatever still runs after a grace period is terminated. Nothing hangs past
``timeout_s``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sturdy.errors import ConfigurationError, DistributedError

__all__ = [
    "launched_by_torchrun",
    "init_from_env",
    "run_local_workers",
    "loopback_interface",
    "collective_device",
    "all_reduce_sum",
]

GRACE_S = 10.0


def launched_by_torchrun() -> bool:
    """True when ``RANK`` and ``WORLD_SIZE`` are set (``torchrun`` or another launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def loopback_interface() -> Optional[str]:
    """Name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    for name in names:
        if name.startswith("lo"):
            return name
    return None


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"


def init_from_env(*, device: str = "cpu", timeout_s: float = 300.0) -> None:
    """Initialise the default process group from ``torchrun``'s environment (``env://``)."""
    if not dist.is_initialized():
        dist.init_process_group(_backend(device), timeout=datetime.timedelta(seconds=timeout_s))


def collective_device(process_group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where tensors of a collective in ``process_group`` must live (the current GPU for NCCL, else the CPU)."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(
    values: Sequence[Union[int, float]], *, process_group: Optional[dist.ProcessGroup] = None
) -> List[float]:
    """Element-wise sum of ``values`` over the ranks of ``process_group``, as float64 (one collective).

    Every rank must pass the same number of values.
    """
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=collective_device(process_group))
    dist.all_reduce(t, group=process_group)
    return t.cpu().tolist()


def _worker(
    rank: int,
    world: int,
    store_path: str,
    backend: str,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
) -> None:
    try:
        iface = loopback_interface()
        if backend == "gloo" and iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit non-zero
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_local_workers(
    fn: Callable[..., Any],
    *,
    nproc: int,
    args: Sequence[Any] = (),
    device: str = "cpu",
    timeout_s: float = 600.0,
    collective_timeout_s: float = 60.0,
) -> List[Any]:
    """Run ``fn(rank, world, *args)`` in ``nproc`` spawned processes inside a process group.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        nproc: number of workers, ``>= 1``.
        args: extra positional arguments for ``fn``.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL when available).
        timeout_s: deadline of the whole launch.
        collective_timeout_s: the process group's timeout for one collective.

    Returns:
        The return values, by rank.

    Raises:
        DistributedError: a worker raised or died, or the deadline passed (the message names the
            ranks and carries the first worker traceback).
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigurationError(f"nproc must be a positive int, got {nproc!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    backend = _backend(device)
    with tempfile.TemporaryDirectory(prefix="sturdy-rdzv-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, nproc, store_path, backend, collective_timeout_s, fn, tuple(args), results),
                daemon=False,
            )
            for rank in range(nproc)
        ]
        for p in procs:
            p.start()
        outcome: dict = {}
        deadline = time.monotonic() + timeout_s
        first_failure: Optional[float] = None
        try:
            while len(outcome) < nproc:
                _drain(results, outcome)
                failed = [r for r, (status, _) in outcome.items() if status == "error"]
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                now = time.monotonic()
                if (failed or dead) and first_failure is None:
                    first_failure = now
                if first_failure is not None and now - first_failure > GRACE_S:
                    break
                if now > deadline:
                    break
                if all(p.exitcode is not None for p in procs):
                    _drain(results, outcome, wait=1.0)
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5.0)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5.0)
        _drain(results, outcome)
    errors = {r: msg for r, (status, msg) in outcome.items() if status == "error"}
    missing = [r for r in range(nproc) if r not in outcome]
    if not errors and not missing:
        return [outcome[r][1] for r in range(nproc)]
    parts = []
    for r in missing:
        code = procs[r].exitcode
        parts.append(f"rank {r} died (exit code {code})" if code not in (None, 0) else f"rank {r} did not finish")
    for r in sorted(errors):
        parts.append(f"rank {r} failed: {errors[r].splitlines()[0]}")
    timed_out = time.monotonic() > deadline
    detail = next(iter(errors.values()), "")
    raise DistributedError(
        (f"distributed run timed out after {timeout_s:.0f} s; " if timed_out else "distributed run failed; ")
        + "; ".join(parts)
        + (f"\nfirst worker traceback:\n{detail}" if detail else "")
    )


def _drain(queue: Any, outcome: dict, *, wait: float = 0.0) -> None:
    import queue as queue_mod

    end = time.monotonic() + wait
    while True:
        try:
            rank, status, value = queue.get(timeout=max(0.01, end - time.monotonic()) if wait else 0.01)
        except queue_mod.Empty:
            if time.monotonic() >= end:
                return
            continue
        outcome[rank] = (status, value)
