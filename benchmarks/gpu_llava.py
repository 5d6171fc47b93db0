"""The LLaVA row of the GPU section (`python -m benchmarks.gpu --rows llava`, whose docstring
describes it): LLaVA-1.5-7B from its config, random bf16 weights, LoRA on the language model,
mmalign's `llava` path end to end (mmalign side only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.gpu import (CLIP_L336_VISION, LLAMA2_7B, LORA_LLAMA, TINY, Device, PhaseClock, Settings, attempt,
                            run_steps)


def llava_records(work: Path, s: Settings, image_size: int) -> Path:
    """4 x batch records: one PNG each, prompts of `prompt_words` and answers of `answer_words` words."""
    import random

    from mmalign.toyvlm import COLOURS, SHAPES, VLM_WORDS, draw_shape

    rng, words = random.Random(s.seed), [w for w in VLM_WORDS if w not in ("<image>", "USER", "ASSISTANT", ":")]
    (work / "llava_images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(4 * s.llava_batch):
        draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), size=image_size, rng=rng).save(
            work / "llava_images" / f"{i}.png")
        text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
        lines.append(json.dumps({"images": [f"llava_images/{i}.png"], "prompt": text(s.prompt_words),
                                 "chosen": text(s.answer_words), "rejected": text(s.answer_words)}))
    (work / "llava_pairs.jsonl").write_text("\n".join(lines) + "\n")
    return work / "llava_pairs.jsonl"


def llava_model_config(s: Settings, tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = {**CLIP_L336_VISION, **(TINY["vision"] if s.tiny else {})}
    text = {**LLAMA2_7B, **(TINY["llama"] if s.tiny else {})}
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text, **ids),
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)


def llava_mmalign(work: Path, s: Settings, dev: Device, checkpointing: bool) -> dict[str, Any]:
    import torch
    from transformers import LlavaForConditionalGeneration

    from mmalign.config import Config, from_dict
    from mmalign.modalities.llava import LlavaLikelihood, restrict_lora_to_language_model
    from mmalign.toyvlm import build_tiny_llava_processor, build_vlm_tokenizer
    from mmalign.train.trainer import PreferenceTrainer

    tokenizer = build_vlm_tokenizer()
    tokenizer.model_max_length = 4096
    config = llava_model_config(s, tokenizer)
    v = config.vision_config
    processor = build_tiny_llava_processor(tokenizer, image_size=v.image_size, patch_size=v.patch_size)
    cfg = from_dict(Config, {
        "modality": "llava", "model": {"path": str(work), "dtype": "bfloat16", "gradient_checkpointing": checkpointing},
        "lora": {"enabled": True, "r": s.lora_rank, "alpha": 2 * s.lora_rank, "target_modules": list(LORA_LLAMA)},
        "data": {"train": str(llava_records(work, s, v.image_size)), "max_length": 2048},
        "loss": {"name": "dpo", "beta": 0.1}, "optim": {"name": "adamw", "lr": 1e-6},
        "train": {"output_dir": str(work / "run_llava"), "max_steps": s.steps + 1, "batch_size": s.llava_batch,
                  "seed": s.seed, "progress": False, "tensorboard": False, "mixed_precision": "bf16", "cpu": s.tiny}})
    dev.reset_peak()
    torch.manual_seed(s.seed)
    with torch.device(dev.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    restrict_lora_to_language_model(model, cfg.lora)
    likelihood = LlavaLikelihood(processor, model.config, cfg.data.max_length, 0, None, [work])
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    clock = PhaseClock(dev.sync)
    clock.wrap_likelihood(likelihood)
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    clock.wrap(trainer.optimizer, "step", "optimizer")
    tokens = likelihood.collate(trainer.fetch("train", list(range(s.llava_batch))), "pair").inputs["input_ids"].shape
    out = run_steps(lambda: trainer.train_step()["loss"], clock, dev, s, s.llava_batch)
    return {**out, "reference": trainer.strategy, "gradient_checkpointing": checkpointing,
            "sequence_length": int(tokens[1]), "image_tokens": (v.image_size // v.patch_size) ** 2}


def llava_row(work: Path, s: Settings, dev: Device) -> dict[str, Any]:
    side = attempt(lambda c: llava_mmalign(work, s, dev, c), s.checkpointing, dev)
    dev.free()
    return {"name": "llava", "sides": {"mmalign": side},
            "what": (f"LLaVA-1.5-7B ({'tiny' if s.tiny else 'full size'}), bf16 weights + autocast, LoRA "
                     f"r{s.lora_rank} on the language model, reference adapters off, {s.llava_batch} pairs/step")}
