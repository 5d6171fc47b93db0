"""Padding-free batches (mmalign/modalities/packing.py, `data.padding_free`, issue 20 item 2): one
packed row with restarting positions gives the padded batch's log-probs and gradients, left or
right padded, with or without the chunked head; a model that mixes packed sequences falls back."""

from __future__ import annotations

import pytest
import torch
from test_lm_head import Tok, logps_and_grads, tiny_gemma3, tiny_llama

from mmalign.modalities.causal_lm import CausalLMLikelihood
from mmalign.modalities.packing import pack_rows
from mmalign.types import PreferenceBatch


def tiny_qwen2(vocab=211):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).float()


def uneven_batch(left: bool, vocab=211):
    """4 sequences of lengths 14, 5, 9, 2 padded to 14; answers start at token 3 (1 for the last)."""
    lengths, prompts = [14, 5, 9, 2], [3, 3, 3, 1]
    g = torch.Generator().manual_seed(2)
    n, t = len(lengths), max(lengths)
    ids = torch.zeros(n, t, dtype=torch.long)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        start = t - length if left else 0
        ids[row, start:start + length] = torch.randint(2, vocab, (length,), generator=g)
        attention[row, start:start + length] = 1
        loss_mask[row, start + prompt:start + length] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "position_ids": position_ids}
    return PreferenceBatch(kind="unpaired", inputs=inputs, index=torch.arange(n))


def test_pack_rows_by_hand():
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    packed = pack_rows(ids, mask)
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9]] and packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    back = packed.unpack(torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]]))
    assert back.squeeze(-1).tolist() == [[1, 2, 3], [0, 4, 5]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gemma3], ids=["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_equals_padded_logps_and_gradients(make, left, chunk):
    model, b = make(), uneven_batch(left)
    padded, g_padded = logps_and_grads(model, CausalLMLikelihood(Tok(), lm_head_chunk=0), b)
    lik = CausalLMLikelihood(Tok(), lm_head_chunk=chunk, padding_free=True)
    packed, g_packed = logps_and_grads(model, lik, b)
    assert lik.checked == {id(model): (True, chunk > 0)}
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    assert packed.tokens.tolist() == [11, 2, 6, 1]
    for k in g_padded:
        torch.testing.assert_close(g_packed[k], g_padded[k], atol=1e-5, rtol=1e-4)


def test_a_model_that_mixes_packed_sequences_falls_back_to_padding():
    model, b = tiny_llama(), uneven_batch(False)
    original = model.forward

    def no_positions(*args, position_ids=None, **kwargs):  # ignores the restarts: sequences see each other
        return original(*args, **kwargs)

    model.forward = no_positions
    lik = CausalLMLikelihood(Tok(), lm_head_chunk=0, padding_free=True)
    with pytest.warns(UserWarning, match="padded batches"):
        out = lik.logps(model, b)
    assert lik.checked == {id(model): (False, False)}
    torch.testing.assert_close(out.logps, CausalLMLikelihood(Tok()).logps(model, b).logps, atol=0, rtol=0)


def test_packing_check_passes_under_bf16_autocast_and_bf16_weights():
    """The check is exact in any precision (the second sequence's bits cannot depend on the first
    one's tokens), so bf16 autocast or bf16 weights (the GPU setting) keep the packed row. It used
    to compare the packed row with the padded batch to 1e-4, which bf16 rounding alone exceeds:
    every bf16 run fell back to padding with a warning (found for the GPU text row)."""
    import warnings

    for bf16_weights in (False, True):
        model, b = tiny_llama(), uneven_batch(False)
        model = model.to(torch.bfloat16) if bf16_weights else model
        lik = CausalLMLikelihood(Tok(), lm_head_chunk=0, padding_free=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning fails the test
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_weights):
                lik.logps(model, b)
        assert lik.checked == {id(model): (True, False)}


def test_a_padding_free_run_trains_to_the_padded_runs_weights(make_config, tmp_path):
    """data.padding_free through the trainer (LoRA, chunked head on both sides): the same weights
    after 3 steps as the padded run."""
    from test_trainer import params, trainer_for

    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    weights = []
    for padding_free in (False, True):
        cfg = make_config(lora=lora, data={"padding_free": padding_free}, train={
            "output_dir": str(tmp_path / f"pf{padding_free}"), "max_steps": 3})
        trainer = trainer_for(cfg)
        trainer.fit()
        assert set(trainer.likelihood.checked.values()) == {(padding_free, True)}
        weights.append(params(trainer))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fast_path_checks_run_once_per_model_in_eval_mode_without_autocast_and_warn_on_mismatch():
    """`fast_paths`: the comparison runs without grad, in eval mode (training mode restored after)
    and with autocast off even inside a bf16 autocast block; within atol it agrees, beyond it warns
    with the given text; `verified_once` computes a key's verdict once."""
    from mmalign.modalities.fast_paths import paths_agree, verified_once

    model, seen = torch.nn.Linear(2, 2).train(), []

    def values(shift: float):
        def run():
            seen.append((model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return torch.tensor([1.0, 2.0]) + shift
        return run

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert paths_agree(model, values(0.0), values(9e-5), None, 1e-4, "never shown")
    assert seen == [(False, False, False)] * 2 and model.training
    with pytest.warns(UserWarning, match="^data.padding_free: nope$"):
        assert not paths_agree(model, values(0.0), values(2e-4), None, lambda ref: 1e-4 * ref.shape[0] / 2,
                               "data.padding_free: nope")
    assert paths_agree(model, values(0.0), values(2e-4), torch.tensor([True, False]) & False, 1e-4, "never shown")
    assert model.training
    cache, calls = {}, []
    for _ in range(3):
        assert verified_once(cache, 7, lambda: calls.append(1) or (True, False)) == (True, False)
    assert calls == [1] and cache == {7: (True, False)}


def test_the_check_rule_is_per_token_whatever_the_batch_size():
    """`fast_paths.agree`: float32 weights allow max |Δ| ≤ atol at the checked positions, 16-bit
    weights mean |Δ| ≤ 2e-2; neither grows with the number of tokens (a tolerance that did let a
    1,000-token batch 5e-2 off on every token through: Qwen-VL's wrong packed positions)."""
    from mmalign.modalities.fast_paths import agree

    want = torch.zeros(4, 250)
    where = torch.ones(4, 250, dtype=torch.bool)
    where[:, 200:] = False  # 800 checked tokens
    off = torch.full((4, 250), 5e-2)
    assert not agree(want, off, where, 1e-4, low_precision=False)
    assert not agree(want, off, where, 1e-4, low_precision=True)
    assert agree(want, off.where(~where, 0), where, 1e-4, low_precision=False)  # only unchecked positions differ
    near = torch.full((4, 250), 9e-5)
    assert agree(want, near, where, 1e-4, low_precision=False)
    assert not agree(want, near * 2, where, 1e-4, low_precision=False)
    rounding = torch.zeros(4, 250)
    rounding[0, 0] = 1.0  # one token far off, the mean small: 16-bit rounding noise passes, float32 does not
    assert agree(want, rounding, where, 1e-4, low_precision=True)
    assert not agree(want, rounding, where, 1e-4, low_precision=False)
    assert agree(want, off, torch.zeros_like(where), 1e-4, low_precision=False)  # nothing to compare


def test_packing_check_refuses_wrong_positions_that_keep_sequences_apart_in_any_precision():
    """The check's second half: a packed row whose positions are scaled (still apart: the first
    sequence changes none of the second's log-probs) is far from the padded log-probs, which fails
    in float32 (max |Δ| ≤ 1e-4) and under bf16 weights (mean |Δ| ≤ 2e-2), while the right
    positions pass both."""
    import warnings

    from mmalign.modalities.packing import changed_first_row, check_packing

    class ScalesPackedPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, attention_mask=None, use_cache=False):
            if attention_mask is None:  # the packed row
                position_ids = position_ids * 2
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    b = uneven_batch(False)
    ids, mask = b.inputs["input_ids"][:2, :24], b.inputs["attention_mask"][:2, :24]
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama().to(dtype).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_packing(model, ids, mask)
        wrong = ScalesPackedPositions(model)
        with torch.no_grad():  # apart: the first half of the check alone would pass
            rows = [pack_rows(x, mask) for x in (ids, changed_first_row(ids, mask.bool()))]
            second = [r.unpack(wrong(input_ids=r.ids, position_ids=r.position_ids).logits)[1] for r in rows]
        torch.testing.assert_close(second[0], second[1], rtol=0, atol=1e-5)
        with pytest.warns(UserWarning, match="does not keep packed sequences apart"):
            assert not check_packing(wrong, ids, mask)


def test_packing_check_under_bf16_autocast_compares_the_float32_paths():
    """With float32 weights the check runs without autocast, so a packed path off by 5e-3 per
    log-prob (below bf16 rounding's tolerance, above float32's 1e-4) is refused under bf16 mixed
    precision too, and the right packed path passes."""
    import warnings

    from mmalign.modalities.packing import check_packing

    class OffWhenPacked(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, attention_mask=None, use_cache=False):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache)
            if attention_mask is None:  # the packed row
                out.logits = out.logits + 5e-3 * torch.linspace(-1, 1, out.logits.shape[-1])
            return out

    b = uneven_batch(False)
    ids, mask = b.inputs["input_ids"][:2, :24], b.inputs["attention_mask"][:2, :24]
    model = tiny_llama()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_packing(model, ids, mask)
        with pytest.warns(UserWarning, match="does not keep packed sequences apart"):
            assert not check_packing(OffWhenPacked(model), ids, mask)
