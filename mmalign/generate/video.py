"""Videos from diffusers text- and image-to-video pipelines (WanPipeline, WanImageToVideoPipeline) in a local folder,
for `mmalign generate`.

A folder is a video pipeline when its pipeline class is a family's whose `Family.sample` is
"videos" (`is_video_pipeline`). Each video gets its own CPU `torch.Generator` seeded with its
sample seed (the pipeline draws each video's initial latents from it): WanPipeline pads every
prompt to the same 512 tokens with zeros and runs the transformer unmasked, so a video depends on
its prompt, seed and parameters only, not on the other prompts of its batch. Videos are written
as H.264 mp4 (yuv420p, crf 18) at `fps` frames per second (a `--set fps=N` sampling parameter,
default 16, Wan's rate; recorded in the manifest with the pipeline's own parameters).

Image-to-video (WanImageToVideoPipeline: Wan 2.1 I2V with its CLIP image encoder, Wan 2.2 I2V A14B): every
prompt record names the first frame, {"prompt": ..., "source_image": path}, and its videos are the pipeline
called with `image=` that source (loaded as training loads it, `load_image`); the pipeline squashes it to
height x width (`VideoProcessor.preprocess`), as training squashes it to `diffusion.resolution` x
`diffusion.width`, so `--set height=<resolution> --set width=<width>` samples what the training run conditions
on. The pipeline encodes one image per call, so a batch is sampled one call per source (its prompts and
generators together). The manifest row keeps the source's path, and `mmalign build-pairs scores` writes I2V
pairs {source_image, prompt, chosen, rejected} (builders/edit.py copies the source beside them). A prompt
without a source on an I2V pipeline, or a source on a text-to-video one, is a DataError naming the sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.generate.images import RESERVED, image_params, load_pipeline, pipeline_class_name
from mmalign.generate.manifest import media_rows

VIDEO_RESERVED = RESERVED | {"num_videos_per_prompt", "image_embeds", "last_image"}
I2V_PIPELINES = ("WanImageToVideoPipeline",)  # pipelines whose videos continue a prompt's source image
SOURCE = "source_image"
DEFAULT_FPS = 16  # Wan 2.1 writes its 81-frame videos at 16 fps (WanPipeline's example)


def is_video_pipeline(path: str | Path) -> bool:
    """The folder's pipeline class belongs to a family that samples videos, or is an I2V pipeline (the `wan`
    family trains WanImageToVideoPipeline folders too; its registered pipeline is WanPipeline)."""
    from mmalign.families import family_for_pipeline

    name = pipeline_class_name(path)
    family = family_for_pipeline(name)
    return name in I2V_PIPELINES or (family is not None and family.sample == "videos")


def video_params(pipe: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters checked against the pipeline's `__call__` (as `image_params`), with
    num_frames recorded at the pipeline's default when not set."""
    import inspect

    for key in params:
        if key in VIDEO_RESERVED:
            raise ConfigError(f"sampling parameter '{key}' is set by mmalign generate (one video per seed; an "
                              "image-to-video prompt's first frame is its 'source_image')")
    out = image_params(pipe, params)
    signature = inspect.signature(pipe.__call__).parameters
    if "num_frames" in signature and out.get("num_frames") is None:
        out["num_frames"] = signature["num_frames"].default
    return out


def to_uint8(video: np.ndarray) -> np.ndarray:
    """A pipeline's np video (F, H, W, 3) in [0, 1] -> uint8 (F, H, W, 3), rounded."""
    return (np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def generate_videos(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any]) -> list[np.ndarray]:
    """One uint8 video (F, H, W, 3) per (prompt, seed), video i from a CPU generator seeded seeds[i]."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(params)
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    with torch.inference_mode():
        out = pipe(prompt=list(prompts), generator=generators, num_videos_per_prompt=1, output_type="np", **kwargs)
    return [to_uint8(video) for video in out.frames]


def check_sources(items: Iterable[dict[str, Any]], pipeline: str, prompts: str | Path) -> None:
    """Every sample of an I2V pipeline has one `source_image`, no sample of a text-to-video one has any;
    the first that does not is a DataError naming it."""
    i2v = pipeline in I2V_PIPELINES
    for item in items:
        where = f"{prompts}: sample {item['id']}"
        if "source_images" in item:
            raise DataError(f"{where}: 'source_images' given; a video continues one 'source_image'")
        if i2v and SOURCE not in item:
            raise DataError(f"{where}: {pipeline} continues a first frame: give the prompt a '{SOURCE}'")
        if not i2v and SOURCE in item:
            raise DataError(f"{where}: has a '{SOURCE}' but {pipeline} is text-to-video (image-to-video needs a "
                            f"{' or '.join(I2V_PIPELINES)} folder)")


def generate_i2v_videos(pipe: Any, prompts: list[str], seeds: list[int], params: dict[str, Any],
                        sources: list[str]) -> list[np.ndarray]:
    """`generate_videos` of an image-to-video pipeline: video i continues sources[i] (`image=`), one
    pipeline call per source (the pipeline encodes one image per call), video i from seeds[i]."""
    from mmalign.data.media import load_image

    out: list[Any] = [None] * len(prompts)
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    for source, rows in by_source.items():
        call = dict(params, image=load_image(source, f"source image {source}"))
        videos = generate_videos(pipe, [prompts[i] for i in rows], [seeds[i] for i in rows], call)
        for i, video in zip(rows, videos, strict=True):
            out[i] = video
    return out


def video_generator(opts: Any, path: Path, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """(items -> rows with their mp4 written, sampling params) for `mmalign generate` (run.py)."""
    from mmalign.data.video import write_video

    sampling = dict(opts.sampling)
    scheduler = sampling.pop("scheduler", "")
    fps = sampling.pop("fps", DEFAULT_FPS)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise ConfigError(f"sampling.fps: expected a positive integer, got {fps!r}")
    from mmalign.generate.run import plan

    pipeline = pipeline_class_name(path)
    check_sources(plan(opts).values(), pipeline, opts.prompts)
    pipe = load_pipeline(path, getattr(torch, opts.dtype), scheduler).to(device)
    params = video_params(pipe, sampling)
    call = dict(params)
    params = {**params, "fps": fps, **({"scheduler": scheduler} if scheduler else {})}
    out = Path(opts.out)

    def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts, seeds = [it["prompt"] for it in items], [it["seed"] for it in items]
        if pipeline in I2V_PIPELINES:
            videos = generate_i2v_videos(pipe, prompts, seeds, call, [it[SOURCE] for it in items])
        else:
            videos = generate_videos(pipe, prompts, seeds, call)
        return media_rows(items, videos, out, "video", ".mp4",
                          lambda video, tmp: write_video(video, tmp, fps=fps, container="mp4"))

    return run, params
