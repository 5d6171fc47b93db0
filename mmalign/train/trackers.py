"""Experiment trackers (`train.report_to: [tensorboard, wandb, trackio, mlflow]`) through accelerate's
tracker classes (`accelerate.tracking`), beside metrics.jsonl (which stays the record of a run).

Scalar names follow what TRL's runs show in these tools (transformers' logging callbacks): a
training value `k` (loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, ...) is logged as `train/k`; held-out values are already `eval/k`.
Media: the validation images (the PNGs `likelihood.validate` wrote for a step) go as one grid,
`validation/grid`, and an online round's samples (the image files of its round folder, at the
step the round begins) as `online/samples`, to every tracker through its own image API:
tensorboard `add_images` (NHWC), wandb `wandb.Image`, trackio `trackio.Image` in `run.log`,
mlflow `mlflow.log_image(image, key=..., step=...)` (mlflow >= 2.12).

Where they write: tensorboard -> output_dir/tensorboard/mmalign; wandb -> WANDB_DIR (else
output_dir), project WANDB_PROJECT (else "mmalign"), run name = output_dir's name, WANDB_MODE
honoured (offline runs write wandb/offline-run-*/run-*.wandb); trackio -> its own store, project
"mmalign"; mlflow -> MLFLOW_TRACKING_URI (else output_dir/mlruns).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError

# name -> (accelerate tracker class, the module it imports, the pip install that provides it)
TRACKERS = {
    "tensorboard": ("TensorBoardTracker", "tensorboard", "pip install 'mmalign[tensorboard]' (tensorboard)"),
    "wandb": ("WandBTracker", "wandb", "pip install 'mmalign[wandb]' (wandb)"),
    "trackio": ("TrackioTracker", "trackio", "pip install 'mmalign[trackio]' (trackio)"),
    "mlflow": ("MLflowTracker", "mlflow", "pip install 'mmalign[mlflow]' (mlflow)"),
}
MAX_MEDIA_IMAGES = 16  # images per logged grid (the first ones of the folder, sorted)


def check_report_to(names: list[str]) -> None:
    """ConfigError for a name that is not a tracker, a repeated one, or one whose library is not installed."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name][1]) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; {TRACKERS[name][2]}")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to lists a tracker twice: {names}")


def tracker_key(key: str) -> str:
    """metrics.jsonl key -> tracker key: `loss` -> `train/loss`; `eval/...`, `train/...`, `validation/...` kept."""
    return key if key.startswith(("train/", "eval/", "validation/")) else f"train/{key}"


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}; lists as text (what every tracker stores)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return flat


def _build(name: str, output_dir: Path) -> Any:
    from accelerate import tracking

    cls = getattr(tracking, TRACKERS[name][0])
    if name == "tensorboard":
        return cls("mmalign", str(output_dir / "tensorboard"))
    if name == "wandb":
        return cls(os.environ.get("WANDB_PROJECT", "mmalign"), name=output_dir.name,
                   dir=os.environ.get("WANDB_DIR") or str(output_dir))
    if name == "mlflow":
        return cls(experiment_name="mmalign", logging_dir=os.environ.get("MLFLOW_TRACKING_URI")
                   or str(output_dir / "mlruns"), run_name=output_dir.name)
    return cls("mmalign", name=output_dir.name)


def image_grid(paths: list[Path], columns: int = 4) -> Any:
    """One RGB PIL image holding the images at `paths` row by row (cells of the largest size)."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = max(i.width for i in images), max(i.height for i in images)
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h))
    for n, image in enumerate(images):
        grid.paste(image, ((n % cols) * w, (n // cols) * h))
    return grid


class Trackers:
    """The started trackers of one run (main process only): `log` scalars, `log_folder_images`, `finish`."""

    def __init__(self, names: list[str], output_dir: Path, config: dict[str, Any]) -> None:
        check_report_to(names)
        self.names = list(names)
        self.trackers = [_build(name, Path(output_dir)) for name in names]
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(_flat_config(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        scalars = {tracker_key(k): float(v) for k, v in values.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def log_folder_images(self, step: int, folder: Path, key: str = "validation/grid") -> None:
        """The PNG/JPEG files of `folder` (sorted; the first MAX_MEDIA_IMAGES) as one grid `key`."""
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            return
        grid = image_grid(paths[:MAX_MEDIA_IMAGES])
        for name, tracker in zip(self.names, self.trackers):
            log_image(name, tracker, key, grid, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def log_image(name: str, tracker: Any, key: str, image: Any, step: int) -> None:
    """One PIL image under `key` at `step`, through tracker `name`'s own image API."""
    import numpy as np

    if name == "wandb":
        tracker.log_images({key: [image]}, step=step)
    elif name == "tensorboard":
        tracker.log_images({key: np.asarray(image)[None]}, step=step, dataformats="NHWC")
    elif name == "trackio":
        import trackio

        tracker.log({key: trackio.Image(image, caption=f"{key} step {step}")}, step=step)
    elif name == "mlflow":
        import mlflow

        mlflow.log_image(image, key=key, step=step)
