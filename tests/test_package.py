"""Packaging promises: a light `import mmalign`, a working console entry point."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = ("import sys, mmalign, mmalign.losses, mmalign.config, mmalign.types, mmalign.data.preference, "
            "mmalign.train.trainer, mmalign.cli, mmalign.toytext; "
            "heavy = [m for m in ('transformers', 'diffusers', 'open_clip', 'peft', 'accelerate') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_lists_commands(capsys):
    from mmalign.cli import main

    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "demo" in out


def test_the_entry_point_closes_a_launcher_process_group():
    """`mmalign` / `python -m mmalign.cli` tear down the torch.distributed group before exiting
    (gloo threads alive at exit can abort a finished torchrun worker)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, torch.distributed as dist; "
            f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{port}'); "
            "dist.init_process_group('gloo', rank=0, world_size=1); "
            "from mmalign.cli import close_process_group; before = dist.is_initialized(); close_process_group(finished=True); "
            "print(before, dist.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["True", "False"]
