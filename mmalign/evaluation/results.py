"""One results format for `mmalign eval ...` (issue 22 item 4).

Every eval writes a JSON object whose first keys are the same everywhere:

    {"benchmark": "pope" | "chair" | "amber" ...,
     "metrics":   {name as the papers print it: value, ...}   (e.g. "CHAIR_s", "F1", "AMBER"),
     "model":     the model folder, or the answers file the answers were read from,
     "data":      {the annotation / question files read, the image folder},
     "settings":  {every command-line option of the run},
     ...}         the eval's own details (counts, per-item rows) after them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DATA_OPTIONS = ("annotations", "captions", "questions", "images", "data", "synonyms", "vocabulary")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options of a run (argparse plumbing left out), JSON-ready."""
    return {k: _plain(v) for k, v in vars(args).items() if k not in ("func", "command", "method")}


def eval_record(benchmark: str, metrics: dict[str, Any], args: argparse.Namespace,
                details: dict[str, Any]) -> dict[str, Any]:
    """The common header (benchmark, metrics, model, data, settings) followed by `details`."""
    settings = run_settings(args)
    model = settings.get("model") or settings.get("answers")
    data = {k: settings[k] for k in DATA_OPTIONS if settings.get(k) is not None}
    return {"benchmark": benchmark, "metrics": metrics, "model": model, "data": data,
            "settings": settings, **details}
