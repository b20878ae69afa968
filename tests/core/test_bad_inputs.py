"""Hostile use of every command: each bad input is one readable line on stderr, exit status 2, no
traceback, and no output left behind. Cases are data: add a row for every new mistake found.

Faults that are not arguments (a full disk, a process killed while it writes its outputs) have their
own tests at the end. Cases a part does not handle yet are ``xfail(strict=True)``: they flip to a
failure the day the part is fixed, so the mark is removed then.
"""

import argparse
import copy
import errno
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sturdy.cli import build_parser, main
from sturdy.distributed import max_local_workers
from sturdy.errors import ConfigurationError
from sturdy.experiments.argtypes import MAX_BATCH_SIZE, non_negative_int, positive_int
from sturdy.experiments.flatness_grid import QUICK_GRID, max_grid_seeds
from sturdy.fourier.limits import max_phases
from sturdy.training import save_checkpoint
from sturdy.utils import prepare_output_dir

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
    tampered = {
        "noopt": lambda c: c.pop("optimizer"),
        "badepoch": lambda c: c.update(epoch="x"),
        "badhistory": lambda c: c.update(history="nope"),
        "classes7": lambda c: c["extra"].update(num_classes=7),
        "hugeresize": lambda c: c["extra"]["job"].update(resize=100000),
        "hugemlp": lambda c: c["extra"]["job"].update(model="mlp", model_kwargs={"width": 10**8}),
    }
    for name, change in tampered.items():
        copied = copy.deepcopy(torch.load(run / "model.pt", weights_only=True))
        change(copied)
        save_checkpoint(copied, root / name / "model.pt")
    raw = (run / "model.pt").read_bytes()
    (root / "trunc").mkdir()
    (root / "trunc" / "model.pt").write_bytes(raw[: len(raw) // 2])
    return {"root": root, "run": run, "ckpt": run / "model.pt", "nan": nan_dir / "model.pt",
            "text": root / "text.pt", "file": root / "a-file",
            **{f"results_{n}": root / f"results-{n}" / "model.pt" for n in ("corrupt", "list", "zero")},
            **{name: root / name for name in [*tampered, "trunc"]}}


def _part_bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


ATTACK = ["fourier", "attack", "--checkpoint", "{ckpt}", "--eps", "1", "--out", "{out}"]
HEATMAP = ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--out", "{out}"]
TRAIN = ["train", "--model", "linear", "--epochs", "1", "--out", "{out}"]
POWERSGD = TRAIN + ["--nproc", "2", "--compress", "powersgd"]
GRID = ["flatness", "grid", "--quick", "--out", "{out}"]
SEED_MAX = 2**32 - 1
PHASES_MAX = max_phases(1, 8, 8)  # the embedded digits are 1x8x8
GRID_SEEDS_MAX = max_grid_seeds(QUICK_GRID)  # 16 models per seed

# Every count option of every command, at its bound: (case, argv with the option, value at the bound,
# regex of the one error line one past it, work function the command reaches when the value is accepted).
BOUNDS = [
    ("attack-shifts", ATTACK + ["--shifts"], 64, r"shifts must be an integer in \[0, 64\] \(a 8x8 image has 64",
     "sturdy.experiments.fourier.single_fourier_attack"),
    ("attack-phases", ATTACK + ["--phases"], PHASES_MAX,
     rf"phases must be an integer in \[1, {PHASES_MAX}\].*memory",
     "sturdy.experiments.fourier.single_fourier_attack"),
    ("attack-batch-size", ATTACK + ["--batch-size"], MAX_BATCH_SIZE, "--batch-size",
     "sturdy.experiments.fourier.single_fourier_attack"),
    ("attack-seed", ATTACK + ["--seed"], SEED_MAX, "--seed", "sturdy.experiments.fourier.single_fourier_attack"),
    ("heatmap-stride", HEATMAP + ["--stride"], 8, r"stride must be an integer in \[1, 8\]",
     "sturdy.experiments.fourier.fourier_heatmap"),
    ("heatmap-save-every", HEATMAP + ["--save-every"], 34, r"save_every must be an integer in \[1, 34\]",
     "sturdy.experiments.fourier.fourier_heatmap"),
    ("heatmap-batch-size", HEATMAP + ["--batch-size"], MAX_BATCH_SIZE, "--batch-size",
     "sturdy.experiments.fourier.fourier_heatmap"),
    ("heatmap-seed", HEATMAP + ["--seed"], SEED_MAX, "--seed", "sturdy.experiments.fourier.fourier_heatmap"),
    ("train-batch-size", TRAIN + ["--batch-size"], MAX_BATCH_SIZE, "--batch-size",
     "sturdy.experiments.train_job.run_train_job"),
    ("train-seed", TRAIN + ["--seed"], SEED_MAX, "--seed", "sturdy.experiments.train_job.run_train_job"),
    ("train-eval-batch-size", TRAIN + ["--eval-batch-size"], MAX_BATCH_SIZE, "--eval-batch-size",
     "sturdy.experiments.train_job.run_train_job"),
    ("train-sync-every", TRAIN + ["--sync-every"], 2**31 - 1, "--sync-every",
     "sturdy.experiments.train_job.run_train_job"),
    ("train-lmt-iterations", TRAIN + ["--method", "lmt", "--lmt-iterations"], 1000, r"lmt-iterations.*\[1, 1000\]",
     "sturdy.experiments.train_job.run_train_job"),
    ("train-powersgd-rank", POWERSGD + ["--powersgd-rank"], 2**16,
     r"--powersgd-rank must be an integer in \[1, 65536\]",
     "sturdy.experiments.parallel.run_distributed_training"),
    ("train-start-iter", POWERSGD + ["--start-iter"], 2**31 - 1,
     r"--start-iter must be an integer in \[2, 2147483647\]",
     "sturdy.experiments.parallel.run_distributed_training"),
    ("train-epochs", TRAIN[:3] + TRAIN[5:] + ["--epochs"], 1_000_000, "--epochs",
     "sturdy.experiments.train_job.run_train_job"),
    ("demo-seed", ["demo", "--quick", "--out", "{out}", "--seed"], SEED_MAX, "--seed",
     "sturdy.experiments.demo.run_demo"),
    ("grid-seeds", GRID + ["--seeds"], GRID_SEEDS_MAX, rf"--seeds must be an integer in \[1, {GRID_SEEDS_MAX}\]",
     "sturdy.experiments.flatness_grid.run_grid"),
    ("grid-workers", GRID + ["--workers"], max_local_workers(),
     rf"workers must be an integer in \[1, {max_local_workers()}\]",
     "sturdy.experiments.flatness_grid._load_record"),
    ("grid-bootstrap", GRID + ["--bootstrap"], 100_000, r"bootstrap must be an integer in \[0, 100000\]",
     "sturdy.experiments.flatness_grid.run_grid"),
    ("grid-seed", GRID + ["--seed"], SEED_MAX, "--seed", "sturdy.experiments.flatness_grid.run_grid"),
    ("measure-seed", ["flatness", "measure", "--checkpoint", "{ckpt}", "--out", "{out}", "--seed"], SEED_MAX, "--seed",
     "sturdy.experiments.flatness.measure_model"),
    ("costmodel-workers", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--ratio", "0.1", "--out", "{out}",
                           "--workers"], 2**20, r"worker counts in \[1, 1048576\]",
     "sturdy.experiments.compression_costmodel.predict_step_times"),
]
BOUNDS = [(case, argv + [str(bound + 1)], bound, message, work) for case, argv, bound, message, work in BOUNDS]


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
    ("heatmap-phase-nan", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--phase", "nan", "--out",
                           "{out}"], "phase"),
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
    # --out '' for every command, and output locations that cannot be written
    ("demo-empty-out", ["demo", "--quick", "--out", ""], "output folder is empty"),
    ("certify-empty-out", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--out", ""], "output folder is empty"),
    ("certify-alias-empty-out", ["certify", "--checkpoint", "{ckpt}", "--out", ""], "output folder is empty"),
    ("heatmap-empty-out", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--out", ""],
     "output folder is empty"),
    ("attack-empty-out", ["fourier", "attack", "--checkpoint", "{ckpt}", "--eps", "1", "--out", ""],
     "output folder is empty"),
    ("grid-empty-out", ["flatness", "grid", "--quick", "--out", ""], "output folder is empty"),
    ("costmodel-empty-out", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--ratio", "0.1", "--out", ""],
     "output folder is empty"),
    ("demo-out-is-file", ["demo", "--quick", "--out", "{file}"], "existing file"),
    ("attack-out-is-file", ["fourier", "attack", "--checkpoint", "{ckpt}", "--eps", "1", "--out", "{file}"],
     "existing file"),
    ("grid-out-is-file", ["flatness", "grid", "--quick", "--out", "{file}"], "existing file"),
    ("costmodel-out-is-file", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--ratio", "0.1", "--out",
                               "{file}"], "existing file"),
    ("train-out-unwritable", ["train", "--model", "linear", "--out", "{file}/sub"], "cannot write to output folder"),
    ("demo-out-unwritable", ["demo", "--quick", "--out", "{file}/sub"], "cannot write to output folder"),
    ("certify-out-unwritable", ["certify", "--checkpoint", "{ckpt}", "--out", "{file}/sub"],
     "cannot write to output folder"),
    ("measure-out-unwritable", ["flatness", "measure", "--checkpoint", "{ckpt}", "--out", "{file}/sub"],
     "cannot write to output folder"),
    # model settings that are not sizes, or sizes no machine holds (refused before any allocation)
    ("train-float-width", ["train", "--model", "mlp", "--model-arg", "width=1e9", "--out", "{out}"], "whole numbers"),
    ("train-huge-width", ["train", "--model", "mlp", "--model-arg", "width=100000000", "--out", "{out}"], "GiB"),
    ("train-huge-channels", ["train", "--model", "cnn", "--model-arg", "channels=(100000,100000)", "--out", "{out}"],
     "GiB"),
    ("train-epochs-huge", ["train", "--epochs", "100000000000000000000", "--out", "{out}"], "--epochs"),
    # a run that blows up stops with a clear line (no checkpoint of a diverged model is written)
    ("train-lr-diverges-inf", ["train", "--model", "cnn", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "2",
                               "--out", "{out}"], "training diverged at epoch 1.*lower the learning rate"),
    ("train-lr-blows-up", ["train", "--model", "linear", "--lr", "1e6", "--epochs", "2", "--out", "{out}"],
     "training diverged at epoch 1 .mean cross-entropy"),
    # resuming from a checkpoint that is damaged in ways a plain load does not see
    ("train-resume-no-optimizer", ["train", "--model", "linear", "--epochs", "3", "--out", "{noopt}"],
     "damaged or incomplete .'optimizer' is missing"),
    ("train-resume-bad-epoch", ["train", "--model", "linear", "--epochs", "3", "--out", "{badepoch}"],
     "damaged or incomplete .'epoch' is a str"),
    ("train-resume-bad-history", ["train", "--model", "linear", "--epochs", "3", "--out", "{badhistory}"],
     "damaged or incomplete .'history' is a str"),
    ("train-resume-truncated", ["train", "--model", "linear", "--epochs", "3", "--out", "{trunc}"],
     "not a readable checkpoint"),
    # checkpoints whose stored settings lie about their weights (data from whoever made the file)
    ("evaluate-directory", ["evaluate", "--checkpoint", "{root}"], "checkpoint not found"),
    ("evaluate-other-class-count", ["evaluate", "--checkpoint", "{classes7}/model.pt"], "damaged or was edited"),
    ("evaluate-stored-huge-resize", ["evaluate", "--checkpoint", "{hugeresize}/model.pt"], "inconsistent"),
    ("certify-stored-huge-resize", ["lipschitz", "certify", "--checkpoint", "{hugeresize}/model.pt", "--out",
                                    "{out}"], "inconsistent"),
    ("evaluate-stored-huge-model", ["evaluate", "--checkpoint", "{hugemlp}/model.pt"], "another architecture"),
    # part commands
    ("certify-eps-1e200", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--eps", "1e200", "--limit", "5",
                           "--out", "{out}"], "eps"),
    # every count option one past its bound (the bound itself is accepted: test_count_option_at_its_bound_is_accepted)
    *[(f"past-bound-{case}", argv, message) for case, argv, _, message, _ in BOUNDS],
    ("attack-seed-negative", ["fourier", "attack", "--checkpoint", "{ckpt}", "--eps", "1", "--seed", "-1", "--out",
                              "{out}"], "--seed"),
    ("heatmap-frequency-overflow", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--frequencies",
                                    "100000000000000000000,1", "--out", "{out}"], "magnitude below"),
    ("costmodel-too-many-worker-counts", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--ratio", "0.1",
                                          "--workers", ",".join(["2"] * 65), "--out", "{out}"],
     "1 to 64 worker counts"),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _fill(argv, files, out):
    values = {k: str(v) for k, v in files.items()}
    values["out"] = str(out)
    return [a.format(**values) for a in argv]


def _listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _quiet(argv):
    """``argv`` with ``--no-progress`` where the command has it (a progress bar is not an error line)."""
    try:
        args = build_parser().parse_args(argv)
    except ConfigurationError:
        return argv
    return argv + ["--no-progress"] if hasattr(args, "no_progress") else argv


@pytest.mark.parametrize("case, argv, message", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, argv, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    before = _listing(files["root"])
    status = main(_quiet(_fill(argv, files, out)))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (status, captured.err[-2000:])
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    assert len(lines[0]) < MAX_LINE, lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir()), _listing(out)
    assert _listing(files["root"]) == before


class _Reached(Exception):
    """Raised by the command's work function: every check of the arguments passed."""


@pytest.mark.parametrize("case, argv, bound, message, work", BOUNDS, ids=[c[0] for c in BOUNDS])
def test_count_option_at_its_bound_is_accepted(case, argv, bound, message, work, files, tmp_path, monkeypatch,
                                                capsys):
    """The bound itself passes every check: the command reaches its work (stubbed here, so nothing runs)."""
    module, name = work.rsplit(".", 1)

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(importlib.import_module(module), name, reached)
    argv = _fill(argv[:-1] + [str(bound)], files, tmp_path / "out")
    with pytest.raises(_Reached):
        main(_quiet(argv))
    assert "error" not in capsys.readouterr().err


def test_count_bounds_cover_every_count_option():
    """Every integer option of every command has a bound case here, or is a documented clip to the data."""
    clipped = {"--limit", "--attack-images", "--max-queries", "--tightness-points",  # clipped to the data / cost
               "--nproc", "--resize", "--image-size",  # bounded by the parser or the launcher (other tests)
               "--threads"}
    bounded = {argv[-2] for _, argv, *_ in BOUNDS}
    integer = {flag for path, flag, _ in NUMERIC if _integer_type(_action(path, flag).type)}
    assert integer and integer - bounded - clipped == set(), integer - bounded - clipped


def _integer_type(kind):
    return kind is int or kind in (positive_int, non_negative_int) or getattr(kind, "__name__", "").startswith(
        "integer in")


def _action(path, option):
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return next(a for a in parser._actions if option in a.option_strings)


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


def test_heatmap_of_one_frequency_succeeds(files, tmp_path, capsys):
    """One frequency is a valid subset: the map holds it alone, and the gradient ranking, which needs two,
    is reported as not available instead of failing the command."""
    out = tmp_path / "out"
    status = main(["fourier", "heatmap", "--checkpoint", str(files["ckpt"]), "--eps", "1", "--frequencies", "0,1",
                   "--limit", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 0, err
    result = json.loads((out / "heatmap.json").read_text())
    assert result["measured_frequencies"] == 1 and result["n_images"] == 2
    assert result["gradient_rank_correlation_fooling"] is None
    assert "at least 2" in result["gradient_rank_correlation_note"]


# ----------------------------------------------------------------------------- faults while writing


def test_full_disk_while_saving_a_checkpoint_is_one_line(files, tmp_path, capsys, monkeypatch):
    """ENOSPC surfaces as "No space left on device" (not from inside torch's archive writer), nothing is left."""
    out = tmp_path / "out"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    status = main(["train", "--model", "linear", "--epochs", "1", "--out", str(out), "--no-progress"])
    line = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in line and "No space left on device" in line, line
    assert not out.exists() or not any(out.iterdir()), _listing(out)


# One child process imports sturdy once, then forks one grandchild per case; each grandchild is SIGKILLed at
# its first write of a matching file into its OUT: through the atomic writer (os.replace) or through a plain
# image save to a path (0 bytes written, as a kill mid-write would leave).
_KILLER = textwrap.dedent("""
    import json, os, re, signal, sys
    import PIL.Image
    import torch
    from sturdy.cli import main
    from sturdy.experiments import demo
    from sturdy.training import TrainConfig

    def run(out, pattern, how):
        def hit(path):
            path = os.fspath(path)
            return path.startswith(out) and re.search(pattern, os.path.basename(path))

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        real_replace, real_save = os.replace, PIL.Image.Image.save

        def replace(src, dst, *a, **k):
            if hit(dst):
                die()
            return real_replace(src, dst, *a, **k)

        def save(self, fp, *a, **k):
            if isinstance(fp, (str, os.PathLike)) and hit(fp):
                open(fp, "wb").close()
                die()
            return real_save(self, fp, *a, **k)

        os.replace, PIL.Image.Image.save = replace, save
        torch.set_num_threads(1)
        if how == "demo":
            demo.standard_job = lambda out, **kw: demo.TrainJob(
                dataset="digits", model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(out / "standard"))
            demo.run_demo(out=out, quick=True, device="cpu", progress=False, parts=())
        else:
            main(how)

    status = {}
    for case, out, pattern, how in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                run(out, pattern, how)
            finally:
                os._exit(0)
        status[case] = os.waitpid(pid, 0)[1]
    print(json.dumps(status))
""")

KILLS = [
    # (case, argv or "demo", files the kill hits, the results file that must not exist after it)
    ("train-checkpoint", ["train", "--model", "linear", "--epochs", "1", "--device", "cpu", "--no-progress"],
     r"^model\.pt$", "results.json"),
    ("demo-first-figure", "demo", r"\.png$", "demo.json"),
    ("certify-first-figure", ["lipschitz", "certify", "--checkpoint", "{ckpt}", "--limit", "20", "--device", "cpu",
                              "--no-progress"], r"\.png$", "certify.json"),
    ("costmodel-first-figure", ["compression", "costmodel", "--checkpoint", "{ckpt}", "--ratio", "0.1", "--device",
                                "cpu"], r"\.png$", "costmodel.json"),
    ("heatmap-first-figure", ["fourier", "heatmap", "--checkpoint", "{ckpt}", "--eps", "1", "--limit", "4",
                              "--stride", "2", "--device", "cpu", "--no-progress"], r"\.png$", "heatmap.json"),
]


@pytest.fixture(scope="module")
def killed(files, tmp_path_factory):
    """Every case of KILLS run once, in one child process: case -> (wait status, output folder)."""
    root = tmp_path_factory.mktemp("killed")
    cases = []
    for case in KILLS:
        name, argv, pattern, _ = case.values if hasattr(case, "values") else case
        out = root / name
        how = argv if argv == "demo" else _fill(argv, files, out) + ["--out", str(out)]
        cases.append((name, str(out), pattern, how))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(cases)], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    status = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return {name: (status[name], Path(out)) for name, out, _, _ in cases}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case, argv, pattern, results", KILLS, ids=[_case_id(c) for c in KILLS])
def test_killed_while_writing_leaves_no_partial_file(case, argv, pattern, results, killed):
    """SIGKILL at the first output write: no 0-byte or partial file, no results file (results come last), and the
    next command into the folder removes the killed write's temporary file."""
    status, out = killed[case]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, f"not killed while writing (status {status})"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert not [p.name for p in written if p.stat().st_size == 0], _listing(out)
    assert not (out / results).exists(), _listing(out)
    for folder in {p.parent for p in written}:
        prepare_output_dir(folder)
    assert not list(out.rglob("*.tmp")), _listing(out)
