"""`train.report_to` through accelerate's trackers: a wandb run in offline mode (WANDB_MODE=offline,
WANDB_DIR in tmp) on the tiny SDXL config, whose .wandb file is read back here with an
independent reader of its framing (LevelDB log blocks) and wandb's protobuf records."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.errors import ConfigError
from mmalign.train.trackers import check_report_to, tracker_key

ROOT = Path(__file__).resolve().parents[1]
TRL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks
    of chunks, each `<crc32 u32, length u16, type u8>` + payload (1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(buf)
    return records


def test_tracker_names_and_errors(monkeypatch):
    assert [tracker_key(k) for k in ("loss", "rewards/margins", "eval/rewards/margins", "validation/images")] == \
        ["train/loss", "train/rewards/margins", "eval/rewards/margins", "validation/images"]
    with pytest.raises(ConfigError, match="unknown tracker 'wandbb'; known: tensorboard, wandb, trackio, mlflow"):
        check_report_to(["wandbb"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: mlflow is not installed; pip install 'mmalign\[mlflow\]'"):
        check_report_to(["wandb", "mlflow"])
    assert main(["train", str(ROOT / "configs/tiny/lm_dpo.yaml"), "train.report_to=[mlflow]"]) == 2


def test_wandb_offline_run_holds_the_scalars_and_the_validation_grid(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny/sdxl_dpo.yaml"), f"data.train={ROOT / 'datasets/pickapic/sample'}",
                 f"train.output_dir={run}", "train.max_steps=2", "train.validate_every=2",
                 "diffusion.validation_steps=2", "train.report_to=[wandb]", "train.progress=false"]) == 0
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif record.WhichOneof("record_type") == "config":
            config.update({item.key: item.value_json for item in record.config.update})
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in logged if "loss" in r)
    (row,) = [h for h in history if h["_step"] == 2]
    for key in TRL_KEYS:  # the same float as metrics.jsonl, under TRL's train/ name
        assert row[f"train/{key}"] == train_row[key]
    assert row["validation/images"] == 4.0  # validation's own scalar
    assert row["validation/grid/_type"] == "images/separated" and row["validation/grid/count"] == 1
    (media,) = row["validation/grid/filenames"]
    logged_grid = np.asarray(Image.open(run_file.parent / "files" / media).convert("RGB"))
    written = np.asarray(Image.open(run / "validation" / "step_00000002" / "grid.png").convert("RGB"))
    np.testing.assert_array_equal(logged_grid, written)
    assert json.loads(config["loss.beta"]) == 5000.0  # the run config, flattened, as hyperparameters
