"""Online rounds of the flow-transformer and audio families: the tiny SD3 and AudioLDM2 configs
train end to end; a saved audio round is the function of (seed, initial weights) the module
promises (sampled again from the rebuilt model: the same clips); the audio sampler's guidance and
batching obey their invariants on a tiny Tango (w = 0 gives the null prompt's clip, a clip does
not depend on its batch mates), and Tango trains online too."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.cli import main
from mmalign.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_fixtures import save_tiny_audioldm2, save_tiny_clap, save_tiny_tango  # noqa: E402
from flow_fixtures import save_tiny_flow_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "configs/tiny/flow_online_dpo.yaml"
AUDIO = ROOT / "configs/tiny/audio_online_dpo.yaml"
QUIET = ["train.progress=false", "train.tensorboard=false"]
SMALL = ["train.max_steps=2", "online.round_steps=2", "online.prompts_per_round=2", "online.group_size=2",
         "train.batch_size=2"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_trained(out: Path, suffix: str) -> list[dict]:
    """The round's 4 media files, best-vs-worst records over them, finite losses; returns the samples."""
    folder = out / "rounds" / "round_00000"
    assert sorted(p.name for p in (folder / "media").iterdir()) == \
        [f"r00000-p{p:03d}-s{s:02d}{suffix}" for p in range(2) for s in range(2)]
    samples, records = read_jsonl(folder / "samples.jsonl"), read_jsonl(folder / "records.jsonl")
    assert len(records) == 2
    for r in records:
        chosen, rejected = ({s["id"]: s for s in samples}[i] for i in r["ids"])
        assert (r["chosen"], r["rejected"]) == (chosen["path"], rejected["path"])
        assert r["scores"] == [chosen["score"], rejected["score"]] and chosen["score"] > rejected["score"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    return samples


def test_tiny_flow_online_run_samples_through_the_sd3_pipeline_and_trains(tmp_path, capsys):
    pipeline = save_tiny_flow_pipeline(tmp_path / "sd3")
    out = tmp_path / "run"
    assert main(["train", str(FLOW), f"model.path={pipeline}", f"train.output_dir={out}", *SMALL,
                 "online.sampling={num_inference_steps: 2, guidance_scale: 3.0}", *QUIET]) == 0, capsys.readouterr().err
    assert "online round 0:" in capsys.readouterr().out
    check_trained(out, ".png")
    from PIL import Image

    assert Image.open(next((out / "rounds/round_00000/media").iterdir())).size == (16, 16)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_audio")
    return {"audioldm2": save_tiny_audioldm2(root / "audioldm2"), "tango": save_tiny_tango(root / "tango"),
            "clap": save_tiny_clap(root / "clap")}


def audio_args(audio: dict, modality: str, out: Path) -> list[str]:
    return [f"modality={modality}", f"model.path={audio[modality]}", f"online.scorer=[clap={audio['clap']}]",
            f"train.output_dir={out}", *SMALL, "online.sampling={num_inference_steps: 2}"]


def audio_sampler(cfg):
    """sample(job) -> the job's clips from the INITIAL weights (one fresh build), read back from their WAVs."""
    import soundfile

    from mmalign.modalities import build_modality
    from mmalign.online.audio import sample_audio
    from mmalign.online.samplers import SamplerContext

    model, likelihood, processor = build_modality(cfg)

    def sample(job, sampling=None, batch_size=None) -> list[np.ndarray]:
        ctx = SamplerContext(likelihood, processor, dict(sampling or cfg.online.sampling),
                             batch_size or cfg.online.sample_batch_size, model_path=cfg.model.path)
        with torch.no_grad():
            rows = sample_audio(ctx, model.eval(), job)
        return [soundfile.read(str(job.folder / r["path"]), dtype="float32")[0] for r in rows]

    return sample


def test_tiny_audioldm2_online_run_writes_wavs_and_resamples_the_same_round(audio, tmp_path, capsys):
    import soundfile

    from mmalign.online.samplers import SampleJob

    out = tmp_path / "run"
    args = audio_args(audio, "audioldm2", out)
    assert main(["train", str(AUDIO), *args, *QUIET]) == 0, capsys.readouterr().err
    assert "online round 0:" in capsys.readouterr().out
    samples = check_trained(out, ".wav")
    folder = out / "rounds/round_00000"
    saved = [soundfile.read(str(folder / s["path"]), dtype="float32") for s in samples]
    rate = json.loads((audio["audioldm2"] / "vocoder/config.json").read_text())["sampling_rate"]
    assert all(r == rate and w.ndim == 1 and len(w) > 0 and np.isfinite(w).all() for w, r in saved)
    # round 0 = f(seed, initial weights): the rebuilt initial model samples the same clips
    job = SampleJob([s["prompt"] for s in samples], [s["seed"] for s in samples], [s["id"] for s in samples],
                    tmp_path / "again")
    again = audio_sampler(load_config(AUDIO, args))(job)
    for (want, _), got in zip(saved, again, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_audio_sampler_guidance_and_batching_invariants_on_tango(audio, tmp_path):
    from mmalign.online.samplers import SampleJob

    sample = audio_sampler(load_config(AUDIO, audio_args(audio, "tango", tmp_path / "unused")))

    def clips(prompts, seeds, guidance, batch_size=8):
        folder = tmp_path / f"{guidance}-{batch_size}-{len(prompts)}"
        return sample(SampleJob(prompts, seeds, [f"c{i}" for i in range(len(prompts))], folder),
                      {"num_inference_steps": 3, "guidance_scale": guidance}, batch_size)

    batched = clips(["a dog barks", "a dog barks", "rain"], [5, 6, 7], 2.5)
    alone = clips(["a dog barks", "a dog barks", "rain"], [5, 6, 7], 2.5, batch_size=1)
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # another seed, another clip
    # w = 0 leaves only the null-prompt prediction: the clip of "" (whatever its guidance)
    unguided, null = clips(["a dog barks"], [5], 0.0), clips([""], [5], 2.5)
    np.testing.assert_allclose(unguided[0], null[0], rtol=0, atol=1e-6)
    assert not np.allclose(unguided[0], batched[0], atol=1e-4)  # guidance does change the clip


def test_tiny_tango_online_run_trains(audio, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(AUDIO), *audio_args(audio, "tango", out), *QUIET]) == 0, capsys.readouterr().err
    check_trained(out, ".wav")
