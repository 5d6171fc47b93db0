"""UnifiedReward (Wang et al. 2025; CodeGoat24/UnifiedReward, MIT): a generative Qwen2.5-VL
reward model (`CodeGoat24/UnifiedReward-qwen-7b`) that WRITES its verdict (METHODS.md E.3).

Prompts are the official inference scripts' (`inference_qwen/{image,video}_generation/
qwen_{point_score,pair_rank}_*_generation.py`), one user turn [media..., text], the caption in
"Text Caption: [{prompt}]" (special tokens and chat markers in it escaped, `judge.neutralise`):

- pointwise: the answer ends with "Final Score: S". Image: S in [1, 5]; video: S in [1, 10].
  score = S. Strict: "Final Score:" occurs exactly once and only the number (and an optional
  period) follows it; anything else is unparsed: NaN, counted in `stats()` (the official script
  takes the first integer after the last "Final Score:" and 0 when there is none).
- pairwise: two images (videos) and "Image 1 is better." / "Image 2 is better." / "Both images
  are equally good." ("Video 1 is better", ...). Strict: exactly one of the three phrases occurs
  in the answer (case-insensitive; "Image 1 is better than Image 2." counts as the first). Each
  pair is asked in both orders and merged as the local judge does (`judge.merge_verdicts`:
  agreement -> that verdict, disagreement -> tie, or dropped with on_disagreement=drop); each
  sample scores its win rate (wins + ties/2) / decided comparisons among its prompt's samples.

Readout (`readout`, pointwise): `written` (default) is the number the model wrote (greedy
decoding). `expected` (images only) is the probability-weighted score at the step where the model
wrote its score digit d (right after "Final Score:"), with p = softmax(logits at that step) (V,):

    E[S] = sum_{k=1..5} k p(k) / sum_{k=1..5} p(k)      over the single tokens "1" ... "5"

a continuous reward (fewer ties within a group) that equals the written S when the model is
certain; the answer must still parse, with an integer S (the digit's step is then unambiguous).
The video scale has no such readout: "10" is two tokens ("1", "0") in Qwen's tokenizer, so
P("1") mixes 1 and 10.

Videos: frames sampled and resized as qwen-vl-utils does (`qwen_frames.sample_frames`, fps=2 by
default) and given to the processor with their sampled frame rate (`video_metadata`), which
Qwen2.5-VL turns into M-RoPE time positions (second_per_grid_ts = temporal_patch / fps, as the
official `**video_kwargs`); without it transformers assumes 24 fps (second_per_grid_ts 1/12),
so generation goes through `generate_verdicts` here, not `generate_answers`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError, DataError
from mmalign.scoring.base import Scorer, chunks, resolve_dtype

POINT_IMAGE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text "
    "caption, evaluate their presence in the generated image using the format: 'element (type): value' (where "
    "value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]")
POINT_VIDEO = (
    "Suppose you are an expert in judging and evaluating the quality of AI-generated videos, please watch the frames "
    "of a given video and see the text prompt for generating the video.\nThen give scores from 5 different "
    "dimensions:\n(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and "
    "color\n(2) temporal consistency, the consistency of objects or humans in video\n(3) dynamic degree, the degree "
    "of dynamic changes\n(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n\n"
    "For each dimension, output a number from [1,2,3,4], \nin which '1' means 'Bad', '2' means 'Average', '3' means "
    "'Good', \n'4' means 'Real' or 'Perfect' (the video is like a real video)\nFinally, based on above 5 dimensions, "
    "assign a score from 1 to 10 after 'Final Score:'\nHere is an output example:\nvisual quality: 4\ntemporal "
    "consistency: 4\ndynamic degree: 3\ntext-to-video alignment: 1\nfactual consistency: 2\nFinal Score: 6\n\n"
    "**Note: In the example above, scores are placeholders meant only to demonstrate the format. Your actual "
    "evaluation should be based on the quality of the given video.**\nYour task is provided as follows: Text "
    "Prompt: [{prompt}]")
PAIR_IMAGE = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
    "compare these images based on two key criteria:\n1. Alignment with the Caption: Assess how well each image "
    "aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes "
    "as described in the caption.\n2. Overall Image Quality: Examine the visual quality of each image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nCompare both images using the "
    "above criteria and select the one that better aligns with the caption while exhibiting superior visual quality."
    "\nProvide a clear conclusion such as \"Image 1 is better.\", \"Image 2 is better.\" and \"Both images are "
    "equally good.\"\nYour task is provided as follows:\nText Caption: [{prompt}]")
PAIR_VIDEO = (
    "Imagine you are an expert tasked with evaluating AI-generated videos. You are provided with a text caption and "
    "two videos generated based on that caption. Your job is to assess and compare these videos based on the "
    "following two main factors:\n\n1. Caption Alignment: Evaluate how closely each video matches the description "
    "provided in the caption. Pay attention to the accuracy of objects depicted, their relationships, and any "
    "attributes described in the caption.\n\n2. Overall Video Quality: Look at the overall visual appeal of each "
    "video, considering clarity, the level of detail, color accuracy, and how aesthetically pleasing the video is."
    "\n\nUsing these factors, compare the two videos and determine which one better reflects the caption and "
    "exhibits better visual quality.\n\nGive your final judgment, such as 'Video 1 is better,' 'Video 2 is better,' "
    "or 'Both videos are equally good.'\n\nYour task is as follows:\nText Caption: [{prompt}]\n")
TEMPLATES = {("pointwise", "image"): POINT_IMAGE, ("pointwise", "video"): POINT_VIDEO,
             ("pairwise", "image"): PAIR_IMAGE, ("pairwise", "video"): PAIR_VIDEO}
SCALE = {"image": (1.0, 5.0), "video": (1.0, 10.0)}
_FINAL = re.compile(r"final score\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*\.?\s*")
_BEFORE_DIGIT = re.compile(r"final score\s*:\s*$", re.IGNORECASE)


def parse_final_score(answer: str, low: float, high: float) -> float | None:
    """S when "Final Score:" occurs exactly once and only `S[.]` follows it, low <= S <= high; else None."""
    parts = _FINAL.split(answer)
    if len(parts) != 2:
        return None
    m = _NUMBER.fullmatch(parts[1])
    if m is None:
        return None
    value = float(m.group(1))
    return value if low <= value <= high else None


def parse_preference(answer: str, kind: str) -> str | None:
    """'A' (item 1 better), 'B' or 'tie' when exactly one conclusion phrase occurs; else None."""
    noun = "image" if kind == "image" else "video"
    phrases = {f"{noun} 1 is better": "A", f"{noun} 2 is better": "B", f"both {noun}s are equally good": "tie"}
    text = answer.lower()
    found = [(verdict, text.count(phrase)) for phrase, verdict in phrases.items()]
    hits = [verdict for verdict, n in found for _ in range(n)]
    return hits[0] if len(hits) == 1 else None


def _chat_inputs(processor: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Processor inputs of records {"prompt", "images"} | {"prompt", "videos", "video_fps"}: one
    user turn [media..., text] each through the chat template, as the official scripts build it."""
    from mmalign.data.media import load_image

    texts, images, videos, metadata = [], [], [], []
    for k, r in enumerate(records):
        media = [{"type": "image"}] * len(r.get("images", [])) + [{"type": "video"}] * len(r.get("videos", []))
        messages = [{"role": "user", "content": media + [{"type": "text", "text": r["prompt"]}]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images += [load_image(v, f"unifiedreward, prompt {k}") for v in r.get("images", [])]
        for frames, fps in zip(r.get("videos", []), r.get("video_fps", []), strict=True):
            videos.append(frames)
            metadata.append({"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))})
    media_inputs = ({"images": images} if images else {}) | (
        {"videos": videos, "video_metadata": metadata} if videos else {})
    return {"text": texts, **media_inputs}


def _greedy(model: Any, processor: Any, records: list[dict[str, Any]], max_new_tokens: int, batch_size: int,
            logits: bool) -> list[tuple[Tensor, Tensor | None]]:
    """Per record: (new token ids (T,), their step logits (T, V) float32 when `logits`), greedy,
    batches left padded; ids past the end of an answer are padding."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[tuple[Tensor, Tensor | None]] = []
    for part in chunks(len(records), batch_size):
        batch = processor(**_chat_inputs(processor, records[part]), padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            result = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                                    output_logits=logits, return_dict_in_generate=True)
        new = result.sequences[:, batch["input_ids"].shape[1]:].cpu()
        steps = torch.stack(result.logits, 1).float().cpu() if logits else None  # (B, T, V)
        out += [(new[b], None if steps is None else steps[b]) for b in range(len(new))]
    return out


def generate_verdicts(model: Any, processor: Any, records: list[dict[str, Any]], *, max_new_tokens: int,
                      do_sample: bool = False, batch_size: int = 4) -> list[str]:
    """Greedy answers (new tokens decoded, special tokens skipped, stripped)."""
    if do_sample:
        raise ValueError("unifiedreward decodes greedily")
    decode = processor.tokenizer.decode
    return [decode(ids, skip_special_tokens=True).strip()
            for ids, _ in _greedy(model, processor, records, max_new_tokens, batch_size, False)]


def generate_with_logits(model: Any, processor: Any, records: list[dict[str, Any]], *, max_new_tokens: int,
                         batch_size: int = 4) -> list[tuple[Tensor, Tensor]]:
    """Greedy (new token ids (T,), step logits (T, V)) per record, as `generate_verdicts` decodes."""
    return [(ids, steps) for ids, steps in _greedy(model, processor, records, max_new_tokens, batch_size, True)
            if steps is not None]


def expected_score(ids: Tensor, logits: Tensor, tokenizer: Any, digits: dict[int, int]) -> float | None:
    """E[S] at the one step that writes a score digit right after "Final Score:" (module docstring);
    None when the answer does not parse, its score is no integer, or no single such step exists.
    digits: score k -> its token id."""
    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    written = parse_final_score(answer, min(digits), max(digits))
    steps = [t for t in range(len(ids)) if int(ids[t]) in digits.values()
             and _BEFORE_DIGIT.search(tokenizer.decode(ids[:t], skip_special_tokens=True))]
    if written is None or len(steps) != 1 or written != next(k for k, i in digits.items() if i == int(ids[steps[0]])):
        return None
    p = torch.softmax(logits[steps[0]].double(), -1)
    mass = torch.stack([p[i] for i in digits.values()])
    return float((torch.tensor(list(digits), dtype=torch.float64) * mass).sum() / mass.sum())


class UnifiedRewardScorer(Scorer):
    """A local UnifiedReward (Qwen2.5-VL) model; modes and parsing in the module docstring.

    path: model folder or Hub id (ignored when `model` and `processor` are given). mode:
    pointwise | pairwise (`groupwise`). Options: readout (written | expected), on_disagreement
    (tie | drop), max_new_tokens, fps / frames / min_pixels / max_pixels (video sampling), dtype,
    batch_size; `generate` / `generate_logits` (`generate_verdicts` / `generate_with_logits`-
    compatible functions: tests) replace generation.
    """

    kinds = ("image", "video")
    takes_images = True

    def __init__(self, path: str | None = None, *, mode: str = "pointwise", readout: str = "written",
                 on_disagreement: str = "tie",
                 max_new_tokens: int = 512, fps: float = 2.0, frames: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, device: str | torch.device = "cpu", batch_size: int = 4,
                 dtype: str | None = None, model: Any = None, processor: Any = None,
                 generate: Callable[..., list[str]] | None = None,
                 generate_logits: Callable[..., list[tuple[Tensor, Tensor]]] | None = None) -> None:
        from mmalign.scoring.judge import judge_markers, load_judge_model
        from mmalign.scoring.qwen_frames import VIDEO_MIN_PIXELS

        super().__init__(device=device, batch_size=batch_size)
        if mode not in ("pointwise", "pairwise"):
            raise ConfigError(f"unifiedreward mode {mode!r} is not 'pointwise' or 'pairwise'")
        if on_disagreement not in ("tie", "drop"):
            raise ConfigError(f"unifiedreward on_disagreement {on_disagreement!r} is not 'tie' or 'drop'")
        if readout not in ("written", "expected"):
            raise ConfigError(f"unifiedreward readout {readout!r} is not 'written' or 'expected'")
        if readout == "expected" and mode != "pointwise":
            raise ConfigError("unifiedreward readout=expected reads a pointwise score; mode is pairwise")
        if model is None:
            if path is None:
                raise ConfigError("unifiedreward: give the model folder or Hub id (PATH)")
            model, processor, _ = load_judge_model(path, self.device, resolve_dtype(dtype))
        if getattr(processor, "video_processor", None) is None:
            raise ConfigError("unifiedreward: the model's processor is not a Qwen-VL processor (no video processor)")
        self.model, self.processor = model, processor
        self.mode, self.on_disagreement, self.max_new_tokens = mode, on_disagreement, int(max_new_tokens)
        self.groupwise = mode == "pairwise"
        self.sampling = dict(fps=fps, frames=frames, min_pixels=min_pixels or VIDEO_MIN_PIXELS, max_pixels=max_pixels)
        self.markers = judge_markers(processor)
        self.generate = generate or generate_verdicts
        self.generate_logits = generate_logits or generate_with_logits
        self.readout, self.digits = readout, self._digits(readout)
        self.counts: Counter[str] = Counter()
        self._clips: dict[str, tuple[list[Any], float]] = {}

    @classmethod
    def is_groupwise(cls, options: dict[str, Any]) -> bool:
        return options.get("mode", "pointwise") == "pairwise"

    def _digits(self, readout: str) -> dict[int, int]:
        """Score k -> its single token id, for readout=expected on the image scale (else {})."""
        from mmalign.scoring.claims import answer_token_ids

        if readout == "written":
            return {}
        low, high = (int(v) for v in SCALE["image"])
        digits = {k: answer_token_ids(self.processor.tokenizer, [str(k)]) for k in range(low, high + 1)}
        if any(len(ids) != 1 for ids in digits.values()):
            raise ConfigError("unifiedreward readout=expected: the tokenizer has no single token for each of 1-5")
        return {k: ids[0] for k, ids in digits.items()}

    def _expected(self, records: list[dict[str, Any]]) -> list[float | None]:
        """readout=expected: E[S] per record (None = unparsed)."""
        results = self.generate_logits(self.model, self.processor, records, max_new_tokens=self.max_new_tokens,
                                       batch_size=self.batch_size)
        if len(results) != len(records):
            raise RuntimeError(f"unifiedreward generate returned {len(results)} answers for {len(records)} prompts")
        self.counts["answers"] += len(results)
        return [expected_score(ids, logits, self.processor.tokenizer, self.digits) for ids, logits in results]

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def _frames(self, video: Any, where: str) -> tuple[list[Any], float]:
        """(sampled frames, their fps) of a video, decoded once per `score` call (pairs reuse them)."""
        from PIL import Image

        from mmalign.scoring.qwen_frames import sample_frames, video_factor

        key = str(video)
        if key not in self._clips:
            clip, fps = sample_frames(video, where, factor=video_factor(self.processor), **self.sampling)
            self._clips[key] = ([Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in clip], fps)
        return self._clips[key]

    def record(self, condition: str, media: Sequence[Any], kind: str) -> dict[str, Any]:
        """The generation record of one question: the official text for (mode, kind), the
        media in order (item 1 first); videos as their sampled frame lists."""
        from mmalign.scoring.judge import neutralise

        text = TEMPLATES[(self.mode, kind)].format(prompt=neutralise(condition, self.markers))
        if kind == "video":
            clips = [self._frames(v, "unifiedreward, video") for v in media]
            return {"prompt": text, "videos": [c for c, _ in clips], "video_fps": [fps for _, fps in clips]}
        return {"prompt": text, "images": list(media)}

    def _ask(self, records: list[dict[str, Any]]) -> list[str]:
        answers = self.generate(self.model, self.processor, records, max_new_tokens=self.max_new_tokens,
                                do_sample=False, batch_size=self.batch_size)
        if len(answers) != len(records):
            raise RuntimeError(f"unifiedreward generate returned {len(answers)} answers for {len(records)} prompts")
        self.counts["answers"] += len(answers)
        return list(answers)

    def compare(self, conditions: Sequence[str], first: Sequence[Any], second: Sequence[Any], kind: str) -> list[str]:
        """Verdicts of (first, second), each asked in both orders: 'first' | 'second' | 'tie' |
        'inconsistent' (on_disagreement='drop') | 'unparsed'."""
        from mmalign.scoring.judge import merge_verdicts

        records = []
        for c, x, y in zip(conditions, first, second, strict=True):
            records += [self.record(c, [x, y], kind), self.record(c, [y, x], kind)]
        verdicts = [parse_preference(a, kind) for a in self._ask(records)]
        self.counts["unparsed_answers"] += sum(v is None for v in verdicts)
        outcomes = []
        for a, b in zip(verdicts[::2], verdicts[1::2]):
            outcomes.append(merge_verdicts(a, b, self.on_disagreement))
            strict = merge_verdicts(a, b, "drop")
            self.counts[{"unparsed": "unparsed_pairs", "inconsistent": "inconsistent_pairs"}.get(
                strict, "consistent_pairs")] += 1
        return outcomes

    def score(self, conditions: Sequence[str], outputs: Sequence[Any], images: Sequence[Sequence[Any]] | None = None,
              kind: str = "image") -> Tensor:
        """(N,) float32: the written Final Score (NaN = unparsed), or pairwise win rates within
        each prompt's samples (NaN = no decided comparison)."""
        from mmalign.scoring.judge import win_rates

        if len(conditions) != len(outputs):
            raise ValueError(f"{len(conditions)} conditions for {len(outputs)} outputs")
        if kind not in self.kinds:
            raise DataError(f"unifiedreward scores image or video samples, not {kind!r}")
        if images is not None and any(images):
            raise DataError("unifiedreward scores generated media against a text prompt; these rows carry "
                            "condition images")
        self._clips = {}
        if self.mode == "pointwise":
            records = [self.record(c, [o], kind) for c, o in zip(conditions, outputs)]
            if self.readout == "expected" and kind != "image":
                raise DataError("unifiedreward readout=expected scores images only (the video scale's 10 is "
                                "two tokens)")
            values = (self._expected(records) if self.readout == "expected"
                      else [parse_final_score(a, *SCALE[kind]) for a in self._ask(records)])
            self.counts["unparsed_answers"] += sum(v is None for v in values)
            return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(conditions):
            groups.setdefault(c, []).append(i)
        pairs = [(i, j) for idx in groups.values() for a, i in enumerate(idx) for j in idx[a + 1:]]
        outcomes = self.compare([conditions[i] for i, _ in pairs], [outputs[i] for i, _ in pairs],
                                [outputs[j] for _, j in pairs], kind)
        return win_rates(len(outputs), pairs, outcomes)
