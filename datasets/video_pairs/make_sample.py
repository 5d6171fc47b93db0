"""Write `datasets/video_pairs/`: 4 tiny video preference pairs (a few KB) for the tests and the
tiny Wan config (configs/tiny/wan_dpo.yaml).

Rerun from the repository root:

    .venv/bin/python datasets/video_pairs/make_sample.py

Each clip is 9 frames of 32x32 (a shape moving on a white background; 9 = 4·2 + 1 frames, the
4k + 1 a Wan VAE takes). The chosen clip moves as the prompt says; the rejected one moves the
other way (or shows the other shape). Pairs 0-2 are H.264 mp4 files (`videos/`), pair 3's chosen
clip is a folder of PNG frames (`frames/3-chosen/`), the other form a video field may take.
Licence: made here, Apache-2.0 with mmalign.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(OUT.parents[1]))
FRAMES, SIDE = 9, 32
# prompt, (shape, colour, direction) of the chosen clip, of the rejected clip
PAIRS = [
    ("a red circle moving right", ("circle", "red", 1), ("circle", "red", -1)),
    ("a blue square moving left", ("square", "blue", -1), ("square", "blue", 1)),
    ("a green circle moving right", ("circle", "green", 1), ("square", "green", 1)),
    ("a red square moving left", ("square", "red", -1), ("circle", "blue", -1)),
]


def clip(shape: str, colour: str, direction: int) -> np.ndarray:
    """(FRAMES, SIDE, SIDE, 3) uint8: the shape's centre moves 2 px per frame along x."""
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (SIDE, SIDE), "white")
        x = SIDE // 2 + direction * (2 * t - FRAMES + 1)
        box = (x - 6, SIDE // 2 - 6, x + 6, SIDE // 2 + 6)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
        frames.append(np.asarray(image))
    return np.stack(frames)


def main() -> None:
    from mmalign.data.video import write_video

    for folder in ("videos", "frames"):
        shutil.rmtree(OUT / folder, ignore_errors=True)
    records = []
    for row, (prompt, chosen, rejected) in enumerate(PAIRS):
        record = {"prompt": prompt}
        for side, spec in (("chosen", chosen), ("rejected", rejected)):
            frames = clip(*spec)
            if row == 3 and side == "chosen":
                folder = OUT / "frames" / f"{row}-{side}"
                folder.mkdir(parents=True)
                for t, frame in enumerate(frames):
                    Image.fromarray(frame).save(folder / f"{t}.png")
                record[side] = f"frames/{row}-{side}"
            else:
                write_video(frames, OUT / "videos" / f"{row}-{side}.mp4", fps=8)
                record[side] = f"videos/{row}-{side}.mp4"
        records.append(record)
    (OUT / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} pairs to {OUT}")


if __name__ == "__main__":
    main()
