"""One resolver for every model path: a local folder, `pkg://NAME`, or a Hub id `org/name[@revision]`.

    pkg://NAME            mmalign/data/NAME (files shipped with mmalign)
    pkg://tiny/NAME[/p]   a tiny fixture built once into the user's cache (mmalign/tiny.py)
    /a/path, ./x, ~/x     a local file or folder, returned as given
    org/name[@rev]        when no such local path exists: `huggingface_hub.snapshot_download`
                          into the user's cache (HF_HUB_CACHE / HF_HOME), the snapshot folder of
                          `rev` (a branch, tag or commit; default main). With HF_HUB_OFFLINE=1
                          only the cache is read (refs/<rev> -> snapshots/<commit>).

Everything downstream keeps loading with `local_files_only=True` from the returned folder, so
one download serves every part (unet/, vae/, text encoders, tokenizer). A name that is neither
a local path nor a Hub id that can be had is one ConfigError line saying what was tried.
For a diffusers repo (model_index.json at its root) the root's single-file checkpoints
(`flux1-dev.safetensors`, `*.ckpt`) are not downloaded: the components' folders hold the weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmalign.errors import ConfigError

PACKAGE_PREFIX = "pkg://"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
SKIP_FORMATS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.gguf"]
ROOT_CHECKPOINTS = (".safetensors", ".sft", ".ckpt", ".bin", ".pt", ".pth")


def split_revision(name: str) -> tuple[str, str | None]:
    """'org/name@v1.0' -> ('org/name', 'v1.0'); 'org/name' -> ('org/name', None)."""
    repo, sep, revision = name.partition("@")
    return repo, (revision or None) if sep else None


def is_hub_id(name: str) -> bool:
    """`org/name` or `name`, optional `@revision`: what the Hub accepts as a repo id (not a path
    that starts with /, ., ~ or holds two slashes)."""
    repo, _ = split_revision(name)
    return bool(HUB_ID.match(repo)) and not repo.startswith((".", "~")) and ".." not in repo


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "on", "yes", "true")


def cache_dir() -> str | None:
    """The Hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _allow_patterns(repo: str, revision: str | None) -> list[str] | None:
    """For a diffusers repo: every file but the root's single-file checkpoints; None otherwise
    (or when the listing fails: snapshot_download then reports the real error)."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:  # noqa: BLE001 - any listing failure falls back to the plain download
        return None
    if "model_index.json" not in files:
        return None
    return [f for f in files if "/" in f or not f.endswith(ROOT_CHECKPOINTS)]


def download(name: str, what: str = "model.path", files: list[str] | None = None) -> str:
    """The local snapshot folder of the Hub id `name` (`org/name[@revision]`), downloading what
    the cache lacks unless offline; a ConfigError line when it cannot be had. `files`: glob
    patterns of the only files wanted (a scorer that reads a base model's config and processor
    but not its weights); default everything (see the module docstring)."""
    from huggingface_hub import snapshot_download

    repo, revision = split_revision(name)
    is_offline = offline()
    allow = files if files is not None else None if is_offline else _allow_patterns(repo, revision)
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=is_offline,
                                 allow_patterns=allow, ignore_patterns=SKIP_FORMATS)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
        where = cache_dir() or "the default Hugging Face cache"
        reason = (f"not in the Hub cache {where} (HF_HUB_OFFLINE=1: nothing is downloaded)" if is_offline
                  else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        rev = f" at revision {revision!r}" if revision else ""
        raise ConfigError(f"{what} {name!r}: no local folder {Path(name).expanduser().absolute()} exists, and the "
                          f"Hub model {repo!r}{rev} cannot be had: {reason}") from None


def resolve_path(path: str, what: str = "model.path", files: list[str] | None = None) -> str:
    """pkg://NAME -> the shipped folder; an existing local path (or one that cannot be a Hub id)
    -> unchanged; otherwise a Hub id -> its local snapshot folder (see the module docstring),
    holding only the `files` patterns when given."""
    if not path:
        raise ConfigError(f"{what} is empty: give a local folder, pkg://NAME or a Hub id org/name[@revision]")
    if path.startswith("pkg://tiny/"):  # built on first use (mmalign/tiny.py)
        from mmalign.tiny import resolve_tiny

        return resolve_tiny(path)
    if path.startswith(PACKAGE_PREFIX):
        return str(Path(__file__).parent / "data" / path[len(PACKAGE_PREFIX):])
    if Path(path).expanduser().exists() or not is_hub_id(path):
        return path
    return download(path, what, files)
