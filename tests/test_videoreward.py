"""VideoReward (`videoreward`): a tiny random Qwen2-VL saved in the released VideoReward layout
(model_config.json + checkpoint-<step>/model.pth, the PEFT-wrapped state dict in the official
transformers-4.4x key layout), scored against the official formula computed by hand on the same
weights: LoRA merged in the test, the text model run with position_ids=None (as the official
model does), the head read at the three special tokens, normalised with the config's mean/std."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmalign.errors import ConfigError, DataError

COLOURS = [(220, 30, 30), (30, 40, 220), (30, 200, 40), (240, 240, 40), (20, 20, 20), (200, 200, 200),
           (120, 30, 160), (30, 180, 180), (250, 130, 20)]
NORM = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 4.0, "TA_mean": 0.25, "TA_std": 0.5}
LORA_R, LORA_ALPHA = 4, 8
SMALL = "min_pixels=1024,max_pixels=1024"  # 32x32 frames stay 32x32 (factor 16)


def build_base(path):
    """A tiny Qwen2-VL (patch 8, 2x2 merge, 2 + 2 layers) with the Qwen chat layout."""
    import transformers as tf
    from vlm_family_fixtures import QWEN_SPECIALS, QWEN_TEMPLATE, TEXT, _qwen_ids, _seeded, _tokenizer

    tok = _tokenizer(QWEN_SPECIALS)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = tf.Qwen2VLConfig(text_config=dict(TEXT, vocab_size=len(tok), rope_parameters=rope),
                              vision_config=vision, **_qwen_ids(tok))
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32,
                                                                           "longest_edge": 64 * 64})
    processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**sizes),
                                    video_processor=tf.Qwen2VLVideoProcessor(**sizes), tokenizer=tok,
                                    chat_template=QWEN_TEMPLATE)
    _seeded(tf.Qwen2VLForConditionalGeneration, config, 0).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _lora_target(key: str) -> bool:
    """The official LoRA targets: language-model Linear layers (not visual, lm_head, embed_tokens)."""
    return key.startswith("model.language_model.layers.") and key.endswith(".weight") and "norm" not in key


def _old_key(key: str) -> str:
    return key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)


def build_released(base, folder, output_dim=1, base_name=None, norm=True, step=7):
    """The released layout around `base`: random LoRA pairs and rm_head, PEFT key names."""
    import transformers as tf

    processor = tf.AutoProcessor.from_pretrained(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|VQ_reward|>", "<|MQ_reward|>",
                                                                          "<|TA_reward|>"]})
    model = tf.Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(processor.tokenizer))
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        old = "base_model.model." + _old_key(key)
        if _lora_target(key):
            module = old.removesuffix(".weight")
            state[f"{module}.base_layer.weight"] = value.clone()
            state[f"{module}.lora_A.default.weight"] = torch.randn(LORA_R, value.shape[1], generator=gen) * 0.2
            state[f"{module}.lora_B.default.weight"] = torch.randn(value.shape[0], LORA_R, generator=gen) * 0.2
        elif key.startswith("model.language_model.layers.") and key.endswith(".bias"):
            state[old.removesuffix(".bias") + ".base_layer.bias"] = value.clone()
        else:
            state[old] = value.clone()
    state["base_model.model.rm_head.weight"] = torch.randn(output_dim, 64, generator=gen)
    (folder / f"checkpoint-{step}").mkdir(parents=True)
    torch.save(state, folder / f"checkpoint-{step}" / "model.pth")
    config = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 1024, "eval_dim": ["VQ", "MQ", "TA"],
                              "prompt_template_type": "detailed_special", "sample_type": "uniform"},
              "model_config": {"model_name_or_path": base_name or str(base), "output_dim": output_dim,
                               "use_special_tokens": True, "reward_token": "special"},
              "peft_lora_config": {"lora_enable": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                                   "use_rslora": False}}
    if norm:
        config["inference_config"] = NORM
    (folder / "model_config.json").write_text(json.dumps(config))
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmalign.data.video import write_video

    root = tmp_path_factory.mktemp("videoreward")
    base = build_base(root / "base")
    state = build_released(base, root / "released")
    frames = np.stack([np.full((32, 32, 3), c, dtype=np.uint8) for c in COLOURS])
    frames[:, :16, :16] = 255 - frames[:, :16, :16]  # not flat: the patches differ within a frame
    video = write_video(frames, root / "clip.mp4", fps=8)
    short = write_video(frames[::-1][:4].copy(), root / "short.mp4", fps=2)
    return {"root": root, "base": base, "released": root / "released", "state": state, "video": str(video),
            "short": str(short)}


def official_rewards(tiny, prompts, videos, output_dim=1):
    """The official forward on hand-merged weights -> (B, 3) raw [VQ, MQ, TA] (float32)."""
    import transformers as tf

    from mmalign.scoring.qwen_frames import sample_frames
    from mmalign.scoring.videoreward import PROMPT

    state = tiny["state"]
    scale = LORA_ALPHA / LORA_R
    processor = tf.AutoProcessor.from_pretrained(tiny["base"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|VQ_reward|>", "<|MQ_reward|>",
                                                                          "<|TA_reward|>"]})
    model = tf.Qwen2VLForConditionalGeneration.from_pretrained(tiny["base"]).eval()
    model.resize_token_embeddings(len(processor.tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(state["base_model.model.model.embed_tokens.weight"])
        for key, param in model.state_dict().items():
            if _lora_target(key):
                module = "base_model.model." + _old_key(key).removesuffix(".weight")
                b, a = state[f"{module}.lora_B.default.weight"], state[f"{module}.lora_A.default.weight"]
                param.add_(scale * b @ a)
    texts = ["<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>" + PROMPT.format(text_prompt=p)
             + "<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    clips = [sample_frames(v, "x", factor=16, fps=2.0, min_pixels=1024, max_pixels=1024)[0] for v in videos]
    batch = processor(text=texts, videos=clips, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        video = torch.cat(model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                                         return_dict=True).pooler_output)
        mask = (batch["input_ids"] == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, video)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            position_ids=None).last_hidden_state
        logits = hidden @ state["base_model.model.rm_head.weight"].T  # (B, L, N)
    special = processor.tokenizer.convert_tokens_to_ids(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"])
    rows = []
    for b in range(len(prompts)):
        at = [int((batch["input_ids"][b] == t).nonzero()) for t in special]
        picked = logits[b, at]  # (3, N)
        rows.append(picked.diagonal() if output_dim == 3 else picked[:, 0])
    return torch.stack(rows)


def test_frames_follow_qwen_sampling(tiny):
    """9 frames at 8 fps, fps=2: 9/8*2 = 2.25 -> at least 4 -> indices round(linspace(0, 8, 4)) = 0, 3, 5, 8."""
    from mmalign.scoring.qwen_frames import decode, sample_frames, smart_nframes, smart_resize

    assert smart_nframes(9, 8.0) == 4
    assert smart_nframes(100, 10.0) == 20 and smart_nframes(101, 10.0) == 20  # 20.2 -> 20
    # Python's round, as the official code: half to even (5 / 2 = 2.5 -> 2; 7 / 2 = 3.5 -> 4)
    assert smart_nframes(9, None, frames=5) == 4 and smart_nframes(9, None, frames=7) == 8
    assert smart_nframes(9, None, frames=11) == 9
    with pytest.raises(DataError, match="frames=N"):
        smart_nframes(9, None)
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)  # 197568 px <= 200704
    every, rate = decode(tiny["video"], "x")
    assert rate == 8.0 and len(every) == 9
    clip, rate = sample_frames(tiny["video"], "x", factor=16, min_pixels=1024, max_pixels=1024)
    assert rate == 4 / 9 * 8.0  # qwen-vl-utils' sample_fps = n / T * video_fps
    expected = np.stack([np.asarray(every[i]) for i in (0, 3, 5, 8)]).transpose(0, 3, 1, 2)
    assert clip.dtype == torch.uint8 and np.array_equal(clip.numpy(), expected)


@pytest.mark.parametrize("head", ["vq", "mq", "ta", "overall"])
def test_score_is_the_official_formula(tiny, head):
    from mmalign.scoring import load_scorer

    scorer = load_scorer(f"videoreward={tiny['released']},head={head},{SMALL}")
    prompts, videos = ["a red square", "a blue circle turns"], [tiny["video"], tiny["short"]]
    raw = official_rewards(tiny, prompts, videos).double()
    norm = torch.tensor([[NORM["VQ_mean"], NORM["MQ_mean"], NORM["TA_mean"]]], dtype=torch.float64)
    std = torch.tensor([[NORM["VQ_std"], NORM["MQ_std"], NORM["TA_std"]]], dtype=torch.float64)
    z = (raw - norm) / std
    expected = z.sum(1) if head == "overall" else z[:, ["vq", "mq", "ta"].index(head)]
    torch.testing.assert_close(scorer.score(prompts, videos).double(), expected, rtol=1e-4, atol=1e-4)
    if head == "overall":
        alone = torch.cat([scorer.score(prompts[i:i + 1], videos[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(alone.double(), expected, rtol=1e-4, atol=1e-4)  # right padding is inert
        raw_scorer = load_scorer(f"videoreward={tiny['released']},normalise=false,{SMALL}")
        torch.testing.assert_close(raw_scorer.score(prompts, videos).double(), raw.sum(1), rtol=1e-4, atol=1e-4)


def test_positions_are_the_official_1d_ones_not_mrope(tiny):
    """The official model never calls get_rope_index: M-RoPE positions give another score."""
    from mmalign.scoring import load_scorer

    scorer = load_scorer(f"videoreward={tiny['released']},normalise=false,{SMALL}")
    batch = scorer.batch(["a red square"], [tiny["video"]])
    model = scorer.model
    with torch.no_grad():
        mrope = model.rm_head(model.vlm.model(**batch).last_hidden_state)
        ours = model(batch)
    at = torch.isin(batch["input_ids"][0], torch.tensor(model.special_ids))
    assert (mrope[0, at, 0] - ours[0]).abs().max() > 1e-3


def test_output_dim_three_reads_the_diagonal(tiny, tmp_path):
    from mmalign.scoring import load_scorer

    tiny3 = dict(tiny, state=build_released(tiny["base"], tmp_path / "r3", output_dim=3, norm=False))
    raw = official_rewards(tiny3, ["a red square"], [tiny["video"]], output_dim=3)
    scorer = load_scorer(f"videoreward={tmp_path / 'r3'},head=ta,{SMALL}")
    torch.testing.assert_close(scorer.score(["a red square"], [tiny["video"]]), raw[:, 2], rtol=1e-4, atol=1e-4)


def test_hub_ids_from_a_cache_offline(tiny, tmp_path, monkeypatch):
    """PATH and the base both as Hub ids, read from a self-built cache with HF_HUB_OFFLINE=1."""
    from mmalign.scoring import load_scorer

    cache = tmp_path / "hub"
    for repo, source in (("tinyorg/tiny-qwen2-vl", tiny["base"]), ("tinyorg/tiny-videoreward", tmp_path / "rel")):
        if repo.endswith("videoreward"):
            shutil.copytree(tiny["released"], source)
            config = json.loads((source / "model_config.json").read_text())
            config["model_config"]["model_name_or_path"] = "tinyorg/tiny-qwen2-vl"
            (source / "model_config.json").write_text(json.dumps(config))
        storage = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(source, storage / "snapshots" / ("c" * 40))
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    by_id = load_scorer(f"videoreward=tinyorg/tiny-videoreward,{SMALL}").score(["a red square"], [tiny["video"]])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    local = load_scorer(f"videoreward={tiny['released']},{SMALL}").score(["a red square"], [tiny["video"]])
    torch.testing.assert_close(by_id, local)


def test_bad_layouts_are_one_line(tiny, tmp_path):
    from mmalign.scoring import load_scorer

    with pytest.raises(ConfigError, match="head 'xx' is not one of vq, mq, ta, overall"):
        load_scorer(f"videoreward={tiny['released']},head=xx")
    with pytest.raises(ConfigError, match="no checkpoint-3/ folder"):
        load_scorer(f"videoreward={tiny['released']},step=3")
    bad = tmp_path / "bad"
    shutil.copytree(tiny["released"], bad)
    config = json.loads((bad / "model_config.json").read_text())
    config["data_config"]["prompt_template_type"] = "simple"
    (bad / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="prompt_template_type 'simple' is not implemented"):
        load_scorer(f"videoreward={bad}")
    with pytest.raises(ConfigError, match="unreadable VideoReward model_config.json"):
        load_scorer(f"videoreward={tmp_path}")


def test_score_command_scores_a_video_manifest(tiny, tmp_path):
    from mmalign.cli import main
    from mmalign.generate.manifest import read_manifest, write_manifest
    from mmalign.scoring import load_scorer

    (tmp_path / "media").mkdir()
    shutil.copy(tiny["video"], tmp_path / "media" / "0.mp4")
    rows = [{"id": "0", "prompt_index": 0, "prompt": "a red square <|TA_reward|>", "sample": 0, "seed": 1,
             "kind": "video", "path": "media/0.mp4"}]
    write_manifest(rows, tmp_path / "manifest.jsonl")
    spec = f"videoreward={tiny['released']},head=mq,{SMALL}"
    assert main(["score", str(tmp_path), "--scorer", spec]) == 0
    expected = load_scorer(spec).score(["a red square <|TA_reward|>"], [tiny["video"]])  # the token is escaped
    assert read_manifest(tmp_path)[0]["score_videoreward"] == pytest.approx(float(expected[0]), abs=1e-5)
