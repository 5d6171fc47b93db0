"""Text conditioning stored at each prompt's real length in the diffusion cache (mmalign/modalities/ragged.py):
the packing by hand, and the Wan cache on the tiny pipeline: the text table holds Σ ℓ_i rows (ℓ_i each caption's
UMT5 token count), not n × 512, and reads back exactly as the live encoder gives each caption (float32 cache);
cached == uncached training is pinned by tests/test_wan.py and tests/test_qwen_image.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from wan_fixtures import copy_video_sample, save_tiny_wan_pipeline

from mmalign.modalities.ragged import merge, pack, prefix_lengths, read_row, unpack


def test_pack_keeps_the_real_rows_and_reads_back_the_padded_tensor():
    """Rows of lengths 2, 0, 3 of a (3, 4, 2) tensor zero past them: 5 stored rows, offsets [0, 2, 2, 5],
    width 4; two chunks merge with rebased offsets; each row and the whole table read back exactly."""
    x = torch.zeros(3, 4, 2)
    x[0, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x[2, :3] = torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    packed = pack({"x": x, "mask": mask, "pooled": torch.ones(3, 5)}, ("x", "mask"), torch.tensor([2, 0, 3]))
    assert set(packed) == {"ragged/x", "offsets/x", "width/x", "ragged/mask", "offsets/mask", "width/mask", "pooled"}
    assert packed["ragged/x"].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert packed["offsets/x"].tolist() == [0, 2, 2, 5] and packed["width/x"].tolist() == [4]
    table = merge([pack({"x": x[:1], "mask": mask[:1]}, ("x", "mask"), torch.tensor([2])),
                   pack({"x": x[1:], "mask": mask[1:]}, ("x", "mask"), torch.tensor([0, 3]))])
    assert table["offsets/x"].tolist() == [0, 2, 2, 5]
    for i in range(3):
        row = read_row(table.__getitem__, list(table), i)
        assert torch.equal(row["x"], x[i : i + 1]) and torch.equal(row["mask"], mask[i : i + 1])
    whole = unpack(table)
    assert torch.equal(whole["x"], x) and torch.equal(whole["mask"], mask)
    with pytest.raises(ValueError, match="x is not zero past each prompt's real length"):
        pack({"x": x}, ("x",), torch.tensor([1, 0, 3]))
    assert prefix_lengths(mask).tolist() == [2, 0, 3]
    assert prefix_lengths(torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]])).tolist() == [4, 4]  # not a prefix: stored whole


def test_the_wan_cache_stores_each_caption_at_its_token_count(tmp_path):
    from safetensors import safe_open
    from test_wan import cache_config

    from mmalign.modalities import build_modality
    from mmalign.modalities.cache_writer import write_cache
    from mmalign.modalities.diffusion_cache import LatentCache

    pipeline = save_tiny_wan_pipeline(tmp_path / "pipeline")
    train = copy_video_sample(tmp_path / "data")
    cfg = cache_config(pipeline, train, tmp_path / "c")
    _, plain, _ = build_modality(dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, cache_dir="")))
    write_cache(cfg, plain)
    cache = LatentCache(tmp_path / "c")
    captions = cache.index["captions"]
    counts = plain.conditioning.encoder.tokenize(captions)["input_ids_mask"].sum(dim=1)
    assert counts.min() >= 2 and counts.max() < 512
    with safe_open(str(tmp_path / "c" / cache.index["text"]["files"][0]), framework="pt") as f:
        assert "encoder_hidden_states" not in f.keys()
        stored = f.get_tensor("ragged/encoder_hidden_states")
        assert stored.shape == (int(counts[: cache.index["text"]["shard_size"]].sum()), 32)  # Σ ℓ_i, not n x 512
    live = plain.encode_text(captions)["encoder_hidden_states"]
    read = cache.read_text(list(range(len(captions))))["encoder_hidden_states"]
    assert read.shape == live.shape == (len(captions), 512, 32)
    torch.testing.assert_close(read, live, rtol=0, atol=0)  # float32 cache: exact
    torch.testing.assert_close(cache.null["encoder_hidden_states"], plain.encode_text([""])["encoder_hidden_states"],
                               rtol=0, atol=0)
