"""Length-grouped batching (`data.group_by_length`, mmalign/data/length_grouping.py): the grouped
order by hand, every epoch a permutation, 2 processes == 1, record lengths equal to the widths
`collate` pads to (text and VLM families), less padding on a long-tailed mix, per-example losses
independent of the batch, resume == uninterrupted, and the one-line errors."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_trainer import straight_and_resumed, trainer_for

from mmalign.config import load_config, validate
from mmalign.data.length_grouping import LengthGroupedSampler, build_sampler, group_by_length, record_lengths
from mmalign.data.preference import StreamSampler
from mmalign.errors import ConfigError, DataError
from mmalign.modalities.causal_lm import CausalLMLikelihood
from mmalign.toytext import make_toy_pairs
from mmalign.train.setup import check_contracts
from mmalign.types import MeasuresLength

LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]  # ℓ of records 0..9


def test_grouped_order_by_hand():
    """π = [3, 0, 7, 1, 9, 4, 2, 8, 6, 5], G = 2, K = 2 (windows of 4), head 1, batches of each
    window reversed: head [3]; window 0 = [0, 7, 1, 9] (ℓ 5, 4, 1, 10) sorted [9, 0, 7, 1] ->
    batches [9, 0], [7, 1] -> reversed [7, 1], [9, 0]; window 1 = [4, 2, 8, 6] (ℓ 7, 9, 6, 8)
    sorted [2, 6, 4, 8] -> reversed [4, 8], [2, 6]; tail [5] (shorter, stays last). The widest
    full batch ([9, 0], ℓ 10) swaps with the first: [9, 0], [7, 1], [4, 8], [2, 6]."""
    order = [3, 0, 7, 1, 9, 4, 2, 8, 6, 5]
    reverse = lambda w, count: list(reversed(range(count)))  # noqa: E731
    assert group_by_length(order, LENGTHS, 2, 2, head=1, shuffle=reverse) == [3, 9, 0, 7, 1, 4, 8, 2, 6, 5]
    # no shuffle, no head, one window of everything: longest first throughout (HF's order)
    assert group_by_length(order, LENGTHS, 2, 5) == [9, 2, 6, 4, 8, 0, 7, 3, 5, 1]
    # K = 1: the ungrouped batches [3, 0], [7, 1], [9, 4], [2, 8], [6, 5], each sorted, the widest first
    assert group_by_length(order, LENGTHS, 2, 1) == [9, 4, 7, 1, 0, 3, 2, 8, 6, 5]


def stream(sampler, steps: int, batch: int, world: int) -> list[int]:
    return [i for m in range(steps) for r in range(world) for i in sampler.micro_batch(m, batch, r, world)]


def test_each_epoch_is_a_permutation_of_sorted_windows():
    """n = 23, G = 4 (2 x 2), K = 3: every epoch's 23 stream entries are the 23 records; after the
    epoch's head h_e = (-23 e) mod 4, its full global batches, as sets, are the sorted cuts of the
    12-entry windows of π_e, the first one holding the longest of them."""
    rng = random.Random(0)
    lengths = [rng.randrange(1, 200) for _ in range(23)]
    sampler = LengthGroupedSampler(lengths, seed=7, window=3)
    entries = stream(sampler, 30, 2, 2)  # 120 entries: 5 epochs and a bit
    for e in range(5):
        order, perm = entries[e * 23:(e + 1) * 23], StreamSampler(23, 7).epoch_order(e).tolist()
        assert sorted(order) == list(range(23)), e
        head = (-e * 23) % 4
        assert order[:head] == perm[:head]
        full = [order[j:j + 4] for j in range(head, 23 - (23 - head) % 4, 4)]
        cuts = []
        for w in range(head, 23, 12):
            ranked = sorted(perm[w:w + 12], key=lambda i: -lengths[i])
            cuts += [frozenset(ranked[j:j + 4]) for j in range(0, len(ranked), 4) if len(ranked[j:j + 4]) == 4]
        assert sorted(map(sorted, map(frozenset, full))) == sorted(map(sorted, cuts)), e
        assert max(lengths[i] for i in full[0]) == max(lengths[i] for b in full for i in b)
    assert entries[:23] != StreamSampler(23, 7).indices(0, 23)
    assert stream(LengthGroupedSampler(lengths, seed=7, window=3), 30, 2, 2) == entries  # seeded


def test_two_processes_read_the_one_process_batches():
    """Rank slices of W = 2 (B = 3) concatenated == the W = 1 micro-batch of B = 6, over epochs."""
    lengths = [(i * 37) % 101 for i in range(17)]
    two, one = LengthGroupedSampler(lengths, 3, 2), LengthGroupedSampler(lengths, 3, 2)
    for m in range(12):
        assert two.micro_batch(m, 3, 0, 2) + two.micro_batch(m, 3, 1, 2) == one.micro_batch(m, 6, 0, 1), m


# -- lengths -------------------------------------------------------------------------------------
def long_tailed(n: int, seed: int) -> list[dict]:
    """Toy pairs whose answers are repeated to long-tailed lengths (1 to ~30 copies)."""
    rng = random.Random(seed)
    out = []
    for r in make_toy_pairs(n, seed):
        k = min(int(rng.lognormvariate(0.5, 1.0)) + 1, 30)
        out.append(dict(r, chosen=" ".join([r["chosen"]] * k), rejected=" ".join([r["rejected"]] * rng.randint(1, k))))
    return out


def widths(lik, records: list[dict]) -> list[int]:
    """Each record's longest row as `collate` writes it (real tokens)."""
    return [int(lik.collate([r], "pair").inputs["attention_mask"].sum(-1).max()) for r in records]


def padding(lik, records: list[dict], batches: list[list[int]]) -> tuple[int, int]:
    """(padded tokens, real tokens) over the padded batches `collate` makes of `batches`."""
    pad = real = 0
    for b in batches:
        mask = lik.collate([records[i] for i in b], "pair").inputs["attention_mask"]
        pad, real = pad + int((mask == 0).sum()), real + int(mask.sum())
    return pad, real


def test_grouping_lowers_padding_on_a_long_tailed_mix(tiny_lm):
    """64 long-tailed pairs, batch 4, one epoch: lengths equal the collated widths, and grouping
    (K = 4) at least halves the padding between records (the padded tokens above the floor of
    each record alone: its shorter answer padded to the longer, which no order removes)."""
    _, tokenizer = tiny_lm
    lik = CausalLMLikelihood(tokenizer, max_length=512)
    assert isinstance(lik, MeasuresLength)
    records = long_tailed(64, 0)
    lengths = record_lengths(lik, records, "pair")
    assert lengths == widths(lik, records)
    plain = [StreamSampler(64, 0).micro_batch(m, 4, 0, 1) for m in range(16)]
    grouped = [LengthGroupedSampler(lengths, 0, 4).micro_batch(m, 4, 0, 1) for m in range(16)]
    (pad_plain, real_plain), (pad_grouped, real_grouped) = padding(lik, records, plain), padding(lik, records, grouped)
    assert real_grouped == real_plain  # the same rows, once each
    floor, _ = padding(lik, records, [[i] for i in range(64)])
    whole = [LengthGroupedSampler(lengths, 0, 16).micro_batch(m, 4, 0, 1) for m in range(16)]  # one window
    pad_whole, _ = padding(lik, records, whole)
    # measured: ungrouped 3065, K = 4 1713, K = 16 590, floor 467 (real tokens 2839)
    assert floor < pad_whole < pad_grouped, (floor, pad_whole, pad_grouped)
    assert pad_plain - floor > 1000 and pad_grouped - floor < 0.5 * (pad_plain - floor), (pad_plain, pad_grouped, floor)


def test_a_record_that_cannot_be_measured_is_named(tiny_lm):
    _, tokenizer = tiny_lm
    lik = CausalLMLikelihood(tokenizer, max_length=12)
    records = make_toy_pairs(4, 0)
    records[2] = dict(records[2], prompt=" ".join([records[2]["prompt"]] * 5))
    with pytest.raises(DataError, match=r"data.group_by_length: data.train row 2: cannot measure.*no room"):
        record_lengths(lik, records, "pair")


VLM_FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "gemma3", "idefics3", "llava_onevision"]


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_vlm_lengths_count_image_tokens(name, tmp_path):
    """A VLM record's length (text tokenised, image tokens from the processor's per-size counts,
    no pixels decoded, wrapping tokens measured once) equals the width of its longest collated
    row, image tokens included, for images of two sizes (32x32 and 64x48)."""
    from vlm_family_fixtures import BUILDERS

    from mmalign.modalities.llava import LlavaLikelihood
    from mmalign.toyvlm import make_shape_pairs

    path = make_shape_pairs(3, 0, tmp_path, images_per_example=2 if name != "gemma3" else 1)
    records = [dict(json.loads(line), _index=i, _root=str(tmp_path)) for i, line in enumerate(open(path))]
    records = [dict(r, chosen=r["chosen"] + " ." * (3 * i)) for i, r in enumerate(records)]
    image = tmp_path / records[2]["images"][0]  # another size: dynamic-resolution families count more tokens
    Image.open(image).resize((64, 48)).save(image)
    _, processor = BUILDERS[name]()
    model_config = BUILDERS[name]()[0].config if name == "llava" else None
    lik = LlavaLikelihood(processor, model_config, max_length=512)
    assert record_lengths(lik, records, "pair") == widths(lik, records)


# -- per-example losses, resume, errors --------------------------------------------------------
def test_grouped_batch_losses_equal_each_row_alone(make_config):
    """After two steps (policy != reference), the per-example DPO losses of a grouped micro-batch
    equal the losses of each of its rows scored alone, and the rows of an ungrouped batch too."""
    cfg = make_config(data={"group_by_length": 2}, optim={"lr": 5e-2}, train={"max_steps": 2, "batch_size": 4})
    trainer = trainer_for(cfg)
    assert isinstance(trainer.sampler, LengthGroupedSampler)
    trainer.train_step()
    trainer.train_step()
    with torch.no_grad():
        for rows in (trainer.sampler.micro_batch(5, 4, 0, 1), StreamSampler(len(trainer.records), 0).indices(40, 4)):
            together, _ = trainer.forward(trainer.fetch("train", rows), seed=0)
            alone = torch.cat([trainer.forward(trainer.fetch("train", [i]), seed=0)[0] for i in rows])
            assert together.std() > 0  # the policy moved: not every loss log 2
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_resume_with_grouping_equals_uninterrupted_run(make_config):
    """3 steps, checkpoint, a NEW trainer resumes to 6 with grouping on: the weights of 6 straight steps."""
    cfg = make_config(data={"group_by_length": 3}, optim={"lr": 1e-3},
                      train={"max_steps": 6, "grad_accum": 2, "batch_size": 4})
    straight, resumed = straight_and_resumed(cfg, 3)
    assert isinstance(resumed.sampler, LengthGroupedSampler)
    assert resumed.step == 6
    a = {n: p for n, p in straight.unwrapped.named_parameters()}
    for name, p in resumed.unwrapped.named_parameters():
        torch.testing.assert_close(p, a[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match="data.group_by_length is 0 but the run"):
        trainer_for(cfg, "train.resume=true", "data.group_by_length=0", "train.max_steps=8").fit()


class StubSource:
    """A `DataSource` that is never asked for records."""

    kind = "pair"

    def describe(self) -> str:
        return "stub"

    def records_for_step(self, step, model, accelerator):
        raise AssertionError("not called")


def test_config_errors(make_config):
    with pytest.raises(ConfigError, match="data.group_by_length must be >= 0"):
        load_config(make_config(data={"group_by_length": -1}))
    cfg = SimpleNamespace(data=SimpleNamespace(group_by_length=2), train=SimpleNamespace(seed=0))
    with pytest.raises(ConfigError, match="data.group_by_length needs record lengths, which object does not give"):
        build_sampler(cfg, object(), [{"prompt": "a"}], "pair")
    cfg.data.group_by_length = 0
    assert isinstance(build_sampler(cfg, object(), [{"prompt": "a"}], "pair"), StreamSampler)
    online = load_config(make_config(data={"group_by_length": 2}))
    online.online = SimpleNamespace()  # any online section
    with pytest.raises(ConfigError, match="data.group_by_length must be >= 0 .* is for offline data"):
        validate(online)
    with pytest.raises(ConfigError, match="data.group_by_length is for offline data"):
        check_contracts(load_config(make_config(data={"group_by_length": 2})), object.__new__(CausalLMLikelihood),
                        object.__new__(StubSource))
