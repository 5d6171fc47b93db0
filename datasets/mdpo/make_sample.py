"""Write `datasets/mdpo/vlfeedback_llava_10k.json` (+ `images/`): 4 records in the layout of
the mDPO preference data (`img_path` relative to the image folder, `prompt`, `chosen`,
`rejected` strings). Rerun from the repository root:

    .venv/bin/python datasets/mdpo/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

from mmalign.toyvlm import draw_shape

HERE = Path(__file__).resolve().parent
OUT = HERE / "vlfeedback_llava_10k.json"


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    for i, (colour, shape, wrong) in enumerate([("blue", "square", "red"), ("red", "circle", "yellow"),
                                                ("green", "circle", "blue"), ("yellow", "square", "green")]):
        name = f"images/{i:05d}.png"
        draw_shape(colour, shape).save(HERE / name)
        records.append({"img_path": name, "prompt": "<image>\nwhat is in the image .",
                        "chosen": f"a {colour} {shape}", "rejected": f"a {wrong} {shape}"})
    OUT.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {OUT} ({len(records)} records)")


if __name__ == "__main__":
    main()
