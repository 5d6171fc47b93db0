"""Train the shipped toy captioner `mmalign/data/toyworld/captioner/` (pkg://toyworld/captioner).

Rerun from the repository root (CPU, one thread; 531 s on a 2-core machine shared with one other job):

    OMP_NUM_THREADS=1 .venv/bin/python pipelines/train_toy_captioner.py

What it does (all seeded; the world and the models are in `mmalign/toyworld/`):
1. Samples `--n-images` 32×32 scenes of split train (1-3 of 7 shapes) and captions them like
   web data (`web_caption`): the true caption, plus the ABSENT co-occurring partner of an
   object (square-circle, triangle-diamond, cross-ring) with probability `--partner-prob`
   (0.6). Hallucination then comes from the captions, not from poor perception (METHODS §9).
2. SFT of the tiny LLaVA (`build_captioner`) on "USER : <image> describe the image .
   ASSISTANT :" + caption + eos, loss on the answer only (the same layout `mmalign train
   --modality llava` scores), AdamW with warm-up and cosine decay.
   Mixed in: POPE-style yes/no questions "Is there a circle in the image?" answered "yes" /
   "no" from the TRUE objects (one present shape, and one absent shape: the co-occurring
   partner when it is absent, with probability 0.5), `--qa-frac` of each batch, then half of
   each batch in a second stage of `--qa-steps` at the lower `--qa-lr` (at 3e-3 answering
   stays at chance); the loss is a mean over sequences, so a 2-token answer counts as much as
   a caption. The captions stay biased, so the captioner still hallucinates when it
   describes, but it can be asked (`mmalign eval pope --suffix ""`; the tokenizer lower-cases
   POPE's own question): POPE then measures perception, CHAIR the captions.
3. Saves model (fp16 safetensors) + processor, reloads them and prints greedy CHAIR_i,
   CHAIR_s and recall (`mmalign.toyworld.checker.chair`) on held-out test images and,
   separately, on images with held-out colour-shape combinations, POPE accuracy on held-out
   test images, and the wall time.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from mmalign.toyworld.checker import chair
from mmalign.toyworld.models import build_captioner, save_shipped, shipped_size
from mmalign.toyworld.world import PROMPT, render, sample_scenes, web_caption
from mmalign.toyworld.world import yes_no_questions as world_questions

ROOT = Path(__file__).resolve().parents[1]
DATA_SEED, INIT_SEED, TRAIN_SEED, EVAL_SEED = 0, 0, 1, 0


def prompt_ids(processor, image, text: str = PROMPT) -> list[int]:
    """Token ids of the chat-template prompt with its 16 expanded image tokens."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt").input_ids[0].tolist()


def pixel_values(processor, scenes) -> torch.Tensor:
    return processor.image_processor([render(s) for s in scenes], return_tensors="pt").pixel_values


def encode_answers(processor, prompt: list[int] | list[list[int]], answers: list[str]):
    """Right-padded input_ids, attention_mask, labels (-100 outside answer + eos). `prompt`:
    one prompt for all answers, or one per answer."""
    tok = processor.tokenizer
    prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt] * len(answers)
    seqs = [p + ids + [tok.eos_token_id] for p, ids in zip(prompts, tok(answers, add_special_tokens=False).input_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for r, (p, s) in enumerate(zip(prompts, seqs)):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        labels[r, len(p):len(s)] = ids[r, len(p):len(s)]
    return ids, mask, labels


def sequence_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer-token NLL: a 2-token yes/no answer
    weighs as much as a 20-token caption (a token mean would drown the questions).
    logits (B, T, V), labels (B, T) with -100 outside the answers."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return (nll.sum(1) / keep.sum(1).clamp(min=1)).mean()


def fit(model, data, steps: int, n_qa: int, lr: float, cosine: bool, gen: torch.Generator, name: str,
        batch_size: int = 32) -> None:
    """AdamW steps on batches of `batch_size - n_qa` captions and `n_qa` yes/no questions;
    100 warm-up steps, then cosine decay to 0 (`cosine`) or a constant rate."""
    ids, mask, labels, pixels, q_ids, q_mask, q_labels, q_index = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    decay = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))) if cosine else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * decay(s))
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(ids), (batch_size - n_qa,), generator=gen)
        qdx = torch.randint(0, len(q_ids), (n_qa,), generator=gen)
        width = max(int(mask[idx].sum(-1).max()), int(q_mask[qdx].sum(-1).max()) if n_qa else 0)
        logits = model(input_ids=torch.cat([ids[idx, :width], q_ids[qdx, :width]]),
                       attention_mask=torch.cat([mask[idx, :width], q_mask[qdx, :width]]),
                       pixel_values=torch.cat([pixels[idx], pixels[q_index[qdx]]])).logits
        loss = sequence_mean_nll(logits, torch.cat([labels[idx, :width], q_labels[qdx, :width]]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"{name} step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)


def question(shape: str) -> str:
    """POPE's question text (mmalign.evaluation.pope.question_text)."""
    from mmalign.evaluation.pope import question_text

    return question_text(shape)


def yes_no_questions(scenes, rng: random.Random) -> tuple[list[str], list[str], list[int]]:
    """Two questions per scene (`world.yes_no_questions`): (questions, answers, scene index of each)."""
    asked = world_questions([s.shapes() for s in scenes], rng)
    return [question(shape) for _, shape, _ in asked], [a for _, _, a in asked], [i for i, _, _ in asked]


def pope_accuracy(model, processor, scenes, rng: random.Random) -> float:
    """Greedy yes/no accuracy on `yes_no_questions` of `scenes`."""
    texts, answers, index = yes_no_questions(scenes, rng)
    pixels = pixel_values(processor, scenes)
    correct = 0
    for text in sorted(set(texts)):  # one prompt per question text: batched greedy decoding
        rows = [k for k, t in enumerate(texts) if t == text]
        said = greedy(model, processor, prompt_ids(processor, render(scenes[0]), text),
                      pixels[[index[k] for k in rows]])
        correct += sum(s.strip() == answers[k] for s, k in zip(said, rows))
    return correct / len(texts)


@torch.no_grad()
def greedy(model, processor, prompt: list[int], pixels: torch.Tensor, batch: int = 100) -> list[str]:
    tok, out = processor.tokenizer, []
    for start in range(0, len(pixels), batch):
        px = pixels[start:start + batch]
        ids = torch.tensor([prompt] * len(px))
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px.to(model.dtype),
                             max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        out.extend(tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
    return out


def report(name: str, captions: list[str], scenes) -> dict[str, float]:
    m = chair(captions, [s.shapes() for s in scenes])
    print(f"{name}: CHAIR_i {m['chair_i']:.3f}  CHAIR_s {m['chair_s']:.3f}  recall {m['recall']:.3f}  "
          f"({len(scenes)} images)", flush=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--partner-prob", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--qa-frac", type=float, default=0.25, help="share of yes/no questions in each batch")
    ap.add_argument("--qa-steps", type=int, default=3000, help="stage 2: half questions, constant --qa-lr")
    ap.add_argument("--qa-lr", type=float, default=3e-4)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "mmalign" / "data" / "toyworld" / "captioner")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tic = time.time()
    model, processor = build_captioner(seed=INIT_SEED)
    scenes = sample_scenes(args.n_images, DATA_SEED, "train", "scenes")
    rng = random.Random(DATA_SEED)
    captions = [web_caption(s, rng, args.partner_prob) for s in scenes]
    prompt = prompt_ids(processor, render(scenes[0]))
    pixels = pixel_values(processor, scenes)
    q_texts, q_answers, q_index = yes_no_questions(scenes, random.Random(DATA_SEED + 1))
    q_prompts = {t: prompt_ids(processor, render(scenes[0]), t) for t in set(q_texts)}
    # one encoding for captions and questions: a common padded width
    ids, mask, labels = encode_answers(processor, [prompt] * len(captions) + [q_prompts[t] for t in q_texts],
                                       captions + q_answers)
    (ids, q_ids), (mask, q_mask), (labels, q_labels) = (t.split([len(captions), len(q_texts)]) for t in
                                                        (ids, mask, labels))
    q_index = torch.tensor(q_index)
    n_qa = round(args.batch_size * args.qa_frac)
    print(f"captioner {sum(p.numel() for p in model.parameters())} params; prompt {len(prompt)} tokens; "
          f"{len(scenes)} images", flush=True)
    report("training captions (web-like)", captions, scenes)

    gen = torch.Generator().manual_seed(TRAIN_SEED)
    data = (ids, mask, labels, pixels, q_ids, q_mask, q_labels, q_index)
    fit(model, data, args.steps, n_qa, args.lr, cosine=True, gen=gen, name="captions",
        batch_size=args.batch_size)
    # Stage 2: yes/no answering needs a lower learning rate than captioning (at 3e-3 it stays
    # at chance); captions keep being trained (still biased) so the hallucination stays.
    fit(model, data, args.qa_steps, round(args.batch_size * 0.5), args.qa_lr, cosine=False, gen=gen,
        name="questions", batch_size=args.batch_size)
    train_s = time.time() - tic

    save_shipped(model.eval(), processor, args.out)
    print(f"saved {args.out} ({shipped_size(args.out) / 1e6:.2f} MB) after {train_s:.0f}s", flush=True)

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(args.out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    for split in ("test", "combos"):
        held = sample_scenes(args.n_eval, EVAL_SEED, split, "scenes")
        answers = greedy(model, processor, prompt, pixel_values(processor, held))
        if split == "test":
            print("examples:", *[f"  {s.caption()} -> {a}" for s, a in zip(held[:6], answers)], sep="\n")
        report(f"greedy, held-out {split} images", answers, held)
        if split == "test":
            print(f"yes/no accuracy, held-out test images: "
                  f"{pope_accuracy(model, processor, held, random.Random(EVAL_SEED)):.3f}", flush=True)
    print(f"total wall time {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
