"""The procedural toy world behind `mmalign demo` (shapes, captions, COCO annotations, held-out
splits; `world.py`), its exact checker (`checker.py`) and builders of the three small models
the project trains and ships in `mmalign/data/toyworld/` (`models.py`). Heavy imports
(transformers, diffusers) happen inside functions."""

from mmalign.toyworld.world import (COLOURS, HELDOUT_COMBOS, HELDOUT_PROMPTS, IMAGE_SHAPES, PARTNER, PROMPT, SHAPES,
                                    TRAIN_PROMPTS, Obj, Scene, render, sample_scenes, split_of, web_caption,
                                    write_world)

__all__ = ["COLOURS", "HELDOUT_COMBOS", "HELDOUT_PROMPTS", "IMAGE_SHAPES", "PARTNER", "PROMPT", "SHAPES",
           "TRAIN_PROMPTS", "Obj", "Scene", "render", "sample_scenes", "split_of", "web_caption", "write_world"]
