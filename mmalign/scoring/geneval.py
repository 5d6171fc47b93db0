"""`geneval` scorer: GenEval's 0/1 verdict of an image for its prompt (mmalign/evaluation/geneval.py),
usable as a reward (`mmalign score --scorer geneval=METADATA.jsonl,detector=toyworld`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError, DataError
from mmalign.evaluation import geneval
from mmalign.evaluation.geneval_cli import DETECTORS
from mmalign.scoring.base import Scorer


class GenEvalScorer(Scorer):
    """`geneval=METADATA.jsonl,detector=toyworld` (or detector=owlv2 | grounding-dino,detector_path=DIR,clip=DIR): score
    1.0 when the image passes GenEval's checks for its prompt, else 0.0 (the strict GenEval verdict;
    the Flow-GRPO partial reward is not implemented). A prompt must be a "prompt" of METADATA.jsonl."""

    kinds = ("image",)

    def __init__(self, path: str, *, detector: str = "toyworld", detector_path: str | None = None,
                 clip: str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        from mmalign.evaluation.coco import read_jsonl
        from mmalign.evaluation.geneval_detectors import load_detector

        super().__init__(device=device, batch_size=batch_size)
        if detector not in DETECTORS:
            raise ConfigError(f"geneval scorer: detector {detector!r} is not one of {', '.join(DETECTORS)}")
        self.metadata = {row["prompt"]: row for row in read_jsonl(path, "GenEval metadata") if "prompt" in row}
        self.detector = load_detector(detector, detector_path, clip, str(self.device))

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        from mmalign.scoring.base import load_images

        missing = [c for c in conditions if c not in self.metadata]
        if missing:
            raise DataError(f"geneval scorer: prompt {missing[0]!r} is not in the metadata file")
        images = load_images(outputs, "geneval")
        return torch.tensor([float(geneval.check_image(im, self.metadata[c], self.detector)["correct"])
                             for im, c in zip(images, conditions)])
