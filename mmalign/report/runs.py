"""One self-contained HTML page about finished runs: `mmalign report-run --out report.html ...`.

What a person wants to see after training: the metric tables, the training curves (loss and
reward margin from each run's `metrics.jsonl`, inline SVG), the same prompts and seeds sampled
by several models side by side (manifests of `mmalign generate`, matched by sample id), and
generated captions with their hallucinated objects highlighted (result files of `mmalign eval
chair`, which list each caption's hallucinated words). Like `mmalign report` (html.py): images
embedded as data URIs, every piece of text escaped, a Content-Security-Policy that allows no
network, so the file opens anywhere, offline.

Inputs, all optional:
    tables    JSON files holding {"title", "columns", "rows", "note"?} or {"tables": [...]}
    curves    {label: run output_dir (or its metrics.jsonl)}
    grids     {label: manifest (or its folder)}; the first is the reference order
    rounds    {label: an online run's output_dir}: per round its guard values and samples
              with scores (mmalign/report/rounds.py)
    captions  {label: `mmalign eval chair --out` json}; images where the first label's caption
              hallucinates come first
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmalign.errors import DataError
from mmalign.report.html import SCRIPT, STYLE, image_data_uri

COLOURS = ["#2b83ba", "#d7191c", "#1a9641", "#fdae61", "#7b3294", "#636363", "#e66101", "#5e3c99"]
EXTRA_STYLE = """mark{background:#fbb4ae;padding:0 2px;border-radius:2px}
.grid td{vertical-align:top;text-align:center;font-size:.75em} .grid th{text-align:left}
.caps td,.caps th{text-align:left;vertical-align:top;font-size:.85em} .note{font-size:.85em;color:#555}
.curves{display:flex;flex-wrap:wrap;gap:1em} td:first-child,th:first-child{text-align:left}"""


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DataError(f"{what}: {path} not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{what}: {path} is not valid JSON ({e})") from e


# -- tables ------------------------------------------------------------------------------------
def load_tables(path: str | Path) -> list[dict[str, Any]]:
    """The tables of a JSON file ({"tables": [...]} or one table); each needs columns and rows."""
    data = _read_json(Path(path), "table")
    tables = data.get("tables", [data]) if isinstance(data, dict) else None
    if not tables or any(not isinstance(t, dict) or "columns" not in t or "rows" not in t for t in tables):
        raise DataError(f"{path}: expected {{'columns', 'rows'}} tables (or {{'tables': [...]}})")
    return tables


def table_html(table: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in table["columns"])
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in table["rows"])
    note = f'<p class="note">{escape(str(table["note"]))}</p>' if table.get("note") else ""
    return f"<h3>{escape(str(table.get('title', '')))}</h3><table><tr>{head}</tr>{body}</table>{note}"


# -- curves ------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl (`path` is the file or the run's output_dir)."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"curves: {path} not found (a run's output_dir holds metrics.jsonl)")
    from mmalign.data.jsonl import read_jsonl_rows

    return read_jsonl_rows(path, tolerate_torn_end=True)  # a torn last line: a run killed mid-write


def line_chart_svg(series: Mapping[str, Sequence[tuple[float, float]]], title: str, width: int = 420,
                   height: int = 220) -> str:
    """Inline SVG line chart: one polyline per series of (x, y) points, a legend, the y range."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
    label = f'<text x="4" y="14" font-size="12">{escape(title)}</text>'
    if not pts:
        return head + label + '<text x="4" y="40" font-size="11">no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    left, top, right, bottom = 48, 22, width - 8, height - 36
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)  # noqa: E731
    parts = [head, label, f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
                          'fill="none" stroke="#ccc"/>']
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if math.isfinite(y))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}">'
                     f"<title>{escape(name)}</title></polyline>")
        parts.append(f'<text x="{left + 4 + 110 * (i % 3)}" y="{height - 6 - 12 * (i // 3)}" font-size="11" '
                     f'fill="{colour}">{escape(name)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{y1:.3g}</text>'
                 f'<text x="{left - 4}" y="{bottom}" font-size="10" text-anchor="end">{y0:.3g}</text>'
                 f'<text x="{right}" y="{bottom + 12}" font-size="10" text-anchor="end">step {x1:g}</text>')
    return "".join(parts) + "</svg>"


def curves_html(runs: Mapping[str, str | Path], keys: Sequence[str]) -> str:
    """One chart per metric key, one line per run (training rows: those holding the key). Runs
    labelled "GROUP: name" are charted per group (runs of different models, different scales)."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, path in runs.items():
        group, sep, name = label.partition(":")
        groups.setdefault(group.strip() if sep else "", {})[name.strip() if sep else label] = read_metrics(path)
    out = []
    for group, data in groups.items():
        charts = []
        for key in keys:
            series = {label: [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
                      for label, rows in data.items()}
            charts.append(line_chart_svg({k: v for k, v in series.items() if v}, f"{group} {key}".strip()))
        out.append((f"<h3>{escape(group)}</h3>" if group else "") + f'<div class="curves">{"".join(charts)}</div>')
    return "".join(out)


# -- sample grids ------------------------------------------------------------------------------
def grid_html(manifests: Mapping[str, str | Path], column: str | None, max_prompts: int, max_samples: int,
              thumb: int = 64) -> str:
    """Per prompt: one row per model, the same samples (ids) in the same columns."""
    from mmalign.builders.scores import group_by_prompt
    from mmalign.generate.manifest import manifest_path, read_manifest

    loaded = {label: (manifest_path(p), {r["id"]: r for r in read_manifest(p)}) for label, p in manifests.items()}
    first_path, first = next(iter(loaded.values()))
    out = []
    for _, rows in list(group_by_prompt(list(first.values())).items())[:max_prompts]:
        ids = [r["id"] for r in rows][:max_samples]
        lines = []
        for label, (path, by_id) in loaded.items():
            cells = []
            for i in ids:
                row = by_id.get(i)
                if row is None or "path" not in row:
                    cells.append("<td>-</td>")
                    continue
                uri, _ = image_data_uri(path.parent / row["path"], thumb)
                value = row.get(column) if column else None
                text = f"{value:.2f}" if isinstance(value, (int, float)) else ""
                cells.append(f'<td><img src="{uri}" width="{thumb}" height="{thumb}" alt="{escape(i)}"><br>{text}</td>')
            lines.append(f"<tr><th>{escape(label)}</th>{''.join(cells)}</tr>")
        seeds = ", ".join(str(first[i]["seed"]) for i in ids)
        out.append(f"<h3>{escape(str(rows[0]['prompt']))}</h3><p class='note'>seeds {escape(seeds)}</p>"
                   f'<table class="grid">{"".join(lines)}</table>')
    note = f"<p class='note'>number under each image: {escape(column)}</p>" if column else ""
    return note + "".join(out)


# -- captions ----------------------------------------------------------------------------------
def highlight(caption: str, words: Sequence[str]) -> str:
    """`caption` escaped, each of `words` (whole words, case-insensitive, plural s allowed) in <mark>."""
    text = escape(caption)
    for w in sorted(set(words), key=len, reverse=True):
        text = re.sub(rf"\b({re.escape(escape(w))}s?)\b", r"<mark>\1</mark>", text, flags=re.IGNORECASE)
    return text


def captions_html(results: Mapping[str, str | Path], max_images: int, thumb: int = 96) -> str:
    """Image | ground truth | each model's caption with hallucinated words marked."""
    from mmalign.evaluation.coco import load_instances

    data = {label: _read_json(Path(p), "captions") for label, p in results.items()}
    first = next(iter(data.values()))
    settings = first.get("settings") or {}
    if not settings.get("annotations") or not settings.get("images"):
        raise DataError("captions: the eval chair result has no settings.annotations / settings.images "
                        "(run mmalign eval chair with --model and --images)")
    files, _ = load_instances(settings["annotations"])
    by_label = {label: {str(c["image_id"]): c for c in d.get("captions", [])} for label, d in data.items()}
    order = sorted(first.get("captions", []), key=lambda c: not c["hallucinated"])[:max_images]
    head = "<tr><th>image</th><th>objects</th>" + "".join(f"<th>{escape(k)}</th>" for k in data) + "</tr>"
    rows = []
    for c in order:
        key = str(c["image_id"])
        name = files.get(c["image_id"], files.get(key))
        img = "-"
        if name is not None and (Path(settings["images"]) / name).is_file():
            uri, _ = image_data_uri(Path(settings["images"]) / name, thumb)
            img = f'<img src="{uri}" width="{thumb}" height="{thumb}" alt="{escape(str(name))}">'
        cells = []
        for label in data:
            other = by_label[label].get(key)
            cells.append("<td>-</td>" if other is None else
                         f"<td>{highlight(other['caption'], [h['word'] for h in other['hallucinated']])}</td>")
        rows.append(f"<tr><td>{img}</td><td>{escape(', '.join(c.get('ground_truth', [])))}</td>{''.join(cells)}</tr>")
    return ("<p class='note'>hallucinated objects (not in the image) are <mark>marked</mark></p>"
            f'<table class="caps">{head}{"".join(rows)}</table>')


# -- page --------------------------------------------------------------------------------------
def render_run_report(title: str, tables: Sequence[str | Path] = (), curves: Mapping[str, str | Path] | None = None,
                      curve_keys: Sequence[str] = ("loss", "rewards/margins", "rewards/accuracies"),
                      grids: Mapping[str, str | Path] | None = None, grid_column: str | None = None,
                      captions: Mapping[str, str | Path] | None = None, max_prompts: int = 6,
                      max_samples: int = 8, max_images: int = 24, rounds: Mapping[str, str | Path] | None = None) -> str:
    """The HTML page (a string) of the given tables, curves, grids, captions and online rounds."""
    body = [f"<h1>{escape(title)}</h1>"]
    if tables:
        body.append("<h2>Results</h2>" + "".join(table_html(t) for p in tables for t in load_tables(p)))
    if curves:
        body.append("<h2>Training curves</h2>" + curves_html(curves, curve_keys))
    if grids:
        body.append("<h2>Samples: same prompts and seeds</h2>"
                    + grid_html(grids, grid_column, max_prompts, max_samples))
    if captions:
        body.append("<h2>Captions</h2>" + captions_html(captions, max_images))
    if rounds:
        from mmalign.report.rounds import rounds_html

        body.append("<h2>Online rounds</h2>" + "".join(f"<h3>{escape(label)}</h3>"
                                                       + rounds_html(path, max_prompts=max_prompts,
                                                                     max_samples=max_samples)
                                                       for label, path in rounds.items()))
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{escape(title)}</title><style>{STYLE}{EXTRA_STYLE}</style><script>{SCRIPT}</script></head>"
            f"<body>{''.join(body)}</body></html>\n")
