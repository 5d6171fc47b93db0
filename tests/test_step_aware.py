"""Step-aware preference scorer (SPO's SPM; mmalign/scoring/step_aware.py, train_step_aware.py):
a fresh scorer is exactly PickScore at any t, x̂0 inverts add_noise when ε̂ = ε, the pair loss
on hand-made embeddings, training on the shipped Pick-a-Pic sample raises pairwise accuracy,
save/load round trip, `spo.scorer: step_aware=FOLDER` in an SPO sampling call, the command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import save_tiny_pipeline

from mmalign.config import ConfigError
from mmalign.scoring.pickscore import PickScoreScorer, pickscore_from_embeddings
from mmalign.scoring.step_aware import StepAwareScorer, pair_loss
from mmalign.scoring.train_step_aware import NoisyX0, TrainOptions, load_pairs, main, train_scorer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "pickapic" / "sample" / "train-00000-of-00001.parquet"
WORDS = ["a", "red", "blue", "green", "yellow", "square", "circle", "triangle"]


# -- fixtures ---------------------------------------------------------------------------------------
def _tokenizer():
    """Word tokenizer that wraps each prompt in <bos> ... <eos> (CLIP pools the eos token)."""
    from tokenizers.processors import TemplateProcessing

    from mmalign.toytext import build_word_tokenizer

    tok = build_word_tokenizer(WORDS)
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return tok


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + CLIPProcessor folder (PickScore layout, 16 px, projection 16)."""
    from clip_fixtures import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"), _tokenizer(), 16, 4, 16)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd"))


def images_tensor(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def randomise_time_module(scorer: StepAwareScorer, seed: int = 3) -> None:
    """Give the zero-initialised modulation layer weights, so t changes the score."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scorer.time.modulation.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


PROMPTS = ["a red square", "a blue circle", "a green triangle"]


# -- the score -----------------------------------------------------------------------------------------
def test_fresh_scorer_is_plain_pickscore_at_every_t(clip_dir):
    from mmalign.modalities.step_sampler import to_pil

    scorer = StepAwareScorer(str(clip_dir))
    images = images_tensor(3, 0)
    got0 = scorer.score(PROMPTS, images, torch.tensor([0, 0, 0]))
    # the PickScore formula, evaluated independently on the plain CLIP: 100 · cos(text, image)
    reference = PickScoreScorer(str(clip_dir)).score(PROMPTS, to_pil(images))
    torch.testing.assert_close(got0, reference, rtol=0, atol=1e-4)
    model = scorer.model
    with torch.no_grad():
        pixels = scorer.pixel_values(images)
        tokens = scorer.processor(text=PROMPTS, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
        image = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(got0, pickscore_from_embeddings(text, image, math.log(100.0)), rtol=0, atol=1e-4)
    # zero modulation: the timestep has no effect yet; PIL inputs and t=None mean the same
    torch.testing.assert_close(scorer.score(PROMPTS, images, torch.tensor([999, 500, 1])), got0, rtol=0, atol=1e-5)
    torch.testing.assert_close(scorer.score(PROMPTS, to_pil(images)), got0, rtol=0, atol=1e-5)
    randomise_time_module(scorer)
    assert not torch.allclose(scorer.score(PROMPTS, images, torch.tensor([999, 500, 1])), got0, atol=1e-3)


def test_save_load_round_trip_gives_identical_scores(clip_dir, tmp_path):
    scorer = StepAwareScorer(str(clip_dir))
    randomise_time_module(scorer)
    images, t = images_tensor(3, 1), torch.tensor([0, 400, 900])
    before = scorer.score(PROMPTS, images, t)
    scorer.save(tmp_path / "spm", extra={"note": "x"})
    scorer.save(tmp_path / "spm")  # a saved scorer folder is replaced in place
    loaded = StepAwareScorer(str(tmp_path / "spm"))
    assert torch.equal(loaded.score(PROMPTS, images, t), before)
    assert loaded.info["note"] == "x"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a step-aware scorer folder"):
        scorer.save(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").is_file()


def test_pair_loss_on_hand_made_embeddings_is_the_cross_entropy():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    chosen = pickscore_from_embeddings(text, torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), math.log(2.0))
    rejected = pickscore_from_embeddings(text, torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), math.log(2.0))
    # scores 2·cos: row 0 (2, 0), row 1 (√2, √2), row 2 (2, 0)
    torch.testing.assert_close(chosen, torch.tensor([2.0, math.sqrt(2), 2.0]))
    loss = pair_loss(chosen, rejected, torch.tensor([1.0, 1.0, 0.5]))
    # row 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2); row 1: equal scores -> log 2;
    # row 2 (tie): -(0.5 log σ(2) + 0.5 log σ(-2)) = 0.5 (log(1 + e^-2) + log(1 + e^2))
    expected = [math.log(1 + math.exp(-2)), math.log(2), 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)))]
    torch.testing.assert_close(loss, torch.tensor(expected))


# -- x̂0 from the frozen diffusion model --------------------------------------------------------------------
class TrueNoise(torch.nn.Module):
    """A UNet stub that predicts exactly the noise it is told (ε̂ = ε) and records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stub a dtype
        self.noise, self.seen = None, []

    def forward(self, x, t, **kwargs):
        self.seen.append((x.clone(), t.clone()))
        return (self.noise if self.noise is not None else torch.zeros_like(x),)


def test_x0_hat_inverts_add_noise_when_the_model_predicts_the_true_noise(pipeline):
    noisy = NoisyX0(str(pipeline), resolution=16)
    stub = TrueNoise()
    noisy.unet = stub
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(4, 4, 8, 8, generator=g) * 1.6 - 0.8  # inside the scheduler's clip_sample range
    stub.noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 750, 999])
    cond = noisy.step.encode(noisy.step.tokenize(["a red circle"] * 4))
    x0 = noisy.x0_hat(latents, stub.noise, t, cond)
    torch.testing.assert_close(x0, latents, rtol=0, atol=1e-4)
    # the full path: one ε per pair, shared by its chosen and rejected images
    records = load_pairs(SAMPLE)
    stub.noise, stub.seen = None, []
    images = noisy([records[0], records[1]], torch.tensor([300, 600]), torch.Generator().manual_seed(1))
    assert images.shape == (4, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    x_t, t_seen = stub.seen[0]
    assert t_seen.tolist() == [300, 600, 300, 600]
    a = noisy.base.scheduler.alphas_cumprod[t_seen].view(-1, 1, 1, 1)
    eps = (x_t - a.sqrt() * noisy.latents([records[0], records[1]])) / (1 - a).sqrt()
    torch.testing.assert_close(eps[:2], eps[2:], rtol=0, atol=1e-4)
    assert not torch.allclose(eps[0], eps[1])


# -- training ----------------------------------------------------------------------------------------------
def clean_images(records, t, generator):
    """(2B, 3, 16, 16) the pairs' own images (chosen rows first): no diffusion model."""
    from mmalign.data.media import load_image
    from mmalign.modalities.diffusion import to_pixels

    items = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return torch.stack([to_pixels(load_image(x, "test")) for x in items]) / 2 + 0.5


def test_training_on_the_shipped_sample_raises_pairwise_accuracy(clip_dir):
    pairs = load_pairs(SAMPLE)  # colour shapes: the preferred image has the prompt's colour
    torch.manual_seed(0)
    scorer = StepAwareScorer(str(clip_dir))
    opts = TrainOptions(steps=40, lr=2e-3, batch_size=8, t_max=999, eval_pairs=8, progress=False)
    summary = train_scorer(scorer, pairs, clean_images, opts)
    assert summary["train_pairs"] + summary["held_out_pairs"] == len(pairs) and summary["held_out_pairs"] == 7
    assert summary["train_acc"] > summary["train_acc_before"] + 0.2
    assert summary["train_acc"] >= 0.8


def test_step_aware_folder_is_an_spo_scorer(clip_dir, pipeline, tmp_path):
    from mmalign.config import Config, from_dict
    from mmalign.modalities import build_modality
    from mmalign.modalities.step_sampler import load_step_scorer, sample_spo_pairs

    StepAwareScorer(str(clip_dir)).save(tmp_path / "spm")
    scorer = load_step_scorer(f"step_aware={tmp_path / 'spm'},batch_size=4", None)
    assert isinstance(scorer, StepAwareScorer)  # not wrapped: it gets the candidates' timesteps
    calls = []
    original = scorer.score
    scorer.score = lambda p, i, t: calls.append(t.clone()) or original(p, i, t)
    cfg = from_dict(Config, {"modality": "sd_spo", "model": {"path": str(pipeline)}, "diffusion": {"resolution": 16},
                             "spo": {"prompt_list": ["a red circle"], "num_steps": 4, "candidates": 2,
                                     "threshold": 0.0, "first_step": 1, "guidance": 1.0}})
    unet, likelihood, _ = build_modality(cfg)
    records, counts = sample_spo_pairs(likelihood, unet, ["a red circle"], scorer, torch.Generator().manual_seed(0))
    assert counts["steps"] >= 1 and len(calls) == counts["steps"]
    _, prevs = likelihood.timesteps()
    allowed = {max(int(p), 0) for p in prevs[1:].tolist()}  # each candidate at its own (previous) timestep
    assert all(len(set(c.tolist())) == 1 and int(c[0]) in allowed for c in calls) and int(calls[0][0]) > 0
    assert all(len(r["scores"]) == 2 and all(math.isfinite(s) for s in r["scores"]) for r in records)


def test_command_trains_saves_and_reports(clip_dir, pipeline, tmp_path, capsys):
    out = tmp_path / "spm"
    args = ["--pairs", str(SAMPLE.parent), "--diffusion", str(pipeline), "--clip", str(clip_dir), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--t-max", "500", "--eval-pairs", "4", "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[mmalign] step-aware scorer: 2 steps on 35 train pairs") and "held-out" in line
    from mmalign.scoring import load_scorer

    loaded = load_scorer(f"step_aware={out}")
    assert loaded.info["trained"]["t_max"] == 500 and not (out / "checkpoint").exists()
    assert loaded.score(["a red square"], images_tensor(1, 2), torch.tensor([10])).shape == (1,)
    # a bad pipeline folder is one error line, not a traceback
    assert main([*args[:2], "--diffusion", str(tmp_path), *args[4:]]) == 2
    assert "not a local diffusers" in capsys.readouterr().out


def test_a_resumed_run_repeats_the_uninterrupted_one(clip_dir, tmp_path, capsys):
    pairs = load_pairs(SAMPLE)
    opts = dict(lr=1e-3, batch_size=4, t_max=999, eval_pairs=4, progress=False)
    whole = StepAwareScorer(str(clip_dir))
    train_scorer(whole, pairs, clean_images, TrainOptions(steps=4, **opts), out=tmp_path / "a")
    part = StepAwareScorer(str(clip_dir))  # "killed" after step 3; its checkpoint holds step 2
    train_scorer(part, pairs, clean_images, TrainOptions(steps=3, save_every=2, **opts), out=tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint" / "state.json").is_file()
    resumed = StepAwareScorer(str(clip_dir))
    summary = train_scorer(resumed, pairs, clean_images, TrainOptions(steps=4, save_every=2, **opts),
                           out=tmp_path / "b", resume=True)
    assert summary["resumed_from"] == 2 and "resuming the step-aware scorer at step 2" in capsys.readouterr().out
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), part.parameters()))
