"""Hostile use of every command: each bad input is one readable line on stderr, exit status 2, no
traceback, and no output left behind. Cases are data: add a row for every new mistake found."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sturdy.cli import build_parser, main
from sturdy.errors import ConfigurationError
from sturdy.training import save_checkpoint

MAX_LINE = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained linear digits model, a copy with NaN weights, a text file, and results files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "run"
    assert main(["train", "--model", "linear", "--epochs", "2", "--out", str(run), "--no-progress",
                 "--device", "cpu"]) == 0
    ckpt = torch.load(run / "model.pt", weights_only=True)
    nan_dir = root / "nan"
    for tensor in ckpt["model"].values():
        tensor.fill_(float("nan"))
    save_checkpoint(ckpt, nan_dir / "model.pt")
    (root / "text.pt").write_text("this is not a checkpoint\n")
    (root / "a-file").write_text("x")
    for name, content in {"corrupt": "{not json", "list": "[1, 2]", "zero": json.dumps({"compression": {
            "compression_ratio": 0, "dense_bytes_per_step": 0}})}.items():
        folder = root / f"results-{name}"
        folder.mkdir()
        (folder / "model.pt").write_bytes((run / "model.pt").read_bytes())
        (folder / "results.json").write_text(content)
    return {"root": root, "run": run, "ckpt": run / "model.pt", "nan": nan_dir / "model.pt",
            "text": root / "text.pt", "file": root / "a-file",
            **{f"results_{n}": root / f"results-{n}" / "model.pt" for n in ("corrupt", "list", "zero")}}


# (case id, argv with {placeholders}, regex the one error line must match)
CASES = [
    # checkpoints that are not what they claim
    ("evaluate-text-file", ["evaluate", "--checkpoint", "{text}"], "not a readable checkpoint"),
    ("evaluate-nan-weights", ["evaluate", "--checkpoint", "{nan}"], "non-finite"),
    ("certify-nan-weights", ["lipschitz", "certify", "--checkpoint", "{nan}", "--out", "{out}"], "non-finite"),
    ("certify-alias-text-file", ["certify", "--checkpoint", "{text}", "--out", "{out}"], "not a readable checkpoint"),
    ("heatmap-nan-weights", ["fourier", "heatmap", "--checkpoint", "{nan}", "--eps", "1", "--out", "{out}"],
     "non-finite"),
    ("flatness-nan-weights", ["flatness", "measure", "--checkpoint", "{nan}", "--out", "{out}"], "non-finite"),
    ("evaluate-other-shape", ["evaluate", "--checkpoint", "{ckpt}", "--dataset", "synthetic"], "shape"),
    # reruns into an existing output folder
    ("train-other-architecture", ["train", "--model", "mlp", "--epochs", "2", "--out", "{run}"],
     "model: 'linear' there, 'mlp' here"),
    ("train-already-past", ["train", "--model", "linear", "--epochs", "1", "--out", "{run}"], "already past epoch 1"),
    ("train-other-dataset", ["train", "--model", "linear", "--epochs", "2", "--dataset", "synthetic",
                             "--out", "{run}"], "dataset: 'digits' there, 'synthetic' here"),
    # output locations, checked before any work
    ("train-empty-out", ["train", "--model", "linear", "--out", ""], "output folder is empty"),
    ("train-out-is-file", ["train", "--model", "linear", "--out", "{file}"], "existing file"),
    ("certify-out-is-file", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--out", "{file}"], "existing file"),
    ("heatmap-out-is-file", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--out", "{file}"],
     "existing file"),
    ("flatness-out-is-file", ["flatness", "measure", "--checkpoint", "{ckpt}", "--out", "{file}"], "existing file"),
    ("flatness-empty-out", ["flatness", "measure", "--checkpoint", "{ckpt}", "--out", ""], "output folder is empty"),
    # numbers out of range
    ("train-huge-resize", ["train", "--resize", "100000", "--out", "{out}"], "--resize"),
    ("train-negative-seed", ["train", "--seed", "-1", "--out", "{out}"], "--seed"),
    ("train-nan-lr", ["train", "--lr", "nan", "--out", "{out}"], "--lr"),
    ("heatmap-eps-overflow", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1e308", "--out", "{out}"],
     "eps"),
    ("heatmap-phase-nan", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--phase", "nan",
                           "--out", "{out}"], "phase"),
    ("attack-eps-inf", ["fourier", "attack", "--checkpoint", "{ckpt}", "--eps", "inf", "--out", "{out}"], "eps"),
    ("certify-eps-nan", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--eps", "nan", "--out", "{out}"], "eps"),
    ("certify-eps-huge", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--eps", "1e300", "--out", "{out}"],
     "eps"),
    ("certify-tightness-points", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--tightness",
                                  "--tightness-points", "-3", "--out", "{out}"], "tightness-points"),
    ("certify-limit-zero", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--limit", "0", "--out", "{out}"],
     "--limit"),
    ("costmodel-threads", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--threads", "100000"],
     "--threads"),
    # results files next to a checkpoint that are damaged
    ("costmodel-corrupt-results", ["compression", "costmodel", "--checkpoint", "{results_corrupt}"], "results.json"),
    ("costmodel-list-results", ["compression", "costmodel", "--checkpoint", "{results_list}"], "results.json"),
    ("costmodel-zero-results", ["compression", "costmodel", "--checkpoint", "{results_zero}"], "results.json"),
]


def _fill(argv, files, out):
    values = {k: str(v) for k, v in files.items()}
    values["out"] = str(out)
    return [a.format(**values) for a in argv]


def _listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, argv, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    before = _listing(files["root"])
    status = main(_fill(argv, files, out) + (["--no-progress"] if argv[0] == "train" else []))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (status, captured.err[-2000:])
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    assert len(lines[0]) < MAX_LINE, lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir()), _listing(out)
    assert _listing(files["root"]) == before


def _numeric_options():
    """(command path, option, required options) for every option parsed as a number, in every command."""
    found = []

    def walk(parser, path):
        required = tuple(a.option_strings[0] for a in parser._actions if a.required and a.option_strings)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.option_strings and (action.type in (int, float) or getattr(action.type, "__module__", "")
                                            == "sturdy.experiments.argtypes"):
                found.append((tuple(path), action.option_strings[0], required))

    walk(build_parser(), [])
    return sorted(set(found))


NUMERIC = _numeric_options()
REQUIRED_VALUES = {"--checkpoint": "x.pt", "--out": "o", "--eps": "1"}


def test_numeric_options_are_found():
    assert (("train",), "--lr", ()) in NUMERIC and len(NUMERIC) >= 10


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(NUMERIC),
       text=st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e308", "-0", "1e-320",
                                                             "99999999999999999999", "0x10", "", " 3"]),
                      st.floats().map(repr), st.integers().map(str)))
def test_numeric_options_accept_or_refuse_in_one_line(option, text):
    """Parsing never raises anything but a one-line ConfigurationError, and never yields a non-finite number."""
    path, flag, required = option
    argv = list(path) + [f"{flag}={text}"]
    argv += [f"{req}={REQUIRED_VALUES[req]}" for req in required if req != flag]
    try:
        args = build_parser().parse_args(argv)
    except ConfigurationError as exc:
        assert "\n" not in str(exc).strip() and len(str(exc)) < 2 * MAX_LINE
        return
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float):
            assert v == v and abs(v) != float("inf"), (argv, v)
