"""The latent cache for the audio modalities (`tango`, `audioldm2`; mmalign/modalities/audio_cache.py)
on tiny pipelines: cached == uncached on the same draw (values, logps, dpo loss) with prompts of
several lengths and dropped captions, the stored mel latents and per-prompt conditioning with its
mask and length, resume after a kill, `mmalign cache` + `mmalign train` without the VAE or a text
encoder, and the audio-only errors (no flips, no random crops, a cache of other mels)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from audio_fixtures import PROMPTS, save_tiny_audioldm2, save_tiny_tango, write_audio_pairs
from diffusion_fixtures import Killed, kill_after_first_latent_shard, perturbed, uncached
from safetensors.torch import load_file

import mmalign.modalities.cache_writer as cw
import mmalign.modalities.diffusion_cache as dc
from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality
from mmalign.types import Draw

MASK = {"tango": "encoder_attention_mask", "audioldm2": "encoder_attention_mask_1"}
DENOISERS = {"tango": "TangoUNet", "audioldm2": "AudioLDM2UNet"}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_cache_pipelines")
    return {"tango": save_tiny_tango(root / "tango"), "audioldm2": save_tiny_audioldm2(root / "audioldm2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 tone pairs, prompts PROMPTS[i % 4]: 4 unique captions of 11 to 31 characters."""
    path, records = write_audio_pairs(tmp_path_factory.mktemp("audio_cache_data"), 6)
    return {"train": path, "records": [dict(r, _index=i) for i, r in enumerate(records)]}


def make_cfg(pipelines, data, tmp_path, modality, **diffusion):
    d = {"caption_dropout": 0.5, "cache_dir": str(tmp_path / "cache"), "cache_shard_size": 2, **diffusion}
    return from_dict(Config, {"modality": modality, "model": {"path": str(pipelines[modality])},
                              "data": {"train": str(data["train"])}, "diffusion": d, "audio": {"seconds": 0.32},
                              "train": {"progress": False}})


# β 2000 multiplies logp differences: float32 = the conv kernels' rounding on another memory layout (~3e-8 of
# logp -> ~1e-4 of loss); float16 storage of latents and embeddings (~1e-4 of logp, mostly shared by policy and
# reference) -> ~1e-2.
LOSS_TOL_FP32, LOSS_TOL_FP16 = 1e-3, 2e-2


# -- cached == uncached ------------------------------------------------------------------------
@pytest.mark.parametrize("modality,dtype", [("tango", "float32"), ("audioldm2", "float32"), ("tango", "float16")])
def test_cached_and_uncached_draw_give_the_same_unet_inputs_logps_and_loss(pipelines, data, tmp_path, modality,
                                                                           dtype):
    cfg = make_cfg(pipelines, data, tmp_path, modality, cache_dtype=dtype)
    unet, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    _, cached, _ = build_modality(cfg)
    assert type(cached.conditioning).__name__ == "CachedPromptwiseText" and cached.vae is None
    assert type(cached.denoiser).__name__ == DENOISERS[modality] and cached.text_encoders == []
    records = data["records"]
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    exact, policy, mask = dtype == "float32", perturbed(unet), MASK[modality]
    seen_dropped, seen_lengths = set(), set()
    for seed in range(3):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "timesteps", "caption_dropped", mask):
            assert torch.equal(w[key], v[key]), key  # same random choices, same padding and mask (int64)
        for key in v.keys() - {"noise", "timesteps", "caption_dropped", mask}:
            if exact:
                assert torch.equal(w[key], v[key]), key  # latents and conditioning bit-identical
            else:
                torch.testing.assert_close(w[key], v[key], rtol=0, atol=3e-3, msg=key)
        seen_dropped.update(v["caption_dropped"].tolist())
        seen_lengths.add(v[mask].shape[1])
        ref, ref_c = plain.logps(unet, batch, Draw(v)), cached.logps(unet, batch_c, Draw(w))
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        if exact:  # the VAE's output is not contiguous: in the same memory layout the logps are bit-identical
            same_layout = plain.logps(unet, batch, Draw({k: x.contiguous() for k, x in v.items()}))
            assert torch.equal(ref_c.logps, same_layout.logps)
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6 if exact else 5e-4)
        loss = dpo_loss(pol.pairs(), ref.pairs(), beta=2000.0)
        loss_c = dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=2000.0)
        assert (loss - math.log(2)).abs().max() > 1e-3  # the policy differs from the reference
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=LOSS_TOL_FP32 if exact else LOSS_TOL_FP16)
    assert seen_dropped == {True, False}  # dropped captions (the cached "") and kept ones
    assert len(seen_lengths) > 1  # dropping a long caption shortens the batch's padding, cached as uncached


@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_the_cache_holds_mel_latents_and_each_prompts_own_conditioning(pipelines, data, tmp_path, modality):
    cfg = make_cfg(pipelines, data, tmp_path, modality, cache_dtype="float32")
    _, plain = uncached(cfg)
    stats = cw.write_cache(cfg, plain)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert stats["captions"] == 4 and index["captions"] == PROMPTS  # 6 records, 4 unique prompts
    assert index["settings"]["audio"]["seconds"] == 0.32 and index["settings"]["resolution"] is None
    assert index["latent"]["shape"] == [4, 16, 8]  # 32 mel frames x 16 mels, VAE factor 2
    shard = load_file(str(tmp_path / "cache" / "train" / "latents-00000.safetensors"))  # records 0, 1
    assert "mean_flipped" not in shard and shard["crop_top_left"].abs().sum() == 0  # no flips, no crops
    mels = torch.stack([plain.latents.cache_item(r[c], "", None)[0] for r in data["records"][:2] for c in ("chosen", "rejected")])
    assert mels.shape == (4, 1, 32, 16)
    torch.testing.assert_close(mels[[0, 2]], plain.collate(data["records"][:2], "pair").inputs["pixel_values"][:2],
                               rtol=0, atol=0)  # the log-mel collate makes
    mean, std = plain.latents.latent_dist(mels)
    assert torch.equal(shard["mean"], mean) and torch.equal(shard["std"], std)
    text = [load_file(str(tmp_path / "cache" / f)) for f in index["text"]["files"]]
    rows = [(t, i) for t in text for i in range(t[f"length/{MASK[modality]}"].shape[0])]
    null = load_file(str(tmp_path / "cache" / index["text"]["null"]))
    for caption, (table, i) in zip(PROMPTS + [""], rows + [(null, 0)]):
        alone = plain.conditioning.encoder.encode_one(caption)  # as the uncached draw encodes it: alone, unpadded
        for name, value in alone.items():
            length = int(table[f"length/{name}"][i])
            assert length == value.shape[1] and table[name].dtype == value.dtype  # masks stay int64
            assert torch.equal(table[name][i : i + 1, :length], value), (caption, name)
            assert not table[name][i, length:].any()  # right-padded with zeros (mask 0)
    lengths = [int(t[f"length/{MASK[modality]}"][i]) for t, i in rows]
    assert len(set(lengths)) == 4 and text[0][MASK[modality]].shape[1] != text[1][MASK[modality]].shape[1]


# -- resume and the CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_a_killed_cache_run_resumes_from_the_last_complete_shard(pipelines, data, tmp_path, monkeypatch, modality):
    cfg = make_cfg(pipelines, data, tmp_path, modality)  # 6 records, 2 per shard: 3 latent shards of 4 clips
    _, plain = uncached(cfg)
    calls, encode, save = [], plain.vae.encode, cw.save_atomic  # save: restored after the kill
    plain.vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)

    kill_after_first_latent_shard(monkeypatch, cw, tmp_path / "cache")
    with pytest.raises(Killed):
        cw.write_cache(cfg, plain)
    assert sum(calls) == 8 and not (tmp_path / "cache" / "index.json").exists()  # shard 0 written, shard 1 lost
    monkeypatch.setattr(cw, "save_atomic", save)
    calls.clear()
    stats = cw.write_cache(cfg, plain)
    assert sum(calls) == 8 and stats["written"] == 2 + 3 and stats["reused"] == 1  # shards 1, 2 + 2 text + null
    calls.clear()
    assert cw.write_cache(cfg, plain)["written"] == 0 and calls == []  # complete: nothing re-encoded
    _, cached, _ = build_modality(cfg)
    batch = cached.collate(data["records"], "pair")
    mels = plain.collate(data["records"], "pair").inputs["pixel_values"]
    torch.testing.assert_close(batch.inputs["latent_mean"], plain.latents.latent_dist(mels)[0], rtol=0, atol=2e-3)


def write_yaml(tmp_path, pipelines, data, modality, **diffusion):
    import yaml

    cfg = {"modality": modality, "model": {"path": str(pipelines[modality])},
           "data": {"train": str(data["train"]), "format": "audio_pairs"}, "audio": {"seconds": 0.32},
           "diffusion": {"caption_dropout": 0.5, "cache_dir": str(tmp_path / "cache"), **diffusion},
           "loss": {"name": "dpo", "beta": 2000.0}, "optim": {"name": "adamw", "lr": 1e-4},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 3, "log_every": 1,
                     "progress": False, "tensorboard": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_cli_caches_then_trains_without_the_vae_or_text_encoders(pipelines, data, tmp_path, monkeypatch, capsys,
                                                                   modality):
    config = write_yaml(tmp_path, pipelines, data, modality)
    assert main(["cache", str(config)]) == 0
    assert "6 train records, 4 unique captions" in capsys.readouterr().out
    from diffusers import AudioLDM2ProjectionModel, AutoencoderKL
    from transformers import ClapModel, GPT2LMHeadModel, T5EncoderModel

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached run loaded a frozen encoder")

    for cls in (AutoencoderKL, T5EncoderModel, ClapModel, GPT2LMHeadModel, AudioLDM2ProjectionModel):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)
    assert main(["train", str(config)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference on the first step
    assert all(math.isfinite(r["loss"]) and r["mse/policy"] > 0 for r in rows)
    assert rows[1]["mse/policy"] != rows[1]["mse/ref"]  # the policy moved


# -- errors ----------------------------------------------------------------------------------------
def test_flips_random_crops_and_a_cache_of_other_mels_are_refused(pipelines, data, tmp_path, capsys):
    cfg = make_cfg(pipelines, data, tmp_path, "tango")
    for change, message in (({"random_flip": True}, "diffusion.random_flip: audio clips are never flipped"),
                            ({"crop": "random"}, "audio clips are not cropped at random")):
        with pytest.raises(ConfigError, match=message):
            uncached(dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, **change)))
    config = write_yaml(tmp_path, pipelines, data, "tango")
    assert main(["cache", str(config), "diffusion.random_flip=true"]) == 2
    assert "audio clips are never flipped" in capsys.readouterr().err
    assert main(["cache", str(config)]) == 0
    assert main(["train", str(config), "audio.seconds=0.64"]) == 2  # other mels than the cached ones
    assert "audio: cache {" in capsys.readouterr().err
    assert main(["train", str(config), "diffusion.resolution=64"]) == 0  # resolution means nothing for audio
    _, cached, _ = build_modality(make_cfg(pipelines, data, tmp_path, "tango"))
    with pytest.raises(dc.CacheError, match="caption 'a new prompt' is not in the cache"):
        cached.collate([dict(data["records"][0], prompt="a new prompt")], "pair")
    with pytest.raises(dc.CacheError, match="no text encoder"):
        cached.encode_text(["a dog barks"])
