"""Win rate with a percentile bootstrap (mmalign/evaluation/images.py) on hand numbers, and
`mmalign eval images` on two scored manifests."""

from __future__ import annotations

import json
import math

import pytest

from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.evaluation.images import win_rate
from mmalign.generate.manifest import sample_id, write_manifest


def test_all_wins_ties_losses():
    w = win_rate([0, 1, 2], [1, 2, 3], n_boot=200)
    assert (w.rate, w.low, w.high, w.wins, w.ties, w.losses, w.n) == (1.0, 1.0, 1.0, 3, 0, 0, 3)
    w = win_rate([0.5, 0.5], [0.5, 0.5], n_boot=200)
    assert (w.rate, w.low, w.high, w.ties) == (0.5, 0.5, 0.5, 2)
    assert win_rate([3, 3], [1, 2], n_boot=50).rate == 0.0


def test_tie_counts_half():
    # 3 wins, 1 tie, 1 loss out of 5: (3 + 0.5) / 5
    w = win_rate([0, 0, 0, 0, 0], [1, 2, 3, 0, -1], n_boot=100)
    assert w.rate == pytest.approx(0.7) and (w.wins, w.ties, w.losses) == (3, 1, 1)
    assert w.low <= w.rate <= w.high


def test_bootstrap_matches_the_normal_approximation():
    # 400 independent samples, 240 wins: se = sqrt(.6 * .4 / 400) = 0.0245, 95% CI ~ 0.6 -/+ 0.048
    base, aligned = [0.0] * 400, [1.0] * 240 + [-1.0] * 160
    w = win_rate(base, aligned, n_boot=4000, seed=1)
    se = math.sqrt(0.6 * 0.4 / 400)
    assert w.rate == 0.6
    assert w.low == pytest.approx(0.6 - 1.96 * se, abs=0.006)
    assert w.high == pytest.approx(0.6 + 1.96 * se, abs=0.006)
    assert win_rate(base, aligned, n_boot=500, seed=3) == win_rate(base, aligned, n_boot=500, seed=3)


def test_bootstrap_resamples_prompts_not_samples():
    # two prompts of 10 samples each: one all wins, one all losses. As 20 independent samples
    # the CI is about 0.5 -/+ 0.22; drawn as 2 prompts, a resample holds 0, 1 or 2 winning
    # prompts (p = 1/4, 1/2, 1/4), so the 95% interval is [0, 1].
    base, aligned = [0.0] * 20, [1.0] * 10 + [-1.0] * 10
    loose = win_rate(base, aligned, n_boot=2000)
    assert 0.2 < loose.low < 0.35 and 0.65 < loose.high < 0.8
    grouped = win_rate(base, aligned, n_boot=2000, groups=[0] * 10 + [1] * 10)
    assert (grouped.rate, grouped.low, grouped.high) == (0.5, 0.0, 1.0)


def test_bad_input():
    with pytest.raises(DataError, match="equally long"):
        win_rate([1, 2], [1])
    with pytest.raises(DataError, match="finite"):
        win_rate([1, float("nan")], [1, 2])


def manifest(path, scores: dict[int, list[tuple[float, float]]], prompt: str = "p") -> None:
    rows = [{"id": sample_id(p, s), "prompt_index": p, "prompt": f"{prompt} {p}", "sample": s, "seed": 7 * p + s,
             "kind": "text", "text": "x", "score": a, "score_clip": b}
            for p, values in scores.items() for s, (a, b) in enumerate(values)]
    write_manifest(rows, path)


def test_cli_compares_matched_samples(tmp_path, capsys):
    manifest(tmp_path / "base", {0: [(0.1, 0.3), (0.2, 0.3)], 1: [(0.5, 0.9), (0.4, 0.9)]})
    manifest(tmp_path / "aligned", {0: [(0.3, 0.3), (0.3, 0.2)], 1: [(0.6, 0.9), (0.1, 0.5)]})
    out = tmp_path / "eval.json"
    assert main(["eval", "images", "--base", str(tmp_path / "base"), "--aligned", str(tmp_path / "aligned"),
                 "--out", str(out), "--n-boot", "200"]) == 0
    result = json.loads(out.read_text())["scorers"]
    # score: wins at 000000-000, 000000-001, 000001-000; loss at 000001-001 -> 3/4
    assert result["score"]["win_rate"] == 0.75 and result["score"]["wins"] == 3
    assert result["score"]["mean_base"] == pytest.approx(0.3) and result["score"]["mean_aligned"] == pytest.approx(1.3 / 4)
    # score_clip: tie, loss, tie, loss -> (0.5 + 0 + 0.5 + 0) / 4
    assert result["score_clip"]["win_rate"] == 0.25 and result["score_clip"]["ties"] == 2
    assert result["score"]["prompts"] == 2
    text = capsys.readouterr().out
    assert "score_clip" in text and "0.750" in text and "[mmalign] eval images: 4 matched samples of 2 prompts" in text


def test_cli_names_unmatched_ids_and_prompt_mismatch(tmp_path, capsys):
    manifest(tmp_path / "base", {0: [(0.1, 0.3), (0.2, 0.3)], 1: [(0.5, 0.9)]})
    manifest(tmp_path / "aligned", {0: [(0.3, 0.3), (0.3, 0.2)]})
    args = ["eval", "images", "--base", str(tmp_path / "base"), "--aligned", str(tmp_path / "aligned"),
            "--out", str(tmp_path / "e.json")]
    assert main(args) == 2
    assert "1 only in base: 000001-000" in capsys.readouterr().err
    manifest(tmp_path / "aligned", {0: [(0.3, 0.3), (0.3, 0.2)], 1: [(0.5, 0.9)]}, prompt="other")
    assert main(args) == 2
    assert "prompts differ" in capsys.readouterr().err


def test_null_scores_leave_the_comparison(tmp_path):
    from mmalign.evaluation.images import compare
    from mmalign.generate.manifest import read_manifest

    manifest(tmp_path / "base", {0: [(0.1, None), (0.2, 0.3)], 1: [(0.5, 0.9)]})
    manifest(tmp_path / "aligned", {0: [(0.3, 0.3), (0.3, 0.2)], 1: [(0.6, 1.0)]})
    table = compare(read_manifest(tmp_path / "base"), read_manifest(tmp_path / "aligned"), n_boot=50)
    assert (table["score"]["n"], table["score"]["unscored"], table["score"]["win_rate"]) == (3, 0, 1.0)
    assert (table["score_clip"]["n"], table["score_clip"]["unscored"], table["score_clip"]["win_rate"]) == (2, 1, 0.5)


def test_cli_generates_and_scores_both_models_first(tmp_path, capsys):
    """--base-model / --aligned-model run mmalign generate + score. The same tiny SDXL twice on the
    same seeds gives the same images, so every comparison is a tie: win rate 1/2, CI [1/2, 1/2]."""
    from mmalign.toyworld.models import build_scorer

    model, processor = build_scorer(seed=0)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "eval.json"
    assert main(["eval", "images", "--base-model", "pkg://tiny_sdxl", "--aligned-model", "pkg://tiny_sdxl",
                 "--prompts", str(tmp_path / "prompts.txt"), "--scorer", f"pickscore={tmp_path / 'clip'}",
                 "--samples", "2", "--set", "num_inference_steps=2", "--out", str(out), "--n-boot", "100"]) == 0
    result = json.loads(out.read_text())
    assert result["base"].endswith("eval_base") and result["aligned"].endswith("eval_aligned")
    t = result["scorers"]["score_pickscore"]
    assert (t["n"], t["ties"], t["win_rate"], t["ci"]) == (4, 4, 0.5, [0.5, 0.5])
    assert t["mean_base"] == t["mean_aligned"]
