"""Certified accuracy on digits (8x8, L2, pixels in [0, 1]): a standard and an LMT-trained CNN.

Trains both models with the project's training loop (the equivalent commands are printed), then
reports, for each: clean accuracy, certified accuracy at eps 0.1/0.25/0.5/1.0 and the median
radius (pairwise certificate, guaranteed float64 bound); for the LMT model also the gap between
the power-iteration estimate used in training and the guaranteed bound (per layer and global), a
soundness check (L2 PGD at 0.999 x the certified radius on every certified test point, plus the
same points mirrored) and the tightness chain A/B, A/D on a sample.

Usage:
    python benchmarks/lipschitz_digits.py --out runs/bench/lipschitz_digits.json
    python benchmarks/lipschitz_digits.py --model resnet --out runs/bench/lipschitz_digits_resnet.json

``--model resnet`` trains the registry's default ``resnet`` (pre-activation, BatchNorm) with the same recipe
and also reports BatchNorm's smallest running variance and the per-epoch drift checks of the LMT run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sturdy.experiments.jsonio import write_json
from sturdy.experiments.lipschitz import training_plugin
from sturdy.experiments.lipschitz_certify import certify_model
from sturdy.experiments.train_job import TrainJob, fit
from sturdy.lipschitz import LipschitzTracker, pgd_l2, tightness
from sturdy.training import TrainConfig, load_checkpoint

ATTACK_FRACTION = 0.999


def _command(job: TrainJob) -> str:
    def fmt(v: object) -> str:
        return v if isinstance(v, str) else repr(v).replace(" ", "")

    kw = " ".join(f"--model-arg {k}={fmt(v)}" for k, v in job.model_kwargs.items())
    opts = job.options
    lmt = ""
    if opts.get("method") == "lmt":
        lmt = (f" --method lmt --c {opts['c']} --c-warmup-epochs {opts['c_warmup_epochs']}"
               f" --lmt-form {opts['lmt_form']}" + (" --lmt-clip" if opts.get("lmt_clip") else ""))
    cfg = job.config
    return (f"sturdy train --dataset digits --model {job.model} {kw} --epochs {cfg.epochs} --batch-size "
            f"{cfg.batch_size} --lr {cfg.lr} --optimizer {cfg.optimizer} --schedule {cfg.schedule}{lmt} "
            f"--out {job.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("cnn", "resnet"), default="cnn",
                   help="cnn: --channels/--width/--pool; resnet: the registry's defaults (BatchNorm)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--c", type=float, default=0.5)
    p.add_argument("--warmup", type=float, default=30)
    p.add_argument("--channels", default="32,64")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--pool", default="none")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--attack-steps", type=int, default=100)
    p.add_argument("--attack-restarts", type=int, default=5)
    p.add_argument("--tightness-points", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/bench/lipschitz_digits")
    p.add_argument("--out", default="runs/bench/lipschitz_digits.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    arch = {"channels": tuple(int(c) for c in args.channels.split(",")), "width": args.width, "pool": args.pool}
    if args.model == "resnet":
        arch = {}
    config = TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3, optimizer="adam", schedule="cosine", seed=0,
                         device="cpu")
    common = dict(dataset="digits", model=args.model, model_kwargs=arch, config=config)
    jobs = {
        "standard": TrainJob(**common, out=str(work / "standard")),
        "lmt": TrainJob(**common, out=str(work / "lmt"), options={
            "method": "lmt", "c": args.c, "c_warmup_epochs": args.warmup, "lmt_form": "pairwise",
            "lmt_clip": not args.no_clip, "lmt_iterations": 1}),
    }
    result = {"benchmark": "lipschitz_digits", "hardware": "cpu", "threads": args.threads, "c": args.c,
              "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}, "models": {}}
    for name, job in jobs.items():
        print(_command(job), flush=True)
        t0 = time.perf_counter()
        plugin = training_plugin(job)
        fitted = fit(job, plugins=[plugin] if plugin is not None else [], resume=False, progress=False)
        train_seconds = time.perf_counter() - t0
        model = fitted.model.eval()
        test_set_x, test_set_y = _test_data()
        cert, summary = certify_model(model, test_set_x, test_set_y)
        entry = {"command": _command(job), "train_seconds": train_seconds,
                 **{k: summary[k] for k in ("clean_accuracy", "certified_accuracy", "median_radius",
                                            "radius_quantiles", "lipschitz_upper", "lipschitz_upper_body",
                                            "lipschitz_estimate", "per_layer")}}
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if bns:
            entry["batchnorm_min_running_var"] = min(float(m.running_var.min()) for m in bns)
        if "lipschitz_drift" in fitted.results:
            entry["drift_checks"] = fitted.results["lipschitz_drift"]
        if name == "lmt":
            # power-iteration gap: the tracker state at the end of training vs. the guaranteed bounds
            tracker = LipschitzTracker(model, input_shape=(1, 1, 8, 8), warmup_iterations=0)  # eval: running stats
            state = load_checkpoint(Path(job.out) / "model.pt").get("state", {}).get("lipschitz")
            if state is not None:
                tracker.load_state_dict(state)
            est = tracker.norms()
            gaps = {}
            for layer in summary["per_layer"]:
                if layer["path"] in est:
                    gaps[layer["path"]] = 1.0 - est[layer["path"]] / layer["upper"]
            with torch.no_grad():
                e = tracker()
            entry["training_estimate"] = {"from_checkpoint": state is not None, "per_layer_gap": gaps,
                                          "lipschitz": float(e.lipschitz), "body": float(e.body),
                                          "global_gap": 1.0 - float(e.lipschitz) / summary["lipschitz_upper"],
                                          "body_gap": 1.0 - float(e.body) / summary["lipschitz_upper_body"]}
            # soundness: attack every certified point (and mirrored digits) at 0.999 x its radius
            x = torch.cat([test_set_x, test_set_x.flip(-1)])
            with torch.no_grad():
                y = torch.cat([test_set_y, model(test_set_x.flip(-1)).argmax(1)])
            c2, _ = certify_model(model, x, y)
            idx = (c2.radius > 0).nonzero().flatten()
            t1 = time.perf_counter()
            res = pgd_l2(model, x[idx], c2.predicted[idx], eps=c2.radius[idx] * ATTACK_FRACTION,
                         steps=args.attack_steps, restarts=args.attack_restarts)
            entry["soundness"] = {"points": int(idx.numel()), "attack_steps": args.attack_steps,
                                  "restarts": args.attack_restarts, "fraction_of_radius": ATTACK_FRACTION,
                                  "broken": int(res.success.sum()), "seconds": time.perf_counter() - t1}
            n = args.tightness_points
            entry["tightness"] = tightness(model, test_set_x[:n], test_set_y[:n], bound=cert.bound).to_dict()
        result["models"][name] = entry
        print(json.dumps({name: {k: entry[k] for k in ("clean_accuracy", "certified_accuracy", "median_radius")}}),
              flush=True)
    out = Path(args.out)
    write_json(result, out)
    print(json.dumps(result, indent=2))


def _test_data():
    from sturdy.data import load_dataset

    test = load_dataset("digits", split="test")
    return test.images, test.labels


if __name__ == "__main__":
    main()
