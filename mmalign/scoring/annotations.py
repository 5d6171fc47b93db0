"""Hallucination score of an answer against its image's annotation objects (`annotations=VOCAB`;
METHODS.md §4, what `mmalign build-pairs onpolicy` ranks by; iterative online DPO, D.2/D.3).

    score = -|H| + recall_weight * R,   H = mentioned \\ present,   R = |mentioned ∩ present| / |present|

`mentioned` are the answer's objects under the vocabulary (`ObjectVocabulary.objects`, the CHAIR
extraction), `present` the row's annotation objects (category names, the row's "objects" field:
an online VLM round copies them from its prompt records). PATH: a vocabulary file (`pkg://...`
works) or `coco` (the shipped 80 COCO categories); option `recall=W` (default 0: fewest
hallucinated objects only). No model is loaded. An answer with no annotation, or an annotation
object that is not a vocabulary category, is a DataError naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import DataError
from mmalign.scoring.base import Scorer, require_path


def load_object_vocabulary(path: str) -> Any:
    """The vocabulary at `path` (`coco`: the shipped COCO list)."""
    from mmalign.evaluation.objects import ObjectVocabulary

    return ObjectVocabulary.load(None if path == "coco" else require_path(path, "object vocabulary"))


class AnnotationScorer(Scorer):
    """score(prompts, answers, objects) -> (N,) float32: -hallucinated + recall * recall_fraction.

    takes_objects: `score_rows` passes each row's "objects" (a list of category names) and its id."""

    kinds = ("text",)
    takes_objects = True

    def __init__(self, path: str = "coco", *, recall: float = 0.0, device: str = "cpu", batch_size: int = 64) -> None:
        from mmalign.builders.onpolicy import annotation_scorer

        super().__init__(device=device, batch_size=batch_size)
        self.vocab = load_object_vocabulary(path)
        self.recall_weight = float(recall)
        self.counts = annotation_scorer(self.vocab)

    def hallucinations(self, answer: str, objects: Any, where: str) -> tuple[float, float]:
        """(hallucinated objects, recall) of one answer (`build-pairs onpolicy`'s counting)."""
        if objects is None:
            raise DataError(f"row {where} has no 'objects' annotation (the objects in the image); the annotations "
                            "scorer needs prompt records with 'objects'")
        return self.counts({"objects": list(objects), "_index": where}, str(answer))

    def score(self, conditions: Sequence[str], outputs: Sequence[Any],
              objects: Sequence[Any] | None = None, ids: Sequence[Any] | None = None) -> Tensor:
        if len(conditions) != len(outputs):
            raise ValueError(f"{len(conditions)} conditions for {len(outputs)} outputs")
        objects = objects if objects is not None else [None] * len(outputs)
        ids = ids if ids is not None else list(range(len(outputs)))
        values = []
        for answer, present, where in zip(outputs, objects, ids, strict=True):
            hallucinated, recall = self.hallucinations(answer, present, str(where))
            values.append(-hallucinated + self.recall_weight * recall)
        return torch.tensor(values, dtype=torch.float32)
