"""A tiny transformers CLIPModel + CLIPProcessor folder (PickScore's layout), shared by the scorer tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def save_tiny_clip(path: Path, tokenizer: Any, image_size: int, patch_size: int, max_positions: int) -> Path:
    """CLIPModel (2 layers, width 32, projection 16, logit scale 100, seed 1) and its processor
    (`tokenizer`, images resized and cropped to `image_size`) saved in `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_positions, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16, logit_scale_init_value=math.log(100.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        CLIPModel(config).save_pretrained(path)
    size = {"height": image_size, "width": image_size}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size),
                  tokenizer=tokenizer).save_pretrained(path)
    return path
