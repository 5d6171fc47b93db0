"""Write `datasets/trl_vlm/train-00000-of-00001.parquet`: 4 rows of TRL's VLM preference
format as in HuggingFaceH4/rlaif-v_formatted: `images` a list of Image structs {bytes, path};
`prompt`, `chosen`, `rejected` chat messages with typed content ({"type": "image"} /
{"type": "text", "text"}). Rerun from the repository root:

    .venv/bin/python datasets/trl_vlm/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.toyvlm import shape_png

OUT = Path(__file__).resolve().parent / "train-00000-of-00001.parquet"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MESSAGES = pa.list_(pa.struct([("content", pa.list_(pa.struct([("text", pa.string()), ("type", pa.string())]))),
                               ("role", pa.string())]))
SCHEMA = pa.schema([("chosen", MESSAGES), ("rejected", MESSAGES), ("images", pa.list_(IMAGE)), ("prompt", MESSAGES)])


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def main() -> None:
    rows = []
    for colour, shape, wrong in [("yellow", "circle", "green"), ("blue", "triangle", "red"),
                                 ("green", "square", "blue"), ("red", "triangle", "yellow")]:
        prompt = [{"role": "user", "content": [{"type": "image", "text": None},
                                               {"type": "text", "text": "describe the image ."}]}]
        rows.append({"chosen": answer(f"a {colour} {shape}"), "rejected": answer(f"a {wrong} {shape}"),
                     "images": [{"bytes": shape_png(colour, shape), "path": None}], "prompt": prompt})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), OUT)
    print(f"wrote {OUT} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
