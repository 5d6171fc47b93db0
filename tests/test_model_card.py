"""`mmalign export` writes a model card (README.md + the run's config); `--push-to-hub` uploads
the export through huggingface_hub to a fake Hub on 127.0.0.1 that this test starts (HF_ENDPOINT)."""

from __future__ import annotations

import base64
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mmalign.cli import main


class FakeHub:
    """Enough of the Hub API for create_repo + upload_folder with every file uploaded inline
    ("regular" upload mode): repos/create, preupload, commit (ndjson). Files land in `files`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                self._send(404, {"error": "not in the fake hub"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append(("POST", self.path.split("?")[0]))
                self._send(*hub.answer(self.path.split("?")[0], body, self.headers.get("Authorization", "")))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, path: str, body: bytes, auth: str) -> tuple[int, dict]:
        if auth != "Bearer hf_fake_token":
            return 401, {"error": "bad token"}
        if path == "/api/repos/create":
            self.created.append(json.loads(body))
            return 200, {"url": f"{self.url}/{json.loads(body)['organization']}/{json.loads(body)['name']}"}
        if path == "/api/validate-yaml":  # the README's YAML header is checked before the commit
            self.validated.append(json.loads(body)["content"])
            return 200, {}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.commits.append(lines[0])
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64"
                self.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/org/run/commit/{'c' * 40}", "commitOid": "c" * 40}
        return 404, {"error": f"not in the fake hub: {path}"}

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def lm_run(make_config):
    config = make_config(train={"max_steps": 2})
    assert main(["train", str(config)]) == 0
    return config


def test_export_writes_a_model_card_with_the_runs_facts(lm_run, tmp_path):
    from mmalign.model_card import final_metrics

    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--to", str(out), "--format", "merged"]) == 0
    card = (out / "README.md").read_text()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = final_metrics(tmp_path / "run" / "metrics.jsonl")
    assert last["step"] == 2 and last["loss"] == metrics[-1]["loss"]
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "transformers" and "dpo" in header["tags"]
    assert "base_model" not in header  # a local folder is no Hub id
    assert "DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta d)." in card
    assert f"| loss | {metrics[-1]['loss']:.6g} |" in card
    assert f"| rewards/accuracies | {metrics[-1]['rewards/accuracies']:.6g} |" in card
    assert "| loss.beta | 0.1 |" in card and "| train.max_steps | 2 |" in card
    assert "mmalign train mmalign_config.yaml" in card
    saved = yaml.safe_load((out / "mmalign_config.yaml").read_text())
    original = yaml.safe_load(Path(lm_run).read_text())
    assert saved["model"]["path"] == original["model"]["path"] and saved["data"]["train"] == original["data"]["train"]
    assert math.isclose(saved["optim"]["lr"], 1e-3)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "bare"), "--no-card"]) == 0
    assert not (tmp_path / "bare" / "README.md").exists()


def test_push_to_hub_uploads_the_export_and_card(lm_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        out = tmp_path / "export"
        assert main(["export", str(tmp_path / "run"), "--to", str(out), "--format", "merged",
                     "--push-to-hub", "org/run", "--private"]) == 0
    assert hub.created == [{"name": "run", "organization": "org", "visibility": "private"}]
    assert hub.calls == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                         ("POST", "/api/models/org/run/preupload/main"), ("POST", "/api/models/org/run/commit/main")]
    assert yaml.safe_load(hub.validated[0].split("---\n")[1])["library_name"] == "transformers"
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.files == local  # every file, byte for byte
    assert "README.md" in hub.files and "model.safetensors" in hub.files
    assert hub.commits[0]["value"]["summary"].startswith("mmalign export (merged)")
    assert f"pushed to org/run: {hub.url}/org/run/commit/{'c' * 40}" in capsys.readouterr().out
