"""Wan 2.2 A14B: two experts switched at boundary_ratio (mmalign/modalities/experts.py) on a tiny two-expert
folder (tests/wan_fixtures.py `save_tiny_wan22_pipeline`): the row switch against WanPipeline's own loop,
the likelihood against each expert called by hand, `diffusion.train_experts`, a LoRA DPO run (log 2 at
step 0) and its exports (merged pipeline folder, one LoRA file per expert) reloaded in WanPipeline and
reproducing the trained denoisers' outputs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import build_for, draw_for
from test_wan import RecordingWan, fixed_sigma_scheduler, pipe_of, prompts_of
from wan_fixtures import copy_video_sample, sample_records, save_tiny_wan22_pipeline

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.losses import dpo_loss
from mmalign.modalities.experts import TwoExperts

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = 875.0  # 0.875 · 1000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "pipeline")


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """boundary_ratio 0.75 (the median of the shifted σ draw): both experts see draws within a 2-step run."""
    return save_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22_even") / "pipeline", boundary_ratio=0.75)


@pytest.fixture(scope="module")
def records():
    return sample_records()


class Tagged(RecordingWan):
    """A recording transformer that predicts its tag everywhere."""

    def __init__(self, tag: float) -> None:
        super().__init__()
        self.tag = tag

    def forward(self, hidden_states, return_dict=True, **kwargs):
        self.calls.append(dict(kwargs, hidden_states=hidden_states.clone()))
        return (torch.full_like(hidden_states, self.tag),)


def test_rows_go_to_the_expert_the_pipeline_loop_uses_at_their_timestep(pipeline):
    """t >= 875 -> transformer, below -> transformer_2, per row; WanPipeline (boundary_ratio 0.875) calls
    the same expert at its step t = σ·1000 for σ = 0.875 (exactly the boundary) and just below it."""
    high, low = Tagged(1.0), Tagged(2.0)
    experts = TwoExperts(high, low, BOUNDARY, 0.875)
    t = torch.tensor([875.0, 874.5, 999.0, 0.0])
    x = torch.zeros(4, 4, 2, 4, 4)
    out = experts(hidden_states=x, timestep=t, encoder_hidden_states=torch.zeros(4, 3, 32))[0]
    assert out[:, 0, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert high.calls[0]["timestep"].tolist() == [875.0, 999.0] and low.calls[0]["timestep"].tolist() == [874.5, 0.0]
    _, likelihood, _ = build_for(pipeline, ROOT / "datasets/video_pairs/train.jsonl", "wan", num_frames=5)
    for sigma, expected in ((0.875, "high"), (0.87499, "low")):
        h, lo = RecordingWan(), RecordingWan()
        pipe_of(likelihood, h, fixed_sigma_scheduler(sigma), transformer_2=lo, boundary_ratio=0.875)(
            prompt=["star"], latents=torch.zeros(1, 4, 2, 4, 4), height=16, width=16, num_frames=5,
            guidance_scale=1.0, output_type="latent")
        second = h.calls[1:] or lo.calls  # the first step (σ = 1) is always the high-noise expert's
        assert (h if expected == "high" else lo).calls[-1]["timestep"].item() == pytest.approx(sigma * 1000)
        assert len(second) == 1 and len(h.calls) == (2 if expected == "high" else 1)
        ours = experts(hidden_states=torch.zeros(1, 4, 2, 4, 4), timestep=torch.tensor([sigma * 1000]),
                       encoder_hidden_states=torch.zeros(1, 3, 32))[0]
        assert ours.flatten()[0].item() == (1.0 if expected == "high" else 2.0)


def test_likelihood_calls_the_drawn_timesteps_expert(pipeline, records):
    """logps of the two-expert model == -0.5·mse of each row's expert called by hand (transformer for
    σ·1000 >= 875, transformer_2 below); a draw with rows on both sides; dpo at policy == reference is log 2."""
    model, likelihood, _ = build_for(pipeline, ROOT / "datasets/video_pairs/train.jsonl", "wan", num_frames=5)
    assert isinstance(model, TwoExperts) and model.boundary == BOUNDARY
    batch, draw = draw_for(likelihood, records, seed=2)
    v = draw.values
    high = v["timesteps"] >= BOUNDARY
    assert high.any() and (~high).any(), v["timesteps"]  # seed 2: both experts serve this batch
    out = likelihood.logps(model, batch, draw)
    experts = model.components()
    s = v["sigmas"].view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        preds = {name: m(hidden_states=(1 - s) * v["latents"] + s * v["noise"], timestep=v["timesteps"],
                         encoder_hidden_states=v["encoder_hidden_states"], return_dict=False)[0]
                 for name, m in experts.items()}
    pred = torch.where(high.view(-1, 1, 1, 1, 1), preds["transformer"], preds["transformer_2"])
    mse = (pred - (v["noise"] - v["latents"])).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-7)
    other = torch.where(high.view(-1, 1, 1, 1, 1), preds["transformer_2"], preds["transformer"])
    assert (other - pred).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3  # the experts differ on every row
    loss = dpo_loss(likelihood.logps(model, batch, draw).pairs(), out.pairs(), beta=500.0)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)), rtol=0, atol=0)


def test_train_experts_picks_what_trains(pipeline):
    """train_experts [high]: only transformer is a registered (trained) submodule; transformer_2 is frozen
    outside the module tree, still moved by `.to` and still used; LoRA lands on transformer only."""
    import peft

    data = ROOT / "datasets/video_pairs/train.jsonl"
    model, _, _ = build_for(pipeline, data, "wan", num_frames=5, train_experts=["high"])
    assert [n for n, _ in model.named_children()] == ["transformer"]
    low = model.components()["transformer_2"]
    assert not any(p.requires_grad for p in low.parameters())
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"transformer"}
    from mmalign.train.setup import enable_checkpointing

    enable_checkpointing(model)  # model.gradient_checkpointing reaches both experts
    assert model.transformer.gradient_checkpointing and low.gradient_checkpointing
    model.to(torch.float64)
    assert next(low.parameters()).dtype == torch.float64
    copied = copy.deepcopy(model)  # a frozen reference: the trained expert copied, the frozen one shared
    assert copied.components()["transformer_2"] is low and copied.transformer is not model.transformer
    torch.testing.assert_close(outputs(copied.transformer.float(), 999.0), outputs(model.transformer.float(), 999.0),
                               rtol=0, atol=0)
    wrapped = peft.get_peft_model(model.to(torch.float32), peft.LoraConfig(r=2, target_modules=["to_q"]))
    lora = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert lora and all(".transformer." in n for n in lora)
    for bad in (["middle"], [], ["low", "low"]):
        with pytest.raises(ConfigError, match="diffusion.train_experts .*subset of \\[high, low\\]"):
            build_for(pipeline, data, "wan", num_frames=5, train_experts=bad)


def outputs(model: torch.nn.Module, t: float) -> torch.Tensor:
    """The model's velocity on a fixed input at timestep t."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), timestep=torch.tensor([t]),
                     encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)[0]


def sample(pipe) -> torch.Tensor:
    """Five UniPC steps (flow shift 3: timesteps 999, 923, 818, 667, 429: both experts at boundary 750), latents out."""
    with torch.no_grad():
        return pipe(prompt=["a red circle"], generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                    height=16, width=16, num_frames=5, guidance_scale=1.0, output_type="latent").frames


@pytest.mark.parametrize("experts", [["high", "low"], ["low"]])
def test_lora_dpo_run_exports_both_experts_that_reload_in_wan_pipeline(even, tmp_path, experts):
    """A 2-step LoRA DPO run (loss log 2 at step 0); `--format merged` is a WanPipeline folder with both
    experts and `--format lora` one file per trained expert: both reload and give the trained
    experts' outputs and the trained denoiser's samples; an expert left out of train_experts is exported
    unchanged (boundary_ratio 0.75, so that both experts see draws in 2 steps)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from mmalign.export import find_run, load_trained
    from mmalign.modalities.validation import sampling_pipeline

    data, run = copy_video_sample(tmp_path / "pairs"), tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "wan_dpo.yaml"), f"model.path={even}",
                 f"data.train={data}", "train.max_steps=2", f"train.output_dir={run}", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", "optim.lr=1e-2", "train.batch_size=4",
                 f"diffusion.train_experts=[{','.join(experts)}]"]) == 0
    rows = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    trained, _ = load_trained(find_run(run))
    mine = trained.get_base_model().components()
    base = {n: WanTransformer3DModel.from_pretrained(even / n) for n in mine}
    for name, t in (("transformer", 999.0), ("transformer_2", 500.0)):
        moved = (outputs(mine[name], t) - outputs(base[name], t)).abs().max()
        assert (moved > 1e-5) == ({"transformer": "high", "transformer_2": "low"}[name] in experts), name
    _, likelihood, _ = build_for(even, data, "wan", num_frames=5)
    expected = sample(sampling_pipeline(likelihood, trained))
    for fmt in ("merged", "lora"):
        assert main(["export", str(run), "--to", str(tmp_path / fmt), "--format", fmt]) == 0
    merged = WanPipeline.from_pretrained(tmp_path / "merged")
    assert merged.config.boundary_ratio == 0.75
    lora = WanPipeline.from_pretrained(even)
    files = sorted(p.name for p in (tmp_path / "lora").glob("*.safetensors"))
    if "high" in experts:
        lora.load_lora_weights(tmp_path / "lora")
    if "low" in experts:
        lora.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights_transformer_2.safetensors",
                               load_into_transformer_2=True)
    assert len(files) == len(experts)
    for pipe in (merged, lora):
        for name, t in (("transformer", 999.0), ("transformer_2", 500.0)):
            torch.testing.assert_close(outputs(getattr(pipe, name), t), outputs(mine[name], t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sample(pipe), expected, rtol=1e-4, atol=1e-5)
