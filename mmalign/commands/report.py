"""`mmalign report MANIFEST [--pairs PAIRS.jsonl] --out report.html`: look at samples, scores and
picks before training on them (one self-contained HTML file + PNG contact sheets)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from mmalign.report import write_report

    s = write_report(args.manifest, args.out, args.pairs, args.thumb, args.max_prompts or None,
                     not args.no_sheets, args.title)
    size = s["html"].stat().st_size / 1e6
    print(f"[mmalign] report: {s['shown']} of {s['prompts']} prompts, {s['samples']} samples, "
          f"{s['picked']} picked by the pairs, {len(s['unreadable'])} unreadable; "
          f"wrote {s['html']} ({size:.1f} MB) and {len(s['sheets'])} contact sheets")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="self-contained HTML report of a sample manifest (+ PNG contact sheets)")
    p.add_argument("manifest", help="manifest.jsonl or its folder")
    p.add_argument("--pairs", help="pairs jsonl from mmalign build-pairs scores: marks chosen / rejected")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--thumb", type=int, default=256, help="largest embedded image side in pixels (default 256)")
    p.add_argument("--max-prompts", type=int, default=200, help="prompts shown (default 200; 0 = all)")
    p.add_argument("--no-sheets", action="store_true", help="skip the PNG contact sheets")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=run)
