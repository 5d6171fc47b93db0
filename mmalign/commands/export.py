"""`mmalign export RUN_DIR_OR_CONFIG --to OUT [--format auto|merged|unet|lora] [--source auto|final|latest|STEP|DIR]
[--dtype float16|bfloat16|float32] [--overwrite] [--no-card] [--push-to-hub REPO [--private]]
[--set section.key=value ...]`."""

from __future__ import annotations

import argparse

FORMAT_HELP = ("auto: lora for a LoRA run of a family that has it, merged otherwise; merged: diffusion -> a "
               "complete diffusers pipeline folder (tango: the component folder, no pipeline class), text models -> "
               "the merged model + tokenizer/processor; unet: the diffusion denoiser alone (UNet or transformer "
               "folder, LoRA merged); lora: diffusion -> pytorch_lora_weights.safetensors for "
               "pipeline.load_lora_weights (tango: unet.load_lora_adapter(OUT, prefix='unet'); audioldm2 has none), "
               "text models -> the peft adapter folder; each family's formats: its descriptor in mmalign/families/")


def run(args: argparse.Namespace) -> int:
    from mmalign.export import export_run

    s = export_run(args.run, args.to, args.format, args.source, args.dtype, args.overwrite, args.overrides,
                   card=args.card, push_to_hub=args.push_to_hub, private=args.private)
    where = "final/" if s["step"] is None else f"checkpoint step {s['step']}"
    card = ", model card README.md" if args.card else ""
    pushed = f"; pushed to {args.push_to_hub}: {s['pushed']}" if s["pushed"] else ""
    print(f"[mmalign] exported {s['modality']} run ({where}) as {s['format']} to {s['out']}: "
          f"{s['files']} files, {s['mb']:.1f} MB{card}; load with {s['load']}{pushed}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run: mmalign export RUN_DIR_OR_CONFIG --to OUT [--format ...]")
    p.add_argument("run", metavar="RUN_DIR_OR_CONFIG", help="the run's output_dir (config read from its checkpoints) or its YAML config")
    p.add_argument("--to", required=True, metavar="OUT", help="output folder (written atomically)")
    p.add_argument("--format", default="auto", choices=("auto", "merged", "unet", "lora"), help=FORMAT_HELP)
    p.add_argument("--source", default="auto", metavar="SOURCE",
                   help="auto (final/ if present, else the latest checkpoint), final, latest, a step number, "
                        "or a checkpoint folder")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="cast the exported weights (default: as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                   help="write the model card README.md and mmalign_config.yaml into OUT (default; --no-card skips)")
    p.add_argument("--push-to-hub", default="", metavar="REPO",
                   help="then upload OUT to the Hub model repo REPO (org/name; created if missing; token from "
                        "HF_TOKEN or `hf auth login`, endpoint from HF_ENDPOINT)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides of the run's config, e.g. --set model.path=/models/sdxl when the base moved")
    p.set_defaults(func=run)
