"""The diffusion latent/text cache (`mmalign cache`: mmalign/modalities/cache_writer.py writes, diffusion_cache.py reads) on
tiny SD1.5- and SDXL-shaped pipelines: cached == uncached on the same draw (Draw values, logps,
dpo loss), flipped latents, caption deduplication, resume after a kill, the index, several
processes, the CLI end to end (no VAE or text encoder loaded), and mismatches."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import needs_torchrun, torchrun
from diffusion_fixtures import (Killed, kill_after_first_latent_shard, perturbed, save_tiny_pipeline, two_writers,
                                uncached, write_image, write_image_pairs)
from safetensors.torch import load_file

import mmalign.modalities.cache_writer as cw
import mmalign.modalities.diffusion_cache as dc
from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.data.preference import read_records
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality
from mmalign.modalities.diffusion import example_generators
from mmalign.types import Draw


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_pipelines")
    return {"sd": save_tiny_pipeline(root / "sd"), "sdxl": save_tiny_pipeline(root / "sdxl", sdxl=True, seed=1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 pairs (3 unique captions), two of them non-square (wide 40×20 and tall 16×30), and 2
    held-out pairs; relative paths."""
    root = tmp_path_factory.mktemp("cache_data")
    records = write_image_pairs(root, 6)
    for i in range(3):
        records[i]["prompt"] = records[i + 3]["prompt"] = ["a red circle", "a blue square", "a green star"][i]
    write_image(root / "images" / "wide.png", 40, 20, 7), write_image(root / "images" / "tall.png", 16, 30, 8)
    records[1].update(chosen="images/wide.png", rejected="images/tall.png")
    records[4].update(rejected="images/wide.png")
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    held.write_text("".join(json.dumps(dict(r, prompt="a held out prompt")) + "\n" for r in records[2:4]))
    return {"train": train, "eval": held, "root": root}


def make_cfg(pipelines, data, tmp_path, modality="sd", eval_=False, **diffusion):
    d = {"resolution": 16, "caption_dropout": 0.5, "random_flip": True, "cache_dir": str(tmp_path / "cache"),
         "cache_shard_size": 2, **diffusion}
    return from_dict(Config, {"modality": modality, "model": {"path": str(pipelines[modality])},
                              "data": {"train": str(data["train"]), "eval": str(data["eval"]) if eval_ else ""},
                              "diffusion": d, "train": {"progress": False}})


# β 5000 multiplies logp differences: fp32 text embeddings differ from the uncached ones in the last bits (the
# text encoder runs on another batch: G prompts vs the unique captions), ~1e-7 of logp -> ~5e-4 of loss; the
# fp16 rounding of latents and embeddings (~1e-4 of logp, mostly shared by policy and reference) -> ~1e-2.
LOSS_TOL_FP32, LOSS_TOL_FP16 = 1e-3, 2e-2


def train_records(data):
    return [dict(r, _index=i) for i, r in enumerate(read_records(data["train"]))]


# -- cached == uncached ----------------------------------------------------------------------
@pytest.mark.parametrize("modality,dtype,null_prompt", [
    ("sd", "float32", "empty"), ("sdxl", "float32", "empty"), ("sdxl", "float16", "zeros"), ("sd", "float16", "empty"),
])
def test_cached_and_uncached_draw_give_the_same_values_logps_and_loss(pipelines, data, tmp_path, modality, dtype,
                                                                      null_prompt):
    cfg = make_cfg(pipelines, data, tmp_path, modality, cache_dtype=dtype, null_prompt=null_prompt)
    unet, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    unet_c, cached, _ = build_modality(cfg)
    assert type(cached.latents).__name__ == "CachedLatents" and type(cached.conditioning).__name__ == "CachedText"
    assert cached.family.name == modality
    records = train_records(data)
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    exact = dtype == "float32"
    tol = {"rtol": 0, "atol": 1e-6} if exact else {"rtol": 0, "atol": 3e-3}
    policy = perturbed(unet)
    flips = set()
    for seed in range(2):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        generators = example_generators(batch.index, torch.Generator().manual_seed(seed))
        flips.update(plain.draw_choices("pair", 12, generators)[1].tolist())
        assert v.keys() == w.keys()
        for key in ("noise", "timesteps", "caption_dropped") + (("time_ids",) if modality == "sdxl" else ()):
            assert torch.equal(v[key], w[key]), key  # the same random choices and micro-conditioning
        for key in v.keys() - {"noise", "timesteps", "caption_dropped", "time_ids"}:
            torch.testing.assert_close(w[key], v[key], **tol, msg=key)
        if exact:
            assert torch.equal(w["latents"], v["latents"])  # the VAE posterior itself is stored exactly
        ref, ref_c = plain.logps(unet, batch, Draw(v)), cached.logps(unet_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6 if exact else 5e-4)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        loss = dpo_loss(pol.pairs(), ref.pairs(), beta=5000.0)
        loss_c = dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=5000.0)
        assert (loss - math.log(2)).abs().max() > 1e-2  # the policy differs from the reference
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=LOSS_TOL_FP32 if exact else LOSS_TOL_FP16)
    assert flips == {True, False}  # both the cached flipped and unflipped latents were used


def test_flipped_latent_is_the_vae_encoding_of_the_flipped_crop(pipelines, data, tmp_path):
    """Random crops fixed at cache time: the stored crop, its mirrored left, and both latents."""
    cfg = make_cfg(pipelines, data, tmp_path, crop="random", cache_dtype="float32")
    _, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    shard = load_file(str(tmp_path / "cache" / "train" / "latents-00000.safetensors"))  # records 0, 1
    # record 1: chosen wide 40×20 -> resized 32×16 (crop left in 0..16), rejected tall 16×30 -> 16×30
    assert shard["original_size"].tolist() == [[16, 16], [16, 16], [20, 40], [30, 16]]
    top, left = shard["crop_top_left"][2].tolist()
    assert top == 0 and 0 <= left <= 16 and shard["crop_top_left_flipped"][2].tolist() == [0, 32 - left - 16]
    from PIL import Image

    from mmalign.modalities.diffusion import resize_shortest, to_pixels

    pixels = to_pixels(resize_shortest(Image.open(data["root"] / "images" / "wide.png").convert("RGB"), 16))
    crop = pixels[:, top : top + 16, left : left + 16][None]
    mean, std = plain.latents.latent_dist(crop)
    mean_f, std_f = plain.latents.latent_dist(crop.flip(-1))
    torch.testing.assert_close(shard["mean"][2:3], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(shard["std"][2:3], std, rtol=0, atol=1e-6)
    torch.testing.assert_close(shard["mean_flipped"][2:3], mean_f, rtol=0, atol=1e-6)
    torch.testing.assert_close(shard["std_flipped"][2:3], std_f, rtol=0, atol=1e-6)
    assert not torch.allclose(mean_f, mean.flip(-1), atol=1e-3)  # the VAE is not flip-equivariant: a second latent
    # The random crop is fixed per record: the same seed gives the same crops in a fresh cache.
    again = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir=str(tmp_path / "again")))
    cw.write_cache(again, plain)
    other = load_file(str(tmp_path / "again" / "train" / "latents-00000.safetensors"))
    assert torch.equal(other["crop_top_left"], shard["crop_top_left"])


def test_text_embeddings_are_deduplicated_by_caption(pipelines, data, tmp_path):
    cfg = make_cfg(pipelines, data, tmp_path, "sdxl", eval_=True, cache_dtype="float32", cache_shard_size=3)
    _, plain = uncached(cfg)
    stats = cw.write_cache(cfg, plain)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    captions = ["a red circle", "a blue square", "a green star", "a held out prompt"]
    assert stats["captions"] == 4 and index["captions"] == captions  # 8 records, 4 unique captions
    tables = [load_file(str(tmp_path / "cache" / f)) for f in index["text"]["files"]]
    hidden = torch.cat([t["encoder_hidden_states"] for t in tables])
    pooled = torch.cat([t["text_embeds"] for t in tables])
    assert hidden.shape == (4, 16, 80) and pooled.shape == (4, 24)  # k unique captions -> k rows
    expected = plain.encode_text(captions)
    torch.testing.assert_close(hidden, expected["encoder_hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected["text_embeds"], rtol=0, atol=1e-6)
    null = load_file(str(tmp_path / "cache" / index["text"]["null"]))
    torch.testing.assert_close(null["text_embeds"], plain.encode_text([""])["text_embeds"], rtol=0, atol=1e-6)


# -- resume, index, processes ----------------------------------------------------------------
def count_vae_images(likelihood):
    calls = []
    encode = likelihood.vae.encode
    likelihood.vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    return calls


def test_a_killed_run_resumes_from_the_last_complete_shard(pipelines, data, tmp_path, monkeypatch):
    cfg = make_cfg(pipelines, data, tmp_path)  # 6 records, 2 per shard: 3 latent shards of 4 images (+ 4 flipped)
    _, plain = uncached(cfg)
    calls = count_vae_images(plain)
    save = cw.save_atomic

    kill_after_first_latent_shard(monkeypatch, cw, tmp_path / "cache")
    with pytest.raises(Killed):
        cw.write_cache(cfg, plain)
    assert sum(calls) == 16 and not (tmp_path / "cache" / "index.json").exists()  # shard 0 done, shard 1 encoded
    monkeypatch.setattr(cw, "save_atomic", save)
    calls.clear()
    stats = cw.write_cache(cfg, plain)
    assert sum(calls) == 16  # shards 1 and 2 only: 4 images + 4 flipped each; shard 0 not re-encoded
    assert stats["written"] == 2 + 3 and stats["reused"] == 1  # latent shards 1, 2 + text shards 0, 1 + null
    calls.clear()
    assert cw.write_cache(cfg, plain)["written"] == 0 and calls == []  # a complete cache: nothing to do
    _, cached, _ = build_modality(cfg)
    torch.testing.assert_close(cached.collate(train_records(data), "pair").inputs["latent_mean"],
                               plain.latents.latent_dist(plain.latents.augment(plain.collate(train_records(data), "pair").inputs,
                                                               torch.zeros(12, dtype=torch.bool),
                                                               torch.zeros(12, 2))[0])[0], rtol=0, atol=2e-3)


def test_two_processes_split_the_shards_and_the_index_lists_every_record_once(pipelines, data, tmp_path):
    cfg = make_cfg(pipelines, data, tmp_path, eval_=True, cache_shard_size=1)
    _, plain = uncached(cfg)
    stats = two_writers(lambda rank, world, wait: cw.write_cache(cfg, plain, rank, world, wait), timeout=60)
    # 6 + 2 latent shards, 1 text shard... per caption (shard size 1): 4, and the null prompt: 13 files
    assert stats[0]["written"] + stats[1]["written"] == 13 and abs(stats[0]["written"] - stats[1]["written"]) <= 1
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    for name, n in (("train", 6), ("eval", 2)):
        split = index["splits"][name]
        covered = [row for s in split["shards"] for row in range(s["start"], s["end"])]
        assert sorted(covered) == list(range(n)) and split["num_records"] == n  # every record exactly once
        stored = torch.cat([load_file(str(tmp_path / "cache" / s["file"]))["record_index"] for s in split["shards"]])
        assert stored.tolist() == list(range(n))
    _, cached, _ = build_modality(dataclasses.replace(cfg))
    held = [dict(r, _index=i) for i, r in enumerate(read_records(data["eval"]))]
    assert [cached.latents.cache.locate(r, "pair", "")[0][0] for r in held] == ["eval", "eval"]  # not train rows 0, 1
    batch = cached.collate(held, "pair")
    assert batch.inputs["caption_rows"].tolist() == [3, 3, 3, 3]


# -- the CLI end to end: no VAE, no text encoder -----------------------------------------------
def write_yaml(tmp_path, pipelines, data, **diffusion):
    import yaml

    cfg = {"modality": "sdxl", "model": {"path": str(pipelines["sdxl"])}, "data": {"train": str(data["train"])},
           "diffusion": {"resolution": 16, "random_flip": True, "cache_dir": str(tmp_path / "cache"), **diffusion},
           "loss": {"name": "dpo", "beta": 5000.0}, "optim": {"name": "adamw", "lr": 1e-4},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "log_every": 1,
                     "progress": False, "tensorboard": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_caches_then_trains_without_loading_the_vae_or_text_encoders(pipelines, data, tmp_path, monkeypatch,
                                                                          capsys):
    config = write_yaml(tmp_path, pipelines, data)
    assert main(["cache", str(config)]) == 0
    assert "6 train records, 3 unique captions" in capsys.readouterr().out
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached run loaded a frozen encoder")

    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)
    from mmalign.config import load_config

    unet, likelihood, _ = build_modality(load_config(config))
    assert likelihood.vae is None and likelihood.text_encoders == [] and unet is not None
    assert main(["train", str(config)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference on the first step
    assert all(math.isfinite(r["loss"]) and r["mse/policy"] > 0 for r in rows)


# -- mismatches --------------------------------------------------------------------------------
def test_a_cache_that_does_not_match_the_data_is_a_clear_error(pipelines, data, tmp_path, capsys):
    config = write_yaml(tmp_path, pipelines, data)
    assert main(["train", str(config)]) == 2
    assert "no complete cache" in capsys.readouterr().err
    assert main(["cache", str(config)]) == 0
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(data["train"].read_text().splitlines(keepends=True)[:4]))
    assert main(["train", str(config), f"data.train={fewer}"]) == 2
    assert "train: cache has 6 records, data has 4" in capsys.readouterr().err
    assert main(["train", str(config), "diffusion.resolution=32"]) == 2
    assert "resolution: cache 16, config 32" in capsys.readouterr().err
    assert main(["cache", str(config), "diffusion.cache_dtype=float32"]) == 2  # same folder, other settings
    assert "settings.dtype: 'float16' -> 'float32'" in capsys.readouterr().err
    from mmalign.config import load_config

    _, cached, _ = build_modality(load_config(config))
    records = train_records(data)
    moved = dict(records[2], _index=0)  # a record at another row is still found, by its images' keys
    torch.testing.assert_close(cached.collate([moved], "pair").inputs["latent_mean"],
                               cached.collate([records[2]], "pair").inputs["latent_mean"], rtol=0, atol=0)
    with pytest.raises(dc.CacheError, match="row 0: its image"):
        cached.collate([dict(records[0], chosen="images/3_c.png", rejected="images/other.png")], "pair")
    with pytest.raises(dc.CacheError, match="caption 'a new caption' is not in the cache"):
        cached.collate([dict(records[0], prompt="a new caption")], "pair")


def test_unsupported_setups_are_config_errors(pipelines, data, tmp_path):
    cfg = make_cfg(pipelines, data, tmp_path, random_flip=False)
    _, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    flipped = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, random_flip=True))
    with pytest.raises(dc.CacheError, match="holds no flipped latents"):
        build_modality(flipped)
    sampling = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, validate_every=1))
    with pytest.raises(ConfigError, match="validate_every samples images with the VAE"):
        build_modality(sampling)  # validation images need the encoders a cached run does not load
    with pytest.raises(ConfigError, match="cache_shard_size must be >= 1"):
        from mmalign.config import validate

        validate(dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_shard_size=0)))



@needs_torchrun
def test_mmalign_cache_under_torchrun_splits_the_shards_between_two_processes(pipelines, data, tmp_path):
    config = write_yaml(tmp_path, pipelines, data, cache_shard_size=2)
    run = torchrun(["cache", str(config)])
    assert run.returncode == 0, run.stderr[-3000:]
    # latent shards 0, 1, 2 and text shards 0, 1 + the null prompt, dealt round-robin per phase: the main
    # process wrote latent shards 0, 2, text shard 0 and the null prompt
    assert "shards of this process: 4 written, 0 already there; 2 process(es)" in run.stdout
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == [
        "latents-00000.safetensors", "latents-00001.safetensors", "latents-00002.safetensors", "null.safetensors",
        "text-00000.safetensors", "text-00001.safetensors"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [(s["start"], s["end"]) for s in index["splits"]["train"]["shards"]] == [(0, 2), (2, 4), (4, 6)]
