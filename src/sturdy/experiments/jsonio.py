"""Results as JSON files: the one writer of every command, demo section and benchmark.

Files a run reads back to resume (partial heat maps, grid records) are written and read by
:mod:`sturdy.resumable` instead (checksummed, read back as untrusted input), which the parts may import.

Every command writes its results under its own file name (:data:`RESULTS_FILES`) and records in it
which command wrote it (``"command"``), so commands can share an output folder: ``sturdy lipschitz
certify --out RUN`` beside ``sturdy train --out RUN`` adds ``certify.json`` and keeps ``results.json``.
A command never replaces (nor removes) a results file another command wrote: :func:`results_path`
refuses before any work, :func:`write_results` again at the end (one line, exit status 2 from the CLI).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from sturdy.errors import ConfigurationError
from sturdy.utils import atomic_write_bytes

__all__ = ["write_json", "json_safe", "RESULTS_FILES", "results_path", "results_owner", "check_results_owner",
           "write_results", "remove_results"]

# The results file of every command that writes one (its other outputs have names no other command uses).
RESULTS_FILES: Mapping[str, str] = {
    "train": "results.json",
    "demo": "demo.json",
    "lipschitz certify": "certify.json",
    "fourier heatmap": "heatmap.json",
    "fourier attack": "attack.json",
    "flatness grid": "correlations.json",
    "flatness measure": "measures.json",
    "compression costmodel": "costmodel.json",
}
# Results files of earlier versions record no command: they belong to the command of their name, except
# ``results.json``, which ``demo`` and ``lipschitz certify`` wrote too (only training results hold a "job").
_EARLIER_FILES: Dict[str, str] = {"grid.json": "flatness grid",
                                  **{name: command for command, name in RESULTS_FILES.items()}}
UNKNOWN_OWNER = "another program"
MAX_RESULTS_BYTES = 256 * 2**20  # a results file is read back only to learn who wrote it


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented, strict JSON, atomically (temporary file, then rename); returns the path.

    Values JSON does not know (paths, devices, ...) are written as their ``str``.
    """
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def results_owner(path: str | os.PathLike) -> Optional[str]:
    """The command that wrote the results file ``path`` (``None`` when there is no file).

    The ``"command"`` it records; for a file of an earlier version, which records none, the command of
    its name (:data:`RESULTS_FILES`); :data:`UNKNOWN_OWNER` for anything else (a folder, a file that is
    not a JSON object, a user's own file).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    data = _read_object(path)
    if data is None:
        return UNKNOWN_OWNER
    command = data.get("command")
    if isinstance(command, str) and command in RESULTS_FILES:
        return command
    if "command" in data:
        return UNKNOWN_OWNER
    earlier = _EARLIER_FILES.get(path.name)
    if earlier == "train" and not isinstance(data.get("job"), dict):
        return UNKNOWN_OWNER
    return earlier or UNKNOWN_OWNER


def _read_object(path: Path) -> Optional[Dict[str, Any]]:
    try:
        if not path.is_file() or path.stat().st_size > MAX_RESULTS_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def check_results_owner(path: str | os.PathLike, command: str) -> None:
    """Refuse to let ``command`` replace ``path`` when another command (or program) wrote it.

    Raises:
        ConfigurationError: one line naming the file, its writer and the fix.
    """
    owner = results_owner(path)
    if owner is not None and owner != command:
        writer = f"`sturdy {owner}`" if owner in RESULTS_FILES else owner
        raise ConfigurationError(f"{str(path)!r} holds the results of {writer}, which `sturdy {command}` never "
                                 "replaces; choose another --out folder (or move that file)")


def _check_command(command: str) -> None:
    if command not in RESULTS_FILES:
        raise ConfigurationError(f"unknown command {command!r}; expected one of {sorted(RESULTS_FILES)}")


def results_path(folder: str | os.PathLike, command: str) -> Path:
    """Where ``command`` writes its results in ``folder``, checked before any work (:func:`check_results_owner`)."""
    _check_command(command)
    path = Path(folder) / RESULTS_FILES[command]
    check_results_owner(path, command)
    return path


def write_results(data: Mapping[str, Any], path: str | os.PathLike, *, command: str) -> Path:
    """Write ``command``'s results ``data`` to ``path`` (:func:`write_json`), recording ``"command"`` first.

    Raises:
        ConfigurationError: ``path`` holds another command's results (it is left as it is).
    """
    _check_command(command)
    check_results_owner(path, command)
    return write_json({"command": command, **{k: v for k, v in data.items() if k != "command"}}, path)


def remove_results(path: str | os.PathLike, command: str) -> None:
    """Remove ``command``'s own results file ``path`` (a stale one); a file another command wrote stays."""
    if results_owner(path) == command:
        Path(path).unlink(missing_ok=True)
