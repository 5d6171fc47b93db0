"""Write `datasets/rlaif_v/RLAIF-V-Dataset_000.parquet`: 4 rows in the column layout of
openbmb/RLAIF-V-Dataset (`image` the Hugging Face Image struct {bytes, path}; `idx` a
string). Rerun from the repository root:

    .venv/bin/python datasets/rlaif_v/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.toyvlm import shape_png

OUT = Path(__file__).resolve().parent / "RLAIF-V-Dataset_000.parquet"
SCHEMA = pa.schema([("ds_name", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    ("question", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                    ("origin_dataset", pa.string()), ("origin_split", pa.string()), ("idx", pa.string()),
                    ("image_path", pa.string())])


def main() -> None:
    rows = []
    for i, (colour, shape, wrong) in enumerate([("green", "triangle", "red"), ("blue", "circle", "yellow"),
                                                ("red", "square", "green"), ("yellow", "triangle", "blue")]):
        path = f"toy/{i:03d}.png"
        rows.append({"ds_name": "RLAIF-V", "image": {"bytes": shape_png(colour, shape), "path": path},
                     "question": "describe the image .", "chosen": f"a {colour} {shape}",
                     "rejected": f"a {wrong} {shape}", "origin_dataset": "toy_shapes",
                     "origin_split": json.dumps({"model": "toy", "feedback_model": "toy", "type": "description"}),
                     "idx": f"toy_{i}", "image_path": path})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), OUT)
    print(f"wrote {OUT} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
