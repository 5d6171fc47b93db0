"""Video records (`videos`: frame folders, frame lists or files) for the families whose processor
takes video (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision), on the committed sample datasets/toy_video: answer-only
log-probs equal the manual formula, the video placeholder expands to the hand-derived token count,
video tokens are never cut (a clear DataError names the example), one DPO step trains on video
records through the CLI, and unreadable videos name the example."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from vlm_family_fixtures import BUILDERS, TEMPLATES, save_family

from mmalign.errors import DataError
from mmalign.modalities.llava import LlavaLikelihood

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "toy_video" / "pairs.jsonl"
TINY_CONFIG = ROOT / "configs" / "tiny" / "llava_dpo.yaml"
# (video placeholder the family's template writes, one expanded block, blocks per 4-frame 32x32 video)
QWEN_BLOCK = ["<|vision_start|>"] + ["<|video_pad|>"] * 4 + ["<|vision_end|>"]
VIDEO = {
    # 4 frames / temporal patch 2 = 2 grids x (4x4 patches / 2x2 merge) = 8 <|video_pad|> in one block
    "qwen2_5_vl": ("<|vision_start|><|video_pad|><|vision_end|>", QWEN_BLOCK[:1] + QWEN_BLOCK[1:5] * 2
                   + QWEN_BLOCK[-1:], 1),
    # the same 8 tokens as one block per temporal grid, each after its "<t seconds>" timestamp text
    "qwen3_vl": ("<|vision_start|><|video_pad|><|vision_end|>", QWEN_BLOCK, 2),
    # 4 frames x (4x4 patches pooled 2x2 -> 4) + one newline token = 17 <video>
    "llava_onevision": ("<video>\n", ["<video>"] * 17, 1),
}
NAMES = list(VIDEO)


def records() -> list[dict]:
    return [dict(json.loads(line), _index=i, _root=str(DATA.parent)) for i, line in enumerate(open(DATA))]


def frames(record: dict) -> list:
    from PIL import Image

    folder = DATA.parent / record["videos"][0]
    return [Image.open(folder / f"{t}.png").convert("RGB") for t in range(4)]


def video_prompt(name: str) -> str:
    head, _, tail = TEMPLATES[name]
    return head + VIDEO[name][0] + "describe the video ." + tail


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    model, processor = BUILDERS[request.param]()
    return request.param, model, processor


def manual_logp(model, processor, text: str, video: list, answer: str, fps: float = 2.0) -> float:
    """The one unpadded sequence through the model; per-token outputs extended with 0 over the
    answer; float64 log-softmax gathered at the answer words + eos."""
    tok = processor.tokenizer
    meta = [{"total_num_frames": len(video), "fps": fps}]  # frames without video_fps: 2 per second
    x = dict(processor(text=[text], videos=[video], video_metadata=meta, return_tensors="pt", add_special_tokens=False))
    p = x["input_ids"][0].tolist()
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    for key, value in list(x.items()):
        if value.shape == (1, len(p)):
            x[key] = torch.cat([value, torch.full((1, len(a)), 1 if key == "attention_mask" else 0)], 1)
    x["input_ids"] = torch.tensor([p + a])
    with torch.no_grad():
        logprobs = model(**x).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[len(p) + i - 1, t]) for i, t in enumerate(a))


def test_video_logps_match_the_formula_and_placeholders_expand(family):
    name, model, processor = family
    lik = LlavaLikelihood(processor, model.config, max_length=128)
    recs = records()[:2]
    batch = lik.collate(recs, "pair")
    with torch.no_grad():
        out = lik.logps(model, batch)
    expected = [manual_logp(model, processor, video_prompt(name), frames(r), r[k])
                for k in ("chosen", "rejected") for r in recs]
    torch.testing.assert_close(out.logps.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)
    assert out.tokens.tolist() == [4.0] * 4
    ids, mask = batch.inputs["input_ids"], batch.inputs["loss_mask"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0][mask[0] == 0])
    _, expanded, blocks = VIDEO[name]
    assert [tokens[i:i + len(expanded)] == expanded for i in range(len(tokens))].count(True) == blocks
    assert "<|image_pad|>" not in tokens and tokens.count(expanded[1]) == blocks * expanded.count(expanded[1])


def test_frame_rate_sets_the_temporal_positions(family, tmp_path):
    """A frame folder is taken at `video_fps` (default 2, Qwen's sampling rate), a file at its
    container's rate: Qwen2.5-VL's second_per_grid_ts = temporal_patch_size / fps (2 / 2 = 1.0,
    2 / 4 = 0.5; transformers alone would assume 24 fps: 1/12), and the log-probs follow."""
    import av
    import numpy as np

    name, model, processor = family
    lik = LlavaLikelihood(processor, model.config, max_length=160)
    rec = records()[0]
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:  # the record's 4 frames at 4 frames per second
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames(rec):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        out.mux(stream.encode())
    at_4 = [dict(rec, video_fps=4.0), dict(rec, videos=[str(clip)])]
    if name == "qwen2_5_vl":
        for r, expected in ((rec, 1.0), *((r, 0.5) for r in at_4)):
            assert lik.encode_prompt(r)["second_per_grid_ts"].tolist() == [expected]
    with torch.no_grad():
        fast = lik.logps(model, lik.collate([at_4[0]], "pair")).logps
    expected = manual_logp(model, processor, video_prompt(name), frames(rec), rec["chosen"], fps=4.0)
    assert float(fast[0]) == pytest.approx(expected, abs=2e-5)
    with pytest.raises(DataError, match="example 0, video 0: video_fps must be a positive number"):
        lik.encode_prompt(dict(rec, _index=0, video_fps=0))


def test_video_tokens_are_never_cut(family):
    name, model, processor = family
    rec = records()[3]
    n_prompt = int(LlavaLikelihood(processor, model.config).encode_prompt(rec)["input_ids"].shape[1])
    n_video = VIDEO[name][1].count(VIDEO[name][1][1]) * VIDEO[name][2]
    batch = LlavaLikelihood(processor, model.config, max_length=n_prompt + 1).collate([rec], "pair")
    assert batch.inputs["loss_mask"].sum(-1).tolist() == [1, 1]
    video_id = processor.tokenizer.convert_tokens_to_ids(VIDEO[name][1][1])
    assert (batch.inputs["input_ids"] == video_id).sum() == 2 * n_video
    for cut in (n_prompt, n_prompt - 3):
        with pytest.raises(DataError, match=rf"example 3: prompt has {n_prompt} tokens .*never cut"):
            LlavaLikelihood(processor, model.config, max_length=cut).collate([rec], "pair")


def test_frame_lists_equal_frame_folders_and_bad_videos_name_the_example(family, tmp_path):
    name, model, processor = family
    lik = LlavaLikelihood(processor, model.config, max_length=128)
    rec = records()[0]
    folder = DATA.parent / rec["videos"][0]
    as_list = {k: v for k, v in rec.items() if k != "videos"} | {"video": [str(folder / f"{t}.png") for t in range(4)]}
    by_folder, by_list = lik.collate([rec], "pair").inputs, lik.collate([as_list], "pair").inputs
    assert by_folder.keys() == by_list.keys() and all(torch.equal(by_folder[k], by_list[k]) for k in by_folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    for video, message in ((str(tmp_path / "nowhere"), "no such video file or frame folder"),
                           (str(tmp_path / "empty"), "no frame images"),
                           (str(tmp_path / "clip.mp4"), "video file")):
        with pytest.raises(DataError, match=f"example 0, video 0: .*{message}"):
            lik.collate([dict(rec, videos=[video])], "pair")


def test_a_family_without_video_refuses_video_records():
    model, processor = BUILDERS["gemma3"]()
    with pytest.raises(DataError, match="example 0: the record has videos but this model's processor takes none"):
        LlavaLikelihood(processor, model.config).collate(records()[:1], "pair")


def test_dpo_trains_on_video_records(tmp_path):
    """Two LoRA DPO steps of Qwen2.5-VL on datasets/toy_video through the CLI: step 1 has
    policy == reference (loss log 2), step 2 moved the margins."""
    from mmalign.cli import main

    folder, out = save_family("qwen2_5_vl", tmp_path / "model"), tmp_path / "run"
    assert main(["train", str(TINY_CONFIG), "modality=qwen2_5_vl", f"model.path={folder}", f"data.train={DATA}",
                 "data.eval=", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2", "optim.lr=0.05",
                 "optim.warmup_steps=0", "loss.sft_weight=0", "train.log_every=1", "train.progress=false",
                 "train.tensorboard=false", "data.max_length=64"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["rewards/margins"] != 0.0
    assert (out / "final" / "adapter_model.safetensors").is_file()
