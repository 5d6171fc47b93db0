"""Model families: one module per family, each defining `FAMILY`, a `Family` descriptor that
answers every question the rest of mmalign asks about that family (shared/DESIGN.md, "Family").

The config's `modality` names a family module here (`mmalign/families/<name>.py`); the
registry is the package's module list, so adding a family is adding its module (plus its
config and its test) — no table elsewhere is keyed by family name. Modules are imported
only when their family is asked for (`get_family`), so listing names stays cheap.

Who reads what:
- the trainer and `mmalign export`: `build` (model, likelihood, processor), `source` (online data);
- `mmalign export`: `pipeline`, `trained`, `export_formats`;
- validation images (`train.validate_every`): `pipeline`, `validation`;
- `mmalign cache`: `cache` and `build(cfg, use_cache=False, trained=False)`;
- `mmalign generate`: `sample` and, for a bare component folder, `layout` and
  `text_encoders` (`family_for_folder`).
"""

from __future__ import annotations

import difflib
import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class PipelineLayout:
    """Where a family's trainable denoiser lives in a diffusers pipeline folder and the diffusers
    classes of it, of the training scheduler and of the VAE (`vae/`); `kind` names the folder in
    errors."""

    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    scheduler_class: str = "DDPMScheduler"
    kind: str = "pipeline"
    vae_class: str = "AutoencoderKL"


@dataclass(frozen=True)
class TextEncoderSpec:
    """A frozen text encoder of a diffusers folder: its subfolder, its tokenizer's subfolder,
    its class as "library:Class" (imported when loaded), whether the folder must hold it
    (SD3's T5 is optional: the pipeline feeds zeros without it), and the class that loads the
    tokenizer folder (FLUX.2 [dev]'s is a PixtralProcessor, as its pipeline loads it)."""

    subfolder: str
    tokenizer: str
    cls: str
    required: bool = True
    tokenizer_cls: str = "transformers:AutoTokenizer"


@dataclass(frozen=True)
class Family:
    """One model family (the config's `modality`).

    build(cfg, use_cache=True, trained=True) -> (model, likelihood, processor): load the parts
        from `cfg.model.path`; use_cache=False ignores `diffusion.cache_dir`, trained=False skips
        the trainable part (`mmalign cache` needs only the frozen encoders).
    kind: "text" | "vlm" | "image" | "video" | "audio".
    trained: the trained part's subfolder of a diffusers folder ("unet", "transformer"), "" for a
        transformers model trained whole.
    layout, text_encoders: how a diffusers folder of this family is laid out (loading, and
        recognising a bare component folder in `mmalign generate`).
    pipeline: the diffusers pipeline class that samples this family (validation images, the
        merged export, LoRA export through its `save_lora_weights`); None when diffusers has none.
    export_formats: the `mmalign export --format` values it supports.
    cache: `mmalign cache` can store its latents and conditioning.
    validation: `train.validate_every` can sample images with it.
    sample: what `mmalign generate` produces with its folders: "images", "videos", "audio" or "text".
    source: online data (SPO rounds): source(cfg, likelihood) -> a `DataSource`, or None.
    step: its likelihood is the SPO / D3PO sampler-transition density (mmalign/modalities/step.py).
    null_prompt_zeros_flag: the pipeline's `force_zeros_for_empty_prompt` switch exists (SDXL):
        exports and validation set it to what training used (`diffusion.null_prompt`).
    zeros_null_prompt: whether `diffusion.null_prompt: zeros` has a counterpart in the family's
        sampling (False: its pipeline encodes the empty negative prompt; zeros are refused).
    true_cfg: the pipeline's classifier-free guidance is `true_cfg_scale` with a negative prompt
        (Qwen-Image); its `guidance_scale` would feed a guidance embedding the family has not.
    unsupported: why an export format is missing ({"lora": "..."}), for the error naming it.
    """

    name: str
    summary: str
    kind: str
    build: Callable[..., tuple[Any, Any, Any]]
    trained: str = ""
    layout: PipelineLayout | None = None
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    pipeline: str | None = None
    export_formats: tuple[str, ...] = ("merged",)
    cache: bool = False
    validation: bool = False
    sample: str = ""
    source: Callable[[Any, Any], Any] | None = None
    step: bool = False
    null_prompt_zeros_flag: bool = False
    zeros_null_prompt: bool = True
    true_cfg: bool = False
    unsupported: dict[str, str] = field(default_factory=dict)

    @property
    def diffusion(self) -> bool:
        """A diffusers denoiser (UNet or flow transformer) family."""
        return self.layout is not None


def family_names() -> list[str]:
    """Every registered family: the modules of this package (sorted; nothing imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_family(name: str) -> Family:
    """The `Family` of module `mmalign.families.<name>`; an unknown name is a ConfigError
    naming the nearest registered one."""
    names = family_names()
    if name not in names:
        from mmalign.errors import ConfigError

        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown modality '{name}'{hint} (known: {', '.join(names)})")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def all_families() -> list[Family]:
    """Every registered family's descriptor (imports each family module)."""
    return [get_family(name) for name in family_names()]


def family_for_pipeline(name: str) -> Family | None:
    """The family whose pipeline is the diffusers class `name` (its base family when several share
    it, e.g. `sd` rather than `sd_spo`); None when no registered family uses it."""
    found = [f for f in all_families() if f.pipeline == name]
    return next((f for f in found if f.source is None), found[0] if found else None)


def _config_value(file: Path, key: str) -> str | None:
    if not file.is_file():
        return None
    value = json.loads(file.read_text()).get(key)
    return value[0] if isinstance(value, list) and value else value


def _matches(family: Family, path: Path) -> bool:
    """The folder's denoiser is the family's class and every required text encoder is there,
    of the family's class."""
    layout = family.layout
    if layout is None or _config_value(path / layout.denoiser / "config.json", "_class_name") != layout.denoiser_class:
        return False
    for spec in family.text_encoders:
        if spec.required and _config_value(path / spec.subfolder / "config.json", "architectures") != \
                spec.cls.partition(":")[2]:
            return False
    return True


def family_for_folder(path: str | Path) -> Family | None:
    """The family of a bare diffusers component folder (no model_index.json): its denoiser
    subfolder holds the family's denoiser class and every required text encoder subfolder holds
    the family's encoder class; of several matches the one requiring most encoders (SDXL over
    SD); online (SPO) families share their base's folders and are not candidates. None: no match."""
    path = Path(path)
    found = [f for f in all_families() if f.source is None and _matches(f, path)]
    return max(found, key=lambda f: sum(e.required for e in f.text_encoders), default=None)
