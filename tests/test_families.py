"""The family registry (mmalign/families/): every registered family declares how it loads,
samples and exports, and (where it applies) caches and validates; names resolve strictly; a bare
component folder is recognised by its layout; no other module keys a table by family name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from diffusion_fixtures import save_tiny_pipeline
from flow_fixtures import save_tiny_flow_pipeline

from mmalign.config import ConfigError, resolve_path
from mmalign.families import Family, family_for_folder, family_names, get_family

NAMES = family_names()
EXPORT_FORMATS = {"merged", "unet", "lora"}


def test_the_registry_holds_every_family_module():
    assert {"causal_lm", "llava", "sd", "sdxl", "sd_spo", "sdxl_spo", "sd3", "flux", "audioldm2", "tango"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_family_declares_load_sample_export_cache_and_validation(name):
    import diffusers

    family = get_family(name)
    assert isinstance(family, Family) and family.name == name  # the module name is the config's modality
    assert callable(family.build) and family.kind in {"text", "vlm", "image", "video", "audio"}
    assert family.sample in {"images", "videos", "audio", "text"}
    assert family.export_formats and set(family.export_formats) <= EXPORT_FORMATS
    if family.diffusion:
        assert family.trained == family.layout.denoiser  # the export writes the trained part there
        assert hasattr(diffusers, family.layout.denoiser_class) and hasattr(diffusers, family.layout.scheduler_class)
        assert family.text_encoders and "unet" in family.export_formats
        for spec in family.text_encoders:  # every encoder class imports
            module, _, cls = spec.cls.partition(":")
            assert hasattr(importlib.import_module(module), cls), spec.cls
    else:
        assert family.trained == "" and not family.cache and not family.validation and "unet" not in family.export_formats
    if family.pipeline is not None:
        assert hasattr(diffusers, family.pipeline)
    if family.validation:  # validation images sample through the family's pipeline
        assert family.pipeline is not None and family.kind in ("image", "video")
    if "lora" in family.export_formats and family.diffusion and family.pipeline is not None:
        assert hasattr(getattr(diffusers, family.pipeline), "save_lora_weights")
    if family.cache:
        assert family.diffusion and family.source is None  # online families never read a cache


def test_an_unknown_family_names_the_nearest():
    with pytest.raises(ConfigError, match="unknown modality 'llavaa'; did you mean 'llava'"):
        get_family("llavaa")
    with pytest.raises(ConfigError, match="did you mean 'sdxl'"):
        get_family("sdxll")


def test_a_bare_component_folder_is_recognised_by_its_layout(tmp_path):
    assert family_for_folder(resolve_path("pkg://tiny_sdxl")).name == "sdxl"
    assert family_for_folder(save_tiny_pipeline(tmp_path / "sd")).name == "sd"
    assert family_for_folder(save_tiny_pipeline(tmp_path / "xl", sdxl=True)).name == "sdxl"
    assert family_for_folder(save_tiny_flow_pipeline(tmp_path / "sd3")).name == "sd3"
    assert family_for_folder(save_tiny_flow_pipeline(tmp_path / "flux", flux=True)).name == "flux"
    assert family_for_folder(tmp_path) is None


def test_no_module_outside_families_keys_a_table_by_family_name():
    """Facts about a family live in its module: a dict entry `"sdxl": ...` elsewhere is a second table."""
    root = Path(importlib.import_module("mmalign").__file__).parent
    keyed = re.compile(r"""["'](%s)["']\s*:""" % "|".join(map(re.escape, NAMES)))
    found = [f"{path.relative_to(root)}: {line.strip()}" for path in sorted(root.rglob("*.py"))
             if "families" not in path.parts for line in path.read_text().splitlines() if keyed.search(line)]
    assert found == []


def test_generate_reads_what_a_pipeline_samples_from_its_family():
    from mmalign.families import family_for_pipeline
    from mmalign.generate.images import is_audio_name

    assert family_for_pipeline("StableDiffusionPipeline").name == "sd"  # the base, not sd_spo
    assert family_for_pipeline("AudioLDM2Pipeline").name == "audioldm2"
    assert family_for_pipeline("NoSuchPipeline") is None
    assert is_audio_name("AudioLDM2Pipeline") and not is_audio_name("ZImagePipeline")
    assert is_audio_name("MusicLDMPipeline")  # no family: by the words of its name
