"""Plug-in scorers (`python:REF=ARG`) from a file outside the package, and the remote HTTP scorer
on a 127.0.0.1 server this test starts: both score a manifest through `mmalign score`."""

from __future__ import annotations

import base64
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.errors import ConfigError

USER_FILE = '''
import torch

class LengthTimes:
    kinds = ("text",)
    def __init__(self, factor, *, offset=0.0, device="cpu"):
        self.factor, self.offset = float(factor), float(offset)
    def score(self, conditions, outputs):
        return torch.tensor([self.factor * len(o) + self.offset for o in outputs])

def prompt_overlap(conditions, outputs):
    return [float(len(set(c.split()) & set(o.split()))) for c, o in zip(conditions, outputs)]

def wrong_length(conditions, outputs):
    return [1.0]
'''

TEXTS = [("a red cube", "red cube here"), ("a blue ball", "nothing"), ("a red cube", "a red cube indeed")]


def _text_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{i:06d}-000", "prompt_index": i, "prompt": p, "sample": 0, "seed": i, "kind": "text", "text": t}
            for i, (p, t) in enumerate(TEXTS)]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "elsewhere" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(USER_FILE)
    return path


def test_user_class_and_function_from_a_file_score_a_manifest(user_file, tmp_path):
    folder = _text_manifest(tmp_path / "samples")
    assert main(["score", str(folder), "--scorer", f"python:{user_file}:LengthTimes=2,offset=1:0.5",
                 "--scorer", f"python:{user_file}:prompt_overlap"]) == 0
    rows = _rows(folder)
    lengths = [2.0 * len(t) + 1.0 for _, t in TEXTS]
    overlap = [2.0, 0.0, 3.0]  # {red, cube}, {}, {a, red, cube}
    assert [r["score_lengthtimes"] for r in rows] == lengths
    assert [r["score_prompt_overlap"] for r in rows] == overlap
    assert [r["score"] for r in rows] == pytest.approx([0.5 * a + b for a, b in zip(lengths, overlap)])


def test_user_module_on_sys_path_and_bad_answers(user_file, tmp_path, monkeypatch):
    from mmalign.scoring import load_scorer, parse_spec

    monkeypatch.syspath_prepend(str(user_file.parent))
    scorer = load_scorer("python:my_rewards:LengthTimes=3")
    assert scorer.score(["p", "q"], ["ab", "abcd"]).tolist() == [6.0, 12.0]
    assert parse_spec("python:my_rewards:LengthTimes=3,as=len3").column == "len3"
    with pytest.raises(ConfigError, match="shape \\(1,\\) for a batch of 2"):
        load_scorer("python:my_rewards:wrong_length").score(["p", "q"], ["a", "b"])
    with pytest.raises(ConfigError, match="unknown option\\(s\\) scale"):
        load_scorer("python:my_rewards:LengthTimes=3,scale=2")
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        load_scorer("python:my_rewards:Missing")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        load_scorer("python:no_such_module:X")


def test_url_port_is_not_a_weight():
    from mmalign.scoring import parse_spec

    assert (parse_spec("http=http://127.0.0.1:8000").path, parse_spec("http=http://127.0.0.1:8000").weight) == \
        ("http://127.0.0.1:8000", 1.0)
    spec = parse_spec("http=http://127.0.0.1:8000/score,timeout=5,retries=1:0.25")
    assert (spec.path, spec.options, spec.weight) == ("http://127.0.0.1:8000/score", {"timeout": 5, "retries": 1}, 0.25)


class RewardServer:
    """A reward server on 127.0.0.1: scores images by their mean red value (0-255) and texts by
    length; `plan` lists status codes to answer first (503 = retry) or a raw body to send."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.plan: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                step = server.plan.pop(0) if server.plan else None
                if isinstance(step, int):
                    self.send_response(step)
                    self.end_headers()
                    return
                answer = step if isinstance(step, bytes) else json.dumps(server.answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict) -> dict:
        import io

        if body["kind"] == "text":
            return {"scores": [float(len(t)) for t in body["texts"]]}
        reds = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").getpixel((0, 0))[0] for b in body["images"]]
        return {"scores": [float(r) for r in reds]}

    def __enter__(self) -> "RewardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _image_manifest(folder: Path, reds: list[int]) -> Path:
    (folder / "media").mkdir(parents=True)
    rows = []
    for i, red in enumerate(reds):
        Image.new("RGB", (8, 8), (red, 10, 20)).save(folder / "media" / f"{i}.png")
        rows.append({"id": f"{i:06d}-000", "prompt_index": i, "prompt": f"p{i}", "sample": 0, "seed": i,
                     "kind": "image", "path": f"media/{i}.png"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_http_scorer_scores_an_image_manifest_in_batches_with_retries(tmp_path):
    folder = _image_manifest(tmp_path / "samples", [200, 15, 90])
    with RewardServer() as server:
        server.plan = [503]  # the first batch is retried once
        assert main(["score", str(folder), "--batch-size", "2",
                     "--scorer", f"http={server.url},retries=2,backoff=0,timeout=5"]) == 0
    assert [r["score_http"] for r in _rows(folder)] == [200.0, 15.0, 90.0]
    assert [len(r["images"]) for r in server.requests] == [2, 2, 1]  # 503 batch, its retry, the last batch
    assert server.requests[0]["prompts"] == ["p0", "p1"] and server.requests[0]["kind"] == "image"


@pytest.mark.parametrize("answer, message", [
    (b"[1.0]", "1 scores for a batch of 2"),
    (b'[1.0, "x"]', "score 1 is 'x'"),
    (b"[1.0, NaN]", "score 1 is nan"),
    (b"[1.0, true]", "score 1 is True"),
    (b"<html>", "not JSON"),
    (400, "HTTP 400"),
])
def test_http_scorer_strict_parsing(answer, message):
    from mmalign.scoring.remote import HttpScorer, RemoteScorerError

    with RewardServer() as server:
        server.plan = [answer]
        scorer = HttpScorer(server.url, retries=0, timeout=5)
        with pytest.raises(RemoteScorerError, match=message):
            scorer.score(["p", "q"], ["some answer", "another"])
        assert server.requests[0]["texts"] == ["some answer", "another"]


def test_http_scorer_gives_up_after_retries():
    from mmalign.scoring.remote import HttpScorer, RemoteScorerError

    with RewardServer() as server:
        server.plan = [503, 502, 500]
        scorer = HttpScorer(server.url, retries=2, backoff=0, timeout=5)
        with pytest.raises(RemoteScorerError, match="no answer after 3 tries \\(last: HTTP 500\\)"):
            scorer.score(["p"], ["t"])
        assert math.isfinite(scorer.score(["p"], ["abc"]).item())  # the plan is spent: it answers again


def test_online_scorer_takes_a_plugin(user_file):
    from mmalign.online.rounds import load_scorers

    ((spec, scorer),) = load_scorers([f"python:{user_file}:LengthTimes=1,as=len"], "text", "cpu")
    assert spec.column == "len" and scorer.score(["p"], ["abc"]).tolist() == [3.0]
    with pytest.raises(ConfigError, match="scores text samples; this modality samples image"):
        load_scorers([f"python:{user_file}:LengthTimes=1"], "image", "cpu")
