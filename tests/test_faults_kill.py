"""Kill injection (issue 23 item 7): `mmalign train` and `mmalign generate` run as subprocesses of
the tiny text model, SIGKILLed at points found by polling their output folder, then rerun. The
resumed run's final weights equal an uninterrupted run's bit for bit; the rerun generation's
manifest is byte-identical. Every process runs with one thread, as the uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.01
LIMIT_S = 300


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmalign.cli", *args]


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                TOKENIZERS_PARALLELISM="false")


def run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_and_kill(args: list[str], ready: Callable[[], bool]) -> None:
    """Start the command, SIGKILL it as soon as `ready()` holds; it must not have finished first."""
    proc = subprocess.Popen(command(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + LIMIT_S
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]!r}")
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass  # the line being written
    return steps


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_train_killed_twice_resumes_bit_exactly(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 10, "save_every": 2, "batch_size": 4, "keep_last": 0})
    straight, killed = tmp_path / "straight", tmp_path / "run"
    run(["train", str(cfg), f"train.output_dir={straight}"])

    # 1: right after the first checkpoint exists
    run_and_kill(["train", str(cfg)], lambda: (killed / "checkpoints" / "latest").is_file())
    # 2: resumed, then killed mid-way between two checkpoints (a step logged past the last save)
    run_and_kill(["train", str(cfg), "train.resume=true"], lambda: any(s >= 5 for s in logged_steps(killed)))
    assert not (killed / "final").exists()
    done = run(["train", str(cfg), "train.resume=true"])
    assert "resumed from" in done.stdout

    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
    assert logged_steps(killed) == logged_steps(straight) == list(range(1, 11))  # no lost or repeated step


def test_generate_killed_then_rerun_is_byte_identical(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"scene : cat {' tree' * (i % 3)} . describe :\n" for i in range(24)))
    args = ["--model", str(tiny_lm_dir), "--prompts", str(prompts), "--num-samples", "2", "--batch-size", "1",
            "--seed", "3", "--no-progress", "--set", "max_new_tokens=6"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(["generate", *args, "--out", str(straight)])

    def some_rows() -> bool:
        path = killed / "manifest.jsonl"
        return path.is_file() and path.read_bytes().count(b"\n") >= 5

    run_and_kill(["generate", *args, "--out", str(killed)], some_rows)
    partial = (killed / "manifest.jsonl").read_bytes().count(b"\n")
    assert 5 <= partial < 48
    run(["generate", *args, "--out", str(killed)])
    assert (killed / "manifest.jsonl").read_bytes() == (straight / "manifest.jsonl").read_bytes()


def test_read_only_output_folder_is_one_line_from_the_command_line(make_config, tmp_path):
    """The installed command (not only `main`): a folder that cannot be written is one line."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; tests/test_faults_cli.py simulates one")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        cfg = make_config(train={"max_steps": 1, "output_dir": str(out / "run")})
        done = subprocess.run(command("train", str(cfg)), env=env(), capture_output=True, text=True, timeout=LIMIT_S)
    finally:
        out.chmod(0o755)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"mmalign: error: cannot write {out / 'run'}")
