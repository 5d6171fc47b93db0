"""Record lengths for `data.group_by_length` (the `MeasuresLength` ability of the token likelihoods):

    ℓ(record) = min(P + max_k A_k, max_length)

P the prompt's tokens as `collate` writes them, A_k the k-th answer's tokens (its EOS included):
the width of the record's longest row in a padded batch. Text is tokenised only; a VLM prompt's
image placeholders count as the tokens the processor expands them to, computed from the image
headers by the processor's `_get_num_multimodal_tokens` (transformers' per-size token counts,
no pixels decoded) plus the family's wrapping tokens (measured once on one real record); every
video counts as its placeholder.
"""

from __future__ import annotations

from typing import Any

from mmalign.data.media import image_size, record_images, record_videos
from mmalign.errors import DataError
from mmalign.layout import record_outputs


def text_record_length(likelihood: Any, record: dict[str, Any], kind: str) -> int:
    """ℓ of a text record under a `CausalLMLikelihood`: its `encode` of each answer (the same
    checks and truncation as `collate`), the longest."""
    return max(len(likelihood.encode(dict(record, response=o))[0]) for o in record_outputs(record, kind))


def image_token_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int] | None:
    """Tokens each image of (height, width) `sizes` expands to, or None where the processor
    cannot say without its pixels."""
    counts = getattr(processor, "_get_num_multimodal_tokens", None)  # transformers' processors (vLLM's API)
    if not sizes or counts is None:
        return None
    data = counts(image_sizes=[list(s) for s in sizes])
    return list(data["num_image_tokens"]) if "num_image_tokens" in data else None


def vlm_prompt_tokens(likelihood: Any, record: dict[str, Any], where: str) -> int:
    """P of a VLM record under a `LlavaLikelihood`: its prompt text tokenised as `encode_prompt`
    does, plus per image n_i (the processor's count for its size, 0 where it has none) + c, where
    c, the tokens an image adds beyond n_i (its wrapping tokens minus the placeholder: +2 for
    Idefics3, +1 for Gemma 3, -1 for LLaVA), is measured once on the first record with images by
    running the processor on it (`likelihood.image_overhead`)."""
    images, videos = record_images(record), record_videos(record)
    text = likelihood.prompt_text(record, len(images), where, len(videos))
    bos = likelihood.tokenizer.bos_token
    ids = likelihood.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids
    root = record.get("_root") or likelihood.roots
    sizes = [image_size(v, f"{where}, image {j}", root) for j, v in enumerate(images)]
    counts = image_token_counts(likelihood.processor, sizes) or [0] * len(images)
    base = len(ids) + sum(counts)
    if images and likelihood.image_overhead is None:
        measured = int(likelihood.encode_prompt(record)["input_ids"].shape[1])
        likelihood.image_overhead = round((measured - base) / len(images))
    return base + len(images) * (likelihood.image_overhead or 0)


def vlm_record_length(likelihood: Any, record: dict[str, Any], kind: str) -> int:
    """ℓ of a VLM record: P (`vlm_prompt_tokens`) + the longest answer, capped at max_length; a
    prompt leaving no room for an answer is the `DataError` `collate` would raise."""
    where = f"example {record.get('_index', '?')}"
    prompt = vlm_prompt_tokens(likelihood, record, where)
    if prompt >= likelihood.max_length:
        raise DataError(f"{where}: prompt has {prompt} tokens (image tokens included), leaving no room for the "
                        f"answer within data.max_length={likelihood.max_length}")
    answer = max(len(likelihood._response_ids(o)) for o in record_outputs(record, kind))
    return min(prompt + answer, likelihood.max_length)
