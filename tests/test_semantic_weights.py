"""Sem-DPO weights (`mmalign build-pairs semantic-weights`, mmalign/builders/semantic.py; METHODS.md
B.5): W = exp(-alpha (1 - cos(e(x), e(y_w)))) on hand-made embeddings, mean pooling against an
unpadded forward, the CLI on a tiny BERT folder built from a transformers config, and the trainer
multiplying each example's loss by its weight."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.builders.semantic import build_semantic_weights, embed_texts, load_embedder, semantic_weights
from mmalign.errors import DataError
from mmalign.losses import dpo_loss, get_loss
from mmalign.types import LogpOutput

T = torch.tensor


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    """A 2-layer BERT (random weights, seeded) and the toy word tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertModel

    from mmalign.toytext import build_word_tokenizer

    tok = build_word_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    path = tmp_path_factory.mktemp("embedder")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def test_weights_hand_computed():
    # cos([1, 0], [1, 1]) = 1/sqrt(2) = 0.707107, d = 0.292893; alpha 2: exp(-0.585786) = 0.556668
    # orthogonal: d = 1, alpha 1: exp(-1) = 0.367879; same direction: d = 0, W = 1
    original = T([[1.0, 0.0], [1.0, 0.0], [2.0, 3.0]])
    chosen = T([[1.0, 1.0], [0.0, 5.0], [4.0, 6.0]])
    w = semantic_weights(original, chosen, alpha=2.0)
    assert w.tolist() == pytest.approx([0.556668, math.exp(-2.0), 1.0], abs=1e-6)
    assert float(semantic_weights(original[1:2], chosen[1:2], alpha=1.0)) == pytest.approx(0.367879, abs=1e-6)


def test_mean_pooling_ignores_padding(embedder_dir):
    model, tok = load_embedder(embedder_dir)
    texts = ["a red circle", "a blue square next to a green triangle"]
    batched = embed_texts(model, tok, texts)
    with torch.no_grad():
        ids = tok(texts[0], return_tensors="pt")["input_ids"]  # no padding: the plain mean over positions
        alone = model(input_ids=ids).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(batched[0], alone, rtol=1e-5, atol=1e-6)


def test_builder_multiplies_existing_weights_and_names_bad_rows(embedder_dir):
    model, tok = load_embedder(embedder_dir)
    records = [{"prompt": "a red circle", "chosen": "a red circle", "rejected": "x"},
               {"prompt": "a red circle", "chosen": "a blue square", "rejected": "x", "weight": 0.5}]
    rows = build_semantic_weights(records, model, tok, alpha=3.0)
    assert rows[0]["weight"] == pytest.approx(1.0, abs=1e-6)  # the chosen IS the original: d = 0
    e = embed_texts(model, tok, ["a red circle", "a blue square"])
    expected = math.exp(-3.0 * (1 - float(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0))))
    assert rows[1]["weight"] == pytest.approx(0.5 * expected, rel=1e-5) and expected < 1
    with pytest.raises(DataError, match="row 1 has no 'original'"):
        build_semantic_weights([dict(records[0], original="a"), records[1]], model, tok, alpha=1.0,
                               original_key="original")
    with pytest.raises(DataError, match="row 0 key 'chosen' is not text"):
        build_semantic_weights([{"prompt": "a", "chosen": 3}], model, tok, alpha=1.0)
    with pytest.raises(DataError, match="--alpha must be finite and >= 0"):
        build_semantic_weights(records, model, tok, alpha=-1.0)


def test_cli_writes_the_weight_column(embedder_dir, tmp_path, capsys):
    from mmalign.cli import main

    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": "a red circle", "chosen": c, "rejected": "a star"}
               for c in ("a red circle", "a red circle next to a star", "a green triangle")]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "weighted.jsonl"
    argv = ["build-pairs", "semantic-weights", "--pairs", str(pairs), "--out", str(out),
            "--embedder", str(embedder_dir), "--alpha", "2.0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in open(out)]
    model, tok = load_embedder(embedder_dir)
    expected = [r["weight"] for r in build_semantic_weights(records, model, tok, alpha=2.0)]
    assert [r["weight"] for r in rows] == pytest.approx(expected, abs=1e-7)
    assert rows[0]["weight"] == pytest.approx(1.0, abs=1e-6) and all(0 < r["weight"] <= 1 + 1e-6 for r in rows)
    assert "semantic-weights: 3 records" in capsys.readouterr().out
    with pytest.raises(DataError, match="not a model folder"):
        load_embedder(tmp_path)


def test_the_trainer_multiplies_each_example_loss_by_its_weight():
    from mmalign.config import LossConfig
    from mmalign.train.objective import RunningMean, preference_losses
    from mmalign.types import PreferenceBatch

    batch = PreferenceBatch("pair", {}, torch.arange(2), weights=T([0.25, 2.0]))
    policy, reference = LogpOutput(T([-1.0, -2.0, -3.0, -1.0])), LogpOutput(T([-2.0, -2.0, -2.0, -2.0]))
    losses, _ = preference_losses(get_loss("dpo"), LossConfig(), batch, policy, reference, lambda x: x, RunningMean())
    plain = dpo_loss(policy.pairs(), reference.pairs(), beta=0.1)
    torch.testing.assert_close(losses, plain * T([0.25, 2.0]))
