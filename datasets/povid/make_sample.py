"""Write `datasets/povid/POVID_preference_data_for_VLLMs.json` (+ `images/`): 4 records in
the layout of the POVID preference data (LLaVA conversations: `conversations` holds the
question and the preferred answer, `rejected_conversations` the same question and the
dispreferred answer; `image` a file name under the image folder). Rerun from the repository root:

    .venv/bin/python datasets/povid/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

from mmalign.toyvlm import draw_shape

HERE = Path(__file__).resolve().parent
OUT = HERE / "POVID_preference_data_for_VLLMs.json"


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    for i, (colour, shape, wrong) in enumerate([("red", "triangle", "blue"), ("green", "square", "yellow"),
                                                ("blue", "triangle", "green"), ("yellow", "circle", "red")]):
        name = f"images/toy_{i:06d}.png"
        draw_shape(colour, shape).save(HERE / name)
        question = {"from": "human", "value": "<image>\ndescribe the image ."}
        records.append({"id": f"toy_{i:06d}", "image": name,
                        "conversations": [question, {"from": "gpt", "value": f"a {colour} {shape}"}],
                        "rejected_conversations": [question, {"from": "gpt", "value": f"a {wrong} {shape}"}]})
    OUT.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {OUT} ({len(records)} records)")


if __name__ == "__main__":
    main()
