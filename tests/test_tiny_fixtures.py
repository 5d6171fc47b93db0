"""`mmalign train configs/tiny/X.yaml` as a newcomer's first command: in a fresh working folder
with an empty cache, the config's `pkg://tiny/NAME` paths build their fixture once
(mmalign/tiny.py), the run trains, and a second run reuses the built folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["train.max_steps=1", "train.batch_size=2", "train.progress=false", "train.eval_every=0"]


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
    """A new cwd and an empty fixture cache."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "cache"))
    return {"work": work, "cache": tmp_path / "cache" / "tiny"}


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("config,fixtures,again", [
    ("sd_dpo", ["sd_run"], False), ("flow_dpo", ["sd3_run"], True), ("audio_dpo", ["audio"], False),
    ("llava_dpo", ["llava_model", "toy_shapes", "toy_shapes_eval"], False),
])
def test_tiny_config_builds_its_fixture_and_trains(fresh, capsys, config, fixtures, again):
    from mmalign.cli import main

    args = ["train", str(ROOT / "configs/tiny" / f"{config}.yaml"), *ONE_STEP]
    assert main(args + ["train.output_dir=first"]) == 0
    built = sorted(p.name.rsplit("-", 1)[0] for p in fresh["cache"].iterdir())
    assert built == sorted(fixtures)  # every fixture the config names, nothing half-built left beside
    assert len(_losses(fresh["work"] / "first")) == 1
    assert capsys.readouterr().out.count("building the tiny fixture") == len(fixtures)
    if not again:
        return
    stamps = {p: p.stat().st_mtime_ns for p in fresh["cache"].iterdir()}
    assert main(args + ["train.output_dir=second"]) == 0  # reused, not rebuilt
    assert "building the tiny fixture" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in fresh["cache"].iterdir()} == stamps
    assert _losses(fresh["work"] / "second") == _losses(fresh["work"] / "first")  # same fixture, same seed


def test_fixture_builds_are_deterministic_and_unknown_names_are_one_line(fresh, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mmalign.hub import resolve_path

    first = Path(resolve_path("pkg://tiny/llava_model"))
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "other"))
    second = Path(resolve_path("pkg://tiny/llava_model"))
    assert first != second and first.name == second.name  # same builder hash
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert resolve_path("pkg://tiny/llava_model/config.json") == str(second / "config.json")
    with pytest.raises(ConfigError, match=r"pkg://tiny/nope: no such tiny fixture; known: sd_run, sd3_run"):
        resolve_path("pkg://tiny/nope/pipeline")
