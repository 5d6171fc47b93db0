"""PNG contact sheets of image samples: one row per prompt, its samples side by side, chosen
framed green and rejected red. For a quick look in any image viewer (or a paper figure)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mmalign.io import atomic_path

GREEN, RED, ORANGE, GREY = (26, 150, 65), (215, 25, 28), (253, 174, 97), (235, 235, 235)
LABEL_H, BORDER = 14, 3


def _ascii(text: str, width: int) -> str:
    """PIL's built-in bitmap font has no glyphs beyond latin-1: keep the label drawable."""
    text = text.encode("ascii", "replace").decode()
    return text if len(text) <= width else text[: width - 1] + "~"


def _cell(path: Path, cell: int) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    if max(image.size) > cell:
        image.thumbnail((cell, cell), Image.LANCZOS)
    elif max(image.size) < cell:  # nearest keeps the pixels of tiny toy samples crisp
        scale = cell / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    return image


def contact_sheets(groups: list[tuple[int, list[dict[str, Any]]]], root: str | Path, out_prefix: str | Path,
                   marks: dict[str, Counter] | None = None, cell: int = 128, prompts_per_sheet: int = 16) -> list[Path]:
    """Write `<out_prefix>-000.png`, ... (prompts_per_sheet prompt rows each) for image rows.
    groups: (prompt_index, rows ordered by sample). Unreadable samples are a grey cell."""
    from PIL import Image, ImageDraw, ImageFont

    root, marks = Path(root), marks or {}
    groups = [(i, [r for r in g if r["kind"] == "image"]) for i, g in groups]
    groups = [(i, g) for i, g in groups if g]
    if not groups:
        return []
    font = ImageFont.load_default()
    columns = max(len(g) for _, g in groups)
    step = cell + 2 * BORDER + 2
    paths = []
    for s in range(0, len(groups), prompts_per_sheet):
        chunk = groups[s: s + prompts_per_sheet]
        sheet = Image.new("RGB", (columns * step + 2, len(chunk) * (step + LABEL_H) + 2), "white")
        draw = ImageDraw.Draw(sheet)
        for y, (index, rows) in enumerate(chunk):
            top = y * (step + LABEL_H) + 1
            draw.text((3, top + 1), _ascii(f"#{index} {rows[0]['prompt']}", columns * step // 6), fill="black", font=font)
            for x, row in enumerate(rows):
                left, cell_top = x * step + 1, top + LABEL_H
                mark = marks.get(row["id"], Counter())
                color = ORANGE if mark["chosen"] and mark["rejected"] else GREEN if mark["chosen"] else \
                    RED if mark["rejected"] else None
                if color:
                    side = cell + 2 * BORDER - 1
                    draw.rectangle([left, cell_top, left + side, cell_top + side], fill=color)
                path = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
                try:
                    image = _cell(path, cell)
                except OSError:
                    image = Image.new("RGB", (cell, cell), GREY)
                offset = (left + BORDER + (cell - image.width) // 2, cell_top + BORDER + (cell - image.height) // 2)
                sheet.paste(image, offset)
        target = Path(f"{out_prefix}-{s // prompts_per_sheet:03d}.png")
        with atomic_path(target) as tmp:
            sheet.save(tmp, format="PNG")
        paths.append(target)
    return paths
