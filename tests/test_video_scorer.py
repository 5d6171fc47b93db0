"""The frame-based video scorer (`video_frames`): an image scorer's mean over evenly spaced frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError

WORDS = ["a", "red", "blue", "green", "square", "circle", "photo", "of"]
COLOURS = [(220, 30, 30), (30, 40, 220), (30, 200, 40), (240, 240, 40), (20, 20, 20), (200, 200, 200),
           (120, 30, 160), (30, 180, 180), (250, 130, 20)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from clip_fixtures import save_tiny_clip

    from mmalign.toytext import build_word_tokenizer

    return save_tiny_clip(tmp_path_factory.mktemp("clip"), build_word_tokenizer(WORDS), 32, 8, 32)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """9 frames of 32x32, frame t filled with COLOURS[t]."""
    from mmalign.data.video import write_video

    frames = np.stack([np.full((32, 32, 3), c, dtype=np.uint8) for c in COLOURS])
    return str(write_video(frames, tmp_path_factory.mktemp("video") / "clip.mp4", fps=8))


def test_score_is_the_image_scorers_mean_over_evenly_spaced_frames(clip_dir, video):
    from mmalign.data.video import load_video
    from mmalign.scoring import load_scorer
    from mmalign.scoring.pickscore import PickScoreScorer

    scorer = load_scorer(f"video_frames={clip_dir},scorer=pickscore,frames=3")
    assert scorer.kinds == ("video",)
    prompts = ["a red square", "a blue circle"]
    scores = scorer.score(prompts, [video, video])
    frames = load_video(video, "x")
    image = PickScoreScorer(str(clip_dir))
    for prompt, score in zip(prompts, scores):
        per_frame = image.score([prompt] * 9, frames)
        torch.testing.assert_close(score, per_frame[[0, 4, 8]].mean(), rtol=1e-5, atol=1e-5)  # frames 0, 4, 8
        assert abs(float(score - per_frame[:3].mean())) > 1e-3  # not the first three frames
    every = load_scorer(f"video_frames={clip_dir},scorer=pickscore,frames=20").score(prompts[:1], [video])
    torch.testing.assert_close(every[0], image.score([prompts[0]] * 9, frames).mean(), rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line(clip_dir):
    from mmalign.scoring import load_scorer

    with pytest.raises(ConfigError, match="scorer 'judge' is not an image scorer"):
        load_scorer(f"video_frames={clip_dir},scorer=judge")
    with pytest.raises(ConfigError, match="frames must be a positive integer"):
        load_scorer(f"video_frames={clip_dir},frames=0")
    with pytest.raises(ConfigError, match="scorer pickscore: unknown option.*colour"):
        load_scorer(f"video_frames={clip_dir},scorer=pickscore,colour=red")  # checked by the image scorer


def test_score_command_scores_a_video_manifest(clip_dir, video, tmp_path, capsys):
    """`mmalign score` on the manifest `mmalign generate` writes for a video pipeline (kind video)."""
    import shutil

    from mmalign.cli import main
    from mmalign.generate.manifest import read_manifest, write_manifest
    from mmalign.scoring import load_scorer

    (tmp_path / "media").mkdir()
    shutil.copy(video, tmp_path / "media" / "0.mp4")
    rows = [{"id": "0", "prompt_index": 0, "prompt": "a red square", "sample": 0, "seed": 1, "kind": "video",
             "path": "media/0.mp4"}]
    write_manifest(rows, tmp_path / "manifest.jsonl")
    spec = f"video_frames={clip_dir},scorer=pickscore,frames=3"
    assert main(["score", str(tmp_path), "--scorer", spec]) == 0
    expected = load_scorer(spec).score(["a red square"], [video])
    assert read_manifest(tmp_path)[0]["score_video_frames"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert main(["score", str(tmp_path), "--scorer", f"pickscore={clip_dir}", "--overwrite"]) == 2
    assert "scores image samples, the manifest has ['video']" in capsys.readouterr().err
