"""`mmalign export`: diffusers LoRA weights that `load_lora_weights` loads, merged UNet and
pipeline folders, causal-LM merged model and adapter; from final/ or a checkpoint; atomic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusion_fixtures import save_tiny_pipeline, write_image_pairs
from peft import PeftModel
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.export import write_model_index

LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def write_run_config(root, pipeline, modality, **sections):
    records = write_image_pairs(root / "pairs", 4)
    data = root / "pairs" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"modality": modality, "model": {"path": str(pipeline)}, "data": {"train": str(data)},
           "diffusion": {"resolution": 16}, "loss": {"beta": 5000.0}, "optim": {"lr": 1e-2},
           "train": {"output_dir": str(root / "run"), "max_steps": 2, "batch_size": 2, "progress": False,
                     "tensorboard": False}}
    cfg.update(sections)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root / "config.yaml"


@pytest.fixture(scope="module")
def sdxl_lora_run(tmp_path_factory):
    """A 2-step SDXL LoRA run (r 4, alpha 8: scale 2 must survive the export)."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    pipeline = save_tiny_pipeline(root / "pipeline", sdxl=True)
    assert main(["train", str(write_run_config(root, pipeline, "sdxl", lora=LORA))]) == 0
    return {"root": root, "pipeline": pipeline, "run": root / "run"}


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 16, 80, generator=g)), cond


@torch.no_grad()
def unet_out(unet):
    args, cond = unet_inputs()
    return unet.eval()(*args, added_cond_kwargs=cond).sample


def trained_unet(run):
    base = UNet2DConditionModel.from_pretrained(run["pipeline"], subfolder="unet")
    return PeftModel.from_pretrained(base, str(run["run"] / "final"))


def base_pipeline(run, tmp_path):
    """The tiny base pipeline (a copy with a model_index.json, which save_tiny_pipeline omits)."""
    folder = shutil.copytree(run["pipeline"], tmp_path / "base")
    write_model_index(folder, "StableDiffusionXLPipeline")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    return pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def export(run, out, *args):
    return main(["export", str(run), "--to", str(out), *args])


# -- diffusion --------------------------------------------------------------------------------
def test_lora_export_loads_with_load_lora_weights_and_equals_the_trained_unet(sdxl_lora_run, tmp_path):
    out = tmp_path / "lora"
    assert export(sdxl_lora_run["run"], out, "--format", "lora") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "mmalign_config.yaml", "pytorch_lora_weights.safetensors"]
    keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    pipe = base_pipeline(sdxl_lora_run, tmp_path)
    before = sample(pipe)
    pipe.load_lora_weights(str(out))
    assert not np.allclose(sample(pipe), before)  # same seed, different images
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(trained_unet(sdxl_lora_run)), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / ".lora.tmp").exists()


def test_unet_and_merged_exports_equal_the_peft_unet(sdxl_lora_run, tmp_path):
    expected = unet_out(trained_unet(sdxl_lora_run))
    assert export(sdxl_lora_run["run"], tmp_path / "unet", "--format", "unet") == 0
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not any("lora" in name for name, _ in unet.named_parameters())  # merged into the weights
    torch.testing.assert_close(unet_out(unet), expected, rtol=1e-5, atol=1e-5)
    assert export(sdxl_lora_run["run"], tmp_path / "pipe", "--format", "merged") == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")  # a whole pipeline folder
    torch.testing.assert_close(unet_out(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    assert pipe.config.force_zeros_for_empty_prompt is False  # the run trained its null prompt as encode("")
    assert sample(pipe).shape == (1, 16, 16, 3)
    assert export(sdxl_lora_run["run"], tmp_path / "half", "--format", "unet", "--dtype", "float16") == 0
    stored = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}


def test_latest_checkpoint_exports_the_same_lora_as_final(sdxl_lora_run, tmp_path, capsys):
    assert export(sdxl_lora_run["run"], tmp_path / "final") == 0  # auto: lora, from final/
    assert "as lora" in capsys.readouterr().out
    # the run's YAML works as well as its folder; --set overrides its config
    config = sdxl_lora_run["root"] / "config.yaml"
    moved = f"model.path={sdxl_lora_run['pipeline']}"
    assert export(config, tmp_path / "ckpt", "--source", "latest", "--set", moved) == 0
    assert "checkpoint step 2" in capsys.readouterr().out
    final = load_file(str(tmp_path / "final" / "pytorch_lora_weights.safetensors"))
    ckpt = load_file(str(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == ckpt.keys()
    for k in final:
        torch.testing.assert_close(final[k], ckpt[k], rtol=0, atol=0)


def test_full_fine_tune_export_and_user_errors(tmp_path, capsys):
    pipeline = save_tiny_pipeline(tmp_path / "pipeline")
    assert main(["train", str(write_run_config(tmp_path, pipeline, "sd", train={
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "progress": False,
        "tensorboard": False}))]) == 0
    run, out = tmp_path / "run", tmp_path / "out"
    assert export(run, out, "--format", "lora") == 2
    assert "needs a LoRA run" in capsys.readouterr().err
    assert export(run, out, "--format", "unet") == 0
    exported = UNet2DConditionModel.from_pretrained(out).state_dict()
    final = UNet2DConditionModel.from_pretrained(run / "final").state_dict()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert export(run, out, "--format", "merged") == 2  # exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export(run, out, "--format", "merged", "--overwrite") == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert export(tmp_path / "nothing", tmp_path / "x") == 2
    assert export(run, tmp_path / "y", "--source", "7") == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert export(run, tmp_path / "z", "--set", "model.path=/no/such/folder") == 2
    assert "model.path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


# -- causal LM -----------------------------------------------------------------------------------
def test_causal_lm_lora_run_exports_merged_model_and_adapter(make_config, tmp_path, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                         optim={"lr": 1e-2}, train={"max_steps": 2})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    assert export(run, tmp_path / "merged", "--format", "merged") == 0
    assert export(config, tmp_path / "adapter", "--format", "lora") == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt").input_ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
        base_logits = base(ids).logits
        expected = PeftModel.from_pretrained(base, str(run / "final")).eval()(ids).logits
        assert not torch.allclose(base_logits, expected)  # the adapters learned something
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(ids).logits, expected, rtol=0, atol=0)
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
    assert export(run, tmp_path / "unet", "--format", "unet") == 2  # no UNet in a causal LM
