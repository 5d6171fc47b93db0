"""The Wan image-to-video cache (mmalign/families/_wan_i2v_cache.py) on tiny WanImageToVideoPipeline folders
(tests/wan_fixtures.py): cached == uncached (every draw value, logps, the DPO loss and its gradients) for Wan 2.1
I2V (CLIP image states) and Wan 2.2 I2V A14B (two experts, none); the cached likelihood holds no VAE, UMT5 or
CLIP module; a killed `mmalign cache` resumes to the uninterrupted cache; a changed record and a cache of the
other I2V kind are refused; the CLI caches, then trains with the encoder folders deleted."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch
from diffusion_fixtures import (Killed, dpo_and_grads, kill_after_first_latent_shard, perturbed, two_writers,
                               uncached)
from PIL import Image
from wan_fixtures import ROOT, copy_video_sample, i2v_records, save_tiny_wan_i2v_versions

import mmalign.modalities.cache_writer as cw
from mmalign.cli import main
from mmalign.config import Config, from_dict
from mmalign.errors import CacheError
from mmalign.families._wan_i2v_cache import CachedI2V, write_i2v_cache
from mmalign.modalities import build_modality
from mmalign.types import Draw

EXACT = ("noise", "sigmas", "timesteps", "caption_dropped")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_i2v_cache")
    return save_tiny_wan_i2v_versions(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shipped video pairs with a relative `source_image` each (its chosen clip's first frame)."""
    root = tmp_path_factory.mktemp("i2v_pairs")
    train = copy_video_sample(root)
    (root / "sources").mkdir()
    for i, record in enumerate(i2v_records(root / "frames0")):
        Image.open(record["source_image"]).save(root / "sources" / f"{i}.png")
    lines = train.read_text().splitlines()
    rows = [dict(json.loads(line), source_image=f"sources/{i}.png") for i, line in enumerate(lines)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train


def config(pipeline, train, cache_dir, **diffusion):
    return from_dict(Config, {"modality": "wan", "model": {"path": str(pipeline)}, "data": {"train": str(train)},
                              "diffusion": dict({"resolution": 16, "num_frames": 5, "caption_dropout": 0.5,
                                                 "cache_dir": str(cache_dir), "cache_dtype": "float32",
                                                 "cache_shard_size": 2}, **diffusion),
                              "train": {"progress": False}})


def records_of(train):
    return [dict(json.loads(line), _root=str(train.parent), _index=i) for i, line in enumerate(open(train))]


def modules_held(obj, seen=None) -> list[str]:
    """Class names of every torch module reachable from `obj` through mmalign objects' attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [type(obj).__name__]
    if isinstance(obj, (list, tuple)):
        return [m for x in obj for m in modules_held(x, seen)]
    if isinstance(obj, dict):
        return [m for x in obj.values() for m in modules_held(x, seen)]
    if type(obj).__module__.startswith("mmalign") and hasattr(obj, "__dict__"):
        return [m for x in vars(obj).values() for m in modules_held(x, seen)]
    return []


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_cached_i2v_likelihood_equals_the_uncached_one(folders, data, version, tmp_path):
    """Same draws (t, ε, η, dropped captions) and, to 1e-5, the same latents, first-frame condition, CLIP
    states and prompt states; the same reference logps, DPO loss and policy gradients; no module held."""
    cfg = config(folders[version], data, tmp_path / "cache")
    model, plain = uncached(cfg)
    stats = write_i2v_cache(cfg, plain)
    assert stats["written"] == 2 + 2 + 1 and stats["reused"] == 0  # 2 video shards, 4 captions in 2, the null
    model_c, cached, _ = build_modality(cfg)
    clip = ["CLIPVisionModel"] if version == "2.1" else []
    frozen = sorted(set(modules_held(plain)) - {"WanTransformer3DModel"})
    assert frozen == ["AutoencoderKLWan", *clip, "UMT5EncoderModel"]
    assert modules_held(cached) == [] and cached.vae is None and cached.text_encoders == []
    assert isinstance(cached.conditioning, CachedI2V) and cached.objective.shift == plain.objective.shift
    records = records_of(data)
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy = perturbed(model, 1e-2)
    policy_c = copy.deepcopy(policy)
    dropped = set()
    for seed in range(4):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys() and ("image_embeds" in v) == (version == "2.1")
        for key in EXACT:
            assert torch.equal(v[key], w[key]), key
        for key in v.keys() - set(EXACT):
            assert v[key].shape == w[key].shape, key
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-5, msg=key)
        assert w["condition"][:, :4, 0].eq(1).all() and w["condition"][:, :4, 1:].eq(0).all()  # the mask
        dropped.update(v["caption_dropped"].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        loss, grads = dpo_and_grads(plain, policy, model, batch, Draw(v), 500.0)
        loss_c, grads_c = dpo_and_grads(cached, policy_c, model_c, batch_c, Draw(w), 500.0)
        assert abs(float(loss) - math.log(2)) > 1e-3  # the policy moved: a real log-ratio
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-4)
        assert grads.keys() == grads_c.keys() and grads
        for name, grad in grads.items():  # fp32 rounding of batched vs one-by-one encoding, amplified by β
            error = float((grads_c[name] - grad).norm())
            assert error <= 1e-3 * float(grad.norm()) + 1e-5 * grad.numel() ** 0.5, (name, error)
    assert dropped == {True, False}  # both the prompt's and the null prompt's cached states were read


def test_a_killed_i2v_cache_run_resumes_to_the_uninterrupted_cache(folders, data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = config(folders["2.1"], data, tmp_path / "killed")
    _, plain = uncached(cfg)
    kill_after_first_latent_shard(monkeypatch, cw, tmp_path / "killed")
    with pytest.raises(Killed):
        write_i2v_cache(cfg, plain)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert not (killed / "index.json").exists() and (killed / "i2v" / "train-00000.safetensors").is_file()
    assert not (killed / "i2v" / "train-00001.safetensors").exists()
    with pytest.raises(CacheError, match="did not finish"):
        build_modality(cfg)
    first = (killed / "train" / "latents-00000.safetensors").stat().st_mtime_ns
    stats = write_i2v_cache(cfg, plain)
    assert stats["written"] == 1 + 3 and stats["reused"] == 1  # shard 1 and the text tables; shard 0 kept
    assert (killed / "train" / "latents-00000.safetensors").stat().st_mtime_ns == first
    whole = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir=str(tmp_path / "whole")))
    write_i2v_cache(whole, plain)
    names = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*.safetensors"))
    assert names == sorted(str(p.relative_to(killed)) for p in killed.rglob("*.safetensors"))
    assert "i2v/train-00001.safetensors" in names
    for name in names:
        a, b = load_file(str(killed / name)), load_file(str(tmp_path / "whole" / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    index = json.loads((killed / "index.json").read_text())
    assert index["i2v"]["train"] == ["i2v/train-00000.safetensors", "i2v/train-00001.safetensors"]


def test_two_processes_write_the_one_process_cache(folders, data, tmp_path):
    """Two writers (threads standing for processes, each with its own encoders: the Wan VAE caches features
    while it encodes; shard size 1) split the 4 video and 5 text tasks and leave the files one writer leaves,
    bit for bit, with every record's source row in the index."""
    from safetensors.torch import load_file

    cfg = config(folders["2.1"], data, tmp_path / "two", cache_shard_size=1)
    likelihoods = [uncached(cfg)[1], uncached(cfg)[1]]
    stats = two_writers(lambda rank, world, wait: write_i2v_cache(cfg, likelihoods[rank], rank, world, wait))
    assert stats[0]["written"] + stats[1]["written"] == 4 + 4 + 1 and stats[0]["written"] in (4, 5)
    one = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir=str(tmp_path / "one")))
    write_i2v_cache(one, likelihoods[0])
    names = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*.safetensors"))
    assert len(names) == 4 + 4 + 4 + 1  # latents, i2v, text shards, null
    assert names == sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*.safetensors"))
    for name in names:
        a, b = load_file(str(tmp_path / "two" / name)), load_file(str(tmp_path / "one" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert index["i2v"]["train"] == [f"i2v/train-{k:05d}.safetensors" for k in range(4)]


def test_a_changed_record_or_another_i2v_kind_is_refused(folders, data, tmp_path):
    cfg = config(folders["2.1"], data, tmp_path / "cache")
    write_i2v_cache(cfg, uncached(cfg)[1])
    _, cached, _ = build_modality(cfg)
    record = records_of(data)[2]
    cached.collate([record], "pair")  # as cached: fine
    with pytest.raises(CacheError, match=r"^row 2: its source_image differs from the cache .*rerun mmalign cache"):
        cached.collate([dict(record, source_image="sources/0.png")], "pair")
    with pytest.raises(CacheError, match=r"^row 2: caption 'a red circle' is not in the cache"):
        cached.collate([dict(record, prompt="a red circle")], "pair")
    with pytest.raises(CacheError, match="image_embeds: cache True, config False"):  # 2.2 takes no CLIP states
        build_modality(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(folders["2.2"]))))


def test_cli_caches_then_trains_without_vae_text_or_image_encoder(folders, data, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = [f"data.train={data}", f"diffusion.cache_dir={cache}", "train.progress=false",
              "diffusion.random_flip=false"]
    tiny = str(ROOT / "configs" / "tiny" / "wan_dpo.yaml")
    assert main(["cache", tiny, f"model.path={folders['2.1']}", *common]) == 0
    assert "4 train records, 4 unique captions" in capsys.readouterr().out
    bare = shutil.copytree(folders["2.1"], tmp_path / "bare")
    for part in ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"):
        shutil.rmtree(bare / part)  # training from the cache must not need them
    run = tmp_path / "run"
    assert main(["train", tiny, f"model.path={bare}", *common, "train.max_steps=2", f"train.output_dir={run}",
                 "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
