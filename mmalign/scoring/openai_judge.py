"""A judge over an OpenAI-compatible chat API (a local vLLM / SGLang server, or a hosted one).

    judge=openai:MODEL@URL[,mode=pairwise,timeout=60,retries=2,api_key_env=OPENAI_API_KEY,vision=true]
    openai_judge=MODEL@URL[,...]                     (the same scorer under its own name)

URL is the API base (`http://127.0.0.1:8000/v1`); without `@URL`, OPENAI_BASE_URL, else
https://api.openai.com/v1. The key is read from the environment variable `api_key_env` at each
request and sent as `Authorization: Bearer ...`; it is never stored on the scorer, printed or put
in an error (no variable set: no header, as a local server wants).

Everything that makes the local judge trustworthy is the same code (mmalign/scoring/judge.py):
the fenced, neutralised prompts (chat-turn markers of common templates escaped, a content nonce
on the fences), pairwise verdicts asked in both orders and merged (a disagreement is a tie, or
dropped), and strict parsing — an answer that is not exactly `[Verdict:] X` is unparsed, counted
in `stats()` and scored NaN. One request per prompt:

    POST URL/chat/completions {"model", "messages": [{"role": "user", "content": prompt}],
                               "max_tokens", "temperature": 0, "seed": 0}
    -> {"choices": [{"message": {"content": answer}}]}

(with `vision=true`, images go as `image_url` content parts holding base64 PNG/JPEG data URLs).
A reply that is not such an envelope is a RemoteScorerError naming the URL; timeouts, connection
errors, HTTP 5xx and 429 are retried like the HTTP scorer (mmalign/scoring/remote.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError
from mmalign.scoring.judge import JudgeScorer
from mmalign.scoring.remote import RemoteScorerError, media_b64, post_with_retries

DEFAULT_BASE = "https://api.openai.com/v1"
_SPEC = re.compile(r"(?P<model>[^@\s]+(?:@(?!https?://)[^@\s]+)*)(?:@(?P<url>https?://\S+))?")


def parse_endpoint(path: str) -> tuple[str, str]:
    """'MODEL@http://host:8000/v1' -> (MODEL, 'http://host:8000/v1/chat/completions'); a bare
    MODEL takes OPENAI_BASE_URL, else the OpenAI API."""
    text = path[len("openai:"):] if path.startswith("openai:") else path
    m = _SPEC.fullmatch(text.strip())
    if not m or "://" in m["model"]:
        raise ConfigError(f"openai judge {path!r}: expected MODEL@http(s)://HOST[:PORT]/v1")
    base = (m["url"] or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE).rstrip("/")
    return m["model"], base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def answer_text(body: bytes, url: str) -> str:
    """choices[0].message.content of a chat completion; a RemoteScorerError for anything else."""
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RemoteScorerError(f"{url}: not a chat completion ({body[:120]!r})") from None
    if not isinstance(content, str):
        raise RemoteScorerError(f"{url}: choices[0].message.content is {type(content).__name__}, not text")
    return content


class ChatClient:
    """POSTs one chat completion per judge prompt (`workers` at a time, answers in order)."""

    def __init__(self, model: str, url: str, *, timeout: float, retries: int, backoff: float,
                 api_key_env: str, temperature: float, workers: int) -> None:
        self.model, self.url, self.api_key_env = model, url, api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.temperature, self.workers = temperature, workers
        self.requests = 0

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _message(self, record: dict[str, Any]) -> dict[str, Any]:
        if not record["images"]:
            return {"role": "user", "content": record["prompt"]}
        parts: list[dict[str, Any]] = [{"type": "text", "text": record["prompt"]}]
        for image in record["images"]:
            jpeg = isinstance(image, (str, Path)) and Path(image).suffix.lower() in (".jpg", ".jpeg")
            url = f"data:image/{'jpeg' if jpeg else 'png'};base64,{media_b64(image)}"  # files as stored, PIL as PNG
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return {"role": "user", "content": parts}

    def _one(self, record: dict[str, Any], max_tokens: int) -> str:
        body = {"model": self.model, "messages": [self._message(record)], "max_tokens": max_tokens,
                "temperature": self.temperature, "seed": 0}

        def count() -> None:
            self.requests += 1

        answer = post_with_retries(self.url, json.dumps(body).encode(), timeout=self.timeout, retries=self.retries,
                                   backoff=self.backoff, headers=self._headers(), on_attempt=count)
        return answer_text(answer, self.url)

    def generate(self, model: Any, processor: Any, records: Sequence[dict[str, Any]], *, max_new_tokens: int,
                 do_sample: bool, batch_size: int) -> list[str]:
        """`generate_answers`' signature (JudgeScorer calls it so): one answer per record, greedy."""
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(lambda r: self._one(r, max_new_tokens), records))


class OpenAIJudgeScorer(JudgeScorer):
    """JudgeScorer whose answers come from an OpenAI-compatible chat API (module docstring).

    path: `MODEL@URL` (an `openai:` prefix allowed). mode / on_disagreement: as JudgeScorer.
    vision: the served model takes images (image samples and VLM prompts' images are attached).
    """

    def __init__(self, path: str, *, mode: str = "pointwise", on_disagreement: str = "tie",
                 max_new_tokens: int = 16, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0,
                 api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0, workers: int = 4,
                 vision: bool = False, device: str = "cpu", batch_size: int = 8) -> None:
        if timeout <= 0 or retries < 0 or backoff < 0 or workers < 1:
            raise ConfigError(f"openai judge {path}: timeout > 0, retries >= 0, backoff >= 0, workers >= 1 "
                              f"(got {timeout}, {retries}, {backoff}, {workers})")
        model, url = parse_endpoint(path)
        self.client = ChatClient(model, url, timeout=float(timeout), retries=int(retries), backoff=float(backoff),
                                 api_key_env=str(api_key_env), temperature=float(temperature), workers=int(workers))
        super().__init__(mode=mode, on_disagreement=on_disagreement, max_new_tokens=max_new_tokens, device=device,
                         batch_size=batch_size, model=self.client, processor=None, generate=self.client.generate)
        self.is_vlm = bool(vision)  # images are attached as image_url parts; the prompt is plain text

    def __repr__(self) -> str:
        return f"OpenAIJudgeScorer({self.client.model}@{self.client.url}, mode={self.mode})"
