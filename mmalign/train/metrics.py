"""Metrics with TRL's names, summed across processes, written to jsonl, TensorBoard and the
trackers of `train.report_to` (mmalign/train/trackers.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.io import atomic_path
from mmalign.types import PairLogps


def pair_metrics(policy: PairLogps, reference: PairLogps, beta: float) -> dict[str, Tensor]:
    """Per-example (B,) values: rewards are β·(policy - reference) log-ratios."""
    chosen_logratios = policy.chosen - reference.chosen
    rejected_logratios = policy.rejected - reference.rejected
    return {
        "rewards/chosen": beta * chosen_logratios,
        "rewards/rejected": beta * rejected_logratios,
        "rewards/margins": beta * (chosen_logratios - rejected_logratios),
        "rewards/accuracies": (chosen_logratios > rejected_logratios).float(),
        "logps/chosen": policy.chosen,
        "logps/rejected": policy.rejected,
    }


class Meter:
    """Running sums and counts per key; `reduce` adds them up over processes.

    Sums stay tensors on the batch's device until `reduce`, so a step costs one host
    transfer, not one per metric. Every process must add the same keys in the same order
    (empty tensors are fine), so the all-reduce lines up.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for key, v in values.items():
            v = v.detach().reshape(-1).to(torch.float64)
            self.sums[key] = self.sums[key] + v.sum() if key in self.sums else v.sum()
            self.counts[key] = self.counts.get(key, 0) + v.numel()

    def reduce(self, accelerator: Any = None) -> dict[str, float]:
        keys = list(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k] for k in keys])
        counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64, device=sums.device)
        totals = torch.stack([sums, counts])
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        totals = totals.cpu()
        return {k: float(totals[0, i] / totals[1, i]) for i, k in enumerate(keys) if totals[1, i] > 0}


def trim_metrics(path: Path, resume_step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint a run resumes from (all of them
    when it starts from step 0) and a torn (unparseable) line a crash or a full disk left. The
    file is left alone when nothing is to drop, else replaced atomically (never rewritten in
    place: a kill during the trim keeps the old history)."""
    raw = path.read_bytes()
    kept, dropped, torn = [], 0, []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            torn.append(number)
            continue
        if resume_step and step <= resume_step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped and not torn and (not raw or raw.endswith(b"\n")):
        return
    if torn:
        print(f"[mmalign] warning: {path}: dropped unreadable line(s) {torn} (torn by a crash or a full disk)")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends one JSON line per log event to `metrics.jsonl` (main process only);
    mirrors scalars to TensorBoard when it is installed and enabled, and to the trackers named in
    `report_to` (with `run_config`, the run's config as a dict, stored as their hyperparameters)."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True,
                 report_to: list[str] | None = None, run_config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.trackers = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            trim_metrics(self.path, resume_step)
        if report_to:
            from mmalign.train.trackers import Trackers

            self.trackers = Trackers(list(report_to), Path(output_dir), run_config or {})
        if tensorboard and "tensorboard" not in (report_to or []):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(step, values)

    def log_media(self, step: int, folder: Path, key: str = "validation/grid") -> None:
        """The images in `folder` (a validation's, an online round's samples), as one grid `key`, to the trackers."""
        if self.enabled and self.trackers is not None:
            self.trackers.log_folder_images(step, folder, key)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.finish()


def format_metrics(values: dict[str, float], keys: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins")) -> str:
    return " ".join(f"{k}={values[k]:.4f}" for k in keys if k in values)
