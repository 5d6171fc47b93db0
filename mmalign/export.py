"""Export a trained run into the formats other tools load (`mmalign export`).

A run is `train.output_dir`: `final/` (written by `save_pretrained` at the end: a peft adapter
folder with LoRA, the model's own folder otherwise) and `checkpoints/step_*/` (trainable
weights + `state.json`, whose "config" key is the run's whole config; the weights of a
`train.fsdp_checkpoint: sharded` run are every process's shards, put back together here in one
process: mmalign/train/sharded_checkpoint.py). The base model is read from that config
(`model.path`), or from a YAML config given instead of the run folder.

Every fact about a family that export needs is in its descriptor (`mmalign/families/<name>.py`:
`pipeline`, `trained`, `export_formats`, `unsupported`); the code here is generic over them.

Formats (`--format`; `auto` is lora for a LoRA run of a family that has it, merged otherwise):
- `merged`: something one `from_pretrained` call loads. Diffusion: a copy of the base folder's
  files (the VAE from `diffusion.vae_path` when set) with the trained denoiser, LoRA merged in
  with peft `merge_and_unload`: a complete diffusers pipeline folder for a family with a pipeline
  class (a `model_index.json` written if the base has none; `DiffusionPipeline.from_pretrained`),
  the component folder otherwise (tango: `UNet2DConditionModel.from_pretrained(OUT,
  subfolder="unet")`, the other parts beside it). Text models: the merged model + tokenizer or
  processor (`save_pretrained`).
- `unet`: diffusion only: the trained denoiser alone (`<Denoiser>.save_pretrained`: the UNet, or
  the transformer for sd3/flux), LoRA merged.
- `lora`: LoRA runs only. Diffusion: `pytorch_lora_weights.safetensors` in diffusers' key
  format (what diffusers' train_text_to_image_lora_sdxl.py writes: peft state dict ->
  `convert_state_dict_to_diffusers` -> keys prefixed with the component, "unet." or
  "transformer.", with the LoraConfig as metadata so lora_alpha survives), loaded by
  `pipeline.load_lora_weights(OUT)`, or onto the denoiser alone by
  `denoiser.load_lora_adapter(OUT, prefix="unet", use_safetensors=True)` (tango). Text models:
  the peft adapter folder + tokenizer (`PeftModel.from_pretrained(base, OUT)`). AudioLDM2 has
  none: diffusers' `AudioLDM2Pipeline` has no `load_lora_weights` (use merged or unet).
The output is written to a hidden temporary folder next to OUT and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mmalign.config import Config, ConfigError, apply_overrides, from_dict, load_config, resolve_path, validate
from mmalign.families import Family, get_family
from mmalign.train.sharded_checkpoint import is_sharded_checkpoint

FORMATS = ("auto", "merged", "unet", "lora")
DTYPES = ("float32", "float16", "bfloat16")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def index_update(family: Family, cfg: Config) -> dict[str, Any]:
    """model_index.json entries that depend on the run's config: SDXL pipelines sample the
    unconditional branch with zeros when `force_zeros_for_empty_prompt` (the SDXL base says true);
    the export samples with the null prompt training used (`diffusion.null_prompt`)."""
    if family.null_prompt_zeros_flag:
        return {"force_zeros_for_empty_prompt": cfg.diffusion.null_prompt == "zeros"}
    return {}


@dataclasses.dataclass
class TrainedRun:
    """Where a run's weights come from: `weights` is `final/` or a checkpoint folder."""

    cfg: Config
    output_dir: Path
    weights: Path
    from_checkpoint: bool
    step: int | None


# -- finding the run -----------------------------------------------------------------------
def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted(p for p in (output_dir / "checkpoints").glob("step_*") if (p / "state.json").is_file())


def run_config(target: str | Path, overrides: list[str] | None = None) -> tuple[Config, Path]:
    """(config, output_dir) of a run folder (config from its newest checkpoint's state.json)
    or of a YAML config (output_dir = its train.output_dir)."""
    target = Path(target)
    if target.is_file():
        cfg = load_config(target, overrides)
        return cfg, Path(cfg.train.output_dir)
    if not target.is_dir():
        raise ConfigError(f"export: {target} is neither a run folder nor a config file")
    found = _checkpoints(target)
    if not found:
        raise ConfigError(f"export: {target} has no checkpoints/step_*/state.json to read the run's config "
                          "from; pass the run's YAML config instead")
    data = json.loads((found[-1] / "state.json").read_text())["config"]
    source = data.pop("source", "")
    cfg = from_dict(Config, apply_overrides(data, overrides or []))
    cfg.source = source
    validate(cfg)
    return cfg, target


def locate_weights(output_dir: Path, source: str = "auto") -> tuple[Path, bool, int | None]:
    """(folder, is_checkpoint, step) for source auto (final/ if present, else the latest
    checkpoint), final, latest, a step number, or a checkpoint folder path."""
    final, found = output_dir / "final", _checkpoints(output_dir)
    if source in ("auto", "final") and final.is_dir():
        return final, False, None
    if source == "final":
        raise ConfigError(f"export: {final} does not exist (the run did not finish); use --source latest")
    if source in ("auto", "latest"):
        if not found:
            raise ConfigError(f"export: no final/ and no checkpoint in {output_dir}")
        path = found[-1]
    elif source.isdigit():
        path = output_dir / "checkpoints" / f"step_{int(source):08d}"
    else:
        path = Path(source)
    if not ((path / "model.safetensors").is_file() or is_sharded_checkpoint(path)):
        raise ConfigError(f"export: {path} is not a checkpoint folder (no model.safetensors, no model_shards/)")
    return path, True, json.loads((path / "state.json").read_text())["step"]


def find_run(target: str | Path, source: str = "auto", overrides: list[str] | None = None) -> TrainedRun:
    """The run's config and the folder its trained weights are read from."""
    cfg, output_dir = run_config(target, overrides)
    weights, is_checkpoint, step = locate_weights(output_dir, source)
    return TrainedRun(cfg, output_dir, weights, is_checkpoint, step)


# -- loading the trained model ---------------------------------------------------------------
def _is_diffusers(model: torch.nn.Module) -> bool:
    from mmalign.modalities.experts import TwoExperts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, TwoExperts) or type(base).__module__.startswith("diffusers")


def load_trained(run: TrainedRun) -> tuple[torch.nn.Module, Any]:
    """(trained model, processor): the base from `model.path`, then the run's weights: a peft
    adapter (LoRA final/), the checkpoint's trainable state, or final/ as a whole (full
    fine-tune; the base is loaded first for its class, so twice the model's memory for a moment).
    Loaded without gradient checkpointing and without `diffusion.cache_dir` (no cache needed)."""
    from mmalign.modalities import build_modality
    from mmalign.train.checkpoint import load_weights
    from mmalign.train.setup import apply_lora

    cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model, gradient_checkpointing=False))
    if getattr(cfg.diffusion, "cache_dir", ""):
        cfg.diffusion = dataclasses.replace(cfg.diffusion, cache_dir="")
    base = resolve_path(cfg.model.path)
    if not Path(base).exists():
        raise ConfigError(f"export: the run's base model {base} is not there; pass --set model.path=<local folder>")
    model, _, processor = build_modality(cfg)
    if run.from_checkpoint:
        model = apply_lora(model, cfg)
        load_weights(model, run.weights)  # model.safetensors, or a sharded checkpoint's shards put together
    elif cfg.lora.enabled:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.weights))
    else:
        dtype = getattr(torch, cfg.model.dtype)
        key = "torch_dtype" if _is_diffusers(model) else "dtype"
        model = type(model).from_pretrained(str(run.weights), **{key: dtype})
    return model.eval(), processor


# -- writers (each fills an empty folder) --------------------------------------------------------
def _merged(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(dtype) if dtype is not None else model


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the folder `src` into `dst`, leaving out the top-level entries named in `skip`.
    Real copies, not links: a later in-place write into the export must not reach the base."""
    for entry in src.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)


def _component_class(folder: Path) -> list[str] | None:
    """[library, class] of a saved pipeline component, read from its config files."""
    for name, key in (("scheduler_config.json", "_class_name"), ("config.json", "_class_name"),
                      ("config.json", "architectures"), ("processor_config.json", "processor_class"),
                      ("tokenizer_config.json", "tokenizer_class")):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get(key)
            if value:
                library = "transformers" if key in ("architectures", "processor_class", "tokenizer_class") else "diffusers"
                return [library, value[0] if isinstance(value, list) else value]
    return None


def write_model_index(out: Path, pipeline: str) -> None:
    """`model_index.json` for a pipeline folder saved component by component (no index of its own)."""
    import diffusers

    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        if (found := _component_class(folder)) is not None:
            index[folder.name] = found
    if pipeline == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def write_component_folder(model: torch.nn.Module, cfg: Config, family: Family, out: Path,
                           dtype: torch.dtype | None) -> None:
    """The base folder with the trained (merged) denoiser in `family.trained` (and
    `diffusion.vae_path`'s VAE when set). With a pipeline class it is a pipeline folder: a
    `model_index.json` is written if the base lacks one, and the family's `index_update` applied."""
    from mmalign.modalities.experts import denoiser_components

    vae_path = cfg.diffusion.vae_path
    components = denoiser_components(_merged(model, dtype), family.trained)  # two for Wan 2.2 A14B
    _copy_tree(Path(resolve_path(cfg.model.path)), out, set(components) | ({"vae"} if vae_path else set()))
    if vae_path:
        shutil.copytree(vae_path, out / "vae")
    for component, module in components.items():
        module.save_pretrained(str(out / component))
    if family.pipeline is None:
        return
    index_path = out / "model_index.json"
    if not index_path.is_file():
        write_model_index(out, family.pipeline)
    if update := index_update(family, cfg):
        index = json.loads(index_path.read_text())
        index.update(update)
        index_path.write_text(json.dumps(index, indent=2))


def diffusers_lora_state_dict(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """LoRA weights of a peft-wrapped denoiser in diffusers' key format, without the component
    prefix (`down_blocks.1.attentions.0....attn1.to_q.lora.down.weight`); in peft's key format
    (`...lora_A.weight`) when some target has no diffusers name (one format per file)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    prefix = "base_model.model."
    peft_state = {k.removeprefix(prefix): v for k, v in get_peft_model_state_dict(model).items()}
    state = convert_state_dict_to_diffusers(peft_state)
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        # targets outside the legacy mapping (FLUX.2's to_qkv_mlp_proj) would leave a mixed state
        # dict, which diffusers' load_lora_adapter reads by its FIRST key's format and silently
        # drops the rest of: keep the peft keys (lora_A / lora_B) throughout, which it also reads
        state = peft_state
    return {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in state.items()}


def write_diffusers_lora(model: torch.nn.Module, family: Family, out: Path, dtype: torch.dtype | None) -> None:
    """`pytorch_lora_weights.safetensors`, keys and LoraConfig metadata prefixed with the component
    ("unet." / "transformer."), as `<Pipeline>.save_lora_weights` writes it: what
    `pipeline.load_lora_weights(out)` and `denoiser.load_lora_adapter(out, prefix=component)` load."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    from mmalign.modalities.experts import lora_file, split_lora_state

    prefix = f"{family.trained}."
    config = model.peft_config[model.active_adapter].to_dict()
    for component, part in split_lora_state(diffusers_lora_state_dict(model, dtype), model.get_base_model()).items():
        state = {prefix + k: v for k, v in part.items()}  # each expert's file loads into a "transformer"
        metadata = {prefix + k: v for k, v in config.items()}
        LoraBaseMixin.write_lora_layers(state, str(out), True, lora_file(component, LORA_WEIGHTS), None, True,
                                        metadata)


def write_transformers(model: torch.nn.Module, processor: Any, out: Path, merged: bool,
                       dtype: torch.dtype | None) -> None:
    """A causal LM: the merged model or the peft adapter folder, with the tokenizer/processor."""
    if merged:
        model = _merged(model, dtype)
    elif dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(out))


# -- the command's work ----------------------------------------------------------------------------
def resolve_format(fmt: str, cfg: Config, family: Family) -> str:
    """Check `fmt` against the run and its family; `auto` is `lora` for a LoRA run of a family
    that has it, `merged` otherwise."""
    if fmt not in FORMATS:
        raise ConfigError(f"export: --format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "lora" if cfg.lora.enabled and "lora" in family.export_formats else "merged"
    if fmt not in family.export_formats:
        why = f" ({family.unsupported[fmt]})" if fmt in family.unsupported else ""
        raise ConfigError(f"export: modality '{cfg.modality}' has no --format {fmt}{why}; "
                          f"it supports {', '.join(family.export_formats)}")
    if fmt == "lora" and not cfg.lora.enabled:
        others = " or ".join(f for f in family.export_formats if f != "lora")
        raise ConfigError(f"export: --format lora needs a LoRA run (lora.enabled: true); use {others}")
    return fmt


def write_export(model: torch.nn.Module, processor: Any, cfg: Config, family: Family, fmt: str, out: Path,
                 dtype: torch.dtype | None) -> None:
    """Fill the empty folder `out` with the run's model in format `fmt` (resolved)."""
    if not family.trained:
        write_transformers(model, processor, out, fmt == "merged", dtype)
    elif fmt == "lora":
        write_diffusers_lora(model, family, out, dtype)
    elif fmt == "merged":
        write_component_folder(model, cfg, family, out, dtype)
    else:
        _merged(model, dtype).save_pretrained(str(out))


def load_hint(family: Family, fmt: str, model_class: str) -> str:
    """The call that loads an export of `fmt` (OUT: the export, BASE: the run's base model)."""
    if not family.trained:
        return (f"{model_class}.from_pretrained(OUT)" if fmt == "merged"
                else f"PeftModel.from_pretrained({model_class}.from_pretrained(BASE), OUT)")
    sub = family.trained
    if fmt == "unet":
        return f"{model_class}.from_pretrained(OUT)"
    if fmt == "merged":
        return (f"{family.pipeline}.from_pretrained(OUT)" if family.pipeline
                else f"{model_class}.from_pretrained(OUT, subfolder='{sub}')")
    if model_class == "TwoExperts":  # Wan 2.2 A14B: one file per expert
        from mmalign.modalities.experts import LORA_HINT

        return LORA_HINT
    if family.pipeline:
        return f"{family.pipeline}.from_pretrained(BASE).load_lora_weights(OUT)"
    return (f"{model_class}.from_pretrained(BASE, subfolder='{sub}')"
            f".load_lora_adapter(OUT, prefix='{sub}', use_safetensors=True)")


def _prepare(out: Path, overwrite: bool) -> Path:
    """A fresh hidden temporary folder next to `out` (which must not exist unless overwrite)."""
    if out.exists() and not overwrite:
        raise ConfigError(f"export: {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def export_run(target: str | Path, out: str | Path, fmt: str = "auto", source: str = "auto",
               dtype: str | None = None, overwrite: bool = False,
               overrides: list[str] | None = None, card: bool = True, push_to_hub: str = "",
               private: bool = False) -> dict[str, Any]:
    """Export run `target` (run folder or YAML config) to the folder `out` atomically, with a
    model card (README.md + mmalign_config.yaml, mmalign/model_card.py) unless `card` is False;
    then upload it to the Hub model repo `push_to_hub` when given.

    Returns a summary: format, source folder, step (checkpoints), files written, MB, the call
    that loads the export and the pushed commit's URL ("" without a push)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"export: --dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    run, out = find_run(target, source, overrides), Path(out)
    torch_dtype = getattr(torch, dtype) if dtype else None
    family = get_family(run.cfg.modality)
    fmt = resolve_format(fmt, run.cfg, family)
    tmp = _prepare(out, overwrite)
    try:
        model, processor = load_trained(run)
        write_export(model, processor, run.cfg, family, fmt, tmp, torch_dtype)
        plain = model.get_base_model() if hasattr(model, "get_base_model") else model
        hint = load_hint(family, fmt, type(plain).__name__)
        if card:
            from mmalign.model_card import write_card

            library = "diffusers" if _is_diffusers(model) else ("peft" if fmt == "lora" else "transformers")
            write_card(tmp, run.cfg, run.output_dir, fmt, hint, library)
        sizes = [p.stat().st_size for p in tmp.rglob("*") if p.is_file()]
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pushed = ""
    if push_to_hub:
        from mmalign.model_card import push_to_hub as push

        pushed = push(out, push_to_hub, private, f"mmalign export ({fmt}) of {run.output_dir.name}")
    return {"format": fmt, "modality": run.cfg.modality, "source": str(run.weights), "step": run.step,
            "out": str(out), "files": len(sizes), "mb": sum(sizes) / 2**20, "load": hint, "pushed": pushed}
