"""Tiny fixtures built on demand: `pkg://tiny/NAME[/sub/path]` (what configs/tiny/*.yaml point at).

The first time a path names fixture NAME, its builder writes it into
`<cache>/tiny/NAME-<hash of the builder's source>` (cache: MMALIGN_CACHE, else
$XDG_CACHE_HOME/mmalign, else ~/.cache/mmalign); later runs reuse that folder. Nothing is
downloaded: every model is built from its real config class with a fixed seed, every data file
is generated (the same bytes as the command in each config's first comment line). The build goes
to a temporary folder renamed into place when complete, so concurrent processes (a multi-GPU
launch) never read half a fixture; a builder change (its source hash) builds a fresh folder.

| NAME            | builder                                              | holds                              |
|-----------------|------------------------------------------------------|------------------------------------|
| sd_run          | tests/diffusion_fixtures.py write_tiny_run           | pipeline/, pairs/train.jsonl       |
| sd3_run         | tests/flow_fixtures.py write_tiny_flow_run           | pipeline/, pairs/train.jsonl       |
| flux2_run       | tests/flux2_fixtures.py write_tiny_flux2_run         | pipeline/, pairs/train.jsonl       |
| qwen_image_run  | tests/qwen_image_fixtures.py write_tiny_qwen_image_run | pipeline/, pairs/train.jsonl     |
| zimage_run      | tests/zimage_fixtures.py write_tiny_zimage_run       | pipeline/, pairs/train.jsonl       |
| wan_pipeline    | tests/wan_fixtures.py save_tiny_wan_pipeline         | pipeline/                          |
| qwen_image_edit_pipeline | tests/qwen_image_edit_fixtures.py save_tiny_qwen_image_edit_pipeline | pipeline/          |
| flux_kontext_pipeline | tests/flux_kontext_fixtures.py save_tiny_flux_kontext_pipeline | pipeline/                |
| audio           | tests/audio_fixtures.py write_tiny_audio_run         | pipeline/, clap/, pairs/train.jsonl |
| llava_model     | mmalign.toyvlm save_tiny_llava                       | a LLaVA model + processor folder   |
| toy_shapes      | mmalign.toyvlm make_shape_pairs(256, seed 0)         | pairs.jsonl, images/               |
| toy_shapes_eval | mmalign.toyvlm make_shape_pairs(64, seed 1)          | pairs.jsonl, images/               |
| toy_scenes      | mmalign.toyworld.world write_world(32 train scenes, seed 0) | train.jsonl, images, annotations |

The image / audio / video families' tiny builders live beside the tests that use them
(tests/*_fixtures.py of a source checkout, where configs/tiny/ lives too); they are imported
from there, and a missing file is one ConfigError line.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmalign.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[1]  # the source checkout holding mmalign/ and tests/
PREFIX = "pkg://tiny/"


@dataclass(frozen=True)
class Fixture:
    """builder: `tests/FILE.py:function` (a source checkout's test fixtures) or `module:function`;
    called as function(folder, *args, **kwargs), or function(*args, folder) with `folder_last`."""

    builder: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    subfolder: str = ""  # the builder writes into folder/subfolder
    folder_last: bool = False


FIXTURES: dict[str, Fixture] = {
    "sd_run": Fixture("tests/diffusion_fixtures.py:write_tiny_run"),
    "sd3_run": Fixture("tests/flow_fixtures.py:write_tiny_flow_run", kwargs={"count": 32}),
    "flux2_run": Fixture("tests/flux2_fixtures.py:write_tiny_flux2_run", kwargs={"count": 32}),
    "qwen_image_run": Fixture("tests/qwen_image_fixtures.py:write_tiny_qwen_image_run", kwargs={"count": 32}),
    "zimage_run": Fixture("tests/zimage_fixtures.py:write_tiny_zimage_run", kwargs={"count": 32}),
    "wan_pipeline": Fixture("tests/wan_fixtures.py:save_tiny_wan_pipeline", subfolder="pipeline"),
    "qwen_image_edit_pipeline": Fixture("tests/qwen_image_edit_fixtures.py:save_tiny_qwen_image_edit_pipeline",
                               subfolder="pipeline"),
    "flux_kontext_pipeline": Fixture("tests/flux_kontext_fixtures.py:save_tiny_flux_kontext_pipeline", subfolder="pipeline"),
    "audio": Fixture("tests/audio_fixtures.py:write_tiny_audio_run"),
    "llava_model": Fixture("mmalign.toyvlm:save_tiny_llava"),
    "toy_shapes": Fixture("mmalign.toyvlm:make_shape_pairs", (256, 0), folder_last=True),
    "toy_shapes_eval": Fixture("mmalign.toyvlm:make_shape_pairs", (64, 1), folder_last=True),
    "toy_scenes": Fixture("mmalign.toyworld.world:write_world", (32, 0, "train", "scenes")),
}


def cache_root() -> Path:
    """MMALIGN_CACHE, else $XDG_CACHE_HOME/mmalign, else ~/.cache/mmalign (read now)."""
    if os.environ.get("MMALIGN_CACHE"):
        return Path(os.environ["MMALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmalign"


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """`folder` importable for the block (the test fixtures import each other by bare name)."""
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


def _builder(name: str, fixture: Fixture) -> tuple[Callable[..., Any], Path]:
    """(the builder function, its source file)."""
    target, _, function = fixture.builder.rpartition(":")
    if target.endswith(".py"):
        source = CHECKOUT / target
        if not source.is_file():
            raise ConfigError(f"pkg://tiny/{name}: its builder {source} is missing (the tiny image, audio and video "
                              f"fixtures are built by the source checkout's tests/*_fixtures.py)")
        with _on_path(source.parent):
            module = importlib.import_module(source.stem)
    else:
        module = importlib.import_module(target)
    return getattr(module, function), Path(module.__file__)


def _build(fixture: Fixture, function: Callable[..., Any], folder: Path) -> None:
    out = folder / fixture.subfolder if fixture.subfolder else folder
    if fixture.folder_last:
        function(*fixture.args, out, **fixture.kwargs)
    else:
        function(out, *fixture.args, **fixture.kwargs)


def materialise(name: str) -> Path:
    """The folder of tiny fixture `name`, built now if the cache lacks it (module docstring)."""
    if name not in FIXTURES:
        raise ConfigError(f"pkg://tiny/{name}: no such tiny fixture; known: {', '.join(FIXTURES)}")
    fixture = FIXTURES[name]
    function, source = _builder(name, fixture)
    digest = hashlib.sha256(source.read_bytes() + repr(fixture).encode()).hexdigest()[:10]
    folder = cache_root() / "tiny" / f"{name}-{digest}"
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"[mmalign] building the tiny fixture {name} into {folder} (once; nothing is downloaded)")
    try:
        _build(fixture, function, tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():  # not "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_tiny(path: str) -> str:
    """`pkg://tiny/NAME/rest` -> `<fixture folder>/rest`."""
    name, _, rest = path[len(PREFIX):].partition("/")
    folder = materialise(name)
    return str(folder / rest) if rest else str(folder)
