"""A remote scorer: POST batches to a reward server a user runs (`http=URL[,timeout=S,retries=K]`).

Request (JSON, one per batch of `batch_size` samples of one kind):
    {"kind": "image" | "audio" | "text", "prompts": [N str],
     "images": [N base64 file bytes]  (kind image; PNG/JPEG bytes as stored)
     | "audios": [N base64 file bytes] (kind audio) | "texts": [N str] (kind text)}
Response: a JSON list of N finite numbers, or {"scores": [N finite numbers]}. Anything else (a
wrong length, a string, NaN, a bool, not JSON) is a RemoteScorerError naming the URL: a server
that cannot score a sample must fail loudly rather than hand back a silent default.

Connection errors, timeouts and HTTP 5xx / 429 are retried `retries` times, waiting
`backoff * 2**attempt` seconds; a 4xx answer is not retried (the request itself is wrong).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
FIELDS = {"image": "images", "audio": "audios", "text": "texts"}


class RemoteScorerError(RuntimeError):
    """The reward server failed or answered something that is not N finite numbers."""


def media_b64(output: Any) -> str:
    """base64 of a file's bytes (a path) or of a PIL image saved as PNG."""
    if isinstance(output, (str, Path)):
        data = Path(output).read_bytes()
    else:
        buf = io.BytesIO()
        output.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


def _kind(output: Any) -> str:
    """text for a string that is not a file, audio for a sound file, else image (a PIL image or a file)."""
    if isinstance(output, (str, Path)):
        try:
            if not Path(output).is_file():
                return "text"
        except (OSError, ValueError):  # a long answer is no file name
            return "text"
    return "audio" if Path(str(output)).suffix.lower() in AUDIO_SUFFIXES else "image"


def parse_scores(body: bytes, n: int, url: str) -> list[float]:
    """Strict: a JSON list (or {"scores": list}) of exactly n finite numbers (bools refused)."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RemoteScorerError(f"{url}: answer is not JSON ({body[:80]!r})") from e
    if isinstance(data, dict) and set(data) >= {"scores"}:
        data = data["scores"]
    if not isinstance(data, list):
        raise RemoteScorerError(f"{url}: expected a list of {n} numbers (or {{'scores': [...]}}), got "
                                f"{type(data).__name__}")
    if len(data) != n:
        raise RemoteScorerError(f"{url}: {len(data)} scores for a batch of {n} samples")
    for i, v in enumerate(data):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RemoteScorerError(f"{url}: score {i} is {v!r}, not a finite number")
    return [float(v) for v in data]


def post_with_retries(url: str, body: bytes, *, timeout: float, retries: int, backoff: float,
                      headers: dict[str, str] | None = None, on_attempt: Callable[[], None] | None = None) -> bytes:
    """POST a JSON body; the answer's bytes. Connection errors, timeouts, HTTP 5xx and 429 are
    retried `retries` times after `backoff * 2**attempt` s; another 4xx is a RemoteScorerError
    at once. Errors name the URL and the HTTP status, never the request's headers (API keys)."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        if on_attempt is not None:
            on_attempt()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code < 500 and e.code != 429:
                raise RemoteScorerError(f"{url}: {last} ({e.read()[:200]!r})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = str(getattr(e, "reason", e))
    raise RemoteScorerError(f"{url}: no answer after {retries + 1} tries (last: {last})")


class HttpScorer(Scorer):
    """score(prompts, outputs) -> (N,) float32 from a server at `path` (http:// or https:// URL)."""

    kinds = ("image", "audio", "text")

    def __init__(self, path: str, *, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0,
                 kind: str = "", device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if not path.startswith(("http://", "https://")):
            raise ConfigError(f"http scorer: {path!r} is not an http:// or https:// URL")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigError(f"http scorer {path}: timeout must be > 0, retries and backoff >= 0 "
                              f"(got {timeout}, {retries}, {backoff})")
        if kind and kind not in FIELDS:
            raise ConfigError(f"http scorer {path}: kind must be one of {', '.join(FIELDS)}, got {kind!r}")
        self.url, self.timeout, self.retries, self.backoff, self.kind = path, float(timeout), int(retries), \
            float(backoff), kind
        self.requests = 0

    def _payload(self, conditions: list[str], outputs: list[Any]) -> dict[str, Any]:
        kind = self.kind or _kind(outputs[0])
        media = list(outputs) if kind == "text" else [media_b64(o) for o in outputs]
        return {"kind": kind, "prompts": list(conditions), FIELDS[kind]: media}

    def _post(self, body: bytes) -> bytes:
        def count() -> None:
            self.requests += 1

        return post_with_retries(self.url, body, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                                 on_attempt=count)

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        body = json.dumps(self._payload(conditions, outputs)).encode()
        return torch.tensor(parse_scores(self._post(body), len(outputs), self.url), dtype=torch.float32)
