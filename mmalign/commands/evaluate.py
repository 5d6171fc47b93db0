"""`mmalign eval METHOD ...`: evaluate models. Methods live in `mmalign/evaluation/` (one module
each defining `register`: CHAIR, POPE, image win rates, ...)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    import mmalign.evaluation
    from mmalign.cli import register_modules

    p = sub.add_parser("eval", help="evaluate a model: mmalign eval METHOD ... (mmalign eval -h lists the methods)")
    register_modules(p.add_subparsers(dest="method", required=True, metavar="METHOD"), mmalign.evaluation)
