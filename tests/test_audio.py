"""Audio Diffusion-DPO (`tango`, `audioldm2`) on tiny pipelines saved to disk and loaded back:
clip loading (rate, channels, length), the AudioLDM mel against independent formulas, the ELBO
target, the shared draw, the text mask, Tango 2's loss, Audio-Alpaca, and prompts -> clips ->
CLAP -> pairs -> report -> training through the CLI."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
from audio_fixtures import (PROMPTS, SAMPLE_RATE, build_for, save_tiny_audioldm2, save_tiny_clap, save_tiny_tango,
                            tone, write_audio_pairs, write_wav)
from diffusion_fixtures import ZeroDenoiser

from mmalign.cli import main
from mmalign.data.audio import MelSettings, load_audio, load_audio_alpaca, log_mel, mel_filters, normalize_waveform
from mmalign.data.preference import DataError
from mmalign.losses import dpo_loss


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_pipelines")
    return {"tango": save_tiny_tango(root / "tango"), "audioldm2": save_tiny_audioldm2(root / "audioldm2"),
            "clap": save_tiny_clap(root / "clap")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path, records = write_audio_pairs(tmp_path_factory.mktemp("audio_pairs"), 4)
    return {"path": path, "records": [dict(r, _index=i) for i, r in enumerate(records)]}


def build(pipelines, pairs, modality, **kwargs):
    return build_for(pipelines[modality], pairs["path"], modality, **kwargs)


def draw_for(likelihood, records, seed=0):
    batch = likelihood.collate(records, "pair")
    return batch, likelihood.draw(batch, torch.Generator().manual_seed(seed))


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum) * rate / len(wave))


# -- reading clips ----------------------------------------------------------------------------
def test_load_audio_resamples_downmixes_and_pads(tmp_path):
    stereo = np.concatenate([tone(500, 0.25, rate=8000), 0.5 * tone(500, 0.25, rate=8000)], axis=1)
    path = write_wav(tmp_path / "stereo_8k.wav", stereo, rate=8000)
    wave = load_audio(str(path.name), "row 0, chosen", tmp_path, sample_rate=16000, max_seconds=0.5)
    assert wave.shape == (1, 8000)  # 0.25 s at 16 kHz = 4000 samples, zero-padded to 0.5 s
    assert torch.count_nonzero(wave[0, 4000:]) == 0
    body = wave[0, 200:3800].numpy()  # mono = mean of the channels: amplitude 0.75 · 0.3, still 500 Hz
    assert peak_hz(body, 16000) == pytest.approx(500, abs=16000 / len(body))
    assert np.abs(body).max() == pytest.approx(0.225, abs=0.01)
    cropped = load_audio(path.read_bytes(), "bytes", sample_rate=16000, max_seconds=0.1)
    assert cropped.shape == (1, 1600)
    torch.testing.assert_close(cropped, wave[:, :1600], rtol=0, atol=0)  # bytes read like the file
    two = load_audio({"bytes": None, "path": str(path)}, "dict", sample_rate=8000, channels=2)
    torch.testing.assert_close(two[1], 0.5 * two[0], rtol=1e-4, atol=1e-4)  # channels kept, no resampling


def test_load_audio_errors_name_the_row(tmp_path):
    short = write_wav(tmp_path / "short.wav", tone(300, 0.05))
    with pytest.raises(DataError, match=r"row 3, rejected: clip is 0.050 s, shorter than min_seconds 0.1"):
        load_audio(str(short), "row 3, rejected", sample_rate=16000, min_seconds=0.1)
    with pytest.raises(DataError, match="row 1, chosen: unreadable audio"):
        load_audio(b"not a wav file", "row 1, chosen", sample_rate=16000)
    with pytest.raises(DataError, match="row 2, chosen: unreadable audio"):
        load_audio("missing.wav", "row 2, chosen", tmp_path, sample_rate=16000)


# -- the mel, against independent formulas --------------------------------------------------------
def slaney_filters(n_mels: int, n_fft: int, rate: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa's filters.mel (htk=False, norm='slaney') written out: Slaney's mel scale is linear
    below 1 kHz (3 mel per 200 Hz) and logarithmic above (27 mel per factor 6.4)."""
    def to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4))

    def to_hz(m):
        return np.where(m < 15, 200 * m / 3, 1000 * 6.4 ** ((m - 15) / 27))

    edges = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    bank = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        bank[m] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid))) * 2 / (hi - lo)
    return bank


def test_mel_filters_are_slaneys():
    s = MelSettings()  # AudioLDM: 16 kHz, n_fft 1024, 64 mels, 0-8000 Hz
    np.testing.assert_allclose(mel_filters(s).numpy(), slaney_filters(64, 1024, 16000, 0, 8000), rtol=1e-4, atol=1e-7)


def test_log_mel_equals_a_direct_dft():
    s = MelSettings(n_mels=16)
    rng = np.random.default_rng(0)
    wave = rng.normal(0, 0.1, 3200).astype(np.float32)
    mel = log_mel(torch.from_numpy(wave)[None], s)[0]  # (frames, 16)
    assert mel.shape == (1 + 3200 // 160, 16)
    padded = np.pad(wave.astype(np.float64), 512, mode="reflect")  # the conv STFT's reflect padding
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)  # periodic Hann
    bank = slaney_filters(16, 1024, 16000, 0, 8000)
    for frame in (0, 7, 20):
        magnitude = np.abs(np.fft.rfft(padded[frame * 160: frame * 160 + 1024] * window))
        expected = np.log(np.maximum(bank @ magnitude, 1e-5))
        np.testing.assert_allclose(mel[frame].numpy(), expected, rtol=1e-4, atol=1e-4)
    silence = log_mel(torch.zeros(1, 1600), s, frames=16)
    torch.testing.assert_close(silence, torch.full((1, 16, 16), math.log(1e-5)))  # padded to 16 frames too
    norm = normalize_waveform(torch.tensor([[1.0, 3.0, 2.0]]))
    torch.testing.assert_close(norm, torch.tensor([[-0.5, 0.5, 0.0]]))  # zero mean, peak 0.5


# -- the likelihood ---------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_noisy_input_and_target_equal_the_closed_form(pipelines, pairs, modality):
    _, likelihood, _ = build(pipelines, pairs, modality)
    assert likelihood.prediction_type == ("v_prediction" if modality == "tango" else "epsilon")
    batch, draw = draw_for(likelihood, pairs["records"])
    assert batch.inputs["pixel_values"].shape == (8, 1, 32, 16)  # 0.32 s = 32 frames x 16 mels
    assert draw.values["latents"].shape == (8, 4, 16, 8)
    model = ZeroDenoiser()
    out = likelihood.logps(model, batch, draw)
    x0, eps, t = (draw.values[k].double() for k in ("latents", "noise", "timesteps"))
    alphas = likelihood.scheduler.alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen["sample"].double(), alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    target = eps if modality == "audioldm2" else alphas.sqrt() * eps - (1 - alphas).sqrt() * x0
    expected = target.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.diagnostics["mse"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)
    mask_key = "encoder_attention_mask" if modality == "tango" else "encoder_attention_mask_1"
    assert torch.equal(model.seen[mask_key], draw.values[mask_key])  # the text mask reaches the UNet


@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_draw_is_shared_within_a_pair_and_dropout_gives_the_empty_prompt(pipelines, pairs, modality):
    _, likelihood, _ = build(pipelines, pairs, modality)
    _, draw = draw_for(likelihood, pairs["records"])
    v, b = draw.values, 4
    assert torch.equal(v["timesteps"][:b], v["timesteps"][b:]) and len(set(v["timesteps"][:b].tolist())) > 1
    assert torch.equal(v["noise"][:b], v["noise"][b:]) and not torch.equal(v["noise"][0], v["noise"][1])
    assert torch.equal(v["encoder_hidden_states"][:b], v["encoder_hidden_states"][b:])
    assert not torch.allclose(v["latents"][:b], v["latents"][b:])  # different clips
    likelihood.settings.caption_dropout = 1.0
    _, dropped = draw_for(likelihood, pairs["records"])
    empty = likelihood.encode_text([""])
    for key, value in empty.items():
        torch.testing.assert_close(dropped.values[key][:, : value.shape[1]], value.expand(8, *value.shape[1:]).to(
            dropped.values[key].dtype))


def test_conditioning_is_the_pipelines_own(pipelines, pairs):
    """AudioLDM2: diffusers' AudioLDM2Pipeline.encode_prompt on the folder's components; Tango: the
    T5 encoder's last hidden state with its mask."""
    from diffusers import AudioLDM2Pipeline
    from transformers import AutoTokenizer, T5EncoderModel

    _, likelihood, _ = build(pipelines, pairs, "audioldm2")
    cond = likelihood.encode_text([PROMPTS[2]])
    pipe = AudioLDM2Pipeline.from_pretrained(pipelines["audioldm2"], language_model=likelihood.text_encoders[3])
    t5, mask, generated = pipe.encode_prompt([PROMPTS[2]], torch.device("cpu"), 1, False)
    torch.testing.assert_close(cond["encoder_hidden_states"], generated)
    torch.testing.assert_close(cond["encoder_hidden_states_1"], t5)
    assert torch.equal(cond["encoder_attention_mask_1"], mask)

    _, tango, _ = build(pipelines, pairs, "tango")
    cond = tango.encode_text(["a dog barks"])
    tok = AutoTokenizer.from_pretrained(pipelines["tango"], subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(pipelines["tango"], subfolder="text_encoder").eval()
    ids = tok(["a dog barks"], return_tensors="pt")
    torch.testing.assert_close(cond["encoder_hidden_states"], encoder(**ids).last_hidden_state)


@pytest.mark.parametrize("modality", ["tango", "audioldm2"])
def test_text_mask_makes_padding_invisible(pipelines, pairs, modality):
    """A pair's log-likelihoods are the same alone and next to a much longer prompt (which pads its
    text to that length): the mask keeps the padding out of cross-attention."""
    unet, likelihood, _ = build(pipelines, pairs, modality)
    record = pairs["records"][0]
    long = dict(pairs["records"][1], prompt="a very long caption " * 2, _index=1)
    alone_batch, alone = draw_for(likelihood, [record])
    mixed_batch, mixed = draw_for(likelihood, [record, long])
    mask = "encoder_attention_mask" if modality == "tango" else "encoder_attention_mask_1"
    assert mixed.values[mask].shape[1] > alone.values[mask].shape[1] and not bool(mixed.values[mask][0].all())
    with torch.no_grad():
        a = likelihood.logps(unet, alone_batch, alone).logps
        m = likelihood.logps(unet, mixed_batch, mixed).logps
    torch.testing.assert_close(m[[0, 2]], a, rtol=1e-5, atol=1e-6)


def test_dpo_loss_is_tango2s_formula(pipelines, pairs):
    """dpo on logp = -0.5 mse with β equals Diffusion-DPO's / Tango 2's
    -log σ(-0.5 β [(mse_θ(w) - mse_θ(l)) - (mse_ref(w) - mse_ref(l))])."""
    unet, likelihood, _ = build(pipelines, pairs, "tango")
    batch, draw = draw_for(likelihood, pairs["records"])
    with torch.no_grad():
        reference = likelihood.logps(unet, batch, draw)
        policy = copy.deepcopy(unet)
        generator = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator))
        ours = likelihood.logps(policy, batch, draw)
    loss = dpo_loss(ours.pairs(), reference.pairs(), beta=2000.0).double()
    mp, mr = ours.diagnostics["mse"].double(), reference.diagnostics["mse"].double()
    official = -torch.nn.functional.logsigmoid(-0.5 * 2000 * ((mp[:4] - mp[4:]) - (mr[:4] - mr[4:])))
    torch.testing.assert_close(loss, official, rtol=1e-4, atol=1e-6)
    assert (loss - math.log(2)).abs().max() > 1e-3


# -- data formats --------------------------------------------------------------------------------
def test_audio_alpaca_parquet_with_audio_bytes(pipelines, tmp_path):
    """Audio-Alpaca rows (prompt, chosen, rejected, strategy), audio as {"bytes", "path"} structs,
    here 44.1 kHz stereo: read, down-mixed and resampled to the model's 16 kHz."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def clip(freq):
        buf = io.BytesIO()
        soundfile.write(buf, np.concatenate([tone(freq, 0.4, rate=44100)] * 2, axis=1), 44100, format="WAV")
        return {"bytes": buf.getvalue(), "path": f"{freq}.wav"}

    rows = [{"prompt": p, "chosen": clip(300 + 100 * i), "rejected": clip(2000 + 100 * i), "strategy": s}
            for i, (p, s) in enumerate(zip(PROMPTS[:3], ["sample", "perturb", "sample"]))]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    records, kind = load_audio_alpaca(tmp_path / "data")
    assert kind == "pair" and [r["strategy"] for r in records] == ["sample", "perturb", "sample"]
    _, likelihood, _ = build_for(pipelines["tango"], tmp_path / "data", "tango", data_format="audio_alpaca")
    batch = likelihood.collate([dict(r, _index=i) for i, r in enumerate(records)], "pair")
    assert batch.inputs["pixel_values"].shape == (6, 1, 32, 16) and batch.inputs["prompts"][3] == PROMPTS[0]
    pq.write_table(pa.Table.from_pylist([dict(rows[0], chosen={"bytes": b"", "path": ""})]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: row 0 has an empty chosen or rejected audio"):
        load_audio_alpaca(tmp_path / "bad.parquet")


# -- the whole loop through the CLI ---------------------------------------------------------------
def test_generate_score_pairs_report_train(pipelines, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\nrain on a roof\n")
    common = ["--model", str(pipelines["audioldm2"]), "--prompts", str(prompts), "--num-samples", "3",
              "--set", "num_inference_steps=2", "--no-progress"]
    assert main(["generate", *common, "--out", str(tmp_path / "s"), "--batch-size", "4"]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "s1"), "--batch-size", "1"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "s" / "manifest.jsonl")]
    assert [r["kind"] for r in rows] == ["audio"] * 6 and rows[0]["params"]["audio_length_in_s"] == 0.32
    clips = [soundfile.read(tmp_path / "s" / r["path"]) for r in rows]
    assert all(rate == SAMPLE_RATE and len(w) == 5120 and w.std() > 1e-3 for w, rate in clips)
    for r, (w, _) in zip(rows, clips):  # a clip depends on its prompt and seed, not on its batch (up to rounding)
        np.testing.assert_allclose(soundfile.read(tmp_path / "s1" / r["path"])[0], w, rtol=0, atol=1e-5)
    assert not np.array_equal(clips[0][0], clips[1][0])

    assert main(["score", str(tmp_path / "s"), "--scorer", f"clap={pipelines['clap']}"]) == 0
    assert main(["build-pairs", "scores", str(tmp_path / "s"), "--out", str(tmp_path / "pairs")]) == 0
    pairs = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    assert len(pairs) == 2 and all(p["scores"][0] > p["scores"][1] for p in pairs)
    assert main(["report", str(tmp_path / "s"), "--pairs", str(tmp_path / "pairs" / "pairs.jsonl"),
                 "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("<audio controls") == 6 and page.count('class="spec" src="data:image/png;base64,') == 6

    config = {"modality": "audioldm2", "model": {"path": str(pipelines["audioldm2"])},
              "data": {"train": str(tmp_path / "pairs" / "pairs.jsonl"), "format": "audio_pairs"},
              "audio": {"seconds": 0.32}, "diffusion": {"caption_dropout": 0.0},
              "loss": {"name": "dpo", "beta": 2000.0}, "reference": {"strategy": "frozen"},
              "optim": {"name": "adamw", "lr": 1e-4},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2, "log_every": 1,
                        "progress": False, "tensorboard": False}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert metrics[-1]["mse/policy"] != metrics[-1]["mse/ref"]  # the policy moved
    assert (tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_user_errors(pipelines, pairs, tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="null_prompt"):
        build(pipelines, pairs, "tango", null_prompt="zeros")
    with pytest.raises(ConfigError, match="divisible by the VAE factor 2"):
        build(pipelines, pairs, "tango", audio={"seconds": 0.33})
    with pytest.raises(ConfigError, match="not a local diffusers AudioLDM2 pipeline folder"):
        build_for(tmp_path, pairs["path"], "audioldm2")
    unet, aldm2, _ = build(pipelines, pairs, "audioldm2")
    unet.enable_gradient_checkpointing()
    batch, draw = draw_for(aldm2, pairs["records"])  # prompts of several lengths: a padded T5 mask
    with pytest.raises(ConfigError, match="diffusers misroutes the text mask"):
        aldm2.logps(unet, batch, draw)
    _, likelihood, _ = build(pipelines, pairs, "tango", audio={"seconds": 0.32, "min_seconds": 1.0})
    with pytest.raises(DataError, match=r"row 0, chosen: clip is 0.320 s, shorter than min_seconds 1"):
        likelihood.collate(pairs["records"][:1], "pair")


def test_shipped_audio_alpaca_sample_trains_through_the_reader(pipelines):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "datasets" / "audio_alpaca" / "data"
    records, kind = load_audio_alpaca(data)
    assert kind == "pair" and len(records) == 6 and {r["strategy"] for r in records} == {"order", "missing"}
    _, likelihood, _ = build_for(pipelines["tango"], data, "tango", data_format="audio_alpaca")
    batch = likelihood.collate([dict(r, _index=i) for i, r in enumerate(records[:2])], "pair")
    assert batch.inputs["pixel_values"].shape == (4, 1, 32, 16)  # 0.5 s clips cropped to 0.32 s
    assert torch.isfinite(batch.inputs["pixel_values"]).all()


def _recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / "sample_score_audio.py"
    spec = importlib.util.spec_from_file_location("sample_score_audio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_perturbations_remove_or_reorder_concepts(tmp_path):
    from mmalign.generate.manifest import read_manifest, write_manifest

    recipe = _recipe()
    parts = recipe.concepts("A dog barks, then a car passes and rain falls.")
    assert parts == ["A dog barks", "a car passes", "rain falls"]
    variants = recipe.perturbations("a dog barks and a car passes", 5, seed=0)
    assert sorted(variants) == sorted(["a dog barks", "a car passes", "a car passes, a dog barks"])
    assert recipe.perturbations("a dog barks and a car passes", 5, seed=0) == variants  # deterministic
    assert recipe.perturbations("a bell rings twice", 3, seed=0) == []  # one concept: nothing to perturb
    three = recipe.perturbations("a, b, c", 20, seed=1)
    assert len(three) == len(set(three)) == 3 + 5 and "a, b, c" not in three  # 3 removals + 5 other orders

    prompts = ["a dog barks and a car passes", "a bell rings"]
    generation = recipe.write_generation_prompts(prompts, 1, 0, tmp_path)
    lines = [json.loads(line) for line in generation.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["0", "0", "1"] and lines[0]["prompt"] == prompts[0]
    rows = [{"id": f"{i:06d}-{j:03d}", "prompt_index": i, "prompt": line["prompt"], "sample": j, "seed": 7,
             "kind": "audio", "path": f"media/{i}-{j}.wav", "prompt_id": line["id"]}
            for i, line in enumerate(lines) for j in range(2)]
    write_manifest(rows, tmp_path / "manifest.jsonl")
    pooled = read_manifest(recipe.pool_by_original(tmp_path, prompts))
    assert [(r["prompt_index"], r["sample"]) for r in pooled] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert all(r["prompt"] == prompts[r["prompt_index"]] for r in pooled)  # scored against the original
    assert pooled[2]["generated_from"] == lines[1]["prompt"] != prompts[0]
