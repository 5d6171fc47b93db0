"""`generate_answers`: batched greedy == one-at-a-time greedy, per-row seeded sampling that
does not depend on batch mates, and the sampler against an independent reference."""

from __future__ import annotations

import pytest
import torch

from mmalign.generate.text import RowSampler, generate_answers

PROMPTS = ["scene : cat tree . describe :", "scene : cup . describe :", "scene : lamp chair ball . describe :",
           "scene : boat . describe :"]


@pytest.fixture(scope="module")
def vlm():
    from mmalign.toyvlm import build_tiny_llava, build_tiny_llava_processor, build_vlm_tokenizer

    tokenizer = build_vlm_tokenizer()
    return build_tiny_llava(tokenizer, seed=3), build_tiny_llava_processor(tokenizer)


@pytest.fixture(scope="module")
def vlm_records(tmp_path_factory):
    from mmalign.toyvlm import PROMPT, draw_shape

    root = tmp_path_factory.mktemp("vlm_images")
    draw_shape("red", "circle").save(root / "a.png")
    square = draw_shape("blue", "square")
    records = [{"prompt": PROMPT, "images": ["a.png"]},
               {"prompt": "what is in the first image and the second image .", "images": ["a.png", square]},
               {"prompt": [{"role": "user", "content": "describe the image ."}], "images": [square]}]
    return records, root


def test_causal_lm_batched_greedy_equals_single(tiny_lm):
    model, tokenizer = tiny_lm
    records = [{"prompt": p} for p in PROMPTS]
    batched = generate_answers(model, tokenizer, records, max_new_tokens=12, batch_size=3)
    single = generate_answers(model, tokenizer, records, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert all(a and "<eos>" not in a and "<pad>" not in a for a in batched)


def test_causal_lm_greedy_matches_manual_argmax(tiny_lm):
    """The first answer tokens equal an independent argmax loop without padding or cache."""
    model, tokenizer = tiny_lm
    ids = tokenizer(PROMPTS[0]).input_ids
    for _ in range(4):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    expected = tokenizer.decode(ids[-4:], skip_special_tokens=True).strip()
    answer = generate_answers(model, tokenizer, [{"prompt": PROMPTS[1]}, {"prompt": PROMPTS[0]}],
                              max_new_tokens=4, batch_size=2)[1]
    assert answer == expected


def test_sampling_same_seed_same_answer_whatever_the_batch(tiny_lm):
    model, tokenizer = tiny_lm
    records = [{"prompt": p} for p in PROMPTS]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=4.0)
    together = generate_answers(model, tokenizer, records, seeds=[11, 12, 13, 14], batch_size=4, **kw)
    # reversed order, other batch sizes: each row keeps its own draws
    alone = generate_answers(model, tokenizer, records[::-1], seeds=[14, 13, 12, 11], batch_size=1, **kw)[::-1]
    pairs = generate_answers(model, tokenizer, records[1:3], seeds=[12, 13], batch_size=2, **kw)
    assert together == alone
    assert pairs == together[1:3]
    other = generate_answers(model, tokenizer, records, seeds=[21, 22, 23, 24], batch_size=4, **kw)
    assert other != together  # temperature 4 on 20 words: a different seed changes something


def test_row_sampler_matches_reference_draw():
    """One step of RowSampler == multinomial(softmax(logits / T)) with the row's own generator,
    and top-p = 0.5 over probs (0.45, 0.3, 0.25) keeps the two most likely tokens."""
    torch.manual_seed(0)
    scores = torch.randn(3, 7)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = RowSampler(gens, temperature=0.7, top_p=1.0)(None, scores)
    for row, seed in enumerate((1, 2, 3)):
        ref = torch.multinomial(torch.softmax(scores[row] / 0.7, -1), 1, generator=torch.Generator().manual_seed(seed))
        assert out[row].argmax() == ref.item()
        assert torch.isinf(out[row]).sum() == 6
    logits = torch.tensor([[0.45, 0.3, 0.25]]).log()
    sampler = RowSampler([torch.Generator().manual_seed(0)], temperature=1.0, top_p=0.5)
    picked = {int(sampler(None, logits).argmax()) for _ in range(200)}
    assert picked == {0, 1}


def test_vlm_batched_greedy_equals_single(vlm, vlm_records):
    model, processor = vlm
    records, root = vlm_records
    batched = generate_answers(model, processor, records, max_new_tokens=6, batch_size=3, roots=[root])
    single = generate_answers(model, processor, records, max_new_tokens=6, batch_size=1, roots=[root])
    assert batched == single
    assert all(isinstance(a, str) and "<image>" not in a for a in batched)


def test_vlm_sampling_seeded_per_row(vlm, vlm_records):
    model, processor = vlm
    records, root = vlm_records
    kw = dict(max_new_tokens=6, do_sample=True, temperature=2.0, roots=[root])
    together = generate_answers(model, processor, records, seeds=[1, 2, 3], batch_size=3, **kw)
    alone = [generate_answers(model, processor, [r], seeds=[s], batch_size=1, **kw)[0]
             for r, s in zip(records, [1, 2, 3])]
    assert together == alone


def test_image_count_mismatch_is_a_data_error(vlm):
    from mmalign.data.preference import DataError
    from mmalign.toyvlm import draw_shape

    model, processor = vlm
    record = {"prompt": "<image> <image> describe the image .", "images": [draw_shape("red", "circle")]}
    with pytest.raises(DataError, match="placeholders"):
        generate_answers(model, processor, [record], max_new_tokens=2)


def test_images_with_a_text_model_is_a_data_error(tiny_lm):
    from mmalign.data.preference import DataError

    model, tokenizer = tiny_lm
    with pytest.raises(DataError, match="VLM processor"):
        generate_answers(model, tokenizer, [{"prompt": PROMPTS[0], "images": ["x.png"]}], max_new_tokens=2)
