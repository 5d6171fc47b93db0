"""Chunked LM head (mmalign/modalities/lm_head.py, issue 20 item 1): answer-token log-probs and
their gradients equal the full-logits path, for plain, LoRA-on-head and soft-capped (Gemma)
models, with no (N, T, V) logits built."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.config import ModelConfig
from mmalign.modalities.causal_lm import CausalLMLikelihood
from mmalign.modalities.lm_head import LogitTransform, captured_hidden, chunked_token_logps, logit_transform


def tiny_llama(vocab=211, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return LlamaForCausalLM(cfg).float()


def tiny_gemma3(vocab=211):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           final_logit_softcapping=2.0, sliding_window=8)
    return Gemma3ForCausalLM(cfg).float()


class Tok:
    """Just what CausalLMLikelihood reads of a tokenizer (collate is bypassed here)."""

    pad_token_id, eos_token_id, padding_side = 0, 1, "right"


def batch(vocab=211, n=3, t=12):
    from mmalign.types import PreferenceBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (n, t), generator=g)
    attention = torch.ones(n, t, dtype=torch.long)
    attention[1, 9:] = 0  # a padded row
    loss_mask = torch.zeros(n, t, dtype=torch.long)
    loss_mask[:, 5:] = 1
    loss_mask *= attention
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "position_ids": position_ids}
    return PreferenceBatch(kind="unpaired", inputs=inputs, index=torch.arange(n))


def logps_and_grads(model, lik, b):
    model.zero_grad()
    out = lik.logps(model, b)
    (out.logps.sum() + out.token_logps.pow(2).sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3_softcap"])
@pytest.mark.parametrize("chunk", [1, 4, ModelConfig().lm_head_chunk, 1000])
def test_chunked_equals_full_logits_and_gradients(make, chunk):
    model, b = make(), batch()
    full, g_full = logps_and_grads(model, CausalLMLikelihood(Tok(), lm_head_chunk=0), b)
    lik = CausalLMLikelihood(Tok(), lm_head_chunk=chunk)
    lik.square_mass = True
    full_sq = CausalLMLikelihood(Tok(), lm_head_chunk=0)
    full_sq.square_mass = True
    mine, g_mine = logps_and_grads(model, lik, b)
    assert lik.checked == {id(model): (False, True)}
    torch.testing.assert_close(mine.token_logps, full.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.logps, full.logps, atol=1e-5, rtol=0)
    assert mine.token_logps[:, :4].abs().sum() == 0 and (mine.token_logps[:, 5:8] < 0).all()
    torch.testing.assert_close(mine.token_log_sq_mass, full_sq.logps(model, b).token_log_sq_mass, atol=1e-5, rtol=0)
    assert g_mine.keys() == g_full.keys()
    for k in g_full:
        torch.testing.assert_close(g_mine[k], g_full[k], atol=1e-5, rtol=1e-4)


def test_lora_on_the_head_is_used_and_the_head_is_put_back():
    import peft

    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                      init_lora_weights=False))
    b = batch()
    full, g_full = logps_and_grads(model, CausalLMLikelihood(Tok(), lm_head_chunk=0), b)
    mine, g_mine = logps_and_grads(model, CausalLMLikelihood(Tok(), lm_head_chunk=3), b)
    torch.testing.assert_close(mine.logps, full.logps, atol=1e-5, rtol=0)
    head_lora = [k for k in g_full if "lm_head.lora" in k]
    assert head_lora and all(torch.allclose(g_mine[k], g_full[k], atol=1e-5, rtol=1e-4) for k in g_full)
    assert type(base.lm_head).__name__ == "Linear" and "lora" in type(base.lm_head).__module__  # restored


def test_an_unknown_logit_transform_falls_back_to_full_logits():
    model, b = tiny_llama(), batch()
    original = model.forward

    def scaled(*args, **kwargs):  # a model that scales its logits in a way no config field says
        out = original(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    lik = CausalLMLikelihood(Tok(), lm_head_chunk=4)
    with pytest.warns(UserWarning, match="full logits"):
        out = lik.logps(model, b)
    assert lik.checked == {id(model): (False, False)}
    expected = CausalLMLikelihood(Tok(), lm_head_chunk=0).logps(model, b)
    torch.testing.assert_close(out.logps, expected.logps, atol=0, rtol=0)


def test_the_capture_sees_the_final_hidden_states_and_restores_the_head_on_error():
    model = tiny_llama()
    ids = torch.tensor([[3, 4, 5]])
    head = model.lm_head
    with captured_hidden(model) as (capture, real):
        assert model(input_ids=ids).logits.shape == (1, 3, 0)
    assert real is head and model.lm_head is head
    torch.testing.assert_close(head(capture.hidden), model(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="boom"), captured_hidden(model):
        raise RuntimeError("boom")
    assert model.lm_head is head


def test_transforms_from_configs_and_hand_values():
    assert logit_transform(tiny_gemma3().config) == LogitTransform(cap=2.0)
    assert logit_transform(tiny_llama().config) == LogitTransform()
    z = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(LogitTransform(scale=0.5, divide=2.0, cap=1.0)(z),
                               torch.tensor([0.0, 0.46211715726]))  # tanh(2 * 0.5 / 2 / 1) = tanh(0.5)
    # one hidden row, identity head over 3 "vocab" entries: log softmax by hand
    h = torch.tensor([[[0.0, 1.0, 2.0]]])
    lp, _ = chunked_token_logps(h, torch.nn.Identity(), torch.tensor([[2]]), torch.tensor([[1]]), 1)
    assert abs(lp.item() - (2 - torch.log(torch.tensor(1 + 2.718281828 + 7.389056099)).item())) < 1e-6


def test_default_chunk_over_many_answer_tokens_equals_float64_reference():
    """The default `model.lm_head_chunk` (256) splits 2 x 400 answer tokens into 4 chunks; the
    log-probs and the gradients of the hidden states and the head equal a float64 log-softmax."""
    chunk = ModelConfig().lm_head_chunk
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 401, 16, generator=gen, requires_grad=True)
    head = torch.nn.Linear(16, 97, bias=False)
    labels = torch.randint(0, 97, (2, 401), generator=gen)
    mask = torch.ones(2, 401)
    mask[0, :1] = 0  # 400 + 401 = 801 answer tokens: 4 chunks, the last one short
    lp, _ = chunked_token_logps(hidden, head, labels, mask, chunk)
    assert mask.sum() > 3 * chunk
    (lp.sum() + lp.pow(2).sum()).backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    ref = (h64 @ w64.T).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask.double()
    (ref.sum() + ref.pow(2).sum()).backward()
    torch.testing.assert_close(lp.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
