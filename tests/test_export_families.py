"""`mmalign export` for every registered family: a 1-step run of its tiny config (configs/tiny/,
or the nearest one with the modality switched where a family has none), exported in every
format its family descriptor lists (`Family.export_formats`), loaded with the family's own loader (a diffusers pipeline's
`from_pretrained` / `load_lora_weights`, the denoiser's `from_pretrained` / `load_lora_adapter`,
the transformers model's `from_pretrained`, `PeftModel.from_pretrained`) and run on a fixed
batch: the loaded model's output equals the trained model's (`load_trained`), which differs
from the base. Formats a family lacks are refused with a one-line error naming them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from audio_fixtures import save_tiny_tango, write_tiny_audio_run
from diffusion_fixtures import save_tiny_pipeline, write_pairs_file
from flow_fixtures import write_tiny_flow_run
from flux2_fixtures import write_tiny_flux2_run
from flux_kontext_fixtures import write_tiny_flux_kontext_run
from qwen_image_edit_fixtures import write_tiny_qwen_image_edit_run
from qwen_image_fixtures import write_tiny_qwen_image_run
from wan_fixtures import write_tiny_wan_run
from zimage_fixtures import write_tiny_zimage_run

from mmalign.cli import main
from mmalign.config import resolve_path
from mmalign.export import find_run, index_update, load_trained, write_model_index
from mmalign.families import family_names, get_family
from mmalign.modalities import build_modality

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.max_steps=1", "train.log_every=1",
         "optim.lr=1e-2", "optim.warmup_steps=0"]
LORA = ("lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=[to_q,to_k,to_v,to_out.0]")
GRPO = ("data.train=", "grpo.num_steps=3", "grpo.prompts_per_round=1", "grpo.group_size=2", "grpo.round_steps=1",
        "grpo.sample_batch_size=2", "train.batch_size=2")
SPO = ("spo.num_steps=4", "spo.prompts_per_round=2", "spo.round_steps=1", "spo.sample_batch_size=2",
       "spo.candidates=2", "spo.threshold=0.0", "train.batch_size=2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Any]:
    """`model.path=` / `data.train=` overrides for the tiny base folders and data built here, by
    name (the shipped tiny_sdxl and tiny_lm need none), and `sd_pairs`, an image pairs file."""
    from mmalign.toyvlm import make_shape_pairs, save_tiny_llava

    root = tmp_path_factory.mktemp("export_assets")
    sd, sd_pairs = save_tiny_pipeline(root / "sd"), write_pairs_file(root / "sd_pairs", 4)[0]
    sd3, flux = write_tiny_flow_run(root / "sd3", count=4), write_tiny_flow_run(root / "flux", flux=True, count=4)
    audio = write_tiny_audio_run(root / "audio", count=4)
    zimage = write_tiny_zimage_run(root / "zimage", count=4)
    flux2 = write_tiny_flux2_run(root / "flux2", count=4)
    flux2_dev = write_tiny_flux2_run(root / "flux2_dev", count=4, dev=True)
    qwen_image = write_tiny_qwen_image_run(root / "qwen_image", count=4)
    qwen_image_edit = write_tiny_qwen_image_edit_run(root / "qwen_image_edit", count=4)
    flux_kontext = write_tiny_flux_kontext_run(root / "flux_kontext", count=4)
    edit_plus = write_tiny_qwen_image_edit_run(root / "qwen_image_edit_plus", 4, "QwenImageEditPlusPipeline")
    wan = write_tiny_wan_run(root / "wan")
    llava, shapes = save_tiny_llava(root / "llava", seed=0), make_shape_pairs(4, 0, root / "shapes")
    folders = {"sd": (sd, sd_pairs), "sd3": (sd3.parents[1] / "pipeline", sd3),
               "flux": (flux.parents[1] / "pipeline", flux), "audioldm2": (audio.parents[1] / "pipeline", audio),
               "tango": (save_tiny_tango(root / "tango"), audio), "llava": (llava, shapes),
               "zimage": (zimage.parents[1] / "pipeline", zimage), "flux2": (flux2.parents[1] / "pipeline", flux2),
               "flux2_dev": (flux2_dev.parents[1] / "pipeline", flux2_dev),
               "qwen_image": (qwen_image.parents[1] / "pipeline", qwen_image),
               "qwen_image_edit": (qwen_image_edit.parents[1] / "pipeline", qwen_image_edit),
               "flux_kontext": (flux_kontext.parents[1] / "pipeline", flux_kontext),
               "qwen_image_edit_plus": (edit_plus.parents[1] / "pipeline", edit_plus),
               "wan": (wan.parents[1] / "pipeline", wan)}
    named = {k: [f"model.path={model}", f"data.train={data}"] for k, (model, data) in folders.items()}
    return dict(named, sd_pairs=sd_pairs, sd3_pairs=sd3, flux_pairs=flux)


@dataclasses.dataclass(frozen=True)
class Case:
    """A run to export: `config` under configs/tiny/ with the `assets` entry's paths and `overrides`."""

    variant: str  # "lora" or "full"
    config: str
    assets: str | None = None
    overrides: tuple[str, ...] = ()


BATCH = ("train.batch_size=2",)
CASES: dict[str, list[Case]] = {
    "causal_lm": [Case("full", "lm_dpo.yaml", None, ("data.eval=", *BATCH)),
                  Case("lora", "lm_dpo_lora.yaml", None, ("data.eval=", *BATCH))],
    "llava": [Case("lora", "llava_dpo.yaml", "llava", ("data.eval=", *BATCH))],
    "sd": [Case("full", "sd_dpo.yaml", "sd", BATCH)],
    "sdxl": [Case("lora", "sdxl_dpo.yaml", None, BATCH)],
    "sd_spo": [Case("lora", "spo.yaml", "sd", ("modality=sd_spo", "data.train=", *SPO))],
    "sdxl_spo": [Case("lora", "spo.yaml", None, SPO)],
    "sd3": [Case("lora", "flow_dpo.yaml", "sd3", BATCH)],
    "sd3_grpo": [Case("lora", "flow_grpo.yaml", "sd3", GRPO)],
    "flux_grpo": [Case("lora", "flow_grpo.yaml", "flux", ("modality=flux_grpo", *GRPO))],
    "sd_grpo": [Case("full", "sd_grpo.yaml", "sd", GRPO)],
    "flux": [Case("lora", "flow_dpo.yaml", "flux", ("modality=flux", *BATCH))],
    "audioldm2": [Case("full", "audio_dpo.yaml", "audioldm2", BATCH)],
    "tango": [Case("lora", "audio_dpo.yaml", "tango", ("modality=tango", *LORA, *BATCH))],
    "zimage": [Case("lora", "zimage_flow_dpo.yaml", "zimage", BATCH)],
    "flux2": [Case("lora", "flux2_flow_dpo.yaml", "flux2", BATCH)],
    "flux2_dev": [Case("lora", "flux2_dev_flow_dpo.yaml", "flux2_dev", BATCH)],
    "qwen_image": [Case("lora", "qwen_image_flow_dpo.yaml", "qwen_image", BATCH)],
    "qwen_image_edit": [Case("lora", "qwen_image_edit_dpo.yaml", "qwen_image_edit", BATCH)],
    "flux_kontext": [Case("lora", "flux_kontext_dpo.yaml", "flux_kontext", BATCH)],
    "qwen_image_edit_plus": [Case("lora", "qwen_image_edit_dpo.yaml", "qwen_image_edit_plus",
                                  ("modality=qwen_image_edit_plus", "diffusion.resolution=64", *BATCH))],
    "wan": [Case("lora", "wan_dpo.yaml", "wan", BATCH)],
}
# SPO / GRPO runs read no data file: their fixed batch is image pairs (an `assets` entry) through the
# base family's likelihood
PROBE_AS = {"sd_spo": ("sd", "sd_pairs"), "sdxl_spo": ("sdxl", "sd_pairs"), "sd_grpo": ("sd", "sd_pairs"),
            "sd3_grpo": ("sd3", "sd3_pairs"), "flux_grpo": ("flux", "flux_pairs")}


# The current VLM families export through the same code as llava; each family's merged and adapter exports are
# loaded back with from_pretrained in tests/test_vlm_families.py::test_dpo_step_and_export_load_with_from_pretrained.
TESTED_IN_VLM_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision")


def case_ids() -> list[tuple[str, str]]:
    """(modality, variant) for every registered family; a family without a case gives "missing"."""
    return [(m, c.variant) for m in family_names() if m not in TESTED_IN_VLM_FAMILIES
            for c in CASES.get(m, [Case("missing", "")])]


def test_the_vlm_families_skipped_here_are_exported_in_their_own_test():
    from test_vlm_families import NAMES

    assert set(TESTED_IN_VLM_FAMILIES) == set(NAMES) and set(NAMES) <= set(family_names())


# -- the fixed batch and the output it gives --------------------------------------------------------
def probe_for(run_dir: Path, modality: str, assets: dict[str, Any]):
    """A function model -> its output tensor (logits / denoiser output) on one fixed batch of the
    run's data, through the family's likelihood (the same inputs, noise and timesteps each call)."""
    from mmalign.data.preference import load_split

    cfg = find_run(run_dir).cfg
    if modality in PROBE_AS:
        base_modality, pairs = PROBE_AS[modality]
        data = dataclasses.replace(cfg.data, train=str(assets[pairs]), format="auto")
        cfg = dataclasses.replace(cfg, modality=base_modality, data=data)
    _, likelihood, _ = build_modality(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False)))
    records, kind = load_split(cfg.data.train, format=cfg.data.format)
    batch = likelihood.collate([dict(records[i], _index=i) for i in range(2)], kind)
    draw = likelihood.draw(batch, torch.Generator().manual_seed(0))

    @torch.no_grad()
    def probe(model: torch.nn.Module) -> torch.Tensor:
        seen = []
        handle = model.register_forward_hook(lambda module, args, out: seen.append(out[0]))
        try:
            likelihood.logps(model.eval(), batch, draw)
        finally:
            handle.remove()
        out = seen[0]  # Z-Image's transformer returns a list of (C, 1, h, w), one per item
        return (torch.stack(list(out)) if isinstance(out, (list, tuple)) else out).float()

    return probe


# -- each format's loader ---------------------------------------------------------------------------
def plain_class(model: torch.nn.Module) -> type:
    """The model's own class (under a peft wrapper)."""
    return type(model.get_base_model() if hasattr(model, "get_base_model") else model)


def loadable_base(folder: Path, pipeline: str, tmp_path: Path) -> Path:
    """The base folder, or a copy with a model_index.json when it has none (the tiny builders omit it)."""
    if (folder / "model_index.json").is_file():
        return folder
    copy = shutil.copytree(folder, tmp_path / "base_pipeline")
    write_model_index(copy, pipeline)
    return copy


def load_export(fmt: str, out: Path, base: Path, modality: str, trained: torch.nn.Module,
                tmp_path: Path) -> torch.nn.Module:
    """The exported model, loaded the way a user of the family loads it."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    family, cls = get_family(modality), plain_class(trained)
    if not family.trained:  # transformers: the merged model, or the adapter onto the base
        if fmt == "merged":
            return cls.from_pretrained(out)
        return PeftModel.from_pretrained(cls.from_pretrained(base), out)
    if fmt == "unet":
        return cls.from_pretrained(out)
    if fmt == "merged" and family.pipeline:
        pipe = DiffusionPipeline.from_pretrained(out)
        assert type(pipe).__name__ == family.pipeline
        return getattr(pipe, family.trained)
    if fmt == "merged":  # a component folder without a pipeline class
        assert {p.name for p in base.iterdir()} <= {p.name for p in out.iterdir()}
        return cls.from_pretrained(out, subfolder=family.trained)
    if family.pipeline:  # lora onto the base pipeline
        pipe = DiffusionPipeline.from_pretrained(loadable_base(base, family.pipeline, tmp_path))
        pipe.load_lora_weights(out)
        return getattr(pipe, family.trained)
    denoiser = cls.from_pretrained(base, subfolder=family.trained)  # lora onto the denoiser alone
    denoiser.load_lora_adapter(out, prefix=family.trained, use_safetensors=True)
    return denoiser


def base_model(base: Path, modality: str, trained: torch.nn.Module) -> torch.nn.Module:
    """The untrained model the run started from."""
    component = get_family(modality).trained
    return plain_class(trained).from_pretrained(base, **({"subfolder": component} if component else {}))


# -- the test ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality,variant", case_ids())
def test_every_family_exports_what_its_own_loader_loads(modality, variant, assets, tmp_path, capsys):
    if modality not in CASES:
        pytest.fail(f"family '{modality}' has no export case here (CASES)")
    case = next(c for c in CASES[modality] if c.variant == variant)
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / case.config), f"train.output_dir={run}", *QUIET,
                 *assets.get(case.assets, []), *case.overrides]) == 0
    family, probe = get_family(modality), probe_for(run, modality, assets)
    trained, _ = load_trained(find_run(run))
    base = Path(resolve_path(find_run(run).cfg.model.path))
    expected = probe(trained)
    model_class = plain_class(trained).__name__
    assert not torch.allclose(probe(base_model(base, modality, trained)), expected, rtol=1e-4, atol=1e-5)
    for fmt in ("merged", "unet", "lora"):
        out = tmp_path / fmt
        capsys.readouterr()
        code = main(["export", str(run), "--to", str(out), "--format", fmt])
        printed = capsys.readouterr()
        err = printed.err
        if fmt not in family.export_formats:  # one line naming the family and what it supports
            line = next(x for x in err.splitlines() if "error:" in x)
            assert code == 2 and f"modality '{modality}' has no --format {fmt}" in line
            assert line.endswith(f"it supports {', '.join(family.export_formats)}")
        elif fmt == "lora" and variant == "full":
            assert code == 2 and "needs a LoRA run" in err
        else:
            assert code == 0, err
            loaded = load_export(fmt, out, base, modality, trained, tmp_path)
            if fmt == "merged" and (update := index_update(family, find_run(run).cfg)):  # SDXL's null prompt
                index = json.loads((out / "model_index.json").read_text())
                assert update.items() <= index.items()
            loader = family.pipeline if fmt != "unet" and family.pipeline else model_class
            assert "; load with " in printed.out and f"{loader}.from_pretrained(" in printed.out
            torch.testing.assert_close(probe(loaded), expected, rtol=1e-5, atol=1e-5, msg=f"{modality} {fmt}")


@pytest.mark.parametrize("modality,lora,expected", [
    ("audioldm2", True, "merged"),  # no lora format: auto falls back to the merged pipeline
    ("tango", True, "lora"), ("sdxl_spo", True, "lora"), ("sd3", False, "merged"), ("llava", True, "lora"),
])
def test_auto_format_follows_the_family_descriptor(modality, lora, expected):
    from mmalign.config import Config, from_dict
    from mmalign.export import resolve_format

    cfg = from_dict(Config, {"modality": modality, "lora": {"enabled": lora}})
    assert resolve_format("auto", cfg, get_family(modality)) == expected
