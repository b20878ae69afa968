"""`sturdy fourier heatmap` launched by a real ``torchrun`` (2 gloo processes) equals the single-process map."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from sturdy.cli import main

from .test_experiments import checkpoint  # noqa: F401 - the package-scoped tiny digits checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "sturdy.cli", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_heatmap_under_torchrun_equals_a_single_process_run(checkpoint, tmp_path):  # noqa: F811
    common = ["fourier", "heatmap", "--checkpoint", str(checkpoint), "--eps", "2.0", "--limit", "30",
              "--phase", "random", "--seed", "5", "--no-progress", "--device", "cpu", "--save-every", "3"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    done = _torchrun([*common, "--out", str(tmp_path / "sharded")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads((tmp_path / "single" / "heatmap.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "heatmap.json").read_text())
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    for key in ("error_map", "fooling_map", "measured", "clean_error", "measured_frequencies"):
        assert sharded[key] == single[key], key
    assert (tmp_path / "sharded" / "heatmap.png").is_file()
