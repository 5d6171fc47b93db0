"""One self-contained HTML page of a sample manifest: `mmalign report MANIFEST --out report.html`.

What a person wants to look at before training on pairs: every prompt with its samples side
by side, each with its seed and scores; the chosen / rejected picks when a pairs file is
given; histograms of every score column (and of the pair margins). Images, audio and videos
(a looping player and a strip of 8 frames spread over the clip) are embedded as base64 data URIs and histograms are inline SVG, so the file opens anywhere,
offline, and can be mailed around. Prompts and generated text are untrusted: every piece of
text goes through `html.escape`, and a Content-Security-Policy allows no network and only the
page's own script (by hash) as a second fence. The script marks each <img> with whether it
decoded (`data-decoded`) and the body with a count (`data-images="ok/total"`; videos: each
<video> that decoded its first frame, `data-videos="ok/total"`), which the tests read back from
a headless browser.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
from collections import Counter, defaultdict
from html import escape
from pathlib import Path
from typing import Any

from mmalign.errors import DataError

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
_AUDIO = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}
_VIDEO = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska"}
STRIP_FRAMES = 8

SCRIPT = """window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute("data-decoded", good ? "1" : "0");
    if (good) ok++;
  }
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
document.addEventListener("DOMContentLoaded", function () {
  var vids = document.getElementsByTagName("video"), played = 0;
  document.body.setAttribute("data-videos", "0/" + vids.length);
  for (var i = 0; i < vids.length; i++) {
    vids[i].addEventListener("loadeddata", function (e) {
      e.target.setAttribute("data-decoded", "1");
      played++;
      document.body.setAttribute("data-videos", played + "/" + vids.length);
    });
    vids[i].addEventListener("error", function (e) { e.target.setAttribute("data-decoded", "0"); });
    vids[i].load();
  }
});"""

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
.prompt{border-top:1px solid #ddd;padding:.6em 0}
.prompt h3{font-size:.95em;font-weight:600;margin:.2em 0 .5em}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;padding:4px;border:3px solid transparent;border-radius:4px;font-size:.75em;max-width:280px}
figure.chosen{border-color:#1a9641} figure.rejected{border-color:#d7191c}
figure.chosen.rejected{border-color:#fdae61}
figure img{display:block;image-rendering:pixelated}
figure video{display:block;image-rendering:pixelated;max-width:100%} figure img.frames{max-width:100%;height:auto}
figcaption{margin-top:3px;line-height:1.35}
.badge{display:inline-block;padding:0 4px;border-radius:3px;color:#fff;font-weight:600;margin-right:3px}
.b-chosen{background:#1a9641} .b-rejected{background:#d7191c} .b-rank{background:#2b83ba}
.missing{width:128px;height:64px;background:#fee;color:#900;padding:4px}
pre.text{white-space:pre-wrap;max-width:420px;background:#f6f6f6;padding:4px;margin:0}
.cond img{height:96px;margin-right:4px}
table{border-collapse:collapse;font-size:.85em} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
.hists{display:flex;flex-wrap:wrap;gap:1em}
"""


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def image_data_uri(path: Path, thumb: int) -> tuple[str, int]:
    """(data URI, display width) of an image file. Files no larger than `thumb` pixels a side
    are embedded verbatim; bigger ones are shrunk to `thumb` (JPEG, quality 85) to keep the page small."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt, size = image.format, image.size
        if max(size) > thumb or fmt not in _MIME:
            image = image.convert("RGB")
            image.thumbnail((thumb, thumb), Image.LANCZOS)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=85)
            data, fmt, size = buf.getvalue(), "JPEG", image.size
    # tiny samples (16 px toy models) are scaled up for the eye; CSS keeps the pixels sharp
    width = max(size[0], 128) if max(size) < 128 else size[0]
    return f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode()}", width


def histogram_svg(values: list[float], title: str, bins: int = 20, width: int = 320, height: int = 150) -> str:
    """An inline SVG histogram (no matplotlib): `bins` equal-width bars from min to max, each with
    a tooltip; the axis shows min, max and the mean."""
    values = [v for v in values if math.isfinite(v)]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
    label = f'<text x="4" y="14" font-size="12">{escape(title)} (n={len(values)})</text>'
    if not values:
        return head + label + "</svg>"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / span * bins), bins - 1)] += 1
    top, plot_h, bar_w = max(counts), height - 44, (width - 8) / bins
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        a, b = lo + span * i / bins, lo + span * (i + 1) / bins
        bars.append(f'<rect x="{4 + i * bar_w:.1f}" y="{20 + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                    f'height="{h:.1f}" fill="#2b83ba"><title>[{a:.4g}, {b:.4g}): {c}</title></rect>')
    mean = sum(values) / len(values)
    axis = (f'<text x="4" y="{height - 8}" font-size="11">{lo:.4g}</text>'
            f'<text x="{width // 2}" y="{height - 8}" font-size="11" text-anchor="middle">mean {mean:.4g}</text>'
            f'<text x="{width - 4}" y="{height - 8}" font-size="11" text-anchor="end">{hi:.4g}</text>')
    return head + label + "".join(bars) + axis + "</svg>"


def pair_marks(records: list[dict[str, Any]], source: str) -> dict[str, Counter]:
    """sample id -> Counter(chosen=n, rejected=n, rank<k>=n) from pairs written by
    `mmalign build-pairs scores` (their `ids` provenance; ranked lists mark ranks)."""
    marks: dict[str, Counter] = defaultdict(Counter)
    for i, r in enumerate(records):
        ids = r.get("ids")
        if not isinstance(ids, list) or len(ids) < 2:
            raise DataError(f"{source}: row {i} has no 'ids' provenance (pairs from mmalign build-pairs scores carry it)")
        if "completions" in r:
            for k, sid in enumerate(ids):
                marks[sid][f"rank {k + 1}"] += 1
        else:
            marks[ids[0]]["chosen"] += 1
            marks[ids[1]]["rejected"] += 1
    return marks


def spectrogram_html(path: Path) -> str:
    """An <img> of the clip's spectrogram (PNG data URI; mmalign.data.audio.spectrogram_image)."""
    import soundfile
    import torch

    from mmalign.data.audio import spectrogram_image

    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    buf = io.BytesIO()
    spectrogram_image(torch.from_numpy(wave.mean(axis=1)), rate).save(buf, format="PNG")
    return (f'<img class="spec" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" '
            f'width="256" alt="spectrogram">')


def frame_strip_html(path: Path, thumb: int) -> str:
    """An <img> (PNG data URI) of up to 8 frames spread evenly over the video, left to right, each
    scaled to a quarter of `thumb` wide (at least 32 px): the video's contact sheet."""
    from PIL import Image

    from mmalign.data.video import frame_indices, load_video

    frames = load_video(str(path), str(path))
    frames = [frames[i] for i in frame_indices(len(frames), min(STRIP_FRAMES, len(frames)))]
    w = max(thumb // 4, 32)
    h = max(1, round(frames[0].height * w / frames[0].width))
    strip = Image.new("RGB", (w * len(frames), h))
    for k, frame in enumerate(frames):
        strip.paste(frame.resize((w, h), Image.NEAREST), (k * w, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return (f'<img class="frames" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" '
            f'width="{strip.width}" alt="frames">')


def video_html(path: Path, thumb: int) -> str:
    """A looping, muted <video> of the file (data URI) and its frame strip (`frame_strip_html`)."""
    mime = _VIDEO.get(path.suffix.lower(), "video/mp4")
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<video controls muted loop autoplay playsinline width="{max(thumb, 128)}" '
            f'src="data:{mime};base64,{data}"></video><br>' + frame_strip_html(path, thumb))


def _media_html(row: dict[str, Any], root: Path, thumb: int, missing: list[str]) -> str:
    if row["kind"] == "text":
        return f'<pre class="text">{escape(str(row["text"]))}</pre>'
    path = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
    try:
        if row["kind"] == "audio":
            mime = _AUDIO.get(path.suffix.lower(), "audio/wav")
            return (f'<audio controls src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"></audio>'
                    + spectrogram_html(path))
        if row["kind"] == "video":
            return video_html(path, thumb)
        uri, width = image_data_uri(path, thumb)
    except Exception as e:  # noqa: BLE001 - a broken sample is shown as broken, not fatal
        missing.append(row["id"])
        return f'<div class="missing">unreadable: {escape(str(row["path"]))} ({escape(type(e).__name__)})</div>'
    return f'<img src="{uri}" width="{width}" alt="{escape(row["id"])}">'


def _figure(row: dict[str, Any], root: Path, thumb: int, columns: list[str], marks: dict[str, Counter],
            missing: list[str]) -> str:
    mark = marks.get(row["id"], Counter())
    classes = " ".join(k for k in ("chosen", "rejected") if mark[k])
    badges = "".join(f'<span class="badge b-{escape(k.split()[0])}">{escape(k)}{" ×" + str(n) if n > 1 else ""}</span>'
                     for k, n in sorted(mark.items()))
    def value(c: str) -> str:  # the combined score, which ranks the samples, in bold
        return f"<b>{escape(_fmt(row[c]))}</b>" if c == "score" else escape(_fmt(row[c]))

    scores = "".join(f"<br>{escape(c)}: {value(c)}" for c in columns if c in row)
    return (f'<figure class="{classes}" data-id="{escape(row["id"])}">{_media_html(row, root, thumb, missing)}'
            f'<figcaption>{badges}{escape(row["id"])} · seed {escape(str(row["seed"]))}{scores}</figcaption></figure>')


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages
        return " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def _condition(row: dict[str, Any], root: Path, thumb: int, missing: list[str]) -> str:
    images = row.get("images") or []
    if not images:
        return ""
    parts = [_media_html({"kind": "image", "path": p, "id": f"{row['id']} condition"}, root, thumb, missing)
             for p in images]
    return f'<div class="cond">{"".join(parts)}</div>'


def _summary_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "<tr><th>column</th><th>n</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>"
    body = []
    for c in columns:
        xs = [float(r[c]) for r in rows if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)]
        if xs:
            m = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
            body.append(f"<tr><td>{escape(c)}</td><td>{len(xs)}</td><td>{m:.4g}</td><td>{sd:.4g}</td>"
                        f"<td>{min(xs):.4g}</td><td>{max(xs):.4g}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>" if body else ""


def render_report(rows: list[dict[str, Any]], root: str | Path, pairs: list[dict[str, Any]] | None = None,
                  title: str = "mmalign samples", thumb: int = 256, max_prompts: int | None = None,
                  source: str = "pairs") -> tuple[str, dict[str, Any]]:
    """(HTML text, stats) for manifest rows; media paths are relative to `root`. pairs: records
    written by `mmalign build-pairs scores` (marks chosen / rejected / ranks by sample id)."""
    from mmalign.builders.scores import group_by_prompt
    from mmalign.generate.manifest import score_columns

    root = Path(root)
    marks = pair_marks(pairs, source) if pairs else {}
    known = {r["id"] for r in rows}
    unknown = sorted(set(marks) - known)
    if unknown:
        raise DataError(f"{source}: sample ids {', '.join(unknown[:5])} are not in the manifest "
                        "(pairs of another manifest?)")
    columns = [c for c in (["score"] if any("score" in r for r in rows) else []) + score_columns(rows)]
    groups = group_by_prompt(rows)
    shown = list(groups.items())[: max_prompts or None]
    missing: list[str] = []
    sections = []
    for index, group in shown:
        figures = "".join(_figure(r, root, thumb, columns, marks, missing) for r in group)
        sections.append(f'<section class="prompt" id="p{index}"><h3>#{index} {escape(_prompt_text(group[0]["prompt"]))}</h3>'
                        f'{_condition(group[0], root, thumb, missing)}<div class="row">{figures}</div></section>')
    hists = [histogram_svg([float(r[c]) for r in rows if c in r], c) for c in columns]
    if pairs and all("margin" in p for p in pairs):
        hists.append(histogram_svg([float(p["margin"]) for p in pairs], "pair margin"))
    models = sorted({str(r.get("model", "?")) for r in rows})
    kinds = Counter(r["kind"] for r in rows)
    facts = [f"{len(groups)} prompts", f"{len(rows)} samples (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")",
             "models: " + ", ".join(models)]
    if pairs:
        facts.append(f"{len(pairs)} {'ranked lists' if 'completions' in pairs[0] else 'pairs'} from {source} "
                     f"({len(marks)} samples picked)")
    if len(shown) < len(groups):
        facts.append(f"showing the first {len(shown)} prompts (--max-prompts)")
    params = rows[0].get("params") if rows else None
    body = (f"<h1>{escape(title)}</h1><p>{escape('; '.join(facts))}</p>"
            + (f"<p>params: <code>{escape(json.dumps(params, ensure_ascii=False))}</code></p>" if params else "")
            + "<h2>Scores</h2>" + _summary_table(rows, columns) + f'<div class="hists">{"".join(hists)}</div>'
            + "<h2>Samples</h2>" + "".join(sections))
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
            f"<body>{body}</body></html>\n")
    stats = {"prompts": len(groups), "shown": len(shown), "samples": len(rows), "picked": len(marks),
             "unreadable": missing, "columns": columns}
    return page, stats
