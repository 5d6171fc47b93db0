"""`mmalign demo [--out DIR] [--quick] [--no-online | --flow]`: alignment end to end on the shipped toy-world models.

Image side: generate -> score (learned scorer) -> build-pairs -> Diffusion-DPO (+ an SFT
control) -> win rate over the base under the exact checker on held-out seeds and prompts;
then the online rows at the same sample budget (rounds sampled by the current model): online
DPO and GRPO on the UNet, each against the base and against offline DPO (`--no-online` skips
them; the whole demo took 6 min 48 s on 2 idle cores with them).
VLM side: injection + corrupted-image pairs -> plain DPO, DPO + SFT, SFT only -> CHAIR and
POPE on held-out images. Then an HTML report. Each step is printed as the `mmalign ...`
command it runs (mmalign/toyworld/demo.py). `--world text` runs the older, smaller demo on
the shipped tiny text model (mmalign/demo.py). `--flow` runs offline Flow-DPO against Flow-GRPO and
DiffusionNFT on the shipped toy flow model at equal sampled-image budget (mmalign/toyworld/demo_flow.py).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    if args.world == "text":
        from mmalign.demo import run_demo as run_text_demo

        return run_text_demo(args.out, args.overrides)
    if args.overrides:
        from mmalign.errors import ConfigError

        raise ConfigError(f"overrides {args.overrides} apply to --world text only; rerun the printed commands "
                          "with other settings instead")
    if args.flow:
        from mmalign.toyworld.demo_flow import run_flow_demo

        run_flow_demo(args.out if args.out != "runs/demo" else "runs/demo_flow", quick=args.quick)
        return 0
    from mmalign.toyworld.demo import run_demo

    run_demo(args.out, quick=args.quick, sides=args.only or ("image", "vlm"), online=args.online)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="alignment end to end on the shipped toy-world models (~15 min on 2 CPU cores)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--output-dir", dest="out", default="runs/demo",
                   help="output folder (default runs/demo); finished steps are skipped on a rerun")
    p.add_argument("--quick", action="store_true", help="a few samples and steps: checks the pipeline, not the numbers")
    p.add_argument("--only", nargs="+", choices=("image", "vlm"), help="run one side only")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=True,
                   help="the online image rows at the offline sample budget: online DPO and GRPO on the UNet "
                        "(rounds sampled by the current model); on by default, --no-online skips them")
    p.add_argument("--flow", action="store_true",
                   help="instead: Flow-DPO vs Flow-GRPO vs DiffusionNFT on the toy flow model "
                        "(default out runs/demo_flow)")
    p.add_argument("--world", choices=("toy", "text"), default="toy",
                   help="toy (default): images + captioner; text: the small text-only demo")
    p.add_argument("overrides", nargs="*", help="--world text only: section.key=value overrides of its config")
    p.set_defaults(func=run)
