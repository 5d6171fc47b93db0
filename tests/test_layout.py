"""The batch item layout: pairs chosen block then rejected block, ranked lists list-major,
unpaired one item each; every expected order below is written out by hand."""

from __future__ import annotations

import pytest
import torch

from mmalign.errors import DataError
from mmalign.layout import (batch_slots, by_record, chosen_rejected, item_slots, output_fields, record_outputs,
                            repeat_pairs)

PAIRS = [{"prompt": "p0", "chosen": "c0", "rejected": "r0"}, {"prompt": "p1", "chosen": "c1", "rejected": "r1"}]
RANKED = [{"prompt": "p0", "completions": ["a", "b", "c"], "scores": [1, 2, 3]},
          {"prompt": "p1", "completions": ["d", "e", "f"], "scores": [3, 2, 1]}]
UNPAIRED = [{"prompt": "p0", "completion": "x", "label": True}, {"prompt": "p1", "completion": "y", "label": False}]


def test_a_two_pair_batch():
    assert item_slots("pair", [2, 2]) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert batch_slots(PAIRS, "pair") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [record_outputs(PAIRS[i], "pair")[j] for i, j in batch_slots(PAIRS, "pair")] == ["c0", "c1", "r0", "r1"]
    assert output_fields(PAIRS[0], "pair") == ["chosen", "rejected"]


def test_ranked_and_unpaired():
    assert batch_slots(RANKED, "ranked") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert output_fields(RANKED[1], "ranked") == ["completions[0]", "completions[1]", "completions[2]"]
    assert batch_slots(UNPAIRED, "unpaired") == [(0, 0), (1, 0)]
    assert record_outputs(UNPAIRED[1], "unpaired") == ["y"] and output_fields(UNPAIRED[1], "unpaired") == ["completion"]


def test_unknown_kind():
    for call in (lambda: item_slots("steps", [1]), lambda: record_outputs({}, "pairs"), lambda: output_fields({}, "")):
        with pytest.raises(DataError, match="unknown batch kind"):
            call()


def test_by_record_inverts_the_layout():
    assert by_record(["c0", "c1", "r0", "r1"], item_slots("pair", [2, 2]), 2) == [["c0", "r0"], ["c1", "r1"]]
    assert by_record([1, 2, 3, 4, 5, 6], item_slots("ranked", [3, 3]), 2) == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="3 values for 4 items"):
        by_record([1, 2, 3], item_slots("pair", [2, 2]), 2)


def test_split_and_repeat_pairs():
    x = torch.tensor([1.0, 2.0, 10.0, 20.0])
    chosen, rejected = chosen_rejected(x)
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [10.0, 20.0]
    assert chosen_rejected(["c0", "c1", "r0", "r1"]) == (["c0", "c1"], ["r0", "r1"])
    with pytest.raises(ValueError, match="even number of items, got 3"):
        chosen_rejected([1, 2, 3])
    assert repeat_pairs(["p0", "p1"]) == ["p0", "p1", "p0", "p1"]
    t = torch.arange(6).view(2, 3)
    assert repeat_pairs(t).tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    assert torch.equal(repeat_pairs(torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))),
                       torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1))


def test_flatten_and_batch_fields_follow_the_layout():
    from mmalign.data.preference import batch_fields, flatten

    assert [i["response"] for i in flatten(PAIRS, "pair")] == ["c0", "c1", "r0", "r1"]
    assert [i["response"] for i in flatten(RANKED, "ranked")] == ["a", "b", "c", "d", "e", "f"]
    assert [i["response"] for i in flatten(UNPAIRED, "unpaired")] == ["x", "y"]
    steps = [{"completion": "x1", "advantage": 0.5, "old_logp": -1.0}, {"completion": "y1", "advantage": -0.5,
                                                                         "old_logp": -2.0}]
    assert [i["response"] for i in flatten(steps, "step")] == ["x1", "y1"]  # GRPO transitions: one item each
    step_batch = batch_fields(steps, "step", {})
    assert step_batch.advantages.tolist() == [0.5, -0.5] and step_batch.old_logps.tolist() == [-1.0, -2.0]
    with pytest.raises(DataError, match="unknown batch kind 'steps'"):
        flatten([], "steps")
    refs = [dict(r, _ref_logps=[-1.0 - i, -10.0 - i]) for i, r in enumerate(PAIRS)]
    assert batch_fields(refs, "pair", {}).ref_logps.tolist() == [-1.0, -2.0, -10.0, -11.0]
    ranked = [dict(r, _ref_logps=[float(3 * i + k) for k in range(3)]) for i, r in enumerate(RANKED)]
    assert batch_fields(ranked, "ranked", {}).ref_logps.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_the_diffusion_groups_and_item_names_follow_the_layout():
    """A diffusion draw's groups (items sharing t, ε, ...) and the item names of its error messages."""
    from mmalign.modalities.diffusion import _output_names, group_index

    assert group_index("pair", 4, 2).tolist() == [0, 1, 0, 1]
    assert group_index("ranked", 6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_index("unpaired", 2, 2).tolist() == [0, 1]
    assert _output_names("pair", PAIRS) == ["row 0, chosen", "row 1, chosen", "row 0, rejected", "row 1, rejected"]
    assert _output_names("ranked", RANKED)[2:4] == ["row 0, completions[2]", "row 1, completions[0]"]
    assert _output_names("unpaired", [dict(UNPAIRED[0], _index=7, source="shard:3")]) == ["row 7 (shard:3), completion"]


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, mmalign.layout, mmalign.data.media; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
