"""The toy-world demo as a recipe script: the same function `mmalign demo` (and `make demo`) runs.

    OMP_NUM_THREADS=2 .venv/bin/python pipelines/toyworld_demo.py [--out runs/demo] [--quick] [--only image|vlm]

It prints every step as the `mmalign ...` command it runs, so any step can be rerun by hand
with other settings (another scorer, loss, beta, LoRA), and writes everything under --out:
results.json (the tables), report.html, and each step's outputs (see mmalign/toyworld/demo.py).
"""

from __future__ import annotations

import argparse

from mmalign.toyworld.demo import run_demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--quick", action="store_true", help="a few samples and steps (checks the pipeline)")
    ap.add_argument("--only", nargs="+", choices=("image", "vlm"), default=["image", "vlm"])
    args = ap.parse_args()
    run_demo(args.out, quick=args.quick, sides=args.only)
