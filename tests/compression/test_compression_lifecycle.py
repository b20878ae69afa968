"""Process lifecycle of local launches: a worker failure is one line naming the rank; SIGTERM, SIGINT and
SIGHUP to the launcher end every worker within 10 s; workers whose launcher was SIGKILLed end by
themselves and write nothing. One launcher process runs every launch (each costs seconds of start-up)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.distributed

STOP_DEADLINE_S = 10.0
START_TIMEOUT_S = 180.0
SLEEP_S = 60.0
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def _failing(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def _sleepy(rank, world, folder):
    """Write this worker's pid, sleep, then (too late) write a file: the launcher's end must come first."""
    folder = Path(folder)
    tmp = folder / f"{rank}.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(folder / f"{rank}.pid")
    end = time.monotonic() + SLEEP_S
    while time.monotonic() < end:
        time.sleep(0.05)
    (folder / f"late-{rank}").write_text("written after the launcher's end")


LAUNCHER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_compression_lifecycle import _failing, _sleepy
    from sturdy.distributed import LaunchInterrupted, run_local_workers
    from sturdy.errors import DistributedError
    try:
        run_local_workers(_failing, nproc=2, timeout_s=120, collective_timeout_s=60)
    except DistributedError as exc:
        print(json.dumps({{"message": str(exc), "cause": str(exc.__cause__)}}), flush=True)
    for folder in {folders!r}:
        try:
            run_local_workers(_sleepy, nproc=2, args=(folder,), timeout_s=300)
        except LaunchInterrupted as exc:
            print(json.dumps({{"stopped": exc.signum}}), flush=True)
""")


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_for_pids(folder, deadline):
    while time.monotonic() < deadline:
        pids = sorted(folder.glob("*.pid"))
        if len(pids) == 2:
            return [int(p.read_text()) for p in pids]
        time.sleep(0.1)
    raise AssertionError(f"workers did not start in {folder}")


def _wait_gone(pids, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return time.monotonic() - (end - seconds)
        time.sleep(0.05)
    return None


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_failures_and_signals_end_every_worker(tmp_path):
    folders = [tmp_path / name for name in (*STOP_SIGNALS, "SIGKILL")]
    for folder in folders:
        folder.mkdir()
    script = LAUNCHER.format(tests=str(Path(__file__).parent), folders=[str(f) for f in folders])
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise AssertionError(f"the launcher ended early: {proc.stderr.read()[-3000:]}")
        first = json.loads(line)  # the failing launch
        assert first["message"].startswith("distributed run failed; rank 1 failed: ValueError: boom on purpose")
        assert "\n" not in first["message"] and len(first["message"]) < 200
        assert "Traceback" in first["cause"] and "_failing" in first["cause"]  # behind --debug
        for name, folder in zip(STOP_SIGNALS, folders):
            pids = _wait_for_pids(folder, time.monotonic() + START_TIMEOUT_S)
            os.kill(proc.pid, getattr(signal, name))
            took = _wait_gone(pids, STOP_DEADLINE_S)
            assert took is not None, f"{name}: workers still alive after {STOP_DEADLINE_S} s"
            assert json.loads(proc.stdout.readline()) == {"stopped": int(getattr(signal, name))}
        pids = _wait_for_pids(folders[-1], time.monotonic() + START_TIMEOUT_S)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher dies without cleaning up
        proc.wait(timeout=30)
        assert _wait_gone(pids, STOP_DEADLINE_S) is not None, "workers outlived their launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    time.sleep(0.5)
    assert not list(tmp_path.rglob("late-*"))


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], r"--nproc must be a positive integer of at most \d+"),
    (["--nproc", "-3"], r"--nproc must be a positive integer"),
    (["--nproc", "10000"], r"--nproc must be a positive integer of at most \d+ \(4 local workers per CPU core\)"),
    (["--nproc", "2", "--compress", "vgc", "--alpha", "-1"],
     r"--alpha must be a finite number in \[0, inf\], got -1.0; larger sends less"),
    (["--nproc", "2", "--compress", "topk", "--topk-ratio", "0"], r"--topk-ratio must be a finite number in \(0, 1\]"),
    (["--nproc", "2", "--compress", "vgc", "--zeta", "2"], r"--zeta must be a finite number in \[0, 1\]"),
    (["--nproc", "2", "--compress", "strom", "--strom-tau", "-1"], r"--strom-tau must be a finite number in"),
    (["--nproc", "2", "--compress", "powersgd", "--start-iter", "1"], r"--start-iter must be an integer >= 2"),
    (["--nproc", "2", "--compress", "powersgd", "--powersgd-rank", "0"], r"--powersgd-rank must be an integer >= 1"),
    (["--nproc", "2", "--compress", "topk", "--gather", "bounded"], r"--gather bounded .* vgc only"),
    (["--nproc", "2", "--gather-slack", "0.5"], r"--gather-slack must be a finite number in \[1, inf\]"),
    (["--nproc", "2", "--dist-timeout", "0"], r"--dist-timeout must be a finite number of seconds > 0, got 0"),
])
def test_bad_options_are_one_line_before_any_worker_starts(argv, message, tmp_path, capsys, monkeypatch):
    import sturdy.distributed as distributed
    from sturdy.cli import main  # here, not at the top: the launcher process imports this module

    def no_launch(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(distributed.mp, "get_context", no_launch)
    status = main(["train", "--model", "linear", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "o"),
                   *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
