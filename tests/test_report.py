"""`mmalign report`: every sample is on the page, text is escaped, picks are marked, contact
sheets are drawn, and the page renders in a real (headless) browser with every image decoded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from mmalign.cli import main
from mmalign.generate.manifest import sample_id, write_manifest
from mmalign.report.html import histogram_svg

EVIL = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


@pytest.fixture
def scored(tmp_path):
    """3 prompts x 3 image samples (one 300x200 image, shrunk for the page) + best-vs-worst pairs."""
    from PIL import Image

    rows = []
    (tmp_path / "m" / "media").mkdir(parents=True)
    for p, prompt in enumerate(["a red circle", EVIL, "ünïcödé square"]):
        for s in range(3):
            sid = sample_id(p, s)
            size = (300, 200) if (p, s) == (0, 0) else (16, 16)
            Image.new("RGB", size, (40 * s, 80 * p, 200)).save(tmp_path / "m" / "media" / f"{sid}.png")
            rows.append({"id": sid, "prompt_index": p, "prompt": prompt, "sample": s, "seed": 10 * p + s,
                         "kind": "image", "path": f"media/{sid}.png", "model": "tiny", "params": {"steps": 2},
                         "score_clip": 0.1 * s + p, "score": float(s)})
    manifest = write_manifest(rows, tmp_path / "m")
    assert main(["build-pairs", "scores", str(manifest), "--out", str(tmp_path / "pairs")]) == 0
    return manifest, rows, tmp_path / "pairs" / "pairs.jsonl"


def test_report_has_every_sample_escaped_and_marked(scored, tmp_path, capsys):
    manifest, rows, pairs = scored
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(manifest), "--pairs", str(pairs), "--out", str(out)]) == 0
    page = out.read_text()
    figures = re.findall(r'<figure class="([^"]*)" data-id="([^"]+)">', page)
    assert [sid for _, sid in figures] == [r["id"] for r in rows]
    assert page.count('<img src="data:image/') == len(rows)
    # best (sample 2) vs worst (sample 0) of each prompt
    assert {sid: cls for cls, sid in figures if cls} == {sample_id(p, s): c for p in range(3)
                                                          for s, c in ((2, "chosen"), (0, "rejected"))}
    # the untrusted prompt shows as text only
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page
    assert "ünïcödé square" in page
    assert page.count("<svg") == 3  # score, score_clip, pair margin
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3 of 3 prompts, 9 samples, 6 picked by the pairs, 0 unreadable" in line and "1 contact sheets" in line


def test_contact_sheet_grid(scored, tmp_path):
    from PIL import Image

    manifest, _, pairs = scored
    assert main(["report", str(manifest), "--pairs", str(pairs), "--out", str(tmp_path / "rep.html")]) == 0
    sheet = Image.open(tmp_path / "rep-sheet-000.png").convert("RGB")
    step = 128 + 2 * 3 + 2  # cell + border + gap
    assert sheet.size == (3 * step + 2, 3 * (step + 14) + 2)
    # prompt 1 row: sample 2 (chosen) framed green, sample 0 (rejected) red, sample 1 plain white
    top = 1 * (step + 14) + 1 + 14
    assert sheet.getpixel((2 * step + 2, top + 1)) == (26, 150, 65)
    assert sheet.getpixel((0 * step + 2, top + 1)) == (215, 25, 28)
    assert sheet.getpixel((1 * step + 2, top + 1)) == (255, 255, 255)
    assert sheet.getpixel((1 * step + 1 + 3 + 64, top + 3 + 64)) == (40, 80, 200)  # the sample itself


def test_pairs_of_another_manifest_are_an_error(scored, tmp_path, capsys):
    manifest, rows, pairs = scored
    write_manifest(rows[:3], tmp_path / "small")
    assert main(["report", str(tmp_path / "small"), "--pairs", str(pairs), "--out", str(tmp_path / "x.html")]) == 2
    assert "not in the manifest" in capsys.readouterr().err


def test_histogram_counts():
    svg = histogram_svg([0.0, 0.0, 1.0, 2.0], "s", bins=2)
    assert re.findall(r"\): (\d+)</title>", svg) == ["2", "2"] and "mean 0.75" in svg and "n=4" in svg


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_report_renders_in_a_browser(scored, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is missing: .ci/run installs Debian's chromium before make test")
        pytest.skip("Chromium not installed (apt-get install chromium): browser rendering not checked")
    manifest, rows, pairs = scored
    out = tmp_path / "report.html"
    assert main(["report", str(manifest), "--pairs", str(pairs), "--out", str(out), "--no-sheets"]) == 0
    # one extra image that cannot decode proves the in-page check can tell a broken image from a good one
    page = out.read_text().replace("<h1>", '<img id="broken" src="data:image/png;base64,AAAA"><h1>', 1)
    out.write_text(page)
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-images="{len(rows)}/{len(rows) + 1}"' in dom, dom[:500]
    decoded = re.findall(r'<img[^>]*?data-decoded="([01])"', dom)
    assert decoded.count("1") == len(rows) and decoded.count("0") == 1
    assert re.search(r'<img id="broken"[^>]*data-decoded="0"', dom)


def test_report_plays_videos_with_a_frame_strip(tmp_path, capsys):
    """A video manifest (what `mmalign generate` writes for Wan): every sample is a <video> of its
    mp4 and a strip of its frames; in a headless Chromium (when installed) every video decodes its
    first frame and every strip decodes."""
    import base64

    from PIL import Image

    from mmalign.data.video import write_video

    import numpy as np

    (tmp_path / "m" / "media").mkdir(parents=True)
    rows = []
    for s in range(2):
        frames = np.zeros((9, 16, 32, 3), dtype=np.uint8)
        for t in range(9):
            frames[t, :, : 3 * t + 4, s] = 255  # a bar growing over time, red or green
        sid = sample_id(0, s)
        write_video(frames, tmp_path / "m" / "media" / f"{sid}.mp4", fps=8)
        rows.append({"id": sid, "prompt_index": 0, "prompt": "a growing bar", "sample": s, "seed": s,
                     "kind": "video", "path": f"media/{sid}.mp4", "score": float(s)})
    manifest = write_manifest(rows, tmp_path / "m")
    out = tmp_path / "report.html"
    assert main(["report", str(manifest), "--out", str(out), "--no-sheets"]) == 0
    page = out.read_text()
    assert page.count("<video ") == 2 and page.count('src="data:video/mp4;base64,') == 2
    strips = re.findall(r'<img class="frames" src="data:image/png;base64,([^"]+)"', page)
    assert len(strips) == 2
    import io

    strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(strips[0]))).convert("RGB"), dtype=np.int16)
    assert strip.shape == (32, 8 * 64, 3)  # 8 of the 9 frames, each 64 px wide (thumb 256 / 4), 2:1
    lit = [(strip[16, 64 * k : 64 * (k + 1), 0] > 128).sum() for k in range(8)]
    assert lit == sorted(lit) and lit[0] < lit[-1]  # the bar grows from frame to frame
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is missing: .ci/run installs Debian's chromium before make test")
        pytest.skip("Chromium not installed (apt-get install chromium): video playback not checked")
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          "--autoplay-policy=no-user-gesture-required", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-videos="2/2"' in dom, re.findall(r"<body[^>]*>", dom)
    assert 'data-images="2/2"' in dom
