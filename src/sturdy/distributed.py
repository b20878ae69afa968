"""Local multi-process runs and process lifecycle: start ``torch.distributed`` workers (gloo on CPU, NCCL
on GPU), join a ``torchrun`` launch, and small collective helpers shared by the parts.

Local runs rendezvous through a :class:`torch.distributed.FileStore` in a fresh temporary folder (no
port to pick, nothing listening on a network interface) and gloo connects over the loopback
interface only. A worker that raises or dies makes the launch fail with
:class:`~sturdy.errors.DistributedError` naming the rank: the other workers fail on their next
collective (gloo notices the closed connection, and the process group's ``timeout`` bounds every
collective), and whatever still runs after a grace period is terminated. Nothing hangs past
``timeout_s``.

Lifecycle: workers die with their launcher. SIGTERM, SIGINT or SIGHUP to the launcher ends every
worker (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`) and raises :class:`LaunchInterrupted`; a
launcher that dies without cleaning up (SIGKILL, a crash) takes its workers along: on Linux each worker
asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog
thread polls the parent's pid. Either way a worker whose launcher is gone stops at once, without
writing a checkpoint or results.
"""

from __future__ import annotations

import ctypes
import datetime
import io
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

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
    "gather_to_rank0",
    "max_local_workers",
    "LaunchInterrupted",
]

GRACE_S = 10.0
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL of the workers when the launch is stopped
WATCHDOG_PERIOD_S = 0.5
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


class LaunchInterrupted(KeyboardInterrupt):
    """The launcher received SIGTERM, SIGINT or SIGHUP; every worker was ended before this was raised.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; every worker was ended")
        self.signum = signum


class _WorkerTraceback(Exception):
    """A worker's traceback as text: the ``__cause__`` of a launch's error (shown with ``--debug``)."""


def max_local_workers() -> int:
    """Most local workers one launch may start: 4 per CPU core (at least 4)."""
    return max(4, 4 * (os.cpu_count() or 1))


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


def gather_to_rank0(obj: Any, *, device: Optional[torch.device] = None,
                    process_group: Optional[dist.ProcessGroup] = None) -> Optional[List[Any]]:
    """Every rank's ``obj`` (tensors and plain containers), by rank, on rank 0 (``None`` on the others).

    A collective: every rank of ``process_group`` calls it. ``obj`` travels as a ``torch.save`` archive
    (its tensors on the CPU), through ``device`` (the rank's GPU under NCCL; default
    :func:`collective_device`), and is read back with ``torch.load(weights_only=True)``.
    """
    nccl = dist.get_backend(process_group) == "nccl"
    dev = device if device is not None and nccl else collective_device(process_group)
    buffer = io.BytesIO()
    torch.save(_to_cpu(obj), buffer)
    data = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8).to(dev)
    world = dist.get_world_size(process_group)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=process_group)
    longest = int(max(int(t) for t in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    rank = dist.get_rank(process_group)
    dst = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    slots = [torch.zeros_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, slots, dst=dst, group=process_group)
    if slots is None:
        return None
    return [torch.load(io.BytesIO(t[: int(n)].cpu().numpy().tobytes()), weights_only=True)
            for t, n in zip(slots, sizes)]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (its launcher) is gone: parent-death signal + watchdog."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if os.getppid() != parent_pid:  # the launcher died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os._exit(1)  # no cleanup: nothing of this worker's run is written after its launcher died

    threading.Thread(target=watch, name="sturdy-parent-watchdog", daemon=True).start()


def _worker(
    rank: int,
    world: int,
    store_path: str,
    backend: str,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
    parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
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
        # pickled by value: a tensor sent through the queue as is would be a shared-memory handle that
        # dies with this process before the launcher reads it
        value = pickle.dumps(fn(rank, world, *args), protocol=pickle.HIGHEST_PROTOCOL)
        dist.destroy_process_group()
        results.put((rank, "ok", value, time.time()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit non-zero
        # the time of the failure orders the ranks' errors: the first is the cause, later ones its echo
        failed_at = time.time()
        summary = " ".join(f"{type(exc).__name__}: {exc}".split())
        results.put((rank, "error", f"{summary}\n{traceback.format_exc()}", failed_at))
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

    Workers end with the launcher (see the module docstring): SIGTERM, SIGINT or SIGHUP received
    here ends them all and raises :class:`LaunchInterrupted`.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable (tensors come back
            by value, on the device they were on).
        nproc: number of workers, from 1 to :func:`max_local_workers`.
        args: extra positional arguments for ``fn``.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL when available).
        timeout_s: deadline of the whole launch.
        collective_timeout_s: the process group's timeout for one collective.

    Returns:
        The return values, by rank.

    Raises:
        ConfigurationError: ``nproc`` out of range.
        DistributedError: a worker raised or died, or the deadline passed: one line naming the rank that
            failed first and its error; that worker's traceback is the exception's ``__cause__``.
        LaunchInterrupted: a stop signal arrived; every worker was ended.
    """
    _check_nproc(nproc)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    backend = _backend(device)
    with tempfile.TemporaryDirectory(prefix="sturdy-rdzv-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, nproc, store_path, backend, collective_timeout_s, fn, tuple(args), results, os.getpid()),
                daemon=False,
            )
            for rank in range(nproc)
        ]
        outcome: dict = {}
        deaths: Dict[int, int] = {}  # ranks seen dead before any clean-up, in order of detection
        deadline = time.monotonic() + timeout_s
        previous = _install_stop_handlers()
        try:
            for p in procs:
                p.start()
            _watch_workers(procs, results, outcome, deaths, deadline=deadline)
        finally:
            _ignore_stop_signals(previous)  # a second signal must not cut the clean-up short (bounded anyway)
            try:
                _stop(procs)
            finally:
                _restore_stop_handlers(previous)
        _drain(results, outcome)
    return _collect_results(outcome, deaths, nproc=nproc, deadline=deadline, timeout_s=timeout_s)


def _check_nproc(nproc: Any) -> None:
    limit = max_local_workers()
    if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= limit:
        raise ConfigurationError(
            f"nproc must be an integer from 1 to {limit} (4 per CPU core), got {nproc!r}"
        )


def _watch_workers(
    procs: Sequence[Any], results: Any, outcome: dict, deaths: Dict[int, int], *, deadline: float
) -> None:
    """Collect the workers' reports into ``outcome`` until every rank reported, all exited, the deadline
    passed, or :data:`GRACE_S` after the first failure; ranks seen dead go to ``deaths``."""
    first_failure: Optional[float] = None
    while len(outcome) < len(procs):
        _drain(results, outcome)
        failed = [r for r, (status, _, _) in outcome.items() if status == "error"]
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
        for r in dead:
            deaths.setdefault(r, int(procs[r].exitcode or 0))
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


def _collect_results(
    outcome: dict, deaths: Dict[int, int], *, nproc: int, deadline: float, timeout_s: float
) -> List[Any]:
    """The return values by rank, or the :class:`DistributedError` naming the rank that failed first."""
    errors = {r: msg for r, (status, msg, _) in sorted(outcome.items(), key=lambda item: item[1][2])
              if status == "error"}  # in the order the ranks failed
    missing = [r for r in range(nproc) if r not in outcome]
    if not errors and not missing:
        return [pickle.loads(outcome[r][1]) for r in range(nproc)]
    # The cause: a rank that died without a word (killed, crashed), else the first rank to fail; the
    # other ranks' errors are usually its echo (a closed peer, a timed-out collective).
    died = [r for r in deaths if r not in outcome]
    timed_out = time.monotonic() > deadline
    head = f"distributed run timed out after {timeout_s:.0f} s" if timed_out else "distributed run failed"
    if died:
        cause_rank = died[0]
        cause = f"rank {cause_rank} died (exit code {deaths[cause_rank]})"
    elif errors:  # the first to fail
        cause_rank = next(iter(errors))
        cause = f"rank {cause_rank} failed: {errors[cause_rank].splitlines()[0]}"
    else:
        cause_rank = missing[0]
        cause = f"rank {cause_rank} did not finish"
    others = sorted((set(errors) | set(died)) - {cause_rank})
    also = f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped too)" if others else ""
    error = DistributedError(f"{head}; {cause}{also}")
    if cause_rank in errors:
        raise error from _WorkerTraceback(f"rank {cause_rank}'s traceback:\n{errors[cause_rank]}")
    raise error


def _stop(procs: Sequence[Any]) -> None:
    """SIGTERM every live worker, SIGKILL what is left after :data:`STOP_GRACE_S`; never raises a stop signal."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    end = time.monotonic() + STOP_GRACE_S
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(timeout=STOP_GRACE_S)


def _raise_stop(signum: int, frame: Any) -> None:
    raise LaunchInterrupted(signum)


def _install_stop_handlers() -> Dict[int, Any]:
    """Turn SIGTERM/SIGINT/SIGHUP into :class:`LaunchInterrupted` while workers run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in _STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, _raise_stop)
    return previous


def _ignore_stop_signals(previous: Dict[int, Any]) -> None:
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)


def _restore_stop_handlers(previous: Dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _drain(queue: Any, outcome: dict, *, wait: float = 0.0) -> None:
    import queue as queue_mod

    end = time.monotonic() + wait
    while True:
        try:
            rank, status, value, at = queue.get(timeout=max(0.01, end - time.monotonic()) if wait else 0.01)
        except queue_mod.Empty:
            if time.monotonic() >= end:
                return
            continue
        outcome[rank] = (status, value, at)
