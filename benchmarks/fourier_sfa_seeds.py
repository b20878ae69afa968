"""How often the staged SFA search misses exhaustive search's result, over many seeds, at no model cost.

The staged search only reads how many attack images each candidate fools on subsets of them. This
script evaluates every candidate on every attack image once (the cost of one exhaustive search), keeps
the fooled matrix ``(candidates, images)``, and then runs the library's staged search against it for
many seeds: each run is exact (the same counts the model would give) and costs no model call. The
winner's held-out fooling rate is measured with the model. Data and model as in
``fourier_sfa_search.py`` (tinted digits resized to the side length, a small CNN trained for 6 epochs).

    python benchmarks/fourier_sfa_seeds.py --sides 16 32 64 --seeds 40 --cache runs/bench/sfa_matrices
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fourier_sfa_search import tinted_digits, train_cnn  # noqa: E402

from sturdy.experiments.jsonio import write_json  # noqa: E402
from sturdy.fourier import evaluate_perturbation  # noqa: E402
from sturdy.fourier.search import candidate_deltas, count_fooled, enumerate_candidates  # noqa: E402
from sturdy.fourier.staged import frequency_groups, plan_staged, staged_search  # noqa: E402
from sturdy.models import create_model  # noqa: E402

ATTACK_IMAGES = 64


def fooled_matrix(side: int, cache: Optional[Path]) -> dict:
    """Model, attack images, budget and the fooled matrix at ``side`` (read from / written to ``cache``)."""
    path = cache / f"mat{side}.pt" if cache is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    x_train, y_train = tinted_digits(side, "train")
    model = train_cnn(x_train, y_train, epochs=6)
    gen = torch.Generator().manual_seed(0)
    x = x_train[torch.randperm(len(x_train), generator=gen)[:ATTACK_IMAGES]]
    eps = 2.0 * side / 8
    cands = enumerate_candidates(3, side, side)
    with torch.no_grad():
        clean = model(x).argmax(1)

    def deltas(c0: int, c1: int) -> torch.Tensor:
        return candidate_deltas(cands, torch.arange(c0, c1), side, side, eps=eps, norm="l2", wave="sine",
                                dtype=torch.float32, device=torch.device("cpu"))

    mat = torch.zeros(len(cands), ATTACK_IMAGES, dtype=torch.bool)
    for i in range(ATTACK_IMAGES):
        mat[:, i] = count_fooled(model, x, clean, deltas, len(cands), torch.tensor([i]), bounds=(0.0, 1.0),
                                 batch_size=256) > 0
    data = {"model": model.state_dict(), "x": x, "eps": eps, "mat": mat, "side": side}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


def run_side(side: int, args) -> dict:
    t0 = time.perf_counter()
    data = fooled_matrix(side, Path(args.cache) if args.cache else None)
    model = create_model("cnn", in_shape=(3, side, side), num_classes=10, channels=(8, 16), width=64)
    model.load_state_dict(data["model"])
    model.eval()
    x_test, y_test = tinted_digits(side, "test")
    cands = enumerate_candidates(3, side, side)
    mat = data["mat"].long()
    n = mat.shape[1]
    held: dict = {}

    def heldout(c: int) -> float:
        if c not in held:
            delta = candidate_deltas(cands, torch.tensor([c]), side, side, eps=data["eps"], norm="l2", wave="sine",
                                     dtype=torch.float32, device=torch.device("cpu"))[0]
            held[c] = evaluate_perturbation(model, delta, x_test, y_test).fooling_rate
        return held[c]

    def count(idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return mat[idx][:, images].sum(1)

    totals = mat.sum(1)
    exhaustive = int(torch.argsort(totals, descending=True, stable=True)[0])
    ex_held = heldout(exhaustive)
    _, sizes = frequency_groups(cands)
    plan = plan_staged(len(sizes), int(sizes.max()), n, budget=None, screen_images=32, keep=16, initial_images=16,
                       eta=2)
    row = {"side": side, "candidates": len(cands), "exhaustive_queries": n + n * len(cands),
           "exhaustive_attack_fooling_rate": int(totals[exhaustive]) / n, "exhaustive_heldout_fooling_rate": ex_held,
           "settings": {}}
    for name, configs in (("default (one configuration per screen image)", None), ("screen_configs=4", 4)):
        ratios, queries = [], []
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=gen)  # as single_fourier_attack draws it
            best, _, spent = staged_search(count, cands, order, plan, screen_configs=configs, eta=2, generator=gen)
            ratios.append(heldout(best) / ex_held)
            queries.append((n + spent) / row["exhaustive_queries"])
        row["settings"][name] = {"min_heldout_ratio": min(ratios), "median_heldout_ratio": statistics.median(ratios),
                                 "mean_heldout_ratio": statistics.fmean(ratios),
                                 "seeds_below_0.95": sum(r < 0.95 for r in ratios), "seeds": args.seeds,
                                 "max_query_ratio": max(queries)}
        s = row["settings"][name]
        print(f"3x{side}x{side} {name}: held-out ratio min {s['min_heldout_ratio']:.3f} mean "
              f"{s['mean_heldout_ratio']:.3f}, {s['seeds_below_0.95']}/{args.seeds} seeds below 0.95, queries <= "
              f"{s['max_query_ratio']:.4f} x exhaustive", flush=True)
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--cache", default=None, help="folder for the fooled matrices (reused when present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/fourier_sfa_seeds.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_side(side, args) for side in args.sides]
    write_json({"benchmark": "fourier_sfa_seeds", "attack_images": ATTACK_IMAGES, "sizes": rows}, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
