"""A tiny FLUX.1-Kontext pipeline folder: the tiny FLUX parts (tests/flow_fixtures.py: a 1+1-block
FluxTransformer2DModel with a guidance embedding, CLIP + T5, a 2-block VAE: 32×32 images -> 4×16×16
latents) saved with FluxKontextPipeline's model_index.json, and edit pairs of 32×32 PNGs
(tests/qwen_image_edit_fixtures.py `write_edit_pairs`)."""

from __future__ import annotations

from pathlib import Path

from flow_fixtures import save_tiny_flow_pipeline
from qwen_image_edit_fixtures import write_edit_pairs


def save_tiny_flux_kontext_pipeline(path: Path, seed: int = 0) -> Path:
    from mmalign.export import write_model_index

    save_tiny_flow_pipeline(path, flux=True, seed=seed)
    write_model_index(path, "FluxKontextPipeline")
    return path


def write_tiny_flux_kontext_run(root: Path, count: int = 8) -> Path:
    """A tiny Kontext pipeline in `root/pipeline` and `count` edit pairs in `root/pairs/train.jsonl`."""
    save_tiny_flux_kontext_pipeline(root / "pipeline")
    return write_edit_pairs(root / "pairs", count)


if __name__ == "__main__":  # python tests/flux_kontext_fixtures.py runs/tiny_flux_kontext
    import sys

    write_tiny_flux_kontext_run(Path(sys.argv[1]), count=32)
    print(f"wrote {sys.argv[1]}/pipeline and {sys.argv[1]}/pairs/train.jsonl")
