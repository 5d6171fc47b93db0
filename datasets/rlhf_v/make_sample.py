"""Write `datasets/rlhf_v/RLHF-V-Dataset.parquet`: 4 rows in the column layout of
openbmb/RLHF-V-Dataset (one parquet file; `image` is the Hugging Face Image struct
{bytes, path}; `text` a JSON string with question/chosen/rejected). Two toy images, two
questions each, as the real data repeats images. Rerun from the repository root:

    .venv/bin/python datasets/rlhf_v/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.toyvlm import shape_png

OUT = Path(__file__).resolve().parent / "RLHF-V-Dataset.parquet"
SCHEMA = pa.schema([("ds_name", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    ("text", pa.string()), ("origin_dataset", pa.string()), ("origin_split", pa.string()),
                    ("idx", pa.int64()), ("image_path", pa.string())])


def main() -> None:
    rows = []
    for idx, (colour, shape, wrong, question) in enumerate([
            ("red", "circle", "blue", "describe the image ."), ("red", "circle", "green", "what is in the image ."),
            ("yellow", "square", "red", "describe the image ."), ("yellow", "square", "blue", "what is in the image .")]):
        path = f"toy/{colour}_{shape}.png"
        text = {"question": question, "chosen": f"a {colour} {shape}", "rejected": f"a {wrong} {shape}"}
        rows.append({"ds_name": "RLHF-V", "image": {"bytes": shape_png(colour, shape), "path": path},
                     "text": json.dumps(text), "origin_dataset": "toy_shapes",
                     "origin_split": json.dumps({"model": "toy", "type": "detailed_description"}),
                     "idx": idx, "image_path": path})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), OUT)
    print(f"wrote {OUT} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
