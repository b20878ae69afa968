"""The Single Fourier Attack against ART's ``UniversalPerturbation`` on the same model, images and budget.

ART (adversarial-robustness-toolbox, in the ``bench`` extra) builds a universal perturbation with a
white-box per-image attacker (deepfool by default, fgsm, pgd); SFA and the Fourier combination (the SFA
grown into a mixture of a few directions, beyond the paper) are black-box (predicted labels only).
Both get the same attack images (training digits), the same budget, and are evaluated with
:func:`sturdy.fourier.evaluate_perturbation` on the whole test split (held-out) and under random circular
shifts. Times are wall seconds of the search, one CPU thread, measured in the same run.

Usage:
    python benchmarks/fourier_art_compare.py --out runs/bench/fourier_art_compare.json
    python benchmarks/fourier_art_compare.py --attackers fgsm pgd   # skip the slow deepfool
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from fourier_common import attack_split, digits_model
from torch import nn

from sturdy.errors import MissingDependencyError
from sturdy.experiments.jsonio import write_json
from sturdy.fourier import (
    evaluate_perturbation,
    fourier_combination_attack,
    random_noise_baseline,
    single_fourier_attack,
)


def _art():
    if importlib.util.find_spec("art") is None:
        raise MissingDependencyError(
            "this benchmark compares with ART's UniversalPerturbation: install it with "
            "`pip install 'sturdy[bench]'` (or `pip install adversarial-robustness-toolbox`)"
        )
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    return UniversalPerturbation, PyTorchClassifier


def art_universal(model, x: torch.Tensor, *, attacker: str, eps: float, norm: str, max_iter: int, seed: int):
    """ART's universal perturbation of budget ``eps`` (projected by ART); returns (delta, seconds)."""
    UniversalPerturbation, PyTorchClassifier = _art()
    art_norm = 2 if norm == "l2" else np.inf
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    params = {
        "deepfool": {"verbose": False},
        "fgsm": {"norm": art_norm, "eps": eps},
        "pgd": {"norm": art_norm, "eps": eps, "eps_step": eps / 4, "max_iter": 10, "verbose": False},
    }[attacker]
    np.random.seed(seed)
    attack = UniversalPerturbation(clf, attacker=attacker, attacker_params=params, eps=eps, norm=art_norm,
                                   max_iter=max_iter, delta=0.2, batch_size=64, verbose=False)
    start = time.perf_counter()
    attack.generate(x.numpy())
    seconds = time.perf_counter() - start
    return torch.from_numpy(np.asarray(attack.noise)).reshape(x.shape[1:]).float(), seconds


def _entry(model, xt, yt, label, method, delta, seconds, queries, kind="black-box", quiet=False):
    rep = evaluate_perturbation(model, delta, xt, yt, shifts=4)
    if not quiet:
            print(f"{label} {method:24s} held-out fooling {rep.fooling_rate:.3f}  shifted "
              f"{rep.shifted_fooling_rate:.3f}  {seconds:8.2f} s")
    return {"method": method, "kind": kind, "seconds": seconds, "queries": queries,
            "heldout_fooling_rate": rep.fooling_rate, "shifted_fooling_rate": rep.shifted_fooling_rate,
            "mean_applied_l2": rep.mean_l2, "mean_applied_linf": rep.mean_linf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/fourier_art_compare.json")
    parser.add_argument("--attack-images", type=int, default=300)
    parser.add_argument("--attackers", nargs="+", default=["deepfool", "fgsm", "pgd"])
    parser.add_argument("--max-iter", type=int, default=20, help="ART passes over the attack images")
    parser.add_argument("--deepfool-max-iter", type=int, default=2,
                        help="passes for deepfool (one image at a time, 10 class gradients per step: slow)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    _art()  # fail early with the install hint
    torch.set_num_threads(args.threads)
    model, train_set, test_set = digits_model()
    x = attack_split(train_set, args.attack_images)
    xt, yt = test_set.images, test_set.labels
    settings = [dict(eps=2.0, norm="l2", wave="sine"), dict(eps=0.1, norm="linf", wave="square")]
    rows = []
    for setting in settings:
        eps, norm = setting["eps"], setting["norm"]
        label = f"{norm} eps {eps:<4}"
        entries = []
        sfa = None
        for search in ("halving", "exhaustive"):
            result = single_fourier_attack(model, x, search=search, **setting)
            sfa = sfa or result
            entries.append(_entry(model, xt, yt, label, f"SFA {search}", result.delta, result.seconds,
                                  result.queries))
        combo = fourier_combination_attack(model, x, initial=sfa, **setting)
        entries.append(_entry(model, xt, yt, label, "Fourier combination", combo.delta, combo.seconds,
                              combo.queries))
        noise = random_noise_baseline(model, xt, yt, eps=eps, norm=norm, draws=8, shifts=4)
        entries.append({"method": "random noise (mean of 8)", "kind": "black-box", "seconds": 0.0, "queries": 0,
                        "heldout_fooling_rate": noise.fooling_rate, "shifted_fooling_rate": noise.shifted_fooling_rate})
        print(f"{label} {'random noise (mean of 8)':24s} held-out fooling "
              f"{entries[-1]['heldout_fooling_rate']:.3f}  shifted {entries[-1]['shifted_fooling_rate']:.3f}")
        for attacker in args.attackers:
            passes = args.deepfool_max_iter if attacker == "deepfool" else args.max_iter
            delta, seconds = art_universal(model, x, attacker=attacker, eps=eps, norm=norm, max_iter=passes, seed=0)
            entries.append({**_entry(model, xt, yt, label, f"ART universal/{attacker}", delta, seconds, None,
                                     kind="white-box"), "art_max_iter": passes})
        halving = entries[0]
        for e in entries:
            e["seconds_vs_sfa_halving"] = e["seconds"] / halving["seconds"] if halving["seconds"] else None
        rows.append({**setting, "methods": entries})
    result = {"benchmark": "fourier_art_compare", "device": "cpu", "threads": torch.get_num_threads(),
              "attack_images": len(x), "heldout_images": len(xt), "art_max_iter": args.max_iter,
              "art_deepfool_max_iter": args.deepfool_max_iter, "settings": rows}
    out = Path(args.out)
    write_json(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
