"""Every example in README.md runs: Python blocks are executed, ``sturdy`` command lines are parsed by
the real parser (the slow suite runs the short ones)."""

import re
import shlex
from pathlib import Path

import pytest
import torch.distributed as dist

from sturdy.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _commands():
    commands = []
    for block in _blocks("sh"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("sturdy "):
                commands.append(line)
            elif " -m sturdy.cli " in line:
                commands.append("sturdy " + line.split(" -m sturdy.cli ", 1)[1])
    return commands


def test_readme_has_examples():
    assert len(_blocks("python")) >= 2 and len(_commands()) >= 8


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]  # optional parts written as [--x]
    build_parser().parse_args(argv)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = _blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    group = False
    if "DistributedDataParallel" in code and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        group = True
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        if group:
            dist.destroy_process_group()
