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
packed sequences do not see each other, exactly in any precision (a model whose attention ignores
packed positions falls back to padded batches with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmalign.modalities.fast_paths import paths_agree


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
    """Whether packed sequences stay apart in `model`: on the first two rows (their first 24
    tokens) packed into one row, the second sequence's log-probs must not change when the first
    sequence's tokens do (`fast_paths.paths_agree`, atol 1e-5); False, with a warning, when they do.

    Exact in any precision: with attention kept within each sequence, the second sequence's rows
    see only their own tokens through the same kernels at the same shapes, so changing the first
    sequence changes none of their bits. Comparing the packed row with the padded batch instead
    would compare two kernel paths, which differ by bf16 rounding (~1e-2 in log-probs) under
    bf16 autocast or bf16 weights, the usual GPU setting: every such run fell back to padding."""
    ids, mask = input_ids[:2, :24], attention_mask[:2, :24]
    if mask.shape[0] < 2 or mask[0].sum() == 0 or mask[1].sum() == 0:
        return True  # fewer than two sequences: nothing can leak between them
    where = mask.bool()
    changed = ids.clone()
    changed[0] = ids[0].roll(1, -1)  # the first sequence's tokens moved by one: other ids of the vocabulary
    if torch.equal(changed[0][where[0]], ids[0][where[0]]):
        changed[0] = torch.where(where[0], ids[1][where[1]][:1].expand_as(ids[0]), ids[0])
    if torch.equal(changed[0][where[0]], ids[0][where[0]]):
        return True  # cannot change the first sequence with ids of these rows; no evidence either way

    def second(rows: Tensor) -> Tensor:
        packed = pack_rows(rows, mask)
        logits = packed.unpack(model(input_ids=packed.ids, position_ids=packed.position_ids, use_cache=False).logits)
        return logits[1].float().log_softmax(-1)[where[1]]

    return paths_agree(model, lambda: second(ids), lambda: second(changed), 1e-5, 0,
                       f"data.padding_free: {type(model).__name__}'s attention does not keep packed sequences apart; "
                       "using padded batches")


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

