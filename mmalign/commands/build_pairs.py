"""`mmalign build-pairs METHOD ...`: write preference records. Methods live in `mmalign/builders/`
(one module each: hallucination injection, corrupted images, on-policy answers, scored samples, ...)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    import mmalign.builders
    from mmalign.cli import register_modules

    p = sub.add_parser("build-pairs", help="build preference pairs: mmalign build-pairs METHOD ... "
                                           "(mmalign build-pairs -h lists the methods)")
    register_modules(p.add_subparsers(dest="method", required=True, metavar="METHOD"), mmalign.builders)
