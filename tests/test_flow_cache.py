"""The latent / text cache for the flow families (sd3, flux, zimage): `mmalign cache` writes the
same shards as for the UNet families, and the cached likelihood (no VAE, no text encoder) gives
the uncached one's draw values and logps, with the flow objective's shift taken from the cached
latents' size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusion_fixtures import perturbed, uncached, write_image_pairs
from flow_fixtures import save_tiny_flow_pipeline
from zimage_fixtures import save_tiny_zimage_pipeline

import mmalign.modalities.cache_writer as cw
from mmalign.cli import main
from mmalign.config import Config, from_dict
from mmalign.errors import CacheError
from mmalign.losses import dpo_loss
from mmalign.modalities import build_modality
from mmalign.types import Draw

MAKERS = {"sd3": lambda p: save_tiny_flow_pipeline(p), "flux": lambda p: save_tiny_flow_pipeline(p, flux=True),
          "zimage": lambda p: save_tiny_zimage_pipeline(p)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 pairs with 2 unique captions (relative image paths)."""
    import json

    root = tmp_path_factory.mktemp("flow_cache_data")
    records = write_image_pairs(root, 4)
    for i, record in enumerate(records):
        record["prompt"] = ["a red circle", "a blue square"][i % 2]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return [dict(r, _index=i) for i, r in enumerate(records)], root / "train.jsonl"


def make_cfg(modality, pipeline, train, cache_dir):
    return from_dict(Config, {"modality": modality, "model": {"path": str(pipeline)}, "data": {"train": str(train)},
                              "diffusion": {"resolution": 16, "caption_dropout": 0.5, "cache_dir": str(cache_dir),
                                            "cache_dtype": "float32", "cache_shard_size": 2},
                              "train": {"progress": False}})


@pytest.mark.parametrize("modality", ["sd3", "flux", "zimage"])
def test_cached_flow_likelihood_equals_the_uncached_one(modality, data, tmp_path):
    records, train = data
    cfg = make_cfg(modality, MAKERS[modality](tmp_path / modality), train, tmp_path / "cache")
    model, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and type(cached.latents).__name__ == "CachedLatents"
    assert cached.objective.shift == plain.objective.shift  # the shift of the cached latents' token count
    stored = set(cached.latents.cache.file(cached.latents.cache.index["text"]["files"][0]).keys())
    # Z-Image's 512-padded states are stored at each prompt's real length (modalities/ragged.py)
    assert ("ragged/prompt_embeds" in stored) == (modality == "zimage") and "prompt_embeds" not in stored
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy = perturbed(model)
    dropped = set()
    for seed in range(3):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in ("noise", "sigmas", "timesteps", "caption_dropped", "latents"):
            assert torch.equal(v[key], w[key]), key  # the same σ, ε and latent sample (fp32 cache: exact)
        for key in v.keys() - {"noise", "sigmas", "timesteps", "caption_dropped", "latents"}:
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-6, msg=key)
        dropped.update(v["caption_dropped"].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=2000.0),
                                   dpo_loss(pol.pairs(), ref.pairs(), beta=2000.0), rtol=0, atol=1e-3)
    assert dropped == {True, False}  # dropped captions came from the cached null prompt


def test_mmalign_cache_then_train_a_flow_family_from_the_cache(data, tmp_path, monkeypatch):
    """The CLI end to end: `mmalign cache` (no transformer loaded), then `mmalign train` reads it."""
    import diffusers

    _, train = data
    pipeline = save_tiny_flow_pipeline(tmp_path / "flux", flux=True)
    sets = [f"model.path={pipeline}", f"data.train={train}", f"diffusion.cache_dir={tmp_path / 'cache'}",
            "diffusion.resolution=16", "model.dtype=float32", "train.max_steps=2", "train.batch_size=2",
            f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false",
            "model.gradient_checkpointing=false", 'train.mixed_precision="no"',
            "train.grad_accum=1", "modality=flux", "data.format=auto"]
    with monkeypatch.context() as m:  # the cache needs the VAE and text encoders only
        m.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
        assert main(["cache", "configs/tiny/flow_dpo.yaml", *sets]) == 0
    assert main(["train", "configs/tiny/flow_dpo.yaml", *sets]) == 0
    cfg = make_cfg("flux", pipeline, train, tmp_path / "other")
    with pytest.raises(CacheError, match="no complete cache"):
        build_modality(dataclasses.replace(cfg))
