"""`mmalign generate`: N samples per prompt, seeded, batched, resumable, split across processes.

Seeds. Sample j of prompt i gets `sample_seed(seed, i, j)`: the first 31 bits of
sha256("<seed>:<i>:<j>"). It depends on nothing else (not on N, the batch or the process
count), so raising N later adds samples and keeps the old ones, and the same (seed, i, j)
with the same model and parameters gives the same output.

Resume. Each finished sample is first written to disk (its PNG atomically, under
out/media/<id>.png), then its manifest row is appended and flushed (`ManifestWriter`). A
restart reads what is there (manifest.jsonl and any manifest.rank<k>.jsonl left by a killed
multi-process run), keeps the rows whose media file exists, rewrites manifest.jsonl from
them, and generates only the missing ids: nothing is generated twice, nothing is lost. Rows
made with another model, other parameters or another base seed are refused (use a new out
folder) rather than mixed.

Processes. With accelerate (`accelerate launch` / torchrun), the missing ids, in id order, go
round-robin to the processes (`todo[rank::world]`); each appends to manifest.rank<k>.jsonl
and the main process merges them into manifest.jsonl (`merge_manifests`) once all finish.
At the end of every run manifest.jsonl is rewritten in id order (atomically), so a resumed
run's manifest equals an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmalign.config import from_dict, resolve_path
from mmalign.errors import ConfigError, DataError
from mmalign.generate.manifest import (MANIFEST, ManifestWriter, media_rows, merge_manifests, read_manifest,
                                      sample_id, write_manifest)
from mmalign.generate.prompts import prompt_text, read_prompts

KINDS = ("auto", "image", "video", "text", "audio")
DTYPES = ("float32", "bfloat16", "float16")
# text sampling parameters and their defaults (`sampling` keys for causal LMs and VLMs)
TEXT_SAMPLING: dict[str, Any] = {"max_new_tokens": 64, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                                 "chat_template": None}


@dataclass
class GenerateOptions:
    """What `mmalign generate` does; built with `from_dict` (an unknown key is an error)."""

    model: str = ""  # local model folder (or pkg://NAME)
    prompts: str = ""  # prompt file: .txt, .jsonl, .csv, .tsv
    out: str = ""  # output folder: manifest.jsonl + media/
    num_samples: int = 1  # samples per prompt
    kind: str = "auto"  # auto | image | text | audio (auto: from the model folder)
    seed: int = 0  # base seed of `sample_seed`
    batch_size: int = 8
    max_samples: int = 0  # generate at most this many NEW samples in this run (0: all); resume continues
    dtype: str = "float32"
    progress: bool = True
    # image: pipeline __call__ arguments (+ scheduler: a diffusers scheduler class); text: TEXT_SAMPLING keys
    sampling: dict[str, Any] = field(default_factory=dict)


def make_options(data: dict[str, Any]) -> GenerateOptions:
    opts = from_dict(GenerateOptions, data)
    for name in ("model", "prompts", "out"):
        if not getattr(opts, name):
            raise ConfigError(f"generate: '{name}' is required")
    if opts.kind not in KINDS:
        raise ConfigError(f"kind: '{opts.kind}' is not one of {', '.join(KINDS)}")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"dtype: '{opts.dtype}' is not one of {', '.join(DTYPES)}")
    for name in ("num_samples", "batch_size"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(opts, name)}")
    if opts.max_samples < 0:
        raise ConfigError(f"max_samples must be >= 0, got {opts.max_samples}")
    if not isinstance(opts.sampling, dict):
        raise ConfigError(f"sampling: expected a mapping, got {opts.sampling!r}")
    return opts


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt_index` (see module docstring)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def detect_kind(path: Path) -> str:
    """image (a diffusers pipeline folder), video (a video pipeline), audio (an audio pipeline) or
    text (a causal LM / VLM)."""
    from mmalign.generate.images import is_audio_pipeline
    from mmalign.generate.video import is_video_pipeline

    if (path / "model_index.json").is_file() or (path / "unet").is_dir() or (path / "transformer").is_dir():
        return "audio" if is_audio_pipeline(path) else "video" if is_video_pipeline(path) else "image"
    if (path / "config.json").is_file():
        return "text"
    raise ConfigError(f"model {path}: neither a diffusers pipeline folder nor a transformers model folder")


def text_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """TEXT_SAMPLING completed with `sampling`; an unknown key or a wrong type is a ConfigError."""
    out = dict(TEXT_SAMPLING)
    for key, value in sampling.items():
        if key not in TEXT_SAMPLING:
            raise ConfigError(f"unknown sampling parameter '{key}' for a text model; valid: {', '.join(TEXT_SAMPLING)}")
        kind = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float}.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"sampling.{key}: expected {kind.__name__}, got {value!r}")
        if key == "chat_template" and value is not None and not isinstance(value, bool):
            raise ConfigError(f"sampling.chat_template: expected true/false/null, got {value!r}")
        out[key] = value
    return out


# -- the generators: items -> finished rows ---------------------------------------------------
def image_generator(opts: GenerateOptions, path: Path, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """(items -> rows with their PNG written, sampling params) for a diffusers pipeline."""
    from mmalign.generate.images import edit_sources, generate_images, image_params, load_pipeline

    sampling = dict(opts.sampling)
    scheduler = sampling.pop("scheduler", "")
    pipe = load_pipeline(path, getattr(torch, opts.dtype), scheduler).to(device)
    params = image_params(pipe, sampling)
    if scheduler:
        params["scheduler"] = scheduler
    call = {k: v for k, v in params.items() if k != "scheduler"}
    out = Path(opts.out)

    def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        images = generate_images(pipe, [it["prompt"] for it in items], [it["seed"] for it in items], call,
                                 edit_sources(items, type(pipe).__name__))
        return media_rows(items, images, out, "image", ".png", lambda image, tmp: image.save(tmp, format="PNG"))

    return run, params


def text_generator(opts: GenerateOptions, path: Path, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """(items -> rows with their text, sampling params) for a causal LM or VLM."""
    from mmalign.generate.text import generate_answers, load_text_model

    params = text_sampling(opts.sampling)
    model, processor = load_text_model(path, dtype=opts.dtype, device=device)

    def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        records = [{"prompt": it.get("messages", it["prompt"]), "images": it.get("images", [])} for it in items]
        texts = generate_answers(model, processor, records, seeds=[it["seed"] for it in items],
                                 batch_size=len(items), **params)
        return [{**item, "kind": "text", "text": text} for item, text in zip(items, texts, strict=True)]

    return run, params


# -- resume -------------------------------------------------------------------------------
def _complete(row: dict[str, Any], out: Path) -> bool:
    return row["kind"] == "text" or (out / row["path"]).is_file()


def consolidate(out: Path) -> list[dict[str, Any]]:
    """Merge manifest.jsonl and any manifest.rank<k>.jsonl into manifest.jsonl, keeping only
    rows whose media exists; remove the rank files. Returns the kept rows."""
    parts = [p for p in [out / MANIFEST, *sorted(out.glob("manifest.rank*.jsonl"))] if p.is_file()]
    if not parts:
        return []
    merge_manifests(parts, out / MANIFEST)
    rows = [r for r in read_manifest(out / MANIFEST) if _complete(r, out)]
    write_manifest(rows, out / MANIFEST)
    for p in parts:
        if p.name != MANIFEST:
            p.unlink()
    return rows


def check_reusable(rows: list[dict[str, Any]], items: dict[str, dict[str, Any]], model: str,
                   params: dict[str, Any], out: Path) -> None:
    """Refuse to mix: every kept row must come from this model, these parameters and seeds."""
    import json

    params = json.loads(json.dumps(params))
    for row in rows:
        item = items.get(row["id"])
        where = f"{out / MANIFEST}: sample {row['id']}"
        if item is None or item["prompt"] != row["prompt"]:
            raise ConfigError(f"{where} is not a sample of this prompt file; use a new --out folder")
        for key in ("source_image", "source_images"):  # an edit / image-to-video prompt's condition
            if item.get(key) != row.get(key):
                raise ConfigError(f"{where} was made from {key} {row.get(key)}, the prompt file now gives "
                                  f"{item.get(key)}; use a new --out folder")
        if row.get("model") != model or row.get("params") != params or row["seed"] != item["seed"]:
            raise ConfigError(f"{where} was made with another model, sampling parameters or seed "
                              f"({row.get('model')}, {row.get('params')}, seed {row['seed']}); use a new --out folder")


def plan(opts: GenerateOptions) -> dict[str, dict[str, Any]]:
    """Every sample of the run by id, in id order: the manifest row without its output."""
    items = {}
    for i, record in enumerate(read_prompts(opts.prompts)):
        for j in range(opts.num_samples):
            item = {"id": sample_id(i, j), "prompt_index": i, "prompt": prompt_text(record["prompt"]), "sample": j,
                    "seed": sample_seed(opts.seed, i, j), "model": opts.model}
            if isinstance(record["prompt"], list):
                item["messages"] = record["prompt"]
            for key in ("images", "prompt_id", "source_image", "source_images"):
                if key in record:
                    item[key] = record[key]
            items[item["id"]] = item
    return items


def _generate_batch(run: Callable, batch: list[dict[str, Any]], failures: list[str]) -> list[dict[str, Any]]:
    """Rows of a batch; on a data error (a bad condition image, ...) the batch is retried one
    sample at a time and the failing samples are reported (and retried by the next run)."""
    try:
        return run(batch)
    except DataError as e:
        if len(batch) == 1:
            failures.append(f"{batch[0]['id']}: {e}")
            return []
    return [row for item in batch for row in _generate_batch(run, [item], failures)]


def generate(opts: GenerateOptions, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Generate the missing samples of `opts` (see module docstring); `on_row` is called after
    each row is written. Returns {"generated", "reused", "failed", "failures", "manifest"}
    (generated and failed summed over processes)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: torchrun on CPUs makes a gloo group
    path = Path(resolve_path(opts.model))
    if not path.is_dir():
        raise ConfigError(f"model folder not found: {path}")
    kind = detect_kind(path) if opts.kind == "auto" else opts.kind
    items = plan(opts)
    if kind in ("image", "video", "audio") and any("images" in it for it in items.values()):
        raise DataError(f"{opts.prompts}: prompts with images need a VLM; {path} is a text-to-{kind} pipeline")
    if kind == "audio":
        from mmalign.generate.audio import audio_generator as make
    elif kind == "video":
        from mmalign.generate.video import video_generator as make
    else:
        make = image_generator if kind == "image" else text_generator
    run, params = make(opts, path, state.device)
    out = Path(opts.out)
    if state.is_main_process:
        check_reusable(consolidate(out), items, opts.model, params, out)
    state.wait_for_everyone()
    done = {r["id"] for r in read_manifest(out)} if (out / MANIFEST).is_file() else set()
    todo = [it for key, it in items.items() if key not in done][: opts.max_samples or None]
    mine = todo[state.process_index::state.num_processes]
    single = state.num_processes == 1
    part = out / (MANIFEST if single else f"manifest.rank{state.process_index}.jsonl")
    failures: list[str] = []
    generated = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"generate {kind}", unit="sample",
               disable=not (opts.progress and state.is_main_process))
    with ManifestWriter(part) as writer:
        for start in range(0, len(mine), opts.batch_size):
            batch = mine[start:start + opts.batch_size]
            for row in _generate_batch(run, batch, failures):
                row["params"] = params
                writer.write(row)
                generated += 1
                if on_row is not None:
                    on_row(row)
            bar.update(len(batch))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:  # one manifest.jsonl in id order, whatever the run's history
        consolidate(out)
    counts = gather_object([(generated, failures)])
    state.wait_for_everyone()
    return {"generated": sum(c[0] for c in counts), "reused": len(done), "failed": sum(len(c[1]) for c in counts),
            "failures": [f for c in counts for f in c[1]], "manifest": str(out / MANIFEST), "kind": kind}
