"""Hub ids wherever a model path is taken (mmalign/hub.py): a Hub cache folder built here in
huggingface_hub's layout (models--ORG--NAME/{refs,snapshots}), read with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmalign.config import load_config, resolve_path
from mmalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmalign" / "data"
MAIN, V2 = "a" * 40, "b" * 40


def _add_snapshot(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    """Copy `source` as snapshot `commit` of `repo` and point each ref at it."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """tinyorg/tiny-lm at main (the shipped tiny LM) and at v2 (its embedding doubled),
    tinyorg/tiny-sdxl at main (the shipped diffusers folder); network off."""
    cache = tmp_path / "hub"
    _add_snapshot(cache, "tinyorg/tiny-lm", MAIN, PKG / "tiny_lm", ("main",))
    v2 = _add_snapshot(cache, "tinyorg/tiny-lm", V2, PKG / "tiny_lm", ("v2",))
    state = load_file(v2 / "model.safetensors")
    key = next(k for k in state if "embed" in k)
    state[key] = state[key] * 2
    save_file(state, v2 / "model.safetensors", metadata={"format": "pt"})
    _add_snapshot(cache, "tinyorg/tiny-sdxl", MAIN, PKG / "tiny_sdxl", ("main",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return {"cache": cache, "key": key, "v2": state[key]}


def test_text_lm_by_hub_id_and_revision(hub_cache):
    from mmalign.generate.text import load_text_model

    key = hub_cache["key"]
    shipped = load_file(PKG / "tiny_lm" / "model.safetensors")[key]
    model, tok = load_text_model("tinyorg/tiny-lm", device="cpu")
    assert torch.equal(model.state_dict()[key], shipped)
    for name in ("tinyorg/tiny-lm@v2", f"tinyorg/tiny-lm@{V2}"):
        model, _ = load_text_model(name, device="cpu")
        torch.testing.assert_close(model.state_dict()[key], 2 * shipped, rtol=0, atol=0)
    assert resolve_path("tinyorg/tiny-lm") == str(hub_cache["cache"] / "models--tinyorg--tiny-lm" / "snapshots" / MAIN)
    assert tok("hello").input_ids  # the tokenizer came from the snapshot too


def test_diffusers_folder_by_hub_id_trains_config(hub_cache):
    from mmalign.families import get_family
    from mmalign.modalities.loading import family_folder

    cfg = load_config(ROOT / "configs/tiny/sdxl_dpo.yaml", ["model.path=tinyorg/tiny-sdxl"])
    folder = family_folder(cfg, get_family(cfg.modality))
    assert folder == str(hub_cache["cache"] / "models--tinyorg--tiny-sdxl" / "snapshots" / MAIN)
    from mmalign.modalities import build_modality

    model, _, _ = build_modality(cfg)
    shipped = load_file(PKG / "tiny_sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(iter(shipped))
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    torch.testing.assert_close(state[name], shipped[name].to(state[name].dtype))


def test_bad_name_is_one_line(hub_cache, capsys):
    from mmalign.cli import main

    with pytest.raises(ConfigError) as e:
        resolve_path("tinyorg/tiny-lm@v9")
    assert "'tinyorg/tiny-lm@v9'" in str(e.value) and "revision 'v9'" in str(e.value)
    assert main(["train", str(ROOT / "configs/tiny/lm_dpo.yaml"), "model.path=nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.path 'nobody/nothing': no local folder" in err and "HF_HUB_OFFLINE=1" in err
    assert "Traceback" not in err and "internet connection" not in err
    assert resolve_path("./no/such/folder") == "./no/such/folder"  # a path-looking name is left to its loader


def test_diffusers_repo_skips_root_single_file_checkpoints(monkeypatch):
    """Online, a repo with model_index.json downloads its component folders, not the root's
    single-file checkpoint (FLUX.1-dev ships both); other repos download whole."""
    import huggingface_hub

    from mmalign.hub import _allow_patterns

    listings = {"bfl/flux": ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md",
                             "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"],
                "org/lm": ["config.json", "model.safetensors"]}
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: listings[repo])
    assert _allow_patterns("bfl/flux", None) == ["model_index.json", "README.md",
                                                 "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"]
    assert _allow_patterns("org/lm", "v1") is None
