"""Pair selection from a scored manifest (`mmalign build-pairs scores`) on hand-made scores:
which ids are picked, how many ties / low margins are dropped, the written formats, and that
the image pairs feed Diffusion-DPO training unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.builders.scores import build_scored_pairs, judge_rows, write_scored_pairs
from mmalign.cli import main
from mmalign.data.preference import DataError, load_preference_data
from mmalign.generate.manifest import sample_id, write_manifest

ROOT = Path(__file__).resolve().parents[1]

# prompt_index -> scores of its samples (sample = position). Prompt 0: best is a tie between
# samples 1 and 3 (the lower sample index wins), worst is sample 0. Prompt 1: all tied.
# Prompt 2: gap 0.05 (below a 0.1 margin). Prompt 3: one sample. Prompt 4: numeric strings
# ("10" > "9" as numbers, not as text).
SCORES = {0: [0.2, 0.9, 0.5, 0.9], 1: [0.5, 0.5, 0.5], 2: [0.40, 0.45], 3: [0.7], 4: ["10", "9"]}


def make_rows(kind: str = "image", scores: dict = SCORES) -> list[dict]:
    rows = []
    for p, values in scores.items():
        for s, v in enumerate(values):
            row = {"id": sample_id(p, s), "prompt_index": p, "prompt": f"prompt {p}", "sample": s,
                   "seed": 1000 * p + s, "kind": kind, "model": "tiny", "params": {"steps": 2}, "score": v}
            row.update({"path": f"media/{sample_id(p, s)}.png"} if kind == "image" else {"text": f"answer {p}.{s}"})
            rows.append(row)
    return rows


@pytest.fixture
def image_manifest(tmp_path):
    """The SCORES manifest with a distinct 16x16 PNG per sample."""
    from PIL import Image

    rows = make_rows("image")
    (tmp_path / "m" / "media").mkdir(parents=True)
    for i, r in enumerate(rows):
        Image.new("RGB", (16, 16), (10 * i, 255 - 10 * i, 7 * i)).save(tmp_path / "m" / r["path"])
    return write_manifest(rows, tmp_path / "m"), rows


def picked(selection) -> list[tuple[str, str]]:
    return [(item["chosen"]["id"], item["rejected"]["id"]) for item in selection.items]


def test_best_worst_picks_ids_and_counts_drops():
    sel = build_scored_pairs(make_rows(), "best_worst", margin=0.1)
    assert picked(sel) == [("000000-001", "000000-000"), ("000004-000", "000004-001")]
    c = sel.counts
    assert (c["kept"], c["dropped_tie"], c["dropped_low_margin"], c["prompts_lt2"]) == (2, 1, 1, 1)
    assert (c["prompts"], c["samples"]) == (5, 12)
    assert sel.items[0]["margin"] == pytest.approx(0.7)
    assert "2 pairs" in sel.summary() and "1 ties" in sel.summary() and "1 below margin 0.1" in sel.summary()
    # without a margin the 0.05 gap of prompt 2 is kept: only exact ties go
    assert build_scored_pairs(make_rows(), "best_worst").counts["kept"] == 3


def test_margin_strategy_counts_every_pair():
    sel = build_scored_pairs(make_rows(), "margin", margin=0.1)
    # prompt 0: 6 pairs, 1 tie (samples 1, 3); prompt 1: 3 ties; prompt 2: 1 low; prompt 4: 1 kept
    c = sel.counts
    assert (c["kept"], c["dropped_tie"], c["dropped_low_margin"], c["prompts_lt2"]) == (6, 4, 1, 1)
    assert all(item["margin"] >= 0.1 for item in sel.items)
    assert all(float(i["chosen"]["score"]) > float(i["rejected"]["score"]) for i in sel.items)
    assert ("000000-003", "000000-000") in picked(sel) and ("000000-001", "000000-003") not in picked(sel)


def test_ranked_lists_are_ordered_and_equal_length():
    sel = build_scored_pairs(make_rows(), "ranked")  # K = 4, the most samples of any prompt
    assert sel.counts["kept"] == 1 and sel.counts["dropped_short_list"] == 3
    item = sel.items[0]
    assert [r["id"] for r in item["rows"]] == ["000000-001", "000000-003", "000000-002", "000000-000"]
    assert item["scores"] == [0.9, 0.9, 0.5, 0.2]
    sel = build_scored_pairs(make_rows(), "ranked", list_size=2)  # best and worst of each prompt
    assert [[r["id"] for r in i["rows"]] for i in sel.items] == [
        ["000000-001", "000000-000"], ["000002-001", "000002-000"], ["000004-000", "000004-001"]]
    assert sel.counts["dropped_tie"] == 1
    assert all(i["scores"] == sorted(i["scores"], reverse=True) for i in sel.items)


def test_bad_scores_and_strategy_are_named():
    rows = make_rows()
    rows[2]["score"] = "high"
    with pytest.raises(DataError, match="000000-002.*'high' is not a number"):
        build_scored_pairs(rows)
    with pytest.raises(DataError, match="no score column 'score_pick'"):
        build_scored_pairs(make_rows(), score_column="score_pick")
    with pytest.raises(DataError, match="unknown strategy"):
        build_scored_pairs(make_rows(), "best")


def test_image_pairs_written_with_provenance(image_manifest, tmp_path):
    path, rows = image_manifest
    sel = build_scored_pairs(rows, "best_worst", margin=0.1)
    out = write_scored_pairs(sel, path.parent, tmp_path / "pairs")
    records, kind = load_preference_data(out)
    assert kind == "pair" and len(records) == 2
    r = records[0]
    assert (r["prompt"], r["ids"], r["seeds"], r["scores"]) == ("prompt 0", ["000000-001", "000000-000"], [1, 0], [0.9, 0.2])
    assert r["margin"] == pytest.approx(0.7) and r["score_column"] == "score" and r["model"] == "tiny"
    # the image files are the samples, byte for byte, under paths relative to the jsonl
    assert (out.parent / r["chosen"]).read_bytes() == (path.parent / "media/000000-001.png").read_bytes()
    assert (out.parent / r["rejected"]).read_bytes() == (path.parent / "media/000000-000.png").read_bytes()


def test_text_pairs_and_ranked_records(tmp_path):
    rows = make_rows("text")
    (tmp_path / "img.png").write_bytes(b"x")
    for r in rows:
        r["images"] = [str(tmp_path / "img.png")]  # a VLM prompt's condition image (absolute, as generate writes)
    out = write_scored_pairs(build_scored_pairs(rows, "best_worst"), tmp_path, tmp_path / "out")
    records, kind = load_preference_data(out)
    assert kind == "pair" and len(records) == 3
    assert (records[0]["chosen"], records[0]["rejected"]) == ("answer 0.1", "answer 0.0")
    assert (out.parent / records[0]["images"][0]).resolve() == (tmp_path / "img.png").resolve()
    ranked = write_scored_pairs(build_scored_pairs(rows, "ranked", list_size=2), tmp_path, tmp_path / "out", name="ranked")
    records, kind = load_preference_data(ranked)
    assert kind == "ranked" and records[2]["completions"] == ["answer 4.0", "answer 4.1"]
    assert records[2]["scores"] == [10.0, 9.0]


def test_judge_verdicts_both_orders():
    rows = make_rows("text", {0: [0, 0, 0], 1: [0, 0]})
    a, b, c, x, y = rows
    a["verdicts"] = {b["id"]: "A", c["id"]: "B"}      # a beats b; c beats a
    b["verdicts"] = {a["id"]: "B", c["id"]: "tie"}    # agrees: a beats b; b ~ c
    c["verdicts"] = {a["id"]: " a "}                  # agrees: c beats a (parsed strictly but case-free)
    x["verdicts"] = {y["id"]: "A"}
    y["verdicts"] = {x["id"]: "A"}                    # each wins when shown first: position bias
    sel = build_scored_pairs(rows, "judge")
    assert picked(sel) == [(a["id"], b["id"]), (c["id"], a["id"])]
    assert (sel.counts["dropped_tie"], sel.counts["dropped_disagree"]) == (1, 1)
    y["verdicts"] = {x["id"]: "maybe"}
    with pytest.raises(DataError, match="verdict 'maybe'"):
        build_scored_pairs(rows, "judge")


def test_judge_function_fills_verdicts():
    rows = make_rows("text", {0: [0, 0, 0]})
    rows[2]["text"] = "a much longer answer"
    calls = []

    def longer(prompt, first, second):  # a stand-in judge: the longer answer wins
        calls.append((first["id"], second["id"]))
        a, b = len(first["text"]), len(second["text"])
        return "A" if a > b else "B" if a < b else "tie"

    judged = judge_rows(rows, longer, progress=False)
    assert len(calls) == 6  # 3 samples: every ordered pair
    sel = build_scored_pairs(judged, "judge")
    assert picked(sel) == [("000000-002", "000000-000"), ("000000-002", "000000-001")]
    assert sel.counts["dropped_tie"] == 1


def test_cli_summary_line(image_manifest, tmp_path, capsys):
    path, _ = image_manifest
    assert main(["build-pairs", "scores", str(path.parent), "--out", str(tmp_path / "p"), "--margin", "0.1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[mmalign] build-pairs scores: 2 pairs (best_worst, by score) from 12 samples of 5 prompts")
    assert "1 ties, 1 below margin 0.1, 1 prompts with < 2 samples" in line
    assert main(["build-pairs", "scores", str(path), "--out", str(tmp_path / "q"), "--column", "score_x"]) == 2


def test_pairs_feed_sdxl_dpo_training_unchanged(image_manifest, tmp_path):
    path, _ = image_manifest
    assert main(["build-pairs", "scores", str(path), "--out", str(tmp_path / "pairs")]) == 0
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny/sdxl_dpo.yaml"), f"data.train={tmp_path / 'pairs/pairs.jsonl'}",
                 "data.format=auto", "train.max_steps=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


def test_null_scores_are_skipped_and_counted():
    rows = make_rows(scores={0: [0.1, None, 0.3], 1: [None, 0.2]})  # null: a scorer gave no number
    sel = build_scored_pairs(rows)
    assert picked(sel) == [("000000-002", "000000-000")]
    assert (sel.counts["unscored"], sel.counts["prompts_lt2"]) == (2, 1)
    assert "2 samples without a score" in sel.summary()


def test_judge_scorer_asks_both_orders():
    """The real JudgeScorer (mmalign/scoring/judge.py) with a fake generate: it prefers the
    response that contains 'good', except for prompt 1 where it always answers A."""
    pytest.importorskip("mmalign.scoring.judge")
    from mmalign.scoring.judge import JudgeScorer

    def fake_generate(model, processor, records, **kwargs):
        answers = []
        for r in records:
            text = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]
            a, b = text.split("<<<RESPONSE A")[1].split("<<<RESPONSE B")
            answers.append("Verdict: A" if "prompt 1" in text or "good" in a.split("<<<END")[0]
                           else "Verdict: B" if "good" in b.split("<<<END")[0] else "Verdict: tie")
        return answers

    judge = JudgeScorer(mode="pairwise", on_disagreement="drop", model=object(),
                        processor=type("P", (), {"chat_template": None})(), generate=fake_generate)
    rows = make_rows("text", {0: [0, 0, 0], 1: [0, 0]})
    rows[1]["text"] = "a good answer"
    sel = build_scored_pairs(judge_rows(rows, judge, progress=False), "judge")
    assert picked(sel) == [("000000-001", "000000-000"), ("000000-001", "000000-002")]
    # prompt 0: samples 0 and 2 tie; prompt 1: A wins in both orders -> a disagreement
    assert (sel.counts["dropped_tie"], sel.counts["dropped_disagree"]) == (1, 1)


def test_sample_score_sdxl_recipe_tiny(tmp_path, monkeypatch, capsys):
    """pipelines/sample_score_sdxl.py --tiny, smaller still: 2 prompts x 2 samples -> pairs -> report."""
    import runpy

    monkeypatch.setattr("sys.argv", ["sample_score_sdxl.py", "--tiny", "--num-prompts", "2", "--num-samples", "2",
                                     "--out", str(tmp_path / "run")])
    runpy.run_path(str(ROOT / "pipelines/sample_score_sdxl.py"), run_name="__main__")
    records, kind = load_preference_data(tmp_path / "run/pairs/pairs.jsonl")
    assert kind == "pair" and [r["prompt_index"] for r in records] == [0, 1]  # distinct random samples: no ties
    assert [r["prompt"] for r in records] == ["bond", "element"]  # the first PartiPrompts
    assert all(r["scores"][0] > r["scores"][1] for r in records)
    page = (tmp_path / "run/report.html").read_text()
    assert page.count('<img src="data:image/png') == 4 and page.count('class="chosen"') == 2
    assert "next: mmalign train configs/tiny/sdxl_dpo.yaml" in capsys.readouterr().out
