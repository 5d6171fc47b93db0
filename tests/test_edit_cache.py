"""The edit families' cache (mmalign/modalities/edit_cache.py) on the tiny Qwen-Image-Edit and
FLUX.1-Kontext pipelines: cached == uncached (every draw value, logps, the DPO loss and its gradients
on the same draws, with dropped captions and sources of two sizes), a killed `mmalign cache` resumes
to the uninterrupted cache, a changed record is refused, and the CLI caches then trains with the VAE,
text encoder and processor folders deleted."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import Killed, dpo_and_grads, kill_after_first_latent_shard, perturbed, uncached, write_image
from flux_kontext_fixtures import save_tiny_flux_kontext_pipeline
from qwen_image_edit_fixtures import save_tiny_qwen_image_edit_pipeline, write_edit_pairs

import mmalign.modalities.cache_writer as cw
from mmalign.cli import main
from mmalign.config import Config, from_dict
from mmalign.errors import CacheError
from mmalign.modalities import build_modality
from mmalign.modalities.edit_cache import write_edit_cache
from mmalign.types import Draw

ROOT = Path(__file__).resolve().parents[1]
SAVERS = {"qwen_image_edit": save_tiny_qwen_image_edit_pipeline, "flux_kontext": save_tiny_flux_kontext_pipeline,
          "qwen_image_edit_plus": lambda path: save_tiny_qwen_image_edit_pipeline(path, pipeline="QwenImageEditPlusPipeline")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """4 edit pairs of 32×32 PNGs; record 1's source is 96×32 (another source grid in the batch)."""
    root = tmp_path_factory.mktemp("edit_pairs")
    path = write_edit_pairs(root, 4)
    write_image(root / "images" / "1_source.png", 96, 32, seed=99)
    return path


@pytest.fixture(scope="module")
def plus_pairs(tmp_path_factory):
    """4 edit pairs of 64×64 PNGs; record 1 edits two sources (source_images)."""
    path = write_edit_pairs(tmp_path_factory.mktemp("plus_pairs"), 4, size=(64, 64))
    records = [json.loads(line) for line in open(path)]
    records[1]["source_images"] = [records[1].pop("source_image"), records[0]["source_image"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(modality: str, pipeline: Path, data: Path, cache_dir: Path, **diffusion):
    return from_dict(Config, {"modality": modality, "model": {"path": str(pipeline)}, "data": {"train": str(data)},
                              "diffusion": dict({"resolution": 32, "caption_dropout": 0.5, "cache_dir": str(cache_dir),
                                                 "cache_dtype": "float32", "cache_shard_size": 2}, **diffusion),
                              "train": {"progress": False}})


def records_of(path: Path) -> list[dict]:
    return [dict(json.loads(line), _index=i) for i, line in enumerate(open(path))]


@pytest.mark.parametrize("modality", ["qwen_image_edit", "flux_kontext", "qwen_image_edit_plus"])
def test_cached_edit_likelihood_equals_the_uncached_one(modality, pairs, plus_pairs, tmp_path):
    pipeline = SAVERS[modality](tmp_path / "pipeline")
    plus = modality == "qwen_image_edit_plus"  # 64 px: Plus's VL area is resolution²·(384/1024)²
    pairs, resolution = (plus_pairs, 64) if plus else (pairs, 32)
    cfg = config(modality, pipeline, pairs, tmp_path / "cache", resolution=resolution)
    model, plain = uncached(cfg)
    stats = write_edit_cache(cfg, plain)
    assert stats["written"] == 2 and stats["reused"] == 0  # 4 records, 2 per shard
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and cached.tokenizers == []
    assert type(cached.conditioning).__name__ == "CachedEdit" and cached.objective.shift == plain.objective.shift
    records = records_of(pairs)
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy = perturbed(model, 1e-2)
    policy_c = copy.deepcopy(policy)
    dropped, shapes = set(), set()
    for seed in range(4):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "sigmas", "timesteps", "caption_dropped", "latents", "source_shapes"):
            assert torch.equal(v[key], w[key]), key
        for key in v.keys() - {"noise", "sigmas", "timesteps", "caption_dropped", "latents", "source_shapes"}:
            assert v[key].shape == w[key].shape, key  # the same padding as the live batch
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-5, msg=key)
        dropped.update(v["caption_dropped"].tolist())
        shapes.update(tuple(map(tuple, s)) for s in v["source_shapes"].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        loss, grads = dpo_and_grads(plain, policy, model, batch, Draw(v), 200.0)
        loss_c, grads_c = dpo_and_grads(cached, policy_c, model_c, batch_c, Draw(w), 200.0)
        assert abs(float(loss) - math.log(2)) > 1e-3  # the policy moved: a real log-ratio
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-4)
        assert grads.keys() == grads_c.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert dropped == {True, False} and len(shapes) == 2  # two source grids (sizes, or Plus: 1 and 2 sources)


def test_a_killed_cache_run_resumes_to_the_uninterrupted_cache(pairs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    pipeline = save_tiny_flux_kontext_pipeline(tmp_path / "pipeline")
    cfg = config("flux_kontext", pipeline, pairs, tmp_path / "killed")
    _, plain = uncached(cfg)
    kill_after_first_latent_shard(monkeypatch, cw, tmp_path / "killed")
    with pytest.raises(Killed):
        write_edit_cache(cfg, plain)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert not (killed / "index.json").exists() and (killed / "edit" / "train-00000.safetensors").is_file()
    with pytest.raises(CacheError, match="did not finish"):
        build_modality(cfg)
    stats = write_edit_cache(cfg, plain)
    assert stats["written"] == 1 and stats["reused"] == 1
    whole = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir=str(tmp_path / "whole")))
    write_edit_cache(whole, plain)
    names = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*.safetensors"))
    assert names == sorted(str(p.relative_to(killed)) for p in killed.rglob("*.safetensors"))
    for name in names:
        a, b = load_file(str(tmp_path / "killed" / name)), load_file(str(tmp_path / "whole" / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    index = json.loads((tmp_path / "killed" / "index.json").read_text())
    assert index["edit"]["train"] == ["edit/train-00000.safetensors", "edit/train-00001.safetensors"]


def test_a_changed_record_is_refused(pairs, tmp_path):
    pipeline = save_tiny_qwen_image_edit_pipeline(tmp_path / "pipeline")
    cfg = config("qwen_image_edit", pipeline, pairs, tmp_path / "cache")
    write_edit_cache(cfg, uncached(cfg)[1])
    _, cached, _ = build_modality(cfg)
    record = records_of(pairs)[2]
    cached.collate([record], "pair")  # as cached: fine
    with pytest.raises(CacheError, match="row 2: its prompt or source image"):
        cached.collate([dict(record, prompt="make it blue")], "pair")
    with pytest.raises(CacheError, match="no complete cache"):
        build_modality(dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion,
                                                                              cache_dir=str(tmp_path / "none"))))


def test_cli_caches_then_trains_without_vae_or_text_encoder(tmp_path, capsys):
    pipeline = save_tiny_qwen_image_edit_pipeline(tmp_path / "pipeline")
    data = write_edit_pairs(tmp_path / "pairs", 4)
    cache = tmp_path / "cache"
    common = [f"data.train={data}", f"diffusion.cache_dir={cache}", "train.progress=false"]
    tiny = str(ROOT / "configs" / "tiny" / "qwen_image_edit_dpo.yaml")
    assert main(["cache", tiny, f"model.path={pipeline}", *common]) == 0
    assert "4 train records" in capsys.readouterr().out
    bare = shutil.copytree(pipeline, tmp_path / "bare")
    for part in ("vae", "text_encoder", "tokenizer", "processor"):
        shutil.rmtree(bare / part)  # training from the cache must not need them
    run = tmp_path / "run"
    assert main(["train", tiny, f"model.path={bare}", *common, "train.max_steps=2", "train.batch_size=2",
                 f"train.output_dir={run}", "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows)
