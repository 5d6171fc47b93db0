"""The model-based reward scorers ImageReward and HPSv3 (mmalign/scoring/imagereward.py, hpsv3.py):
tiny random models written in the released checkpoint layouts (ImageReward.pt + med_config.json;
HPSv3.safetensors over a Qwen2-VL base folder), loaded by path and by Hub id (a Hub cache built
here, HF_HUB_OFFLINE=1), each score checked against an independent float64 re-implementation of
the released forward on the same weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.errors import ConfigError

WORDS = ["a", "red", "blue", "green", "square", "circle", "dog", "photo", "of", "on", "grass"]
PROMPTS = ["a red square", "a photo of a dog on grass", "a green circle"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def images():
    return [Image.new("RGB", (40, 32), (220, 30, 30)), Image.new("RGB", (32, 48), (30, 40, 220)),
            Image.new("RGB", (32, 32), (30, 200, 40))]


def add_snapshot(cache: Path, repo: str, source: Path) -> Path:
    """Copy `source` as the main snapshot of `repo` in a huggingface_hub cache folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, storage / "snapshots" / ("a" * 40))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("a" * 40)
    return storage / "snapshots" / ("a" * 40)


# -- ImageReward ----------------------------------------------------------------------------
IR_VISION = dict(width=128, depth=2, heads=2, patch=16, size=32)
IR_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
               add_cross_attention=True, encoder_width=768, type_vocab_size=2, model_type="bert")
IR_MLP = [32, 1024, 128, 64, 16, 1]


def _released_imagereward_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names of THUDM's ImageReward.pt: timm ViT keys under
    blip.visual_encoder, BLIP med.py BERT keys under blip.text_encoder, mlp.layers.{0,2,4,6,7}."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name, *shape, scale=0.2, centre=0.0):
        state[name] = centre + scale * torch.randn(*shape, generator=gen)

    d, p, n = IR_VISION["width"], IR_VISION["patch"], (IR_VISION["size"] // IR_VISION["patch"]) ** 2
    v = "blip.visual_encoder."
    put(v + "cls_token", 1, 1, d), put(v + "pos_embed", 1, n + 1, d)
    put(v + "patch_embed.proj.weight", d, 3, p, p, scale=0.05), put(v + "patch_embed.proj.bias", d)
    for i in range(IR_VISION["depth"]):
        b = f"{v}blocks.{i}."
        for norm in ("norm1", "norm2"):
            put(b + norm + ".weight", d, centre=1.0), put(b + norm + ".bias", d)
        for name, out, inp in (("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", 4 * d, d),
                               ("mlp.fc2", d, 4 * d)):
            put(b + name + ".weight", out, inp, scale=inp ** -0.5), put(b + name + ".bias", out)
    put(v + "norm.weight", d, centre=1.0), put(v + "norm.bias", d)
    h, t, inter = IR_TEXT["hidden_size"], "blip.text_encoder.", IR_TEXT["intermediate_size"]
    put(t + "embeddings.word_embeddings.weight", vocab, h), put(t + "embeddings.position_embeddings.weight", 64, h)
    put(t + "embeddings.LayerNorm.weight", h, centre=1.0), put(t + "embeddings.LayerNorm.bias", h)
    state[t + "embeddings.position_ids"] = torch.arange(64)[None]
    for i in range(IR_TEXT["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention.", h), ("crossattention.", d)):
            for name, inp in (("self.query", h), ("self.key", kv), ("self.value", kv), ("output.dense", h)):
                put(b + att + name + ".weight", h, inp, scale=inp ** -0.5), put(b + att + name + ".bias", h)
            put(b + att + "output.LayerNorm.weight", h, centre=1.0), put(b + att + "output.LayerNorm.bias", h)
        put(b + "intermediate.dense.weight", inter, h, scale=h ** -0.5), put(b + "intermediate.dense.bias", inter)
        put(b + "output.dense.weight", h, inter, scale=inter ** -0.5), put(b + "output.dense.bias", h)
        put(b + "output.LayerNorm.weight", h, centre=1.0), put(b + "output.LayerNorm.bias", h)
    put("blip.vision_proj.weight", 16, d), put("blip.text_proj.weight", 16, h)  # BLIP's ITC heads: unused
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(IR_MLP[:-1], IR_MLP[1:])):
        put(f"mlp.layers.{index}.weight", out, inp, scale=inp ** -0.5), put(f"mlp.layers.{index}.bias", out)
    return state


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    """ImageReward.pt + med_config.json + a BERT word-piece tokenizer (tiny vocab.txt) in one folder."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("imagereward")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(root)
    vocab = len(WORDS) + 5 + 2  # + BLIP's [DEC] and [ENC]
    (root / "med_config.json").write_text(json.dumps({**IR_TEXT, "vocab_size": vocab}))
    state = _released_imagereward_state(vocab)
    torch.save(state, root / "ImageReward.pt")
    return {"root": root, "state": state}


def _ref_layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _ref_linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ref_vit(sd, x):
    """The reference `VisionTransformer.forward` (BLIP vit.py) in float64."""
    v, heads = "blip.visual_encoder.", IR_VISION["heads"]
    h = F.conv2d(x, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=IR_VISION["patch"])
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), h], 1) + sd[v + "pos_embed"]
    n, length, d = h.shape
    for i in range(IR_VISION["depth"]):
        b = f"{v}blocks.{i}."
        qkv = _ref_linear(_ref_layer_norm(h, sd, b + "norm1", 1e-6), sd, b + "attn.qkv")
        q, k, w = qkv.reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, -1) @ w
        h = h + _ref_linear(att.transpose(1, 2).reshape(n, length, d), sd, b + "attn.proj")
        y = _ref_layer_norm(h, sd, b + "norm2", 1e-6)
        h = h + _ref_linear(F.gelu(_ref_linear(y, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ref_layer_norm(h, sd, v + "norm", 1e-6)


def _ref_bert_attention(sd, pre, x, context, additive_mask):
    heads = IR_TEXT["num_attention_heads"]
    n, length, h = x.shape
    split = lambda t: t.reshape(n, t.shape[1], heads, h // heads).transpose(1, 2)  # noqa: E731
    q, k = split(_ref_linear(x, sd, pre + "self.query")), split(_ref_linear(context, sd, pre + "self.key"))
    w = split(_ref_linear(context, sd, pre + "self.value"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // heads) + additive_mask, -1) @ w
    out = _ref_linear(att.transpose(1, 2).reshape(n, length, h), sd, pre + "output.dense")
    return _ref_layer_norm(out + x, sd, pre + "output.LayerNorm", 1e-12)


def _ref_bert(sd, ids, mask, image_embeds):
    """The reference med.py `BertModel.forward(mode='multimodal')` in float64: no token types, the
    padding mask as (1 - m) * -10000, cross-attention to every image token in every layer."""
    t = "blip.text_encoder."
    h = sd[t + "embeddings.word_embeddings.weight"][ids]
    h = h + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = _ref_layer_norm(h, sd, t + "embeddings.LayerNorm", 1e-12)
    additive = (1.0 - mask.double())[:, None, None, :] * -10000.0
    for i in range(IR_TEXT["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        h = _ref_bert_attention(sd, b + "attention.", h, h, additive)
        h = _ref_bert_attention(sd, b + "crossattention.", h, image_embeds, 0.0)
        inter = F.gelu(_ref_linear(h, sd, b + "intermediate.dense"))
        h = _ref_layer_norm(_ref_linear(inter, sd, b + "output.dense") + h, sd, b + "output.LayerNorm", 1e-12)
    return h


def _ref_imagereward(state, ids, mask, pil_images):
    """(MLP(BERT(ids; ViT(x))[:, 0]) - 0.16717362830052426) / 1.0333394966054072, float64."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    sd = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    transform = Compose([Resize(32, interpolation=InterpolationMode.BICUBIC), CenterCrop(32), ToTensor(),
                         Normalize(CLIP_MEAN, CLIP_STD)])
    pixels = torch.stack([transform(im.convert("RGB")) for im in pil_images]).double()
    feature = _ref_bert(sd, ids, mask, _ref_vit(sd, pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):
        feature = _ref_linear(feature, sd, f"mlp.layers.{index}")
    return (feature.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_matches_float64_reference(imagereward_dir):
    from mmalign.scoring import load_scorer

    scorer = load_scorer(f"imagereward={imagereward_dir['root']}")
    ids, mask = scorer.tokens(PROMPTS)
    tok = scorer.tokenizer
    assert ids.shape == (3, 35) and (ids[:, 0] == tok.cls_token_id).all()  # [CLS] first, padded to 35
    assert mask.sum(1).tolist() == [5, 9, 5] and (ids != tok.unk_token_id).all()  # [CLS] + words + [SEP]
    scores = scorer.score(PROMPTS, images())
    expected = _ref_imagereward(imagereward_dir["state"], ids, mask, images())
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.05  # the images and prompts do move the score
    single = scorer.score(PROMPTS[:1], images()[:1]).item()
    assert single == pytest.approx(scores[0].item(), abs=1e-5)  # a row's score does not depend on its batch


def test_imagereward_truncates_at_35_tokens_and_standardises(imagereward_dir):
    from mmalign.scoring.imagereward import ImageRewardScorer, normalise_reward

    scorer = ImageRewardScorer(str(imagereward_dir["root"] / "ImageReward.pt"), batch_size=2)
    ids, mask = scorer.tokens([" ".join(["dog"] * 50)])
    assert ids.shape == (1, 35) and mask.sum().item() == 35 and ids[0, -1].item() == scorer.tokenizer.sep_token_id
    raw = torch.tensor([0.16717362830052426, 0.16717362830052426 + 1.0333394966054072])
    assert normalise_reward(raw).tolist() == pytest.approx([0.0, 1.0])
    assert len(scorer.tokenizer) == len(WORDS) + 7  # BLIP's [DEC] and [ENC] are added


def test_imagereward_by_hub_id_offline(imagereward_dir, tmp_path, monkeypatch):
    from mmalign.scoring import load_scorer

    add_snapshot(tmp_path / "hub", "THUDM/ImageReward", imagereward_dir["root"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = load_scorer("imagereward=THUDM/ImageReward,batch_size=2").score(PROMPTS, images())
    by_path = load_scorer(f"imagereward={imagereward_dir['root']}").score(PROMPTS, images())
    torch.testing.assert_close(by_id, by_path)
    with pytest.raises(ConfigError, match="nobody/nothing"):
        load_scorer("imagereward=nobody/nothing")


def test_imagereward_bad_checkpoint_names_keys(imagereward_dir, tmp_path):
    from mmalign.scoring.imagereward import ImageRewardScorer

    state = {k: v for k, v in imagereward_dir["state"].items() if "crossattention.self.key" not in k}
    torch.save(state, tmp_path / "ImageReward.pt")
    shutil.copy(imagereward_dir["root"] / "med_config.json", tmp_path)
    with pytest.raises(ConfigError, match="text weights do not fit: missing.*crossattention.self.key"):
        ImageRewardScorer(str(tmp_path), tokenizer=str(imagereward_dir["root"]))
    (tmp_path / "med_config.json").unlink()
    with pytest.raises(ConfigError, match="no med_config.json"):
        ImageRewardScorer(str(tmp_path))


# -- HPSv3 ------------------------------------------------------------------------------------
HPS_PIXELS = 32 * 32  # the tiny processor's patch 8 x merge 2 = 16-px grid; 256·28·28 when released
HPSV3_INSTRUCTION_SHA = "0393599dad45a971"  # of hpsv3/dataset/data_collator_qwen.py's INSTRUCTION, trailing spaces kept


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    """A tiny Qwen2-VL base folder (config + processor, as Qwen2-VL-7B-Instruct) and HPSv3.safetensors
    made by the released recipe: `<|Reward|>` added to the tokenizer, the embeddings resized to it,
    the ranknet head D -> 1024 -> 16 -> 2, keys as transformers 4.45 saved them (visual.*, model.*)."""
    import transformers as tf
    from safetensors.torch import save_file
    from vlm_family_fixtures import QWEN_SPECIALS, QWEN_TEMPLATE, TEXT, _qwen_ids, _tokenizer

    root = tmp_path_factory.mktemp("hpsv3")
    tok = _tokenizer(QWEN_SPECIALS)
    config = tf.Qwen2VLConfig(
        text_config=dict(TEXT, vocab_size=len(tok), initializer_range=0.2,  # larger weights: image positions matter
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, initializer_range=0.2), **_qwen_ids(tok))
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16,
                                                                           "longest_edge": 64 * 64})
    processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**sizes),
                                    video_processor=tf.Qwen2VLVideoProcessor(**sizes), tokenizer=tok,
                                    chat_template=QWEN_TEMPLATE)
    config.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = tf.Qwen2VLForConditionalGeneration(config).eval()
        model.resize_token_embeddings(len(tok))
        head = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                                   torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        legacy[key] = value.contiguous()
    legacy.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    (root / "hpsv3").mkdir()
    save_file(legacy, root / "hpsv3" / "HPSv3.safetensors")
    newer = {k: v.contiguous() for k, v in model.state_dict().items()}
    newer.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file(newer, root / "newer.safetensors")
    return {"root": root, "base": root / "base", "ckpt": root / "hpsv3", "model": model, "head": head,
            "reward_id": tok.convert_tokens_to_ids("<|Reward|>")}


def _ref_hpsv3(files, prompts, pil_images):
    """The released `HPSv3RewardInferencer.reward` in float64 on the same weights: the message with
    min = max pixels, the chat template with generation prompt, image embeddings scattered into the
    token embeddings, the decoder run WITHOUT image_grid_thw (1-D positions), the head on every
    position, the `<|Reward|>` row kept -> (N, 2) [mu, log sigma]."""
    from transformers import AutoProcessor

    from mmalign.scoring.hpsv3 import INSTRUCTION, smart_resize

    processor = AutoProcessor.from_pretrained(files["base"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    resized = []
    for im in pil_images:
        height, width = smart_resize(im.height, im.width, 16, HPS_PIXELS, HPS_PIXELS)
        resized.append(im.resize((width, height)))
    suffix = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    messages = [[{"role": "user", "content": [{"type": "image", "image": im, "min_pixels": HPS_PIXELS,
                                               "max_pixels": HPS_PIXELS},
                                              {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + suffix}]}]
                for p, im in zip(prompts, resized)]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=resized, padding=True, return_tensors="pt")
    model, head = files["model"].double(), files["head"].double()
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids)
        image = model.model.visual(batch["pixel_values"].double(), grid_thw=batch["image_grid_thw"])
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])[0]
        logits = head(hidden)
    files["model"].float(), files["head"].float()
    return logits[ids == files["reward_id"]].view(len(prompts), -1)


def test_hpsv3_scores_mu_of_the_released_forward(hpsv3_files):
    from mmalign.scoring import load_scorer

    scorer = load_scorer(f"hpsv3={hpsv3_files['ckpt']},base={hpsv3_files['base']},pixels={HPS_PIXELS},dtype=float32")
    expected = _ref_hpsv3(hpsv3_files, PROMPTS, images())
    torch.testing.assert_close(scorer.mu_log_sigma(PROMPTS, images()).double(), expected, rtol=1e-4, atol=1e-4)
    scores = scorer.score(PROMPTS, images())
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores.double(), expected[:, 0], rtol=1e-4, atol=1e-4)  # score = mu
    assert expected[:, 0].std() > 1e-3
    enc = scorer.inputs(PROMPTS, images())
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 2], [1, 4, 4]]  # 32x32, 32x16 (48x32 shrunk), 32x32
    assert (enc["input_ids"] == hpsv3_files["reward_id"]).sum(1).tolist() == [1, 1, 1]
    one = scorer.score(PROMPTS[1:2], images()[1:2])  # right padding: a row's score does not depend on its batch
    assert one.item() == pytest.approx(scores[1].item(), abs=1e-4)


def test_hpsv3_prompt_and_resize_are_the_released_ones():
    import hashlib

    from mmalign.scoring.hpsv3 import INSTRUCTION, hpsv3_text, smart_resize

    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest()[:16] == HPSV3_INSTRUCTION_SHA
    text = hpsv3_text("a red square")
    assert text.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text ")
    assert text.endswith("Textual prompt - a red square\n\n\n\nPlease provide the overall ratings of this image: "
                         "<|Reward|>\n\nEND\n")
    assert smart_resize(1024, 1024, 28, 200704, 200704) == (448, 448)  # 448 * 448 = 200,704 exactly
    assert smart_resize(1080, 1920, 28, 200704, 200704) == (336, 588)  # beta = sqrt(1080*1920/200704)
    assert smart_resize(20, 20, 16, 1024, 1024) == (32, 32)  # grown: ceil(20 * 1.6 / 16) * 16


def test_hpsv3_checkpoint_layouts_and_hub_ids(hpsv3_files, tmp_path, monkeypatch):
    from mmalign.scoring.hpsv3 import HPSv3Scorer

    kwargs = dict(pixels=HPS_PIXELS, dtype="float32")
    reference = HPSv3Scorer(str(hpsv3_files["ckpt"]), base=str(hpsv3_files["base"]), **kwargs).score(PROMPTS, images())
    newer = HPSv3Scorer(str(hpsv3_files["root"] / "newer.safetensors"), base=str(hpsv3_files["base"]), **kwargs)
    torch.testing.assert_close(newer.score(PROMPTS, images()), reference)  # transformers >= 4.52 key names
    add_snapshot(tmp_path / "hub", "MizzenAI/HPSv3", hpsv3_files["ckpt"])
    add_snapshot(tmp_path / "hub", "Qwen/Qwen2-VL-7B-Instruct", hpsv3_files["base"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = HPSv3Scorer("MizzenAI/HPSv3", **kwargs)  # base defaults to Qwen/Qwen2-VL-7B-Instruct
    torch.testing.assert_close(by_id.score(PROMPTS, images()), reference)
    with pytest.raises(ValueError, match="row 0 holds 2 <\\|Reward\\|> tokens"):
        by_id.score(["a <|Reward|> square"], images()[:1])
    from safetensors.torch import load_file, save_file

    state = load_file(hpsv3_files["ckpt"] / "HPSv3.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("rm_head")}
    save_file(state, tmp_path / "nohead.safetensors")
    with pytest.raises(ConfigError, match="not an HPSv3 checkpoint"):
        HPSv3Scorer(str(tmp_path / "nohead.safetensors"), base=str(hpsv3_files["base"]), **kwargs)


def test_score_command_writes_imagereward_and_hpsv3_columns(imagereward_dir, hpsv3_files, tmp_path, capsys):
    from mmalign.cli import main
    from mmalign.generate.manifest import ManifestWriter, read_manifest, sample_id
    from mmalign.scoring import load_scorer

    root = tmp_path / "samples"
    (root / "media").mkdir(parents=True)
    with ManifestWriter(root / "manifest.jsonl") as w:
        for i, (prompt, im) in enumerate(zip(PROMPTS, images())):
            im.save(root / f"media/{i}.png")
            w.write({"id": sample_id(i, 0), "prompt_index": i, "prompt": prompt, "sample": 0, "seed": 0,
                     "kind": "image", "path": f"media/{i}.png", "model": "tiny", "params": {}})
    ir_spec = f"imagereward={imagereward_dir['root']}"
    hps_spec = f"hpsv3={hpsv3_files['ckpt']},base={hpsv3_files['base']},pixels={HPS_PIXELS},dtype=float32"
    assert main(["score", str(root), "--scorer", ir_spec, "--scorer", f"{hps_spec}:0.5", "--device", "cpu"]) == 0
    assert "scored 3 samples" in capsys.readouterr().out
    rows = read_manifest(root)
    paths = [str(root / r["path"]) for r in rows]
    ir = load_scorer(ir_spec).score(PROMPTS, paths)
    hps = load_scorer(hps_spec).score(PROMPTS, paths)
    torch.testing.assert_close(torch.tensor([r["score_imagereward"] for r in rows]), ir)
    torch.testing.assert_close(torch.tensor([r["score_hpsv3"] for r in rows]), hps)
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), ir + 0.5 * hps)


def test_hub_downloads_only_the_files_a_scorer_reads(hpsv3_files, imagereward_dir, monkeypatch):
    """Online, HPSv3 fetches HPSv3.safetensors and the base's config / processor files, not the
    base's weights; ImageReward its checkpoint, med_config and tokenizer files (download mocked)."""
    import huggingface_hub

    from mmalign.scoring.hpsv3 import BASE_FILES, HPSv3Scorer
    from mmalign.scoring.imagereward import ImageRewardScorer

    folders = {"MizzenAI/HPSv3": hpsv3_files["ckpt"], "Qwen/Qwen2-VL-7B-Instruct": hpsv3_files["base"],
               "THUDM/ImageReward": imagereward_dir["root"]}
    calls = {}

    def snapshot_download(repo, allow_patterns=None, **kwargs):
        calls[repo] = allow_patterns
        return str(folders[repo])

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    HPSv3Scorer("MizzenAI/HPSv3", pixels=HPS_PIXELS, dtype="float32")
    ImageRewardScorer("THUDM/ImageReward")
    assert calls == {"MizzenAI/HPSv3": ["HPSv3.safetensors"], "Qwen/Qwen2-VL-7B-Instruct": BASE_FILES,
                     "THUDM/ImageReward": ["ImageReward.pt", "ImageReward.safetensors", "med_config.json",
                                           "*.json", "*.txt"]}
    assert not any(p.endswith((".safetensors", ".bin")) for p in BASE_FILES)
