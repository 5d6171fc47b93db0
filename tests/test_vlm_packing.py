"""Padding-free VLM batches (`data.padding_free`, mmalign/modalities/packing.py `pack_inputs`): one
packed row gives the padded batch's answer log-probs and gradients where the model's positions
follow the packed row (LLaVA, LLaVA-NeXT); where they do not (Qwen2.5-VL's 3-D M-RoPE), the
once-per-model check falls back to padded batches with a warning, so the log-probs stay exact."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from vlm_family_fixtures import BUILDERS

from mmalign.modalities.llava import LlavaLikelihood


@pytest.fixture(scope="module")
def shape_records(tmp_path_factory):
    from mmalign.toyvlm import make_shape_pairs

    path = make_shape_pairs(6, 0, tmp_path_factory.mktemp("shapes"))
    rows = [json.loads(line) for line in open(path)]
    # uneven answers: padding in every batch
    rows = [dict(r, chosen=r["chosen"] + " ." * (i % 3), _index=i, _root=str(path.parent)) for i, r in enumerate(rows)]
    return rows[:3]


def logps_and_grads(name, records, padding_free, chunk):
    model, processor = BUILDERS[name]()
    lik = LlavaLikelihood(processor, model.config, max_length=256, lm_head_chunk=chunk, padding_free=padding_free)
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lik.logps(model, lik.collate(records, "pair"))
    out.logps.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.logps.detach(), grads, lik.pack_ok, [str(w.message) for w in caught]


@pytest.mark.parametrize("name,packs", [("llava", True), ("llava_next", True), ("qwen2_5_vl", False)])
@pytest.mark.parametrize("chunk", [0, 4])
def test_packed_row_equals_the_padded_batch_or_falls_back(name, packs, chunk, shape_records):
    padded, g_padded, ok_padded, _ = logps_and_grads(name, shape_records, False, chunk)
    packed, g_packed, ok, warned = logps_and_grads(name, shape_records, True, chunk)
    assert ok_padded == {} and list(ok.values()) == [packs]
    assert any("data.padding_free" in w for w in warned) == (not packs)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert g_packed.keys() == g_padded.keys() and g_padded
    for k in g_padded:
        torch.testing.assert_close(g_packed[k], g_padded[k], rtol=1e-4, atol=1e-6, msg=k)
