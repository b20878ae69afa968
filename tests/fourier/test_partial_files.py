"""A partial heat map (``partial=path``) is untrusted input: every field tampered is refused in one line.

Each case edits a saved partial file; the edit is refused twice over: as written (its checksum no longer
matches) and with the checksum recomputed (the row checks catch the impossible value), except edits that
leave a plausible state (all counts zeroed), which only the checksum can catch. Nothing is measured
before the refusal, and the refused file is left as it was.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from sturdy.errors import SturdyError
from sturdy.fourier import fourier_heatmap
from sturdy.fourier.partial import MAX_FIXED_BYTES, ROW_BYTES
from sturdy.resumable import MAX_DEPTH, content_digest, read_resumable, write_resumable

from .conftest import tiny_cnn

SHAPE = (1, 4, 4)
N = 6
FREQS = [(0, 1), (1, 1), (2, 0)]
MAX_LINE = 300


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(N, *SHAPE, generator=gen, dtype=torch.float64), torch.arange(N) % 4


@pytest.fixture()
def saved(tmp_path):
    """A partial heat map of 3 frequencies on 6 images, as the heat map writes it."""
    x, y = _data()
    path = tmp_path / "heatmap.partial.json"
    fourier_heatmap(tiny_cnn(SHAPE), x, y, eps=1.0, seed=1, frequencies=FREQS, partial=path)
    return path


def _resume(path: Path):
    x, y = _data()
    model = _Counting(tiny_cnn(SHAPE))
    return model, lambda: fourier_heatmap(model, x, y, eps=1.0, seed=1, frequencies=FREQS, partial=path)


def _set(key, value):
    return lambda c: c.update({key: value})


def _first(key, value):
    return lambda c: c[key].__setitem__(0, value)


# (case, edit of the content, whether the row checks alone refuse it once the checksum is recomputed)
TAMPERED = [
    ("errors-1e308", _first("errors", 1e308), True),
    ("errors-10^30", _first("errors", 10**30), True),
    ("errors-float", _first("errors", 1.0), True),
    ("errors-shorter-than-rows", lambda c: c["errors"].pop(), True),
    ("errors-negative", _first("errors", -1), True),
    ("errors-above-images", _first("errors", N + 1), True),
    ("errors-bool", _first("errors", True), True),
    ("errors-not-a-list", _set("errors", 3), True),
    ("fooled-negative", _first("fooled", -2), True),
    ("fooled-above-images", _first("fooled", 10 * N), True),
    ("fooled-longer-than-rows", lambda c: c["fooled"].append(0), True),
    ("applied-1e308", _first("applied", 1e308), True),
    ("applied-negative", _first("applied", -0.5), True),
    ("applied-above-n-eps", _first("applied", N * 1.0 * 1.01), True),
    ("applied-string", _first("applied", "0.5"), True),
    ("applied-missing", lambda c: c.pop("applied"), True),
    ("rows-strings", lambda c: c.update(rows=[str(r) for r in c["rows"]]), True),
    ("rows-bool", lambda c: c.update(rows=[True] * len(c["rows"])), True),
    ("rows-duplicated", lambda c: c["rows"].__setitem__(1, c["rows"][0]), True),
    ("rows-out-of-range", _first("rows", 10**6), True),
    ("rows-negative", _first("rows", -1), True),
    ("rows-float", _first("rows", 0.0), True),
    ("rows-missing", lambda c: c.pop("rows"), True),
    ("settings-eps", lambda c: c["settings"].update(eps=2.0), True),
    ("settings-images", lambda c: c["settings"].update(images="0" * 64), True),
    ("settings-not-a-dict", _set("settings", [1]), True),
    ("format", _set("format", "something else"), True),
    ("version", _set("version", 1), True),
    ("counts-all-zeroed", lambda c: c.update(errors=[0] * len(c["rows"]), fooled=[0] * len(c["rows"])), False),
    ("applied-changed-within-range", _first("applied", 0.25), False),
]


def _payload(path: Path) -> dict:
    return json.loads(path.read_text())


def _refused(path: Path, match=None):
    model, resume = _resume(path)
    before = path.read_bytes() if path.is_file() else None  # reading a FIFO here would block the test
    with pytest.raises(SturdyError, match=match) as info:
        resume()
    message = str(info.value)
    assert "\n" not in message and len(message) < MAX_LINE, message
    assert model.calls == 0, "the model ran before the partial file was refused"
    assert before is None or path.read_bytes() == before
    return message


@pytest.mark.parametrize("case, edit, rows_catch", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_field_is_refused_by_the_checksum(case, edit, rows_catch, saved):
    payload = _payload(saved)
    edit(payload["content"])
    saved.write_text(json.dumps(payload))
    assert "checksum" in _refused(saved, match="remove it to start over")


@pytest.mark.parametrize("case, edit, rows_catch", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_field_with_its_checksum_recomputed_is_refused_by_the_row_checks(case, edit, rows_catch, saved):
    content = _payload(saved)["content"]
    edit(content)
    write_resumable(saved, content)
    if rows_catch:
        _refused(saved)
    else:  # a plausible state: only the checksum could tell; the map is what the file says
        _, resume = _resume(saved)
        assert resume().resumed == len(FREQS)


RAW = [
    ("errors-NaN", lambda text: text.replace('"errors": [', '"errors": [NaN, ', 1), "not strict JSON"),
    ("errors-Infinity", lambda text: text.replace('"errors": [', '"errors": [Infinity, ', 1), "not strict JSON"),
    ("applied-1e400", lambda text: text.replace('"applied": [', '"applied": [1e400, ', 1), "overflows a float"),
    ("nested-200000", lambda text: text.replace('"rows": ', '"rows": ' + "[" * 200_000 + "]" * 200_000 + ", "
                                               '"x": ', 1), "bytes"),  # refused on its size, before parsing
    ("nested-past-the-depth", lambda text: text.replace('"rows": ', '"rows": ' + "[" * (MAX_DEPTH + 1)
                                                        + "]" * (MAX_DEPTH + 1) + ', "x": ', 1),
     f"nested deeper than {MAX_DEPTH}"),
    ("nested-in-strings-is-text", lambda text: text.replace('"format": ', '"x": "' + "[" * 100 + '", "format": ', 1),
     "checksum"),
    ("truncated", lambda text: text[: len(text) // 2], "not strict JSON"),
    ("empty", lambda text: "", "not strict JSON"),
    ("not-utf8", lambda text: "\udcff", "not UTF-8"),
    ("no-checksum", lambda text: json.dumps(json.loads(text)["content"]), "no checksum"),
    ("checksum-malformed", lambda text: text.replace('"sha256:', '"md5:', 1), "checksum is malformed"),
    ("a-list", lambda text: "[1, 2]", "no checksum"),
    ("huge-digits", lambda text: text.replace('"errors": [', '"errors": [' + "9" * 5000 + ", ", 1), "not strict JSON"),
]


@pytest.mark.parametrize("case, edit, match", RAW, ids=[c[0] for c in RAW])
def test_malformed_text_is_refused_in_one_line(case, edit, match, saved):
    text = edit(saved.read_text())
    saved.write_bytes(text.encode("utf-8", "surrogateescape"))
    _refused(saved, match=match)


def test_oversized_file_is_refused_before_reading(saved):
    payload = _payload(saved)
    payload["content"]["padding"] = " " * (MAX_FIXED_BYTES + ROW_BYTES * 20)
    saved.write_text(json.dumps(payload))
    _refused(saved, match="bytes")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "heatmap.partial.json"
    os.mkfifo(path)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("the reader blocked on a FIFO")))
    signal.alarm(20)
    try:
        _refused(path, match="not a regular file")
    finally:
        signal.alarm(0)


def test_folder_is_refused(tmp_path):
    path = tmp_path / "heatmap.partial.json"
    path.mkdir()
    _, resume = _resume(path)
    with pytest.raises(SturdyError, match="not a regular file|cannot be opened"):
        resume()


def test_untampered_file_resumes_and_equals_a_fresh_map(saved):
    model, resume = _resume(saved)
    hm = resume()
    x, y = _data()
    fresh = fourier_heatmap(tiny_cnn(SHAPE), x, y, eps=1.0, seed=1, frequencies=FREQS)
    assert hm.resumed == len(FREQS)
    torch.testing.assert_close(hm.error, fresh.error, equal_nan=True)
    torch.testing.assert_close(hm.applied, fresh.applied, equal_nan=True)


def test_reader_round_trip_and_checksum(tmp_path):
    path = tmp_path / "state.json"
    assert read_resumable(path) is None
    content = {"rows": [0, 3], "value": 0.1, "nested": {"a": [1, [2, [3]]]}}
    write_resumable(path, content)
    assert read_resumable(path) == content
    assert json.loads(path.read_text())["checksum"] == content_digest(content)


def test_command_refuses_a_tampered_partial_file_in_one_line(tmp_path, capsys):
    from sturdy.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "linear", "--epochs", "1", "--out", str(run), "--no-progress",
                 "--device", "cpu"]) == 0
    out = tmp_path / "heatmap"
    argv = ["fourier", "heatmap", "--checkpoint", str(run / "model.pt"), "--eps", "1", "--limit", "4", "--stride",
            "4", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    partial = out / "heatmap.partial.json"
    payload = _payload(partial)
    payload["content"]["errors"] = [0] * len(payload["content"]["errors"])  # a plausible all-zero map
    partial.write_text(json.dumps(payload))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
