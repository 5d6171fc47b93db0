"""`mmalign report`: a self-contained HTML page (html.py) and PNG contact sheets (sheets.py)
of a sample manifest, with the picks of a pairs file marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmalign.io import atomic_path


def write_report(manifest: str | Path, out: str | Path, pairs: str | Path | None = None, thumb: int = 256,
                 max_prompts: int | None = 200, sheets: bool = True, title: str | None = None) -> dict[str, Any]:
    """Write `out` (HTML) and, for image samples, `<out stem>-sheet-000.png`, ... beside it.
    Returns stats: prompts, shown, samples, picked, unreadable (ids), columns, html, sheets."""
    from mmalign.builders.scores import group_by_prompt
    from mmalign.data.preference import read_records
    from mmalign.generate.manifest import manifest_path, read_manifest
    from mmalign.report.html import pair_marks, render_report
    from mmalign.report.sheets import contact_sheets

    path = manifest_path(manifest)
    rows = read_manifest(path)
    records = read_records(pairs) if pairs else None
    page, stats = render_report(rows, path.parent, records, title or f"mmalign samples: {path}", thumb,
                                max_prompts, str(pairs) if pairs else "pairs")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    stats["html"] = out
    shown = list(group_by_prompt(rows).items())[: max_prompts or None]
    marks = pair_marks(records, str(pairs)) if records else {}
    stats["sheets"] = contact_sheets(shown, path.parent, out.with_name(f"{out.stem}-sheet"), marks) if sheets else []
    return stats
