"""Scorers (mmalign/scoring) on tiny random-init models built from configs in the test, their
released checkpoint layouts (METHODS.md §5), the exact score formulas, combine/z-norm, and
`mmalign score` on a manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.config import ConfigError

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
WORDS = ["a", "red", "blue", "green", "square", "circle", "dog", "barks", "bird", "sings", "photo", "of"]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def image(colour, size=(32, 32)):
    return Image.new("RGB", size, colour)


def images():
    return [image((220, 30, 30)), image((30, 40, 220), (48, 24)), image((30, 200, 40), (20, 40))]


PROMPTS = ["a red square", "a blue square", "a green circle"]


# -- fixtures: tiny models written in the released layouts -------------------------------
@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """A tiny open_clip CLIP, its JSON config, and its weights as HPS ships them
    ({"state_dict": ...} with DDP's `module.` prefix) and as plain safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    (root / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "hps.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "clip.safetensors")
    return {"model": model, "config": str(root / "tiny.json"), "hps": str(root / "hps.pt"),
            "weights": str(root / "clip.safetensors"), "root": root}


def _tiny_tokenizer():
    from mmalign.toytext import build_word_tokenizer

    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + CLIPProcessor folder (PickScore layout), 32 px, projection 16."""
    from clip_fixtures import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("hf_clip"), _tiny_tokenizer(), 32, 8, 32)


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A tiny transformers ClapModel (HTSAT 64x64 spectrogram image, 16 mels) + ClapProcessor at 48 kHz."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    path = tmp_path_factory.mktemp("clap")
    tok = _tiny_tokenizer()
    config = ClapConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, projection_dim=16, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3),
        audio_config=dict(window_size=4, num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=(4, 4),
                          hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16,
                          projection_dim=16, num_hidden_layers=2),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        ClapModel(config).save_pretrained(path)
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, max_length_s=1, hop_length=480,
                                     fft_window_size=1024)
    ClapProcessor(feature_extractor=extractor, tokenizer=tok).save_pretrained(path)
    return path


# -- checkpoint layouts -------------------------------------------------------------------
def test_read_state_dict_unwraps_released_layouts(open_clip_files, tmp_path):
    from mmalign.scoring.clip import read_state_dict

    reference = open_clip_files["model"].state_dict()
    for path in (open_clip_files["hps"], open_clip_files["weights"]):
        loaded = read_state_dict(path)
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_hps_scorer_loads_checkpoint_and_scores_raw_cosine(open_clip_files):
    from mmalign.scoring.clip import HPSScorer, hps_transform

    scorer = HPSScorer(open_clip_files["hps"], model=open_clip_files["config"])
    reference = open_clip_files["model"]
    for k, v in reference.state_dict().items():
        assert torch.equal(scorer.model.state_dict()[k], v), k
    scores = scorer.score(PROMPTS, images())
    import open_clip

    with torch.no_grad():  # the reference formula, computed here: raw cosine, no logit scale
        pixels = torch.stack([hps_transform(im, 32) for im in images()])
        img = reference.encode_image(pixels, normalize=True)
        txt = reference.encode_text(open_clip.SimpleTokenizer(context_length=16)(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (img * txt).sum(-1), rtol=1e-5, atol=1e-6)


def test_hps_transform_pads_longest_side_without_crop():
    from mmalign.scoring.clip import hps_transform

    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 4, 32))  # a red strip on the left edge: a centre crop would cut it
    out = hps_transform(wide, 32)  # -> 32x16 content, 8 rows of black padding above and below
    assert out.shape == (3, 32, 32)
    black = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, :8, :], black[:, None, None].expand(3, 8, 32))
    torch.testing.assert_close(out[:, 24:, :], black[:, None, None].expand(3, 8, 32))
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 16, 0], red, atol=0.05, rtol=0)


def test_open_clip_weights_mismatch_names_keys(open_clip_files, tmp_path):
    from mmalign.scoring.clip import HPSScorer

    state = {k: v for k, v in open_clip_files["model"].state_dict().items() if k != "logit_scale"}
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="missing.*logit_scale"):
        HPSScorer(str(tmp_path / "bad.pt"), model=open_clip_files["config"])


# -- formulas -------------------------------------------------------------------------------
def test_clip_score_is_hessel_scale():
    from mmalign.scoring.clip import clip_score

    cos = torch.tensor([-0.3, 0.0, 0.4, 1.0])
    torch.testing.assert_close(clip_score(cos), torch.tensor([0.0, 0.0, 1.0, 2.5]))


def test_clipscore_scorer_matches_formula(open_clip_files):
    import open_clip
    from torchvision import transforms as T

    from mmalign.scoring.clip import CLIPScoreScorer

    scorer = CLIPScoreScorer(open_clip_files["weights"], model=open_clip_files["config"], batch_size=2)
    scores = scorer.score(PROMPTS, images())
    preprocess = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                            T.ToTensor(), T.Normalize(MEAN, STD)])
    model = open_clip_files["model"]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images()]), normalize=True)
        txt = model.encode_text(open_clip.SimpleTokenizer(context_length=16)(PROMPTS), normalize=True)
    expected = 2.5 * (img * txt).sum(-1).clamp(min=0)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert ((scores >= 0) & (scores <= 2.5)).all()


def test_pickscore_formula_and_softmax_on_fixed_embeddings():
    from mmalign.scoring.pickscore import pickscore_from_embeddings, pickscore_probs

    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    img = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0]])  # cos 1, 0, 1
    scores = pickscore_from_embeddings(text, img, math.log(2.0))
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0, 2.0]))
    probs = pickscore_probs(scores, ["p0", "p0", "p1"])
    e = math.exp(2.0)
    torch.testing.assert_close(probs, torch.tensor([e / (e + 1), 1 / (e + 1), 1.0]))


def test_pickscore_scorer_matches_reference(hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    from mmalign.scoring.pickscore import PickScoreScorer

    scorer = PickScoreScorer(str(hf_clip_dir))
    scores = scorer.score(PROMPTS, images())
    model, proc = CLIPModel.from_pretrained(hf_clip_dir).eval(), CLIPProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():  # PickScore's released inference code, per prompt
        expected = []
        for prompt, im in zip(PROMPTS, images()):
            i = model.get_image_features(**proc(images=[im], return_tensors="pt")).pooler_output
            t_in = proc(text=[prompt], padding=True, truncation=True, max_length=32, return_tensors="pt")
            t = model.get_text_features(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"]).pooler_output
            i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            expected.append((model.logit_scale.exp() * (t @ i.T))[0, 0])
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert scores.abs().max() <= 100.0 + 1e-4  # exp(log 100) * cos


# -- aesthetic -------------------------------------------------------------------------------
RELEASED_AESTHETIC_SHAPES = [("layers.0.weight", (1024, 768)), ("layers.0.bias", (1024,)),
                             ("layers.2.weight", (128, 1024)), ("layers.2.bias", (128,)),
                             ("layers.4.weight", (64, 128)), ("layers.4.bias", (64,)),
                             ("layers.6.weight", (16, 64)), ("layers.6.bias", (16,)),
                             ("layers.7.weight", (1, 16)), ("layers.7.bias", (1,))]


def test_aesthetic_mlp_has_released_layout_and_no_activations():
    from mmalign.scoring.aesthetic import AestheticMLP

    mlp = AestheticMLP(768).eval()
    assert [(k, tuple(v.shape)) for k, v in mlp.state_dict().items()] == RELEASED_AESTHETIC_SHAPES
    dropouts = [m.p for m in mlp.layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]
    x, y = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # affine end to end: f(0.3x + 0.7y) = 0.3 f(x) + 0.7 f(y)
        torch.testing.assert_close(mlp(0.3 * x + 0.7 * y), 0.3 * mlp(x) + 0.7 * mlp(y), rtol=1e-4, atol=1e-5)


def test_aesthetic_scorer_loads_released_layout(hf_clip_dir, open_clip_files, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from mmalign.scoring.aesthetic import AestheticMLP, AestheticScorer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mlp = AestheticMLP(16).eval()
    torch.save(dict(mlp.state_dict()), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = AestheticScorer(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip=str(hf_clip_dir))
    for k, v in mlp.state_dict().items():
        assert torch.equal(scorer.mlp.state_dict()[k], v), k
    scores = scorer.score(PROMPTS, images())
    model, proc = CLIPModel.from_pretrained(hf_clip_dir).eval(), CLIPProcessor.from_pretrained(hf_clip_dir)
    with torch.no_grad():
        emb = model.get_image_features(**proc(images=images(), return_tensors="pt")).pooler_output
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # the same MLP on an open_clip backbone (weights file + JSON architecture) also loads
    oc = AestheticScorer(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip=open_clip_files["weights"],
                         clip_model=open_clip_files["config"])
    assert torch.isfinite(oc.score(PROMPTS, images())).all()
    big = AestheticMLP(768)
    torch.save(dict(big.state_dict()), tmp_path / "big.pth")
    with pytest.raises(ConfigError, match="768"):
        AestheticScorer(str(tmp_path / "big.pth"), clip=str(hf_clip_dir))


# -- CLAP --------------------------------------------------------------------------------------
def test_clap_scorer_resamples_and_matches_cosine(clap_dir, tmp_path):
    import soundfile
    import soxr
    from transformers import ClapModel, ClapProcessor

    from mmalign.scoring.clap import ClapScorer

    t = np.arange(16000) / 16000.0
    waves = [(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)]
    paths = []
    for i, w in enumerate(waves):
        soundfile.write(tmp_path / f"{i}.wav", np.stack([w, w], axis=1), 16000, subtype="FLOAT")  # stereo, 16 kHz
        paths.append(str(tmp_path / f"{i}.wav"))
    scorer = ClapScorer(str(clap_dir))
    prompts = ["a dog barks", "a bird sings"]
    scores = scorer.score(prompts, paths)
    torch.testing.assert_close(scorer.score(prompts, [(w, 16000) for w in waves]), scores)
    model, proc = ClapModel.from_pretrained(clap_dir).eval(), ClapProcessor.from_pretrained(clap_dir)
    with torch.no_grad():
        audio = proc(audio=[soxr.resample(w, 16000, 48000) for w in waves], sampling_rate=48000,
                     truncation="rand_trunc", padding="repeatpad", return_tensors="pt")
        a = model.get_audio_features(input_features=audio["input_features"]).pooler_output
        tt = proc(text=prompts, padding=True, return_tensors="pt")
        b = model.get_text_features(input_ids=tt["input_ids"], attention_mask=tt["attention_mask"]).pooler_output
    expected = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


# -- specs, registry, combine ------------------------------------------------------------------
def test_parse_spec_and_unknown_options(open_clip_files):
    from mmalign.scoring import load_scorer, parse_spec

    spec = parse_spec("hpsv21=/m/a:b.pt,dtype=float16,batch_size=4,as=hps:0.5")
    assert (spec.name, spec.path, spec.column, spec.weight) == ("hpsv21", "/m/a:b.pt", "hps", 0.5)
    assert spec.options == {"dtype": "float16", "batch_size": 4}
    assert parse_spec("pickscore=/m/PickScore_v1").weight == 1.0
    with pytest.raises(ConfigError, match="unknown scorer 'pick'"):
        parse_spec("pick=/m")
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        load_scorer(f"hpsv2={open_clip_files['hps']},colour=red")
    with pytest.raises(ConfigError, match="does not exist"):
        load_scorer(f"hpsv2={open_clip_files['root']}/missing.pt,model={open_clip_files['config']}")


def test_combine_weights_and_znorm_on_hand_numbers():
    from mmalign.scoring import combine, znormalise

    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 10.0, 40.0])
    torch.testing.assert_close(combine({"a": a, "b": b}, {"a": 1.0, "b": 0.5}), torch.tensor([6.0, 7.0, 23.0]))
    za = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)  # population std of 1,2,3 is sqrt(2/3)
    zb = torch.tensor([-10.0, -10.0, 20.0]) / math.sqrt(200.0)
    torch.testing.assert_close(znormalise(a), za)
    torch.testing.assert_close(combine({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, znorm=True), za + 0.5 * zb)
    with_nan = combine({"a": torch.tensor([1.0, math.nan, 3.0])}, znorm=True)
    assert math.isnan(with_nan[1]) and with_nan[0].item() == pytest.approx(-1.0)
    torch.testing.assert_close(znormalise(torch.tensor([4.0, 4.0])), torch.zeros(2))
    with pytest.raises(ValueError, match="without scores"):
        combine({"a": a}, {"b": 1.0})


# -- the command ---------------------------------------------------------------------------------
def _image_manifest(root):
    from mmalign.generate.manifest import ManifestWriter, sample_id

    (root / "media").mkdir(parents=True)
    with ManifestWriter(root / "manifest.jsonl") as w:
        for p, prompt in enumerate(PROMPTS[:2]):
            for s, colour in enumerate([(220, 30, 30), (30, 40, 220)]):
                rel = f"media/{p}-{s}.png"
                image(colour).save(root / rel)
                w.write({"id": sample_id(p, s), "prompt_index": p, "prompt": prompt, "sample": s, "seed": s,
                         "kind": "image", "path": rel, "model": "tiny", "params": {}})
    return root


def test_score_command_columns_combined_and_resume(open_clip_files, tmp_path, capsys):
    from mmalign.cli import main
    from mmalign.generate.manifest import read_manifest
    from mmalign.scoring.clip import CLIPScoreScorer, HPSScorer

    root = _image_manifest(tmp_path / "samples")
    cfg = open_clip_files["config"]
    clip_spec = f"clipscore={open_clip_files['weights']},model={cfg}:2"
    hps_spec = f"hpsv2={open_clip_files['hps']},model={cfg}:0.5"
    assert main(["score", str(root), "--scorer", clip_spec, "--scorer", hps_spec, "--batch-size", "3",
                 "--device", "cpu"]) == 0
    assert "scored 4 samples" in capsys.readouterr().out
    rows = read_manifest(root)
    paths = [str(root / r["path"]) for r in rows]
    prompts = [r["prompt"] for r in rows]
    clip = CLIPScoreScorer(open_clip_files["weights"], model=cfg).score(prompts, paths)
    hps = HPSScorer(open_clip_files["hps"], model=cfg).score(prompts, paths)
    torch.testing.assert_close(torch.tensor([r["score_clipscore"] for r in rows]), clip)
    torch.testing.assert_close(torch.tensor([r["score_hpsv2"] for r in rows]), hps)
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), 2 * clip + 0.5 * hps)
    # resumable: present columns are not recomputed (the weights are gone, nothing is loaded) ...
    (root / "media" / "0-0.png").unlink()
    assert main(["score", str(root / "manifest.jsonl"), "--scorer", clip_spec, "--scorer", hps_spec, "--znorm"]) == 0
    again = read_manifest(root)
    assert [r["score_hpsv2"] for r in again] == [r["score_hpsv2"] for r in rows]
    z = (hps - hps.mean()) / hps.std(unbiased=False)
    zc = (clip - clip.mean()) / clip.std(unbiased=False)
    torch.testing.assert_close(torch.tensor([r["score"] for r in again]), 2 * zc + 0.5 * z, rtol=1e-4, atol=1e-5)
    # ... unless --overwrite, which now meets the missing image: one-line user error
    assert main(["score", str(root), "--scorer", hps_spec, "--overwrite"]) == 2
    assert "0-0.png" in capsys.readouterr().err


def test_score_command_rejects_wrong_kind(clap_dir, tmp_path, capsys):
    from mmalign.cli import main

    root = _image_manifest(tmp_path / "samples")
    assert main(["score", str(root), "--scorer", f"clap={clap_dir}"]) == 2
    assert "scores audio samples" in capsys.readouterr().err
