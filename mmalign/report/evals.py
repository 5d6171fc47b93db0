"""Eval results side by side (`mmalign report-run --evals base=a.json aligned=b.json ...`).

Every `mmalign eval ...` writes the same results format (mmalign/evaluation/results.py):
{"benchmark", "metrics" (paper names, possibly nested: POPE per setting, AMBER per dimension),
"model", "data", "settings", ...}. Here the files are grouped by benchmark; each benchmark gets
one table: a row per metric (nested names joined with "/"), a column per label, and, with two
labels, the difference second − first. A label may give several files (one per benchmark).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from mmalign.errors import DataError


def load_eval(path: str | Path) -> dict[str, Any]:
    """A results file: needs "benchmark" (text) and "metrics" (an object)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"--evals: {path} not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"--evals: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmark"), str) or not isinstance(data.get("metrics"), dict):
        raise DataError(f"--evals: {path} is not an `mmalign eval --out` results file (no 'benchmark' / 'metrics')")
    return data


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"F1": 85.0, "existence": {"F1": 90.0}} -> {"F1": 85.0, "existence/F1": 90.0} (numbers only)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


def eval_tables(evals: Sequence[tuple[str, str | Path]]) -> list[dict[str, Any]]:
    """One table {title, columns, rows, note} per benchmark (in order of first appearance)."""
    labels = list(dict.fromkeys(label for label, _ in evals))
    by_bench: dict[str, dict[str, dict[str, Any]]] = {}
    for label, path in evals:
        data = load_eval(path)
        seen = by_bench.setdefault(data["benchmark"], {})
        if label in seen:
            raise DataError(f"--evals: two {data['benchmark']} results for {label!r} ({seen[label]['path']}, {path})")
        seen[label] = {"path": str(path), "metrics": flat_metrics(data["metrics"]), "model": data.get("model")}
    tables = []
    for bench, results in by_bench.items():
        cols = [lab for lab in labels if lab in results]
        names = list(dict.fromkeys(n for lab in cols for n in results[lab]["metrics"]))
        delta = len(cols) == 2
        rows = []
        for n in names:
            values = [results[lab]["metrics"].get(n) for lab in cols]
            diff = values[1] - values[0] if delta and None not in values else None
            rows.append([n, *map(_cell, values)] + ([_cell(diff) if diff is not None else "–"] if delta else []))
        note = "; ".join(f"{lab}: {results[lab]['model']} ({results[lab]['path']})" for lab in cols)
        tables.append({"title": bench, "columns": ["metric", *cols] + ([f"{cols[1]} − {cols[0]}"] if delta else []),
                       "rows": rows, "note": note})
    return tables


def tables_text(tables: Sequence[dict[str, Any]]) -> str:
    """The tables as aligned plain text (for the terminal)."""
    parts = []
    for t in tables:
        grid = [t["columns"], *t["rows"]]
        widths = [max(len(str(r[i])) for r in grid) for i in range(len(t["columns"]))]
        lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in grid]
        parts.append(f"== {t['title']} ==\n" + "\n".join(lines))
    return "\n\n".join(parts)
