"""The per-round section of `mmalign report-run --rounds LABEL=RUN_DIR`: for each online round
kept under RUN_DIR/rounds/round_NNNNN/ (issue 15): its guard values (meta.json "metrics":
reward mean/std, tie fraction, kept records, held-out reward; plus the KL estimate the trainer
logged in metrics.jsonl at the round's first step) and its samples per prompt, images as a
grid or texts as a list, each with its combined score; the chosen and rejected samples of the
round's records marked; then the held-out samples (eval/) the same way."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.report.html import image_data_uri

GUARD_KEYS = ("online/reward_mean", "online/reward_std", "online/tie_fraction", "online/kept_records",
              "online/eval_reward_mean", "online/kl")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _marks(records: list[dict[str, Any]]) -> dict[str, str]:
    """output (text or media path) -> "chosen" / "rejected" in the round's pair records."""
    marks: dict[str, str] = {}
    for r in records:
        for role in ("chosen", "rejected"):
            if isinstance(r.get(role), str):
                marks.setdefault(r[role], role)
    return marks


def _sample_cell(row: dict[str, Any], folder: Path, marks: dict[str, str], thumb: int) -> str:
    score = row.get("score")
    value = f"{score:.3g}" if isinstance(score, (int, float)) else "-"
    output = row.get("path") if row.get("kind") != "text" else row.get("text")
    mark = marks.get(output or "", "")
    label = f"{value}{f' ({mark})' if mark else ''}"
    if row.get("kind") == "text":
        return f"<li>{escape(str(output))} <b>{escape(label)}</b></li>"
    path = folder / str(output)
    if not path.is_file():
        return f"<td>missing {escape(str(output))}</td>"
    uri, _ = image_data_uri(path, thumb)
    return f'<td><img src="{uri}" width="{thumb}" height="{thumb}" alt="{escape(row["id"])}"><br>{escape(label)}</td>'


def samples_html(rows: list[dict[str, Any]], folder: Path, marks: dict[str, str], max_prompts: int,
                 max_samples: int, thumb: int) -> str:
    """Per prompt: its samples with their scores (a row of images, or a list of texts)."""
    from mmalign.builders.scores import group_by_prompt

    out = []
    for _, group in list(group_by_prompt(rows).items())[:max_prompts]:
        cells = "".join(_sample_cell(r, folder, marks, thumb) for r in group[:max_samples])
        body = f"<ul>{cells}</ul>" if group[0].get("kind") == "text" else f'<table class="grid"><tr>{cells}</tr></table>'
        out.append(f"<h4>{escape(str(group[0]['prompt']))}</h4>{body}")
    return "".join(out)


def rounds_html(run_dir: str | Path, max_rounds: int = 10, max_prompts: int = 6, max_samples: int = 8,
                thumb: int = 64) -> str:
    """The section of one run (module docstring); the last `max_rounds` rounds."""
    run = Path(run_dir)
    folders = sorted((run / "rounds").glob("round_*"))
    if not folders:
        raise DataError(f"rounds: {run / 'rounds'} holds no round_NNNNN folders (an online run's output_dir)")
    logged = {int(r["online/round"]): r for r in _jsonl(run / "metrics.jsonl") if "online/round" in r}
    out = []
    for folder in folders[-max_rounds:]:
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        r = int(meta.get("round", folder.name.split("_")[-1]))
        values = {**meta.get("metrics", {}), **logged.get(r, {})}
        table = "".join(f"<tr><td>{escape(k)}</td><td>{values[k]:.4g}</td></tr>" for k in GUARD_KEYS if k in values)
        out.append(f"<h3>round {r}</h3><p class='note'>{escape(meta.get('summary', 'incomplete (no meta.json)'))}</p>"
                   f"<table>{table}</table>")
        marks = _marks(_jsonl(folder / "records.jsonl"))
        out.append(samples_html(_jsonl(folder / "samples.jsonl"), folder, marks, max_prompts, max_samples, thumb))
        held_out = _jsonl(folder / "eval" / "samples.jsonl")
        if held_out:
            out.append("<h4>held-out prompts (online.eval_scorer)</h4>"
                       + samples_html(held_out, folder / "eval", {}, max_prompts, max_samples, thumb))
    return "".join(out)
