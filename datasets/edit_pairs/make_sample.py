"""Write the tiny edit-preference sample (datasets/edit_pairs/README.md): 4 records, 32x32 PNGs.

Run from the repository root: .venv/bin/python datasets/edit_pairs/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 200, 20)}
# (source shape, source colour, instruction, chosen (shape, colour), rejected (shape, colour))
ROWS = [("circle", "blue", "make it red", ("circle", "red"), ("circle", "blue")),
        ("square", "green", "make it blue", ("square", "blue"), ("circle", "blue")),
        ("circle", "yellow", "add a star", ("circle+star", "yellow"), ("circle", "green")),
        ("square", "red", "remove the square", ("", "red"), ("square", "yellow"))]


def draw(shape: str, colour: str) -> Image.Image:
    """A 32x32 white image with the shape(s) ("circle", "square", "circle+star", "" none) in colour."""
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    for part in filter(None, shape.split("+")):
        if part == "circle":
            pen.ellipse((6, 6, 22, 22), fill=fill)
        elif part == "square":
            pen.rectangle((7, 7, 23, 23), fill=fill)
        else:  # a small star in the corner
            pen.polygon([(26, 20), (28, 25), (31, 25), (29, 28), (30, 31), (26, 29), (22, 31), (23, 28), (21, 25),
                         (24, 25)], fill=(0, 0, 0))
    return image


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    for row, (shape, colour, prompt, chosen, rejected) in enumerate(ROWS):
        names = {}
        for field, (s, c) in (("source_image", (shape, colour)), ("chosen", chosen), ("rejected", rejected)):
            name = f"images/{row}-{field.split('_')[0]}.png"
            draw(s, c).save(HERE / name)
            names[field] = name
        records.append({"source_image": names["source_image"], "prompt": prompt, "chosen": names["chosen"],
                        "rejected": names["rejected"]})
    (HERE / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} edit pairs to {HERE / 'train.jsonl'}")


if __name__ == "__main__":
    main()
