"""VLM DPO, one side per process: mmalign's `PreferenceTrainer` (modality llava) or TRL's
`DPOTrainer` in VLM mode (processing_class = the `LlavaProcessor`, dataset with `images`).

Both sides train the same tiny LLaVA (`mmalign.toyvlm`: 2-layer CLIP tower, 2-layer MLP
projector, 2-layer Llama; built a bit wider here, see `Settings`), loaded from the same
`save_pretrained` folder, full fine-tune (no LoRA), frozen reference copy, float32, on the
same toy shape pairs (`make_shape_pairs`) in the same order (mmalign's `StreamSampler`; TRL
gets those rows pre-ordered with `train_sampling_strategy="sequential"`), AdamW with the same
lr/betas/eps, no weight decay, constant lr, same clipping, no gradient checkpointing.

Tokens: both sides feed the model the same ids, masks and pixel values (checked by
`token_check`, recorded in the JSON). Two things had to be made equal:

- prompt: TRL's `DataCollatorForVisionPreference` applies the processor's chat template only to
  *conversational* prompts (a plain string prompt goes to the processor as is, without an
  `<image>` placeholder, and the processor then fails on the image count). So TRL gets the
  prompt as `[{"role": "user", "content": prompt}]`; TRL adds the image entry and applies the
  template, giving exactly mmalign's "USER : <image> describe the image . ASSISTANT :".
- EOS: on vision datasets TRL 1.16 skips `_prepare_dataset`, where text datasets get EOS
  appended, and the collator adds none; mmalign appends EOS to every answer. So TRL gets the
  answers as assistant messages whose text ends with the tokenizer's EOS token.

Worker command (run by `python -m benchmarks --only vlm`, which prepares WORKDIR)::

    python -m benchmarks.vlm_dpo --side {mmalign,trl} --workdir WORKDIR --result OUT.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.text_dpo import mmalign_order, mmalign_steps, read_pairs, train_trl


@dataclass
class Settings:
    """Everything both sides share; written to WORKDIR/settings.json by `prepare`."""

    steps: int = 40
    warmup: int = 5
    batch_size: int = 8  # pairs per step (16 sequences, 16 images per forward)
    text_hidden: int = 256
    vision_hidden: int = 64
    image_size: int = 32
    patch_size: int = 8  # 16 image tokens per image
    num_pairs: int = 256
    lr: float = 1e-4
    beta: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    threads: int = 1


def prepare(workdir: Path, s: Settings) -> dict[str, Any]:
    """Save the tiny LLaVA + processor and the pairs (PNGs + pairs.jsonl) both sides read;
    returns the token check (see `token_check`)."""
    from transformers.utils import logging

    from mmalign.toyvlm import build_tiny_llava, build_tiny_llava_processor, build_vlm_tokenizer, make_shape_pairs

    logging.disable_progress_bar()
    tokenizer = build_vlm_tokenizer()
    sizes = dict(image_size=s.image_size, patch_size=s.patch_size)
    model = build_tiny_llava(tokenizer, seed=s.seed, text_hidden=s.text_hidden, vision_hidden=s.vision_hidden, **sizes)
    model.save_pretrained(workdir / "model")
    build_tiny_llava_processor(tokenizer, **sizes).save_pretrained(workdir / "model")
    make_shape_pairs(s.num_pairs, s.seed + 1, workdir)  # workdir/pairs.jsonl + workdir/images/
    (workdir / "settings.json").write_text(json.dumps(asdict(s)))
    return token_check(workdir, s)


def load_settings(workdir: Path) -> Settings:
    data = json.loads((workdir / "settings.json").read_text())
    return Settings(**{f.name: data[f.name] for f in fields(Settings)})


def trl_rows(workdir: Path, s: Settings, eos_token: str) -> list[dict[str, Any]]:
    """The pairs in mmalign's order, as TRL's VLM DPO rows: absolute image paths, a
    conversational prompt (so TRL applies the chat template), answers ending in EOS."""
    pairs = read_pairs(workdir)
    return [{"images": [str(workdir / p) for p in pairs[i]["images"]],
             "prompt": [{"role": "user", "content": pairs[i]["prompt"]}],
             "chosen": [{"role": "assistant", "content": pairs[i]["chosen"] + eos_token}],
             "rejected": [{"role": "assistant", "content": pairs[i]["rejected"] + eos_token}]}
            for i in mmalign_order(s)]


def token_check(workdir: Path, s: Settings, batches: int = 3, ids_on_mask: bool = False) -> dict[str, Any]:
    """Collate the first `batches` steps' pairs with mmalign's `LlavaLikelihood.collate` and
    TRL's `DataCollatorForVisionPreference`; are ids, attention masks, answer masks and
    pixel values identical? `ids_on_mask`: compare the ids where the attention mask is set only
    (TRL 1.16 pads answers with `pad_token_id or eos_token_id`, so a pad id of 0 becomes EOS in
    padding that no attention and no loss sees)."""
    import torch
    from transformers import AutoConfig, AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mmalign.modalities.llava import LlavaLikelihood

    processor = AutoProcessor.from_pretrained(workdir / "model")
    likelihood = LlavaLikelihood(processor, AutoConfig.from_pretrained(workdir / "model"), s.max_length,
                                 roots=[workdir])
    collator = DataCollatorForVisionPreference(processor)
    pairs, order = read_pairs(workdir), mmalign_order(s)
    rows = trl_rows(workdir, s, processor.tokenizer.eos_token)
    checks = []
    for b in range(batches):
        idx = order[b * s.batch_size:(b + 1) * s.batch_size]
        ours = dict(likelihood.collate([dict(pairs[i], _index=i) for i in idx], "pair").inputs)
        theirs = collator([json.loads(json.dumps(r)) for r in rows[b * s.batch_size:(b + 1) * s.batch_size]])
        if ids_on_mask and ours["input_ids"].shape == theirs["input_ids"].shape:
            ours["input_ids"] = ours["input_ids"] * ours["attention_mask"]
            theirs["input_ids"] = theirs["input_ids"] * theirs["attention_mask"]
        same = {k: bool(ours[a].shape == theirs[k].shape and torch.equal(ours[a], theirs[k]))
                for k, a in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                             ("completion_mask", "loss_mask"), ("pixel_values", "pixel_values"))}
        checks.append(same)
    first = likelihood.collate([dict(pairs[order[0]], _index=order[0])], "pair").inputs
    tokens = processor.tokenizer.convert_ids_to_tokens(first["input_ids"][0].tolist())
    return {"identical": all(all(c.values()) for c in checks), "batches": checks,
            "example_chosen_tokens": " ".join(tokens),
            "image_tokens_per_image": int((first["input_ids"][0] == likelihood.image_token_id).sum())}


def run_mmalign(workdir: Path, s: Settings) -> dict[str, Any]:
    """mmalign's trainer (modality llava, LoRA off, no checkpointing) on the tiny LLaVA."""
    return mmalign_steps(workdir, s, modality="llava", model={"gradient_checkpointing": False},
                         lora={"enabled": False})


def run_trl(workdir: Path, s: Settings) -> dict[str, Any]:
    """TRL's DPOTrainer in VLM mode on the pairs mmalign reads, pre-ordered, sampled sequentially."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tic = time.perf_counter()
    path = str(workdir / "model")
    processor = AutoProcessor.from_pretrained(path)
    ordered = Dataset.from_list(trl_rows(workdir, s, processor.tokenizer.eos_token))
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return train_trl(workdir, s, policy, reference, processor, ordered, tic)


SIDES = {"mmalign": run_mmalign, "trl": run_trl}


def _import_both_stacks() -> None:
    """Import everything either side uses before the clock and the memory baseline."""
    import datasets  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor,  # noqa: F401
                              CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor)
    from trl import DPOConfig, DPOTrainer  # noqa: F401
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference  # noqa: F401

    import mmalign.modalities.llava  # noqa: F401
    import mmalign.train.trainer  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    measure.run_side(__doc__, SIDES, load_settings, _import_both_stacks, argv)


if __name__ == "__main__":
    main()
