"""RLAIF-V-style claim checking with a local VLM judge (`claims=VLM_FOLDER`; METHODS.md D.2).

Each object an answer mentions (`ObjectVocabulary.objects`, the CHAIR extraction) is one claim.
The judge sees the row's image and the question

    "Is there a {object} in the image? Please answer yes or no."

and one forward pass gives its FIRST answer token's distribution p = softmax(logits) (V,):

    P(yes) = sum_{w in {yes, Yes}} p(w),   P(no) = sum_{w in {no, No}} p(w)

(the variants the tokenizer holds as single tokens). A claim is correct iff P(yes) > P(no);
score = -(incorrect claims), 0 for an answer that mentions nothing. Strict: only the
probabilities are read (no text is parsed), and the judged answer never reaches the judge's
prompt: only vocabulary category names do (image placeholders removed), so an answer cannot
inject instructions or special tokens. Options: vocabulary=PATH (default: the COCO list),
dtype, batch_size; `model`/`processor` (library callers) and `first_token` (tests) replace loading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError, DataError
from mmalign.scoring.base import Scorer, chunks, resolve_dtype

QUESTION = "Is there a {object} in the image? Please answer yes or no."
YES, NO = ("yes", "Yes"), ("no", "No")


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The ids of the `words` the tokenizer encodes as ONE known token (unknown ones skipped)."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
            ids.append(int(encoded[0]))
    return list(dict.fromkeys(ids))


def first_token_logits(model: Any, processor: Any, records: list[dict[str, Any]], batch_size: int) -> Tensor:
    """(N, V) float32 logits of the first answer token of each record ({"prompt", "images"}),
    prompts formatted as `generate_answers` formats them (left padding, generate's position ids)."""
    from mmalign.generate.text import _likelihood, _vlm_batch

    likelihood = _likelihood(model, processor, None, ())
    pad = likelihood.tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = []
    for part in chunks(len(records), batch_size):
        batch = _vlm_batch(likelihood, [{"_index": part.start + i, **r} for i, r in enumerate(records[part])], pad)
        with torch.inference_mode():
            result = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=1,
                                    do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        out.append(result.logits[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class ClaimJudgeScorer(Scorer):
    """score(prompts, answers, images) -> (N,) float32: -(claims the judge finds false)."""

    kinds = ("text",)
    takes_images = True

    def __init__(self, path: str | None = None, *, vocabulary: str = "coco", device: str | torch.device = "cpu",
                 batch_size: int = 8, dtype: str | None = None, model: Any = None, processor: Any = None,
                 first_token: Callable[..., Tensor] | None = None) -> None:
        from mmalign.scoring.annotations import load_object_vocabulary
        from mmalign.scoring.judge import load_judge_model

        super().__init__(device=device, batch_size=batch_size)
        self.vocab = load_object_vocabulary(vocabulary)
        if model is None:
            if path is None:
                raise ConfigError("claims: give a VLM judge folder (path) or a model and processor")
            model, processor, _ = load_judge_model(path, self.device, resolve_dtype(dtype))
        if getattr(processor, "image_processor", None) is None:
            raise ConfigError("claims: the judge must be a VLM (a processor with an image processor)")
        self.model, self.processor = model, processor
        self.first_token = first_token or first_token_logits
        tokenizer = processor.tokenizer
        self.yes, self.no = answer_token_ids(tokenizer, YES), answer_token_ids(tokenizer, NO)
        if not self.yes or not self.no:
            raise ConfigError(f"claims: the judge's tokenizer has no single token for {YES if not self.yes else NO}")
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.counts: Counter[str] = Counter()

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def question(self, category: str) -> str:
        """The yes/no question of one claim (a vocabulary category; placeholders removed)."""
        return QUESTION.format(object=category.replace(self.image_token, " ").strip())

    def probabilities(self, records: list[dict[str, Any]]) -> Tensor:
        """(N, 2) [P(yes), P(no)] of the judge's first answer token for each question record."""
        if not records:
            return torch.zeros(0, 2)
        probs = torch.softmax(self.first_token(self.model, self.processor, records, self.batch_size).double(), -1)
        return torch.stack([probs[:, self.yes].sum(-1), probs[:, self.no].sum(-1)], -1)

    def score(self, conditions: Sequence[str], outputs: Sequence[Any], images: Sequence[Sequence[Any]] | None = None,
              kind: str = "text") -> Tensor:
        if len(conditions) != len(outputs):
            raise ValueError(f"{len(conditions)} conditions for {len(outputs)} outputs")
        images = images if images is not None else [[] for _ in outputs]
        owners, records = [], []
        for i, (answer, ims) in enumerate(zip(outputs, images, strict=True)):
            claimed = sorted(self.vocab.objects(str(answer)))
            if claimed and not ims:
                raise DataError(f"claims: sample {i} has no image to check its claims against")
            owners += [i] * len(claimed)
            records += [{"prompt": self.question(c), "images": list(ims)} for c in claimed]
        p = self.probabilities(records)
        wrong = (p[:, 0] <= p[:, 1]).double()
        self.counts.update(claims=len(records), incorrect_claims=int(wrong.sum()))
        scores = torch.zeros(len(outputs), dtype=torch.float64)
        scores.index_add_(0, torch.tensor(owners, dtype=torch.long), -wrong)
        return scores.float()
