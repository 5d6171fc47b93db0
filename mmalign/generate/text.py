"""Answers from causal LMs and LLaVA-family VLMs (`generate_answers`), batched and seeded.

Prompts are formatted exactly as training formats them, by reusing the likelihoods:

- VLM (a processor with an image processor): `LlavaLikelihood.encode_prompt` (chat template,
  one image placeholder per image, the image-token check);
- causal LM (a tokenizer): `CausalLMLikelihood._prompt_ids` (plain prompt with BOS, or the
  tokenizer's chat template for a message-list prompt or with `chat_template=True`).

Rows are LEFT-padded so every row's new tokens start at the same column; position ids come
from the attention mask (transformers' `generate`), so padding does not change a row's logits
and batched greedy decoding equals one-row-at-a-time greedy decoding.

Sampling with per-row seeds. `generate` samples with the global RNG, so a row's tokens would
depend on its batch mates. Instead `do_sample=True` runs `generate` greedily with
`RowSampler` as a logits processor: at every step it applies temperature and top-p to each
row's logits and draws that row's token with the row's OWN `torch.Generator` (seeded with its
seed), then leaves only that token finite, which greedy decoding then picks. A row's draws
are therefore the same whatever shares its batch: same seed -> same answer (up to float
differences between batch shapes, which do not arise for the tiny test models on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.errors import DataError
from mmalign.tensors import right_pad_cat


class RowSampler:
    """Logits processor that samples each row with its own generator (see module docstring).

    generators: one per batch row. scores: (B, V) -> (B, V) with 0 at the sampled token and
    -inf elsewhere. Top-p keeps the smallest set of most likely tokens whose probability
    reaches `top_p` (Holtzman et al. 2020), always at least the most likely one."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float) -> None:
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
            sorted_probs[before >= self.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=generator)
            out[row, token] = 0.0
        return out


def _is_vlm(processor: Any) -> bool:
    return getattr(processor, "image_processor", None) is not None


def _left_pad(rows: list[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    """1-D id tensors -> input_ids, attention_mask (B, T), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _vlm_batch(likelihood: Any, records: list[dict[str, Any]], pad: int) -> dict[str, Tensor]:
    """Left-padded processor outputs of a VLM batch: input_ids, attention_mask (B, T); per-token
    extras (B, T) left-padded with zeros; per-image tensors (pixel_values ...) concatenated in
    record order (`right_pad_cat`)."""
    from mmalign.modalities.llava import TEXT_KEYS

    encoded = [likelihood.encode_prompt(r) for r in records]
    ids, mask = _left_pad([e["input_ids"][0] for e in encoded], pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in dict.fromkeys(k for e in encoded for k in e if k not in TEXT_KEYS):
        parts = [e for e in encoded if key in e]
        if len(parts) == len(encoded) and all(e[key].shape == e["input_ids"].shape for e in encoded):
            block = torch.zeros(ids.shape, dtype=encoded[0][key].dtype)
            for i, e in enumerate(encoded):
                block[i, ids.shape[1] - e[key].shape[1]:] = e[key][0]
            batch[key] = block
        else:
            batch[key] = right_pad_cat([e[key] for e in parts])
    return batch


def _text_batch(likelihood: Any, records: list[dict[str, Any]], pad: int) -> dict[str, Tensor]:
    """Left-padded input_ids, attention_mask (B, T) of causal-LM prompts."""
    for r in records:
        if r.get("images"):
            raise DataError(f"example {r.get('_index', '?')}: a prompt with images needs a VLM processor "
                            "(the model's processor is a plain tokenizer)")
    ids, mask = _left_pad([torch.tensor(likelihood._prompt_ids(r["prompt"])) for r in records], pad)
    return {"input_ids": ids, "attention_mask": mask}


def load_text_model(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                    trust_remote_code: bool = False, what: str = "model folder") -> tuple[Any, Any]:
    """(model, processor) of an image-text-to-text folder (its config has a `vision_config`),
    else (causal LM, tokenizer), from a local folder or `pkg://NAME`; no download, remote code
    only when asked. In eval mode on `device` (default CUDA when present); dtype "auto" is
    bfloat16 on CUDA, float32 elsewhere. A tokenizer without a pad token pads with EOS (batched
    generation pads on the left). Missing folder: a DataError naming `what`."""
    import transformers

    from mmalign.config import resolve_path

    folder = Path(resolve_path(str(path)))
    if not folder.is_dir():
        raise DataError(f"{what} not found: {path}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    if getattr(config, "vision_config", None) is not None:
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(folder, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        processor = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token
    return model.to(device).eval(), processor


def _likelihood(model: Any, processor: Any, chat_template: bool | None, roots: Sequence[str | Path]) -> Any:
    """The likelihood whose prompt formatting training uses for this model."""
    if _is_vlm(processor):
        from mmalign.modalities.llava import LlavaLikelihood

        return LlavaLikelihood(processor, getattr(model, "config", None), max_length=1 << 30,
                               chat_template=chat_template, roots=roots)
    from mmalign.modalities.causal_lm import CausalLMLikelihood

    return CausalLMLikelihood(processor, max_length=1 << 30, chat_template=bool(chat_template))


def generate_answers(model: Any, processor: Any, records: list[dict], *, max_new_tokens: int = 64,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seeds: list[int] | None = None, batch_size: int = 8, roots: Sequence[str | Path] = (),
                     chat_template: bool | None = None, progress: bool = False) -> list[str]:
    """One answer per record, in record order (decoded new tokens, special tokens skipped, stripped).

    records: {"prompt": str | chat messages, "images": [paths or PIL images]} ("images" absent or
        empty for text); relative image paths resolve against `roots`.
    processor: a VLM processor (LLaVA family) or, for a causal LM, its tokenizer.
    do_sample: False = greedy (batch-independent). True = temperature / top-p sampling where
        record i draws with its own generator seeded `seeds[i]` (default: seed i), so its
        answer does not depend on the other records of its batch (see `RowSampler`).
    chat_template: None = as training formats prompts (VLM: the template when the processor has
        one; causal LM: only for message-list prompts); True requires it; False plain text.
    """
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(range(len(records))) if seeds is None else list(seeds)
    if len(seeds) != len(records):
        raise ValueError(f"{len(seeds)} seeds for {len(records)} records")
    likelihood = _likelihood(model, processor, chat_template, roots)
    tokenizer = likelihood.tokenizer
    make_batch = _vlm_batch if _is_vlm(processor) else _text_batch
    device = next(model.parameters()).device
    starts = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            chunk = [{"_index": start + i, **r, "images": [str(v) if isinstance(v, Path) else v
                                                           for v in r.get("images") or []]}
                     for i, r in enumerate(records[start:start + batch_size])]
            batch = {k: v.to(device) for k, v in make_batch(likelihood, chunk, tokenizer.pad_token_id).items()}
            processors = []
            if do_sample:
                gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds[start:start + batch_size]]
                processors = [RowSampler(gens, temperature, top_p)]
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     logits_processor=processors, pad_token_id=tokenizer.pad_token_id,
                                     temperature=None, top_p=None, top_k=None)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
