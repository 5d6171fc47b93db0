"""VLM DPO at a realistic image-token count and length mix: mmalign vs TRL's DPOTrainer (VLM mode).

The model is LLaVA-1.5-shaped where it matters for the sequence: a CLIP tower at 336 px with
14-px patches (576 image tokens per image, LLaVA-1.5's count; the CLS dropped by the "default"
feature strategy), a 2-layer MLP projector and a Llama with LLaVA-1.5's 32,064-entry vocabulary
and an untied head, at small depth and width so it fits this CPU (vision hidden 64, text hidden
256, 2 + 2 layers). The tokenizer is word-level (`mmalign.toyvlm.build_vlm_tokenizer` over the
toy words + synthetic words up to 32,064 ids), so token counts are word counts on both sides.

Length mix (per pair, numpy seed `seed`): prompt words ~ round(LogNormal(log 24, 0.7)) clipped to
[4, 256]; each answer ~ round(LogNormal(log 64, 0.9)) clipped to [2, 384]; words Zipf(1.1) over
the vocabulary. So a sequence is 576 image tokens + a long-tailed text part, chosen and rejected
of different lengths. One 336-px PNG per pair (a drawn shape; the processor resizes and crops it).

Sides (each in a fresh interpreter): `mmalign` (its defaults: the chunked LM head; llava
modality, full fine-tune, frozen reference, no checkpointing) and `trl` (DPOTrainer in VLM mode
with mmalign's optimizer settings, as `benchmarks.vlm_dpo`). Before timing, the first batches
are collated by both (`vlm_dpo.token_check`): ids, masks, answer masks and pixel values must be
identical (ids where the attention mask is set: `vlm_dpo.token_check`), and the first losses
must agree (`--loss-tol`), else exit 1.

    python -m benchmarks.vlm_real                      # ~3 minutes on 2 idle CPU cores
    python -m benchmarks.vlm_real --steps 3 --warmup 1 --num-pairs 8 --vocab 512   # the CI size
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import measure, vlm_dpo

VOCAB = 32_064  # llava-hf/llava-1.5-7b-hf text_config.vocab_size


@dataclasses.dataclass
class Settings(vlm_dpo.Settings):
    steps: int = 8
    warmup: int = 2
    batch_size: int = 2  # pairs per step (4 sequences, 4 images per forward)
    image_size: int = 336
    patch_size: int = 14  # 576 image tokens per image
    num_pairs: int = 32
    lr: float = 1e-5
    max_length: int = 2048  # nothing is truncated (the longest sequence is 577 + 256 + 384 + 6)
    threads: int = 2
    vocab: int = VOCAB


def words(s: Settings) -> list[str]:
    from mmalign.toyvlm import VLM_WORDS

    return VLM_WORDS + [f"w{i}" for i in range(s.vocab - len(VLM_WORDS) - 4)]  # 4 specials come first


def length_mix(s: Settings, vocab: list[str]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts drawn as the module docstring says."""
    import numpy as np

    rng = np.random.default_rng(s.seed)
    common = len(vocab) - 1

    def text(n: int) -> str:
        return " ".join(vocab[min(int(k), common)] for k in rng.zipf(1.1, n) + 14)  # skip <image>, USER, ...

    out = []
    for _ in range(s.num_pairs):
        p = int(np.clip(round(rng.lognormal(np.log(24), 0.7)), 4, 256))
        c, r = (int(np.clip(round(rng.lognormal(np.log(64), 0.9)), 2, 384)) for _ in range(2))
        out.append((text(p), text(c), text(r)))
    return out


def prepare(workdir: Path, s: Settings) -> dict[str, Any]:
    """Save the model, processor, PNGs and pairs; returns the token check and length statistics."""
    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging

    from mmalign.toyvlm import (COLOURS, SHAPES, build_tiny_llava_processor, build_vlm_tokenizer, draw_shape,
                                tiny_llava_config)

    logging.disable_progress_bar()
    vocab = words(s)
    tokenizer = build_vlm_tokenizer(vocab)
    tokenizer.model_max_length = 4 * s.max_length
    sizes = dict(image_size=s.image_size, patch_size=s.patch_size)
    config = tiny_llava_config(tokenizer, text_hidden=s.text_hidden, vision_hidden=s.vision_hidden, **sizes)
    config.text_config.max_position_embeddings = s.max_length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        LlavaForConditionalGeneration(config).save_pretrained(workdir / "model")
    build_tiny_llava_processor(tokenizer, **sizes).save_pretrained(workdir / "model")
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    lines, lengths = [], []
    for i, (prompt, chosen, rejected) in enumerate(length_mix(s, vocab)):
        draw_shape(list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)], size=s.image_size).save(
            workdir / "images" / f"{i:05d}.png")
        lines.append(json.dumps({"images": [f"images/{i:05d}.png"], "prompt": prompt, "chosen": chosen,
                                 "rejected": rejected}))
        lengths += [len(prompt.split()) + len(a.split()) for a in (chosen, rejected)]
    (workdir / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    check = vlm_dpo.token_check(workdir, s, batches=2, ids_on_mask=True)
    check.pop("example_chosen_tokens")
    text = np.array(lengths)
    check["text_tokens"] = {"median": float(np.median(text)), "p90": float(np.percentile(text, 90)),
                            "max": int(text.max()), "min": int(text.min())}
    return check


def load_settings(workdir: Path) -> Settings:
    data = json.loads((workdir / "settings.json").read_text())
    return Settings(**{f.name: data[f.name] for f in dataclasses.fields(Settings)})


SIDES = {"mmalign": vlm_dpo.run_mmalign, "trl": vlm_dpo.run_trl}


def parse(argv: list[str] | None) -> tuple[Settings, float, Path]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vlm_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("steps", "warmup", "batch_size", "num_pairs", "vocab", "threads", "image_size", "patch_size"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Settings, name))
    p.add_argument("--loss-tol", type=float, default=1e-4, help="max |loss difference| over the steps")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vlm_real.json")
    a = p.parse_args(argv)
    s = Settings(**{k: getattr(a, k) for k in ("steps", "warmup", "batch_size", "num_pairs", "vocab", "threads",
                                                "image_size", "patch_size")})
    if not 0 <= s.warmup < s.steps:
        p.error("need 0 <= --warmup < --steps")
    return s, a.loss_tol, a.out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import run_side

    s, tol, out = parse(argv)
    with tempfile.TemporaryDirectory(prefix="mmalign_bench_vlm_real_") as tmp:
        check = prepare(Path(tmp), s)
        print(f"[bench] tokens identical (mmalign collate vs TRL collator): {check['identical']}; "
              f"image tokens {check['image_tokens_per_image']}, text tokens {check['text_tokens']}", flush=True)
        runs = {side: run_side(side, Path(tmp), s.threads, side, "benchmarks.vlm_real") for side in SIDES}
    mm, trl = runs["mmalign"], runs["trl"]
    diff = max(abs(x - y) for x, y in zip(mm["losses"], trl["losses"]))
    ok = diff <= tol and check["identical"]
    table = "\n".join([
        f"VLM DPO, LLaVA-1.5-shaped (CLIP {s.image_size}px/{s.patch_size}: {check['image_tokens_per_image']} image "
        f"tokens, vocabulary {s.vocab:,}, hidden {s.vision_hidden}/{s.text_hidden}, 2+2 layers), batch "
        f"{s.batch_size} pairs, {s.steps} steps ({s.warmup} warm-up), fp32, {s.threads} threads; text tokens per "
        f"sequence median {check['text_tokens']['median']:.0f}, max {check['text_tokens']['max']}",
        f"{'side':<12}{'pairs/s':>10}{'peak RSS +MiB':>15}{'CPU s':>8}",
        *(f"{k:<12}{r['pairs_per_s']:>10.3f}{r['rss_growth_mib']:>15.0f}{r['process_cpu_s']:>8.0f}"
          for k, r in runs.items()),
        f"mmalign/TRL: pairs/s x{mm['pairs_per_s'] / trl['pairs_per_s']:.2f}, peak memory "
        f"x{mm['rss_growth_mib'] / trl['rss_growth_mib']:.2f}; tokens "
        f"{'identical' if check['identical'] else 'DIFFER'}; losses max |Δ| {diff:.1e} "
        f"({'agree' if diff <= tol else 'DISAGREE'}, tol {tol:g})"])
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "vlm_real", "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.vlm_real " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": dataclasses.asdict(s),
        "token_check": check, "max_loss_diff": diff, "losses_agree": diff <= tol, "table": table, "runs": runs},
        indent=1))
    print(f"\n[bench] wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    if "--side" in sys.argv:
        measure.run_side(__doc__, SIDES, load_settings, vlm_dpo._import_both_stacks, sys.argv[1:])
    else:
        sys.exit(main())
