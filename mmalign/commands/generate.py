"""`mmalign generate --model DIR --prompts FILE --out DIR --num-samples N [--set key=value ...]`:
N seeded samples per prompt from a diffusers pipeline, a causal LM or a LLaVA-family VLM, into
OUT/manifest.jsonl (+ OUT/media/). Resumable: rerun the same command to finish a killed run.
Several processes: `accelerate launch -m mmalign.cli generate ...`."""

from __future__ import annotations

import argparse
import os

FLAGS = ("model", "prompts", "out", "num_samples", "kind", "seed", "batch_size", "max_samples", "dtype")


def options_data(args: argparse.Namespace) -> dict:
    """The options as a dict: the YAML config (if any), then the flags, then the --set values."""
    import yaml

    from mmalign.errors import ConfigError

    data: dict = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise ConfigError(f"config file not found: {args.config}")
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a mapping of options")
    for name in FLAGS:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if args.no_progress:
        data["progress"] = False
    sampling = dict(data.get("sampling") or {})
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        sampling[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    if sampling:
        data["sampling"] = sampling
    return data


def run(args: argparse.Namespace) -> int:
    from mmalign.generate.run import generate, make_options

    opts = make_options(options_data(args))
    result = generate(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        first = f" (first failure: {result['failures'][0]})" if result["failures"] else ""
        print(f"[mmalign] generate ({result['kind']}): {result['generated']} generated, {result['reused']} reused, "
              f"{result['failed']} failed{first}; manifest {result['manifest']}")
    return 1 if result["failed"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="N seeded samples per prompt into a manifest: mmalign generate --model DIR "
                                        "--prompts FILE --out DIR --num-samples N [--set key=value ...]")
    p.add_argument("--config", help="YAML file with the same options (flags override it; 'sampling:' mapping)")
    p.add_argument("--model", help="model: local folder (diffusers pipeline, causal LM or VLM), pkg://NAME or Hub id org/name[@revision]")
    p.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl, .csv/.tsv with a prompt column")
    p.add_argument("--out", help="output folder (manifest.jsonl + media/); rerun to resume")
    p.add_argument("--num-samples", dest="num_samples", type=int, help="samples per prompt (default 1)")
    p.add_argument("--kind", choices=("auto", "image", "video", "text", "audio"), help="default: from the model folder")
    p.add_argument("--seed", type=int, help="base seed (default 0); sample seeds derive from it")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="samples per forward (default 8)")
    p.add_argument("--max-samples", dest="max_samples", type=int, help="stop after this many new samples")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="sampling parameter: image: num_inference_steps, guidance_scale, height, width, "
                        "negative_prompt, eta, scheduler=<diffusers class>, ...; text: max_new_tokens, "
                        "do_sample, temperature, top_p, chat_template")
    p.set_defaults(func=run)
