"""trackio and mlflow media through `train.report_to` (mmalign/train/trackers.py). Neither library
is installed here: small stand-in modules put in sys.modules record the calls accelerate's
TrackioTracker / MLflowTracker and mmalign make (trackio.init / run.log / trackio.Image;
mlflow.start_run / log_metrics / log_image), and the images logged are compared with the files."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tensorboard=false"]


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
    return module


def fake_trackio(calls: list) -> types.ModuleType:
    trackio = _module("trackio")

    class Run:
        def log(self, values, step=None):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    class TrackioImage:
        def __init__(self, value, caption=None):
            self.value, self.caption = value, caption

    def init(project, **kwargs):
        calls.append(("init", project, kwargs))
        return Run()

    trackio.init, trackio.Image = init, TrackioImage
    trackio.config = types.SimpleNamespace(update=lambda values, allow_val_change: calls.append(("config", values)))
    return trackio


def fake_mlflow(calls: list) -> types.ModuleType:
    mlflow = _module("mlflow")
    validation = types.SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=100)
    mlflow.utils = types.SimpleNamespace(validation=validation)
    mlflow.search_experiments = lambda filter_string: []
    mlflow.create_experiment = lambda name, artifact_location=None, tags=None: calls.append(("experiment", name)) or "1"
    mlflow.start_run = lambda **kwargs: calls.append(("start_run", kwargs)) or types.SimpleNamespace(info=None)
    mlflow.log_params = lambda params: calls.append(("params", dict(params)))
    mlflow.log_metrics = lambda metrics, step=None: calls.append(("metrics", dict(metrics), step))
    mlflow.log_image = lambda image, key=None, step=None: calls.append(("image", image, key, step))
    mlflow.end_run = lambda: calls.append(("end_run",))
    return mlflow


@pytest.fixture()
def fakes(monkeypatch):
    calls = {"trackio": [], "mlflow": []}
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls["trackio"]))
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls["mlflow"]))
    return calls


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_validation_grid_and_scalars_reach_trackio_and_mlflow(fakes, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny/sdxl_dpo.yaml"), f"data.train={ROOT / 'datasets/pickapic/sample'}",
                 f"train.output_dir={run}", "train.max_steps=2", "train.validate_every=2",
                 "diffusion.validation_steps=2", "train.report_to=[trackio, mlflow]", *QUIET]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in logged if "loss" in r)
    written = _pixels(Image.open(run / "validation" / "step_00000002" / "grid.png"))

    t = fakes["trackio"]
    assert t[0] == ("init", "mmalign", {"name": "run"}) and t[1][0] == "config" and t[-1] == ("finish",)
    scalars = next(c for c in t if c[0] == "log" and "train/loss" in c[1])
    assert scalars[1]["train/loss"] == train_row["loss"] and scalars[2] == train_row["step"]
    (media,) = [c for c in t if c[0] == "log" and "validation/grid" in c[1]]
    image = media[1]["validation/grid"]
    assert media[2] == 2 and image.caption == "validation/grid step 2"
    np.testing.assert_array_equal(_pixels(image.value), written)

    m = fakes["mlflow"]
    assert m[0] == ("experiment", "mmalign") and m[1][1]["run_name"] == "run" and m[-1] == ("end_run",)
    assert ("metrics", {f"train/{k}": v for k, v in train_row.items() if k != "step"}, train_row["step"]) in m
    (image_call,) = [c for c in m if c[0] == "image"]
    assert image_call[2:] == ("validation/grid", 2)
    np.testing.assert_array_equal(_pixels(image_call[1]), written)


def test_online_round_samples_are_logged_as_media(fakes, tmp_path, monkeypatch):
    """flow_online_dpo: the first round's sampled images, as one grid `online/samples` at step 0."""
    from mmalign.train.trackers import image_grid

    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny/flow_online_dpo.yaml"), f"train.output_dir={run}",
                 "train.max_steps=1", "online.round_steps=1", "online.prompts_per_round=2", "online.group_size=2",
                 "train.batch_size=1", "train.report_to=[trackio, mlflow]", *QUIET]) == 0
    samples = sorted(p for p in (run / "rounds").rglob("*.png"))
    assert len(samples) == 4  # 2 prompts x 2 samples
    expected = _pixels(image_grid(samples))
    (media,) = [c for c in fakes["trackio"] if c[0] == "log" and "online/samples" in c[1]]
    assert media[2] == 0
    np.testing.assert_array_equal(_pixels(media[1]["online/samples"].value), expected)
    (image_call,) = [c for c in fakes["mlflow"] if c[0] == "image"]
    assert image_call[2:] == ("online/samples", 0)
    np.testing.assert_array_equal(_pixels(image_call[1]), expected)
