"""right_pad_cat: concatenate rows, right-padding the later dims (one helper for the copies
that padded conditioning, cached text tensors and per-image processor outputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.tensors import right_pad_cat


def test_pads_dim_1_with_zeros_at_the_end():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    b = torch.tensor([[[5.0, 6.0]]])  # (1, 1, 2)
    out = right_pad_cat([a, b])
    assert out.shape == (2, 2, 2) and out.dtype == torch.float32
    assert out.tolist() == [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [0.0, 0.0]]]


def test_masks_keep_their_dtype_and_pad_with_0():
    out = right_pad_cat([torch.tensor([[1, 1, 1]]), torch.tensor([[1]]), torch.tensor([[1, 1]])])
    assert out.dtype == torch.int64
    assert out.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_1d_rows_are_concatenated_and_equal_rows_untouched():
    assert right_pad_cat([torch.tensor([1, 2]), torch.tensor([3])]).tolist() == [1, 2, 3]
    a, b = torch.randn(2, 3, 4), torch.randn(1, 3, 4)
    assert torch.equal(right_pad_cat([a, b]), torch.cat([a, b]))


def test_every_later_dim_and_several_rows_per_tensor():
    a, b = torch.ones(2, 1, 3), torch.full((1, 2, 2), 2.0)  # (n_i, P_i, W_i)
    out = right_pad_cat([a, b])
    assert out.shape == (3, 2, 3)
    assert torch.equal(out[:2, :1], a) and out[:2, 1:].abs().sum() == 0
    assert torch.equal(out[2, :, :2], b[0]) and out[2, :, 2:].abs().sum() == 0


def test_a_pad_value():
    out = right_pad_cat([torch.zeros(1, 1), torch.zeros(1, 3)], value=-1.0)
    assert out.tolist() == [[0.0, -1.0, -1.0], [0.0, 0.0, 0.0]]


def test_same_as_the_dim_1_pad_it_replaces():
    """The former copies (diffusion_cache._cat_right_padded, audio.pad_conditioning) padded dim 1
    with F.pad: bit-identical results on the (1, L_i, ...) rows they are given."""
    def old(rows):
        if rows[0].ndim >= 2:
            length = max(r.shape[1] for r in rows)
            rows = [F.pad(r, (0, 0) * (r.ndim - 2) + (0, length - r.shape[1])) for r in rows]
        return torch.cat(rows)

    g = torch.Generator().manual_seed(0)
    for rows in ([torch.randn(1, n, 8, generator=g, dtype=torch.float16) for n in (3, 7, 1)],
                 [torch.randint(0, 2, (1, n), generator=g) for n in (5, 2)],
                 [torch.randn(1, generator=g), torch.randn(1, generator=g)],
                 [torch.randn(1, n, 2, 3, generator=g) for n in (4, 4)]):
        new = right_pad_cat(rows)
        assert new.dtype == old(rows).dtype and torch.equal(new, old(rows))
