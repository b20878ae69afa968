"""The one prepared GPU check: every part's GPU correctness and speed figures in one run.

Each part adds a section as ``benchmarks/gpu_sections/<part>.py`` exposing
``run(*, device: torch.device, smoke: bool) -> dict``; a section measures its ratios in the same
run (warm-up, ``torch.cuda.synchronize``, medians) and returns JSON-able results, including a
``"targets"`` dict of ``name -> {"value": ratio, "target": "<= 1.10", "met": bool}``. The whole script
must finish in under 8 minutes on one H100.

    python benchmarks/gpu_check.py --out gpu_check.json              # on a CUDA machine
    python benchmarks/gpu_check.py --smoke --device cpu --out x.json  # tiny sizes: checks the script runs

A section that fails is reported (its error as one line) and the others still run; the exit status
is 1 if any section failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import torch

SECTIONS_DIR = Path(__file__).resolve().parent / "gpu_sections"


def _sections(only):
    for path in sorted(SECTIONS_DIR.glob("*.py")):
        if path.name.startswith("_") or (only and path.stem not in only):
            continue
        spec = importlib.util.spec_from_file_location(f"gpu_sections.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path.stem, module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (any device): checks that the script runs")
    parser.add_argument("--only", default="", help="comma-separated section names")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --device cpu --smoke to check the script", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "smoke": args.smoke, "sections": {}}
    failed = False
    only = {s for s in args.only.split(",") if s}
    t_all = time.perf_counter()
    for name, module in _sections(only):
        t0 = time.perf_counter()
        try:
            section = module.run(device=device, smoke=args.smoke)
            section["seconds"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one section's failure must not hide the others
            failed = True
            section = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500],
                       "traceback": traceback.format_exc()[-2000:], "seconds": time.perf_counter() - t0}
        results["sections"][name] = section
        for target, row in section.get("targets", {}).items():
            print(f"[{name}] {target}: {row.get('value')} (target {row.get('target')}, met={row.get('met')})")
        if "error" in section:
            print(f"[{name}] FAILED: {section['error']}")
        print(f"[{name}] {section['seconds']:.1f} s", flush=True)
    results["seconds"] = time.perf_counter() - t_all
    from sturdy.experiments.jsonio import write_json

    write_json(results, Path(args.out))
    print(f"gpu_check: {results['seconds']:.0f} s in all; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
