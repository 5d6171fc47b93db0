"""`mmalign build-pairs corrupt`: VLM pairs whose rejected answer is the policy's own answer on a
CORRUPTED image (POVID stage 2 / mDPO / OPA-DPO style, METHODS.md §4).

For each input record (`{"images", "prompt", ...}`; jsonl/json/parquet, or any `--format`):
  rejected = the model's answer to the prompt with every image corrupted (mmalign.data.corrupt:
             noise at DDPM step t, crop keeping 1-20% of the area, or 30% of pixels masked),
             seeded per record, so a rerun gives the same images;
  chosen   = the model's answer with the clean image (`--chosen clean`, default) or the
             record's ground-truth answer (`--chosen ground_truth`, column `--answer-column`).
Pairs whose answers are identical (or empty) are dropped and counted. Output: `<out>/<name>.jsonl`
in the common VLM format, clean images referenced relative to the jsonl (bytes written as PNG
under `<out>/images/`), plus provenance (source row, corruption and its seed, model, which
answer is chosen). Written atomically (the jsonl last).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from mmalign.data.corrupt import corrupt_image
from mmalign.data.media import load_image, record_images
from mmalign.errors import DataError
from mmalign.io import atomic_path, write_jsonl_atomic
from mmalign.seeds import mix_seed

CORRUPTION_DEFAULTS = {"noise": {"step": 500}, "crop": {"scale": (0.01, 0.2)}, "mask": {"ratio": 0.3, "patch": 1}}


# -- shared by the VLM builders ----------------------------------------------------------------
def read_prompt_records(path: str | Path, format: str = "auto") -> list[dict[str, Any]]:
    """Records with a prompt and images from a jsonl/json/parquet file or a `data.format` reader."""
    from mmalign.data.preference import load_preference_data, read_records

    records = list(load_preference_data(path, format=format)[0]) if format != "auto" else read_records(path)
    for i, r in enumerate(records):
        missing = [k for k in ("prompt", "images") if k not in r and not (k == "images" and "image" in r)]
        if missing:
            raise DataError(f"{path}: row {i} has no column {', '.join(map(repr, missing))}")
        if r.get("images", r.get("image")) is None:  # record_images would read it as no image at all
            raise DataError(f"{path}: row {i} has no images (the field is null)")
    return records


def load_vlm(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor) from a local image-text-to-text folder or pkg://NAME (no downloads)."""
    from mmalign.generate.text import load_text_model

    return load_text_model(path, trust_remote_code=trust_remote_code)


def image_refs(record: dict[str, Any], index: int, roots: Sequence[Path], out_dir: Path, name: str) -> list[str]:
    """The record's images as paths relative to `out_dir`: existing files are referenced, images
    given as bytes (or a dict without a usable path) are written as PNG under out_dir/images/."""
    refs = []
    for j, value in enumerate(record_images(record)):
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
        found = None
        if isinstance(path, str):
            candidates = [Path(path)] if Path(path).is_absolute() else [Path(r) / path for r in roots]
            found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            relative = f"images/{name}-{index:06d}-{j}.png"
            with atomic_path(out_dir / relative) as tmp:
                load_image(value, f"row {index}, image {j}", roots).save(tmp, format="PNG")
            refs.append(relative)
        else:
            refs.append(Path(os.path.relpath(found.resolve(), out_dir.resolve())).as_posix())
    return refs


def write_vlm_pairs(records: list[dict[str, Any]], out_dir: str | Path, name: str) -> Path:
    """Write `out_dir/<name>.jsonl` atomically; an empty list is a DataError."""
    if not records:
        raise DataError("no pairs to write")
    target = Path(out_dir) / f"{name}.jsonl"
    write_jsonl_atomic(target, records, ensure_ascii=False)
    return target


def corruption_seed(seed: int, index: int) -> int:
    """Seed of record `index`'s corrupted images."""
    return mix_seed(seed, index)


# -- the builder --------------------------------------------------------------------------------
def corrupted_records(records: list[dict[str, Any]], corruption: str, params: dict[str, Any], seed: int,
                      roots: Sequence[Path]) -> list[dict[str, Any]]:
    """Each record's prompt with its images corrupted (PIL images), seeded per record."""
    import torch

    out = []
    for i, r in enumerate(records):
        generator = torch.Generator().manual_seed(corruption_seed(seed, i))
        images = [corrupt_image(load_image(v, f"row {i}, image {j}", roots), corruption, generator, **params)
                  for j, v in enumerate(record_images(r))]
        out.append({"prompt": r["prompt"], "images": images})
    return out


def build_corrupted_image_pairs(model: Any, processor: Any, records: list[dict[str, Any]], out_dir: str | Path, *,
                                corruption: str = "noise", params: dict[str, Any] | None = None,
                                chosen: str = "clean", answer_column: str = "chosen", seed: int = 0,
                                roots: Sequence[str | Path] = (), name: str = "pairs", max_new_tokens: int = 64,
                                batch_size: int = 8, model_name: str = "") -> tuple[Path, dict[str, int]]:
    """Write the pairs (see the module docstring); returns (jsonl path, counts)."""
    from mmalign.generate.text import generate_answers

    if chosen not in ("clean", "ground_truth"):
        raise ValueError(f"chosen must be clean or ground_truth, got {chosen!r}")
    params = {**CORRUPTION_DEFAULTS[corruption], **(params or {})}
    roots, out_dir = [Path(r) for r in roots], Path(out_dir)
    if chosen == "ground_truth":
        bad = next((i for i, r in enumerate(records) if not str(r.get(answer_column) or "").strip()), None)
        if bad is not None:
            raise DataError(f"row {bad} has no ground-truth answer in column {answer_column!r}")
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, roots=roots, progress=True)
    rejected = generate_answers(model, processor, corrupted_records(records, corruption, params, seed, roots), **gen)
    if chosen == "clean":
        answers = generate_answers(model, processor, [{"prompt": r["prompt"], "images": record_images(r)}
                                                      for r in records], **gen)
    else:
        answers = [str(r[answer_column]) for r in records]
    counts = {"rows": len(records), "kept": 0, "identical": 0, "empty": 0}
    pairs = []
    for i, (r, good, bad) in enumerate(zip(records, answers, rejected)):
        if not good.strip() or not bad.strip():
            counts["empty"] += 1
            continue
        if good.strip() == bad.strip():
            counts["identical"] += 1
            continue
        pairs.append({"images": image_refs(r, i, roots, out_dir, name), "prompt": r["prompt"], "chosen": good,
                      "rejected": bad, "source_index": i, "method": "corrupted_image", "corruption": corruption,
                      "corruption_params": params, "corruption_seed": corruption_seed(seed, i),
                      "chosen_source": chosen, "model": model_name})
    counts["kept"] = len(pairs)
    return write_vlm_pairs(pairs, out_dir, name), counts


# -- CLI (shared with onpolicy.py: the builders that run a model) ------------------------------------
def add_model_builder_args(p: argparse.ArgumentParser, data_help: str) -> None:
    """The arguments of every builder that runs a VLM over input records."""
    p.add_argument("data", help=data_help)
    p.add_argument("--model", required=True, help="local image-text-to-text model folder (model + processor)")
    p.add_argument("--out", required=True, help="output folder (gets <name>.jsonl and images/)")
    p.add_argument("--format", default="auto", help="a data.format reader for the input (default: by file type)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default="pairs", help="output file stem")
    p.add_argument("--trust-remote-code", action="store_true")


def load_builder_inputs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Path], Any, Any]:
    """(records, image roots, model, processor) of `add_model_builder_args`'s arguments."""
    records = read_prompt_records(args.data, args.format)
    data = Path(args.data)
    model, processor = load_vlm(args.model, args.trust_remote_code)
    return records, [data if data.is_dir() else data.parent], model, processor


def run(args: argparse.Namespace) -> int:
    records, roots, model, processor = load_builder_inputs(args)
    params = {"noise": {"step": args.noise_step}, "crop": {"scale": tuple(args.crop_scale)},
              "mask": {"ratio": args.mask_ratio, "patch": args.mask_patch}}[args.corruption]
    path, c = build_corrupted_image_pairs(model, processor, records, args.out, corruption=args.corruption,
                                          params=params, chosen=args.chosen, answer_column=args.answer_column,
                                          seed=args.seed, roots=roots, name=args.name,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          model_name=str(args.model))
    print(f"[mmalign] build-pairs corrupt: {c['kept']} pairs kept of {c['rows']} prompts "
          f"({c['identical']} dropped: identical answers, {c['empty']} dropped: empty answer); wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corrupt", help="rejected = the model's answer on a corrupted image (POVID/mDPO style)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_builder_args(p, "records with images and a prompt (jsonl, json, parquet)")
    p.add_argument("--corruption", choices=sorted(CORRUPTION_DEFAULTS), default="noise")
    p.add_argument("--noise-step", type=int, default=500, help="DDPM step of 1000 (noise)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.01, 0.2], help="area fraction kept (crop)")
    p.add_argument("--mask-ratio", type=float, default=0.3, help="fraction of pixels/patches masked (mask)")
    p.add_argument("--mask-patch", type=int, default=1, help="masked square size in pixels (mask)")
    p.add_argument("--chosen", choices=("clean", "ground_truth"), default="clean",
                   help="chosen = the model's answer on the clean image, or the record's ground truth")
    p.add_argument("--answer-column", default="chosen", help="ground-truth column (--chosen ground_truth)")
    p.set_defaults(func=run)
