"""A tiny Wan text-to-video pipeline folder built from the real config classes in code (no downloads),
saved with `save_pretrained` so tests load it through `build(cfg)`:

- WanTransformer3DModel (patch (1, 2, 2), 1 block, 2 heads of 12 = RoPE axes 4 + 4 + 4, the sizes of
  diffusers' own Wan transformer test), 4 latent channels, text width 32;
- UMT5EncoderModel (d_model 32, 2 layers, relative attention buckets 8) with a word-level tokenizer
  with T5's specials (<pad> 0, </s> 1 appended, <unk> 2);
- AutoencoderKLWan (base_dim 8, z_dim 4, dim_mult [1, 1, 1], two temporal downsamples: the real 4x
  temporal factor, spatial 4x): clips (3, 4k + 1, 16, 16) -> latents (4, k + 1, 4, 4), with
  non-trivial latents_mean / latents_std;
- UniPCMultistepScheduler with Wan 2.1 T2V's published config (flow sigmas, flow_shift 3.0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from flow_fixtures import WORDS
from recording import RecordingTransformer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "video_pairs"
WIDTH = 32
VIDEO_WORDS = [*WORDS, "moving", "right", "left"]
SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                 solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
                 timestep_spacing="linspace")


def tiny_umt5_tokenizer():
    """Word-level fast tokenizer with T5's specials (<pad> 0, </s> 1 appended, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(VIDEO_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def tiny_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, -0.4],
                            latents_std=[1.5, 0.5, 2.0, 1.25], scale_factor_temporal=4, scale_factor_spatial=4)


def tiny_wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=WIDTH, freq_dim=32, ffn_dim=32, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def save_tiny_wan_pipeline(path: Path, seed: int = 0) -> Path:
    """Write transformer/, vae/, scheduler/, text_encoder/ and tokenizer/ into `path`."""
    from diffusers import UniPCMultistepScheduler

    torch.manual_seed(seed)
    tiny_wan_transformer().save_pretrained(path / "transformer")
    tiny_wan_vae().save_pretrained(path / "vae")
    UniPCMultistepScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    tiny_umt5().save_pretrained(path / "text_encoder")
    tiny_umt5_tokenizer().save_pretrained(path / "tokenizer")
    return path


def save_tiny_wan22_pipeline(path: Path, boundary_ratio: float = 0.875) -> Path:
    """A two-expert Wan 2.2 A14B-shaped folder: the tiny pipeline, a second tiny transformer (other
    weights) in transformer_2/, and model_index.json with boundary_ratio (A14B T2V's 0.875)."""
    from mmalign.export import write_model_index

    save_tiny_wan_pipeline(path)
    torch.manual_seed(1)
    tiny_wan_transformer().save_pretrained(path / "transformer_2")
    write_model_index(path, "WanPipeline")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=boundary_ratio), indent=2))
    return path


CLIP_WIDTH = 16


def tiny_wan_i2v_transformer(image_dim: int | None = CLIP_WIDTH):
    """The tiny transformer of an I2V folder: in_channels z + 4 + z = 12 ([x_t, mask, first-frame latents]);
    with image_dim, Wan 2.1 I2V's CLIP image projection and added k/v (added_kv_proj_dim = inner dim 24)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12,
                                 out_channels=4, text_dim=WIDTH, freq_dim=32, ffn_dim=32, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                 image_dim=image_dim, added_kv_proj_dim=24 if image_dim else None)


def save_tiny_wan_i2v_pipeline(path: Path, clip: bool = True, boundary_ratio: float | None = None) -> Path:
    """A tiny WanImageToVideoPipeline folder: clip=True is Wan 2.1 I2V (a 2-layer CLIPVisionModel, 32 px,
    patch 8: 17 tokens of width 16, and its CLIPImageProcessor); clip=False with boundary_ratio is Wan 2.2
    I2V A14B (no image encoder, transformer_2)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from mmalign.export import write_model_index

    save_tiny_wan_pipeline(path)
    torch.manual_seed(2)
    tiny_wan_i2v_transformer(CLIP_WIDTH if clip else None).save_pretrained(path / "transformer")
    if boundary_ratio is not None:
        tiny_wan_i2v_transformer(CLIP_WIDTH if clip else None).save_pretrained(path / "transformer_2")
    if clip:
        CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
            path / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            path / "image_processor")
    write_model_index(path, "WanImageToVideoPipeline")
    index = json.loads((path / "model_index.json").read_text())
    index.update(boundary_ratio=boundary_ratio, expand_timesteps=False)
    if clip:
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_tiny_wan_i2v_versions(root: Path) -> dict[str, Path]:
    """The two tiny I2V folders the tests compare: "2.1" (with its CLIP image encoder) and "2.2" (A14B
    experts switching at boundary ratio 0.9, no image encoder)."""
    return {"2.1": save_tiny_wan_i2v_pipeline(root / "i2v21"),
            "2.2": save_tiny_wan_i2v_pipeline(root / "i2v22", clip=False, boundary_ratio=0.9)}


def i2v_records(out: Path) -> list[dict]:
    """The shipped pairs with a `source_image`: each pair's chosen first frame as a PNG in `out`."""
    from mmalign.data.video import load_video

    out.mkdir(parents=True, exist_ok=True)
    records = sample_records()
    for r in records:
        frame = load_video(r["chosen"], "fixture", SAMPLE, num_frames=1)[0]
        frame.save(out / f"{r['_index']}.png")
        r["source_image"] = str(out / f"{r['_index']}.png")
    return records

class RecordingWan(RecordingTransformer):
    """Stands for WanTransformer3DModel (tests/recording.py); its `patch_embedding` gives the input
    dtype (`families.wan.input_dtype`)."""

    config = SimpleNamespace(in_channels=4, patch_size=(1, 2, 2))

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.patch_embedding = torch.nn.Linear(1, 1, bias=False)


def pipe_of(likelihood, transformer, scheduler=None, **config):
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=likelihood.tokenizers[0], text_encoder=likelihood.text_encoders[0],
                       vae=likelihood.vae, scheduler=scheduler or likelihood.scheduler, transformer=transformer,
                       **config)


def fixed_sigma_scheduler(sigma: float):
    """A flow Euler scheduler whose schedule is [1, σ] (shift 1): the loop's second call is at σ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Fixed(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=[1.0, sigma], device=device)

    return Fixed(shift=1.0)


def copy_video_sample(out: Path) -> Path:
    """The shipped video pairs (datasets/video_pairs: train.jsonl, videos/, frames/) copied to `out`;
    returns its train.jsonl."""
    for name in ("videos", "frames"):
        shutil.copytree(SAMPLE / name, out / name, dirs_exist_ok=True)
    shutil.copy(SAMPLE / "train.jsonl", out / "train.jsonl")
    return out / "train.jsonl"


def write_tiny_wan_run(root: Path) -> Path:
    """A tiny pipeline in `root/pipeline` and the shipped video pairs in `root/pairs/train.jsonl`."""
    save_tiny_wan_pipeline(root / "pipeline")
    return copy_video_sample(root / "pairs")


def sample_records() -> list[dict]:
    """The shipped pairs with `_root` and `_index` set as the loader and trainer set them."""
    lines = (SAMPLE / "train.jsonl").read_text().splitlines()
    return [dict(json.loads(line), _root=str(SAMPLE), _index=i) for i, line in enumerate(lines)]


if __name__ == "__main__":  # python tests/wan_fixtures.py runs/tiny_wan
    import sys

    save_tiny_wan_pipeline(Path(sys.argv[1]) / "pipeline")
    print(f"wrote {sys.argv[1]}/pipeline (train on datasets/video_pairs/train.jsonl)")
