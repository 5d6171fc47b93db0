"""Write `datasets/audio_alpaca/data/train-00000-of-00001.parquet`: 6 rows in the Audio-Alpaca
layout (`prompt` string, `chosen` / `rejected` Hugging Face Audio features stored as
struct<bytes: binary, path: string>, `strategy` string, with the `huggingface` features metadata
that `datasets` writes), for tests and the tiny config.

Rerun from the repository root:

    .venv/bin/python datasets/audio_alpaca/make_sample.py

Clips are 0.5 s, 16 kHz, mono, 16-bit WAV (the real clips are Tango outputs: 10 s at 16 kHz).
The chosen clip sounds every concept of its prompt in order (one tone per concept), the rejected
one misses a concept or swaps the order; `strategy` names which (placeholder values: the real
column's values are not reproduced here).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

RATE, SECONDS = 16000, 0.5
OUT = Path(__file__).resolve().parent / "data" / "train-00000-of-00001.parquet"
ROWS = [  # prompt, tone frequencies of its concepts in order, the rejected clip's strategy
    ("A dog barks and then a car passes by", [300, 900], "order"),
    ("Rain falls on a roof while thunder rumbles", [1500, 120], "missing"),
    ("A bell rings twice followed by footsteps", [2000, 2000, 500], "order"),
    ("Birds chirp as wind blows", [3000, 250], "missing"),
    ("A man speaks and a crowd applauds", [180, 1200], "order"),
    ("Water trickles then a door slams", [700, 90], "missing"),
]


def clip(freqs: list[int]) -> bytes:
    """Consecutive tone segments, one per frequency, as WAV bytes."""
    n = int(RATE * SECONDS)
    t = np.arange(n) / RATE
    wave = np.zeros(n, dtype=np.float32)
    bounds = np.linspace(0, n, len(freqs) + 1).astype(int)
    for f, start, stop in zip(freqs, bounds[:-1], bounds[1:]):
        wave[start:stop] = 0.3 * np.sin(2 * np.pi * f * t[start:stop])
    buf = io.BytesIO()
    soundfile.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def main() -> None:
    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("chosen", audio), ("rejected", audio), ("strategy", pa.string())])
    features = {"prompt": {"dtype": "string", "_type": "Value"}, "chosen": {"_type": "Audio"},
                "rejected": {"_type": "Audio"}, "strategy": {"dtype": "string", "_type": "Value"}}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    rows = []
    for i, (prompt, freqs, strategy) in enumerate(ROWS):
        worse = freqs[::-1] if strategy == "order" else freqs[:-1]
        rows.append({"prompt": prompt, "chosen": {"bytes": clip(freqs), "path": f"chosen_{i}.wav"},
                     "rejected": {"bytes": clip(worse), "path": f"rejected_{i}.wav"}, "strategy": strategy})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), OUT)
    print(f"wrote {OUT} ({len(rows)} rows, {OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
