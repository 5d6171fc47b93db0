"""Write `datasets/toy_video/`: 6 video preference records (`pairs.jsonl`), each video a folder of
4 PNG frames (32x32) of one coloured shape sliding right (`videos/00003/0.png` .. `3.png`); the
chosen caption names the shape's colour, the rejected one another colour
(`mmalign.toyvlm.make_video_pairs(6, seed=0)`). Rerun from the repository root:

    .venv/bin/python datasets/toy_video/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

from mmalign.toyvlm import make_video_pairs

if __name__ == "__main__":
    print(make_video_pairs(6, 0, Path(__file__).resolve().parent))
