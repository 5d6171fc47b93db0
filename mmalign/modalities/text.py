"""Live text conditioning of the diffusion families: the family's `PromptEncoder` (its text
encoders and tokenizers, encoding as its pipeline's `encode_prompt`) inside `TextConditioning`,
the conditioning source `DiffusionLikelihood` holds (caption dropout to `encode("")` or zeros)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from mmalign.data.preference import flatten


def _prompt_text(prompt: Any) -> str:
    """The caption of a record's prompt: the string, or the text of its chat messages."""
    if isinstance(prompt, list):  # chat messages: the caption is their text
        return " ".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


# The attention mask of a family's tokenisation rides under this key: `TextConditioning` hands
# `encode` every `tokenize` key starting with "input_ids" and swaps them all for `tokenize([""])`'s
# where a caption is dropped, so ids and mask always travel together (Z-Image, Qwen-Image, FLUX.2).
MASK = "input_ids_mask"


def chat_tokens(tokenizer: Any, prompts: list[str], max_length: int, **template: Any) -> dict[str, Tensor]:
    """{"input_ids", MASK}: (n, max_length) each, every prompt as ONE user turn through the
    tokenizer's chat template (`apply_chat_template(..., tokenize=False, add_generation_prompt=True,
    **template)`), padded to max_length and truncated, as the Qwen3-encoder pipelines do (Z-Image's
    `_encode_prompt`, FLUX.2 klein's `_get_qwen3_prompt_embeds`)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, **template) for p in prompts]
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": out.input_ids, MASK: out.attention_mask}


class PromptEncoder(Protocol):
    """A family's live text encoding (e.g. `families.sdxl.SDXLText`): frozen encoders and their
    tokenizers, in the order the family's pipeline takes them."""

    text_encoders: list[Any]
    tokenizers: list[Any]

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, L)[, "input_ids_2": ...]} padded as the pipeline pads."""
        ...

    def encode(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """The conditioning tensors (n, ...) float32 the denoiser consumes, as the pipeline's
        `encode_prompt` makes them."""
        ...


def pad_tokens(tokenizers: list[Any], lengths: list[int], prompts: list[str]) -> dict[str, Tensor]:
    """{"input_ids": (n, L1), "input_ids_2": (n, L2), ...}: each tokenizer pads to its length."""
    out = {}
    for i, (tok, length) in enumerate(zip(tokenizers, lengths)):
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
    return out


class LiveEncoders:
    """What a live conditioning source owns: the family's encoder object (`encoder`, holding the
    frozen text encoders and tokenizers), frozen here and moved with `to`."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        for e in encoder.text_encoders:
            e.requires_grad_(False).eval()

    @property
    def text_encoders(self) -> list[Any]:
        return self.encoder.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.encoder.tokenizers

    def to(self, device: torch.device | str) -> None:
        for e in self.encoder.text_encoders:
            e.to(device)


class TextConditioning(LiveEncoders):
    """Live text conditioning through the family's `PromptEncoder`: token ids in collate, each
    group's prompt encoded once in the draw; dropped captions become `encode("")`
    (null_prompt "empty") or zeros (null_prompt "zeros")."""

    def __init__(self, encoder: PromptEncoder, null_prompt: str) -> None:
        super().__init__(encoder)
        self.null_prompt = null_prompt

    def collate(self, records: list[dict[str, Any]], kind: str) -> dict[str, Tensor]:
        """input_ids (N, L) [input_ids_2, ...] of each item's prompt."""
        return self.encoder.tokenize([_prompt_text(item["prompt"]) for item in flatten(records, kind)])

    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning (n, ...) of plain strings, e.g. `encode_text([""])` is the null prompt."""
        return self.encoder.encode(self.encoder.tokenize(prompts))

    def per_item(self, inputs: dict[str, Any], groups: Tensor, dropped: Tensor) -> dict[str, Tensor]:
        """Encode each group's prompt once (its first item), null prompt where `dropped` (G,);
        returns per-item (N, ...) tensors."""
        first = (groups[None, :] == torch.arange(int(groups.max()) + 1)[:, None]).int().argmax(1)
        ids = {k: v[first.to(v.device)] for k, v in inputs.items() if k.startswith("input_ids")}
        if self.null_prompt == "empty" and bool(dropped.any()):
            empty = self.encoder.tokenize([""])
            ids = {k: torch.where(dropped.to(v.device)[:, None], empty[k].to(v.device), v) for k, v in ids.items()}
        cond = self.encoder.encode(ids)
        if self.null_prompt == "zeros":
            cond = {k: v * (~dropped).to(v.device, v.dtype).view(-1, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        return {k: v[groups.to(v.device)] for k, v in cond.items()}

    def cache_text(self, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        """What `mmalign cache` stores for `prompts`: `encode_text` in chunks of `batch`, (n, ...);
        a `PaddedText` encoder's padded tensors at each prompt's real length (mmalign/modalities/ragged.py)."""
        from mmalign.modalities.ragged import PaddedText, merge, pack

        outs = []
        for i in range(0, len(prompts), batch):
            ids = self.encoder.tokenize(prompts[i : i + batch])
            cond = {k: v.cpu() for k, v in self.encoder.encode(ids).items()}
            if isinstance(self.encoder, PaddedText):
                cond = pack(cond, self.encoder.padded, self.encoder.real_lengths(ids, cond))
            outs.append(cond)
        return merge(outs)
