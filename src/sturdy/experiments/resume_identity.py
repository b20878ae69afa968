"""The resume check of a training job: what a resumed run must share with its checkpoint, and the one-line
message naming every difference (``sturdy train`` refuses a resume that would change the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping

from sturdy.errors import CheckpointError

__all__ = ["JOB_IDENTITY", "check_same_run", "plain"]

# the job's fields a resumed run keeps (older checkpoints record only these, through their job)
JOB_IDENTITY = ("dataset", "model", "model_kwargs", "resize", "normalize")


def check_same_run(ckpt: Mapping[str, Any], path: Path, identity: Mapping[str, Any]) -> None:
    """The one resume check of a training job: refuse checkpoint ``ckpt`` (read from ``path``) made for another
    data set or architecture, another number of workers, or other methods (e.g. another compression method or
    setting), naming every difference. Checkpoints of earlier versions, which record only their job, are
    compared on the data set and architecture.

    Raises:
        CheckpointError: one line naming the differences and the fix.
    """
    extra = ckpt.get("extra")
    extra = extra if isinstance(extra, dict) else {}
    stored = extra.get("identity")
    if not isinstance(stored, dict):
        job = extra.get("job")
        if not isinstance(job, dict):
            return
        stored = {k: plain(job.get(k)) for k in JOB_IDENTITY}
        identity = {k: identity.get(k) for k in JOB_IDENTITY}
    differ = [_difference(k, stored.get(k), identity.get(k)) for k in _ordered_keys(stored, identity)
              if stored.get(k) != identity.get(k)]
    if differ:
        raise CheckpointError(f"{str(path)!r} was trained with other settings ({'; '.join(differ)}); resume with "
                              "the same settings, or use a new output folder or --no-resume to start over")


def _ordered_keys(*dicts: Mapping[str, Any]) -> List[str]:
    keys: List[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys


def _difference(key: str, there: Any, here: Any) -> str:
    """``key: X there, Y here``; for two settings dicts of one method, only their differing entries."""
    name = key.replace("_", " ")
    if isinstance(there, dict) and isinstance(here, dict) and there.get("method") == here.get("method"):
        return "; ".join(_difference(f"{key} {k}", there.get(k), here.get(k)) for k in _ordered_keys(there, here)
                         if there.get(k) != here.get(k))
    return f"{name}: {_brief(there)} there, {_brief(here)} here"


def _brief(value: Any) -> str:
    """A setting for a one-line message: ``not used`` when absent, a method's name for a method's settings."""
    if value is None:
        return "not used"
    if isinstance(value, dict) and "method" in value:
        return str(value["method"])
    return repr(value)


def plain(value: Any) -> Any:
    """Tuples as lists, so settings compare equal after a round trip through a checkpoint."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
