"""Padding-free forwards for causal LMs and VLMs (`data.padding_free`, issue 20 item 2).

A padded batch (N, T) with attention mask m becomes ONE packed row (1, S), S = Σ m:

    packed_ids = ids[m],   packed_pos = (cumsum(m) − 1)[m]      (positions restart at 0 per sequence)

row-major, so sequence by sequence, each in order (left or right padding alike). With no
attention mask and restarting positions, transformers (5.x `masking_utils.
find_packed_sequence_indices`) builds a block-diagonal causal mask: every token attends only to
its own sequence, so each sequence's logits equal its padded ones while no padding is computed.
Flash attention reads the same boundaries from the positions.

VLMs (`pack_inputs`): the per-token processor outputs (N, T) are packed the same way and the
per-image ones (pixel_values, image_sizes, grids) pass unchanged: the image tokens keep their
row-major order, which is the order the model scatters image features into. Models whose
positions are not a function of the packed row alone (Qwen2-VL's 3-D M-RoPE from the attention
mask) fail `LlavaLikelihood`'s once-per-model check and keep padded batches.

The final hidden states go back to the padded layout (`unpack`) so the rest of the likelihood
(labels, answer mask, the chunked head) is unchanged. `check_packing` verifies once per model that
packed sequences do not see each other (exactly, in any precision) and give the padded log-probs (to
1e-4 in float32, to bf16 rounding in 16-bit); a model that fails falls back to padded batches with a
warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.modalities.fast_paths import agree, has_16bit_weights
from mmalign.nn import eval_mode


@dataclass(frozen=True)
class Packed:
    """One packed row: ids (1, S), position_ids (1, S), and `where` (N, T) bool, the padded
    positions the S tokens came from (row-major)."""

    ids: Tensor
    position_ids: Tensor
    where: Tensor

    def unpack(self, values: Tensor) -> Tensor:
        """(1, S, ...) packed values -> (N, T, ...) padded, zeros at padding (differentiable)."""
        n, t = self.where.shape
        out = values.new_zeros((n, t, *values.shape[2:]))
        return out.index_put((self.where,), values[0])


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> Packed:
    """(N, T) padded ids and 0/1 mask -> the `Packed` row of their real tokens."""
    where = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return Packed(input_ids[where].unsqueeze(0), positions[where].unsqueeze(0), where)


def check_packing(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> bool:
    """Whether `model` runs packed rows right, on the first two rows (their first 24 tokens):

    1. apart: the second sequence's packed log-probs do not change when the first sequence's
       tokens do (atol 1e-5: exact in any precision, the second sequence's rows see only their
       own tokens through the same kernels at the same shapes);
    2. positioned: the packed log-probs equal the padded batch's, max |Δ| ≤ 1e-4 with float32
       weights (autocast is turned off for the check, so bf16 mixed precision compares float32
       paths); with 16-bit weights the two kernel paths differ by rounding (~2e-3 on a tiny Llama),
       so mean |Δ| ≤ 2e-2 there (a packed row whose positions are wrong is off by ~0.2).

    False, with a warning, when either fails."""
    ids, mask = input_ids[:2, :24], attention_mask[:2, :24]
    if mask.sum() == 0:
        return True
    where = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def packed(rows: Tensor) -> Tensor:
        row = pack_rows(rows, mask)
        return row.unpack(model(input_ids=row.ids, position_ids=row.position_ids, use_cache=False).logits)

    # dropout off: every forward sees the same network; autocast off: under bf16 mixed precision the
    # float32 master weights compare exactly (two bf16 kernel paths differ by rounding)
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model), torch.autocast(device.type, enabled=False):
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        mine = packed(ids)
        ok = agree(padded.float().log_softmax(-1), mine.float().log_softmax(-1), where.unsqueeze(-1), 1e-4,
                   has_16bit_weights(model))
        changed = changed_first_row(ids, where)
        if ok and changed is not None:
            second = mine[1].float().log_softmax(-1)[where[1]]
            ok = bool(torch.allclose(packed(changed)[1].float().log_softmax(-1)[where[1]], second, atol=1e-5, rtol=0))
    if not ok:
        warnings.warn(f"data.padding_free: {type(model).__name__}'s attention does not keep packed sequences apart; "
                      "using padded batches")
    return ok


def changed_first_row(ids: Tensor, where: Tensor) -> Tensor | None:
    """`ids` (2, T) with the first sequence's real tokens changed (rolled by one, else the second
    sequence's first token); None when there are not two sequences or nothing changes."""
    if where.shape[0] < 2 or not where[0].any() or not where[1].any():
        return None
    changed = ids.clone()
    changed[0] = ids[0].roll(1, -1)
    if torch.equal(changed[0][where[0]], ids[0][where[0]]):
        changed[0] = torch.where(where[0], ids[1][where[1]][:1].expand_as(ids[0]), ids[0])
    return None if torch.equal(changed[0][where[0]], ids[0][where[0]]) else changed


def pack_inputs(inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Packed]:
    """A VLM's padded forward kwargs -> (packed kwargs, `Packed`): input_ids and every (N, T)
    per-token tensor packed to (1, S), position_ids restarting per sequence, no attention mask
    and no `logits_to_keep` (all S positions are real tokens); per-image tensors unchanged."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    packed = pack_rows(ids, mask)
    out: dict[str, Tensor] = {"input_ids": packed.ids, "position_ids": packed.position_ids}
    for key, value in inputs.items():
        if key in out or key in ("attention_mask", "logits_to_keep"):
            continue
        per_token = torch.is_tensor(value) and value.shape == ids.shape
        out[key] = value[packed.where].unsqueeze(0) if per_token else value
    return out, packed

