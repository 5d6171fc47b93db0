"""The toy text-to-image trainers' command lines (pipelines/train_toy_diffusion.py, train_toy_flow.py):
one shared option block (`toy_arguments`, imported by train_toy_flow.py from train_toy_diffusion.py
through sys.path, `pipelines/` holding no __init__.py), each script's defaults as before."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOYWORLD = ROOT / "mmalign" / "data" / "toyworld"
SHARED = {"n_images": 20000, "batch_size": 32, "caption_dropout": 0.1, "eval_per_prompt": 16, "threads": 1}
DEFAULTS = {  # each script's options and defaults (before the shared block: written out in each main())
    "train_toy_diffusion": {**SHARED, "vae_steps": 400, "kl_weight": 1e-6, "steps": 1600, "lr": 1e-3,
                            "out": TOYWORLD / "diffusion"},
    "train_toy_flow": {**SHARED, "layers": 2, "heads": 3, "steps": 700, "lr": 2e-3, "out": TOYWORLD / "flow"},
}


def script(name: str):
    """pipelines/<name>.py loaded as a module (not run: main() is behind __main__)."""
    spec = importlib.util.spec_from_file_location(f"_pinned_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_script_keeps_its_options_and_defaults(name):
    parser = script(name).arguments()
    assert vars(parser.parse_args([])) == DEFAULTS[name]
    args = parser.parse_args(["--steps", "3", "--lr", "0.5", "--out", "x", "--threads", "2"])
    assert (args.steps, args.lr, args.out, args.threads) == (3, 0.5, Path("x"), 2)
    assert parser.description.startswith("Train the shipped toy")  # the script's docstring, raw
    with pytest.raises(SystemExit):  # the other script's own options are not taken
        parser.parse_args(["--layers", "1"] if name == "train_toy_diffusion" else ["--vae-steps", "1"])


def test_flow_script_runs_standalone_with_the_shared_block():
    """`python pipelines/train_toy_flow.py --help` from the repository root (no __init__.py in pipelines/)."""
    assert not (ROOT / "pipelines" / "__init__.py").exists()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "pipelines/train_toy_flow.py", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for option in ("--n-images", "--steps", "--eval-per-prompt", "--out", "--layers", "--heads"):
        assert option in out.stdout
    assert "pkg://toyworld/flow" in out.stdout  # the flow script's own description
