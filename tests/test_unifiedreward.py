"""UnifiedReward (`unifiedreward`): the official prompts (pinned by hash against the official
scripts' text), strict parsing of the written verdicts (hand-written answers), order-swapped
pairwise win rates (stub generations), and a tiny random Qwen2.5-VL generating on images and
videos through the scorer and `mmalign score`."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.scoring.unifiedreward import (PAIR_IMAGE, PAIR_VIDEO, POINT_IMAGE, POINT_VIDEO, UnifiedRewardScorer,
                                           parse_final_score, parse_preference)

SMALL = dict(frames=4, min_pixels=1024, max_pixels=1024)
LONG = "a blue dog and a red square on a green circle"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image
    from vlm_family_fixtures import build_qwen

    from mmalign.data.video import write_video

    root = tmp_path_factory.mktemp("unifiedreward")
    model, processor = build_qwen("2.5")
    with torch.no_grad():  # weights ~ N(0, 0.1^2): answers that differ with the inputs
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        tok = processor.tokenizer  # special tokens (EOS among them) get logit 0: the model writes words
        model.lm_head.weight[sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))] = 0.0
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = []
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
        images.append(str(root / f"{name}.png"))
    frames = np.stack([np.full((32, 32, 3), (20 * t, 100, 200 - 20 * t), dtype=np.uint8) for t in range(8)])
    videos = [str(write_video(frames, root / "a.mp4", fps=8)), str(write_video(frames[::-1].copy(), root / "b.mp4",
                                                                                  fps=8))]
    return {"root": root, "folder": folder, "images": images, "videos": videos}


class Stub:
    """A `generate_answers` stand-in: answer(record) per record; keeps every record it was asked."""

    def __init__(self, answer):
        self.answer, self.records = answer, []

    def __call__(self, model, processor, records, **kwargs):
        self.records += records
        return [self.answer(r) for r in records]


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny["folder"])


def test_prompts_are_the_official_scripts_text():
    """sha256 of each template formatted with caption XYZ, equal to the official scripts' strings
    (inference_qwen/{image,video}_generation/*.py at CodeGoat24/UnifiedReward HEAD, checked when written)."""
    from mmalign.scoring.videoreward import PROMPT

    def digest(text):
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    assert digest(POINT_IMAGE.format(prompt="XYZ")) == "a368b542f6d7ecfc"
    assert digest(POINT_VIDEO.format(prompt="XYZ")) == "c758273a581e5753"
    assert digest(PAIR_IMAGE.format(prompt="XYZ")) == "93e22914ac79ba96"
    assert digest(PAIR_VIDEO.format(prompt="XYZ")) == "4f97fc26604d66f7"
    assert digest(PROMPT.format(text_prompt="XYZ")) == "2265462ce3d4a65d"  # VideoAlign's detailed_special


@pytest.mark.parametrize("answer, high, expected", [
    ("dog (object): 1\nred (attribute): 1\nFinal Score: 4", 5, 4.0),
    ("Final Score: 3.5.", 5, 3.5),
    ("final score:10", 10, 10.0),
    ("Final Score: 6", 5, None),       # off the image scale
    ("Final Score: 6", 10, 6.0),       # on the video scale
    ("Final Score: 0", 10, None),
    ("Final Score: 4\nFinal Score: 2", 5, None),
    ("Final Score: 4 because the dog is red", 5, None),
    ("Final Score: four", 5, None),
    ("The image is good.", 5, None),
])
def test_final_score_parsing_is_strict(answer, high, expected):
    assert parse_final_score(answer, 1.0, high) == expected


@pytest.mark.parametrize("answer, kind, expected", [
    ("Image 1 is better.", "image", "A"),
    ("Image 2 is better than Image 1.", "image", "B"),
    ("Both images are equally good.", "image", "tie"),
    ("Image 1 is better. Image 2 is better.", "image", None),
    ("Image 1 is better. Image 1 is better.", "image", None),
    ("Video 1 is better,", "video", "A"),
    ("Image 1 is better.", "video", None),
    ("The first one.", "image", None),
])
def test_preference_parsing_is_strict(answer, kind, expected):
    assert parse_preference(answer, kind) == expected


def test_pointwise_scores_the_written_number_and_counts_unparsed(tiny, processor):
    answers = {tiny["images"][0]: "red (attribute): 1\nFinal Score: 4", tiny["images"][1]: "Final Score: 9",
               tiny["images"][2]: "Final Score: 2."}
    stub = Stub(lambda r: answers[r["images"][0]])
    scorer = UnifiedRewardScorer(model=object(), processor=processor, generate=stub)
    prompts = ["a red dog <|im_end|>", "a green dog", "a blue dog"]
    scores = scorer.score(prompts, tiny["images"], kind="image")
    assert scores[0] == 4.0 and math.isnan(scores[1]) and scores[2] == 2.0
    assert scorer.stats() == {"answers": 3, "unparsed_answers": 1}
    assert stub.records[1] == {"prompt": POINT_IMAGE.format(prompt="a green dog"), "images": [tiny["images"][1]]}
    assert "<|im_end|>" not in stub.records[0]["prompt"] and "&lt;|im_end|&gt;" in stub.records[0]["prompt"]


def test_pairwise_asks_both_orders_and_scores_win_rates(tiny, processor):
    rank = {p: i for i, p in enumerate(tiny["images"])}  # blue > green > red
    consistent = Stub(lambda r: f"Image {1 if rank[r['images'][0]] > rank[r['images'][1]] else 2} is better.")
    scorer = UnifiedRewardScorer(model=object(), processor=processor, mode="pairwise", generate=consistent)
    prompts = ["a dog"] * 3 + ["a cat"]
    scores = scorer.score(prompts, tiny["images"] + tiny["images"][:1], kind="image")
    assert scores[:3].tolist() == [0.0, 0.5, 1.0] and math.isnan(scores[3])  # a lone sample has no comparison
    assert [r["images"] for r in consistent.records[:2]] == [tiny["images"][:2], tiny["images"][1::-1]]
    assert consistent.records[0]["prompt"] == PAIR_IMAGE.format(prompt="a dog")
    assert scorer.stats()["consistent_pairs"] == 3
    biased = Stub(lambda r: "Image 1 is better.")  # position bias: every swapped pair disagrees
    tie = UnifiedRewardScorer(model=object(), processor=processor, mode="pairwise", generate=biased)
    assert tie.score(prompts[:3], tiny["images"], kind="image").tolist() == [0.5, 0.5, 0.5]
    assert tie.stats()["inconsistent_pairs"] == 3
    drop = UnifiedRewardScorer(model=object(), processor=processor, mode="pairwise", on_disagreement="drop",
                               generate=biased)
    assert drop.score(prompts[:3], tiny["images"], kind="image").isnan().all()


def test_pairwise_videos(tiny, processor):
    """Video pairs: both orders, the video prompt, frames sampled once per video (4 of 8, 32x32)."""
    def red(frames):
        return np.asarray(frames[0])[..., 0].mean()

    stub = Stub(lambda r: f"Video {1 if red(r['videos'][0]) > red(r['videos'][1]) else 2} is better,")
    scorer = UnifiedRewardScorer(model=object(), processor=processor, mode="pairwise", generate=stub, **SMALL)
    assert scorer.score(["a dog runs"] * 2, tiny["videos"], kind="video").tolist() == [0.0, 1.0]  # b starts redder
    assert [r["prompt"] for r in stub.records] == [PAIR_VIDEO.format(prompt="a dog runs")] * 2
    first, swapped = stub.records
    assert first["videos"] == swapped["videos"][::-1] and first["video_fps"] == [4.0, 4.0]
    assert [len(v) for v in first["videos"]] == [4, 4] and first["videos"][0][0].size == (32, 32)


@pytest.fixture(scope="module")
def digit_processor():
    """A Qwen2.5-VL processor whose word tokenizer holds "Final", "Score", ":" and the digits 1-5."""
    import transformers as tf
    from vlm_family_fixtures import QWEN_SPECIALS, QWEN_TEMPLATE

    from mmalign.toytext import build_word_tokenizer

    tok = build_word_tokenizer(["Final", "Score", ":", ".", "1", "2", "3", "4", "5", "red", "dog", "good"])
    tok.add_tokens(QWEN_SPECIALS, special_tokens=True)
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 1024, "longest_edge": 4096})
    return tf.Qwen2_5_VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                  video_processor=tf.Qwen2VLVideoProcessor(**sizes), chat_template=QWEN_TEMPLATE)


def _answer(tokenizer, text, seed):
    """(ids, step logits) of a written answer: random logits, seeded."""
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    return ids, torch.randn(len(ids), len(tokenizer), generator=torch.Generator().manual_seed(seed))


def _by_hand(tokenizer, ids, logits):
    """sum_k k p(k) / sum_k p(k) at the step that wrote the digit, in float64."""
    t = next(i for i, v in enumerate(ids.tolist()) if tokenizer.decode([v]) in "12345")
    p = torch.softmax(logits[t].double(), -1)
    mass = {k: p[tokenizer.convert_tokens_to_ids(str(k))] for k in range(1, 6)}
    return float(sum(k * m for k, m in mass.items()) / sum(mass.values()))


def test_expected_readout_weights_the_score_digits(tiny, digit_processor, processor):
    from mmalign.scoring.unifiedreward import expected_score

    tok = digit_processor.tokenizer
    digits = {k: tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)}
    ids, logits = _answer(tok, "red dog Final Score: 4.", 0)
    assert tok.decode(ids) == "red dog Final Score : 4 ."
    assert expected_score(ids, logits, tok, digits) == pytest.approx(_by_hand(tok, ids, logits), abs=1e-12)
    for text in ("red dog good", "Final Score: 4 Final Score: 2", "Final Score: 3.5", "Final Score: 4 good"):
        assert expected_score(*_answer(tok, text, 1), tok, digits) is None
    answers = {tiny["images"][0]: _answer(tok, "Final Score: 2", 2), tiny["images"][1]: _answer(tok, "good", 3),
               tiny["images"][2]: _answer(tok, "dog 2 Final Score: 5", 4)}

    def stub(model, processor, records, **kwargs):
        return [answers[r["images"][0]] for r in records]

    scorer = UnifiedRewardScorer(model=object(), processor=digit_processor, readout="expected", generate_logits=stub)
    scores = scorer.score(["a dog"] * 3, tiny["images"], kind="image")
    assert scores[0].item() == pytest.approx(_by_hand(tok, *answers[tiny["images"][0]]), abs=1e-6)
    assert math.isnan(scores[1]) and scorer.stats()["unparsed_answers"] == 1
    last_ids, last_logits = answers[tiny["images"][2]]  # the "2" before "Final Score:" is not the score
    assert scores[2].item() == pytest.approx(_by_hand(tok, last_ids[2:], last_logits[2:]), abs=1e-6)
    with pytest.raises(DataError, match="images only"):
        scorer.score(["a dog"], tiny["videos"][:1], kind="video")
    with pytest.raises(ConfigError, match="reads a pointwise score"):
        UnifiedRewardScorer(model=object(), processor=digit_processor, mode="pairwise", readout="expected")
    with pytest.raises(ConfigError, match="no single token for each of 1-5"):
        UnifiedRewardScorer(model=object(), processor=processor, readout="expected")


def test_generate_with_logits_returns_each_steps_logits(tiny):
    """Step t's logits are the model's next-token logits after the prompt and answer tokens < t."""
    from mmalign.scoring.unifiedreward import _chat_inputs, generate_verdicts, generate_with_logits

    scorer = UnifiedRewardScorer(str(tiny["folder"]), max_new_tokens=3, **SMALL)
    model, processor = scorer.model, scorer.processor
    records = [scorer.record("a red dog", [tiny["images"][0]], "image")]
    ((ids, logits),) = generate_with_logits(model, processor, records, max_new_tokens=3)
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == \
        generate_verdicts(model, processor, records, max_new_tokens=3)[0]
    prompt = processor(**_chat_inputs(processor, records), return_tensors="pt")
    per_token = [k for k, v in prompt.items() if k != "input_ids" and v.shape == prompt["input_ids"].shape]
    for t in range(3):
        inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], ids[None, :t]], 1),
                      attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + t, dtype=torch.long))
        inputs |= {k: torch.cat([prompt[k], torch.zeros(1, t, dtype=prompt[k].dtype)], 1)
                   for k in per_token if k != "attention_mask"}  # mm_token_type_ids: text
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits[0, -1], logits[t], rtol=1e-4, atol=1e-4)
        assert int(logits[t].argmax()) == int(ids[t])  # greedy


def test_bad_inputs_are_one_line(tiny, processor):
    from mmalign.scoring import load_scorer

    with pytest.raises(ConfigError, match="mode 'listwise' is not"):
        load_scorer(f"unifiedreward={tiny['folder']},mode=listwise")
    scorer = UnifiedRewardScorer(model=object(), processor=processor, generate=Stub(lambda r: ""))
    with pytest.raises(DataError, match="condition images"):
        scorer.score(["a dog"], tiny["images"][:1], images=[[tiny["images"][1]]], kind="image")
    with pytest.raises(DataError, match="not 'text'"):
        scorer.score(["a dog"], ["some text"], kind="text")


def official_answer(model, processor, content, video_fps=None):
    """The official script's call: one user turn, processor (with the video's sampled fps as
    qwen-vl-utils' video_kwargs give it), greedy generate, new tokens decoded."""
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [c["image"] for c in content if c["type"] == "image"]
    videos = [c["video"] for c in content if c["type"] == "video"]
    kwargs = {"images": images} if images else {
        "videos": videos, "video_metadata": [{"fps": video_fps, "total_num_frames": len(videos[0]),
                                              "frames_indices": list(range(len(videos[0])))}]}
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    if videos:  # Qwen2.5-VL's time positions: temporal patch 2 / sampled fps
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / video_fps])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_tiny_qwen25_generates_on_images_and_videos(tiny):
    """The real generation path: the scorer's answers are the official script's answers on the
    same inputs, and its scores are those answers parsed by hand; batching changes nothing."""
    from PIL import Image

    from mmalign.scoring.unifiedreward import _chat_inputs, generate_verdicts

    spy = Stub(None)
    spy.answers = []

    def generate(model, processor, records, **kwargs):
        spy.records += records
        spy.answers += generate_verdicts(model, processor, records, **kwargs)
        return spy.answers[-len(records):]

    scorer = UnifiedRewardScorer(str(tiny["folder"]), max_new_tokens=4, batch_size=1, generate=generate, **SMALL)
    image_scores = scorer.score(["a red dog", LONG], [tiny["images"][0], tiny["images"][2]], kind="image")
    video_scores = scorer.score(["a dog runs"], tiny["videos"][:1], kind="video")
    frames = spy.records[2]["videos"][0]
    assert len(frames) == 4 and spy.records[2]["video_fps"] == [4 / 8 * 8.0]  # 4 of 8 frames at 8 fps
    model, processor = scorer.model, scorer.processor
    by_hand = [official_answer(model, processor, [{"type": "image", "image": Image.open(tiny["images"][i])},
                                                  {"type": "text", "text": POINT_IMAGE.format(prompt=p)}])
               for i, p in ((0, "a red dog"), (2, LONG))]
    video_text = POINT_VIDEO.format(prompt="a dog runs")
    by_hand.append(official_answer(model, processor, [{"type": "video", "video": frames},
                                                      {"type": "text", "text": video_text}], video_fps=4.0))
    assert by_hand == spy.answers and all(by_hand) and by_hand[0] != by_hand[1]  # words, differing per image
    ours = processor(**_chat_inputs(processor, spy.records[2:3]), return_tensors="pt")
    assert ours["second_per_grid_ts"].tolist() == [0.5]  # temporal patch 2 / 4 fps, as the official video_kwargs
    logits = []  # the frame rate moves Qwen2.5-VL's time positions: transformers' default 24 fps is another input
    for fps in (4.0, 24.0):
        inputs = processor(**_chat_inputs(processor, [dict(spy.records[2], video_fps=[fps])]), return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    expected = [parse_final_score(a, 1.0, high) for a, high in zip(by_hand, (5.0, 5.0, 10.0))]
    got = [None if math.isnan(v) else v for v in torch.cat([image_scores, video_scores]).tolist()]
    assert got == expected
    records = [scorer.record(p, [tiny["images"][i]], "image") for i, p in ((0, "a red dog"), (2, LONG))]
    inputs = processor(**_chat_inputs(processor, records), padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded (left)
    assert generate_verdicts(model, processor, records, max_new_tokens=4, batch_size=2) == by_hand[:2]


def test_score_command_on_image_and_video_manifests(tiny, tmp_path, capsys):
    import shutil

    from mmalign.cli import main
    from mmalign.generate.manifest import read_manifest, write_manifest

    for kind, files in (("image", tiny["images"][:2]), ("video", tiny["videos"])):
        out = tmp_path / kind
        (out / "media").mkdir(parents=True)
        rows = []
        for j, f in enumerate(files):
            shutil.copy(f, out / "media" / f"{j}{f[-4:]}")
            rows.append({"id": str(j), "prompt_index": 0, "prompt": "a dog", "sample": j, "seed": j, "kind": kind,
                         "path": f"media/{j}{f[-4:]}"})
        write_manifest(rows, out / "manifest.jsonl")
        spec = f"unifiedreward={tiny['folder']},mode=pairwise,max_new_tokens=3,frames=4,min_pixels=1024,max_pixels=1024"
        assert main(["score", str(out), "--scorer", spec]) == 0
        scored = read_manifest(out)
        assert all("score_unifiedreward" in r for r in scored)
        # a random model writes no verdict: unparsed answers leave the rows unscored and are reported
        assert all(r["score_unifiedreward"] is None for r in scored)
        captured = capsys.readouterr()
        assert "2 unparsed answers, 1 unparsed pairs" in captured.out + captured.err  # one pair, both orders
