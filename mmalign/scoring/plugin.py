"""User scorers by import path: `python:my_pkg.rewards:MyScorer=ARG` or `python:/path/file.py:fn`.

The object named after `python:` is imported from a module on `sys.path` (`pkg.mod:Name`) or
from a Python file (`/path/to/file.py:Name`). It follows the Scorer contract
(mmalign/scoring/base.py):

- a class: built as `Name(ARG, **options)` (`Name(**options)` without ARG), with `device` and
  `batch_size` passed when its constructor takes them; its `score(conditions, outputs)` returns
  N numbers. Class attributes `kinds` and `groupwise` are read when present.
- a function: `fn(conditions, outputs, [ARG], **options) -> N numbers`, called on batches of
  `batch_size`; it scores every sample kind (outputs: media paths, or the text).

Either way the N numbers (a Tensor, list or array) are checked: one number per sample, NaN
allowed (the contract's "could not score"), anything else is a ConfigError naming the scorer.
`module:function` in `spo.scorer` / `grpo.scorer` imports through `import_object` too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.errors import ConfigError
from mmalign.scoring.base import Scorer

PREFIX = "python:"
ALL_KINDS = ("image", "video", "audio", "text")  # a function scorer gets the media paths of any kind


def import_object(ref: str, what: str = "scorer") -> Any:
    """`pkg.mod:Name` (a module on sys.path) or `/path/file.py:Name` (a file, imported under a
    private module name) -> the object; a ConfigError saying what failed otherwise."""
    module, sep, name = ref.rpartition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{what} {ref!r}: expected module.path:Name or /path/file.py:Name")
    try:
        if module.endswith(".py"):
            file = Path(module).expanduser()
            if not file.is_file():
                raise ConfigError(f"{what} {ref!r}: file {file} does not exist")
            key = f"mmalign_user_{abs(hash(str(file.resolve())))}"
            spec = importlib.util.spec_from_file_location(key, file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod  # dataclasses and pickling look the module up by name
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} {ref!r}: cannot import {module}: {e}") from e
    if not hasattr(mod, name):
        raise ConfigError(f"{what} {ref!r}: {module} has no {name!r}")
    return getattr(mod, name)


def as_scores(values: Any, n: int, who: str) -> Tensor:
    """A scorer's answer as a float32 (n,) tensor; a ConfigError naming `who` when it is not n numbers."""
    try:
        t = torch.as_tensor(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"scorer {who}: returned {type(values).__name__}, not a list of numbers ({e})") from e
    if t.dim() != 1 or t.numel() != n:
        raise ConfigError(f"scorer {who}: returned shape {tuple(t.shape)} for a batch of {n} samples; expected ({n},)")
    return t


class FunctionScorer(Scorer):
    """A plain function under the Scorer contract: fn(conditions, outputs, [arg], **options) -> N numbers."""

    kinds = ALL_KINDS
    fn: Any = None
    ref = ""

    def __init__(self, path: str = "", *, device: str = "cpu", batch_size: int = 16, **options: Any) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.args = (path,) if path else ()
        self.options = options

    def _score_batch(self, conditions: list[str], outputs: list[Any]) -> Tensor:
        return as_scores(type(self).fn(conditions, outputs, *self.args, **self.options), len(outputs), self.ref)


class ClassScorer:
    """A user class's instance whose answers are checked (length, numbers) by `as_scores`;
    `plugin_class` makes one subclass per user class (`inner_cls`, its `kinds`, `groupwise`)."""

    inner_cls: Any = None
    ref = ""
    kinds: tuple[str, ...] = ALL_KINDS
    groupwise = False

    def __init__(self, path: str = "", **kwargs: Any) -> None:
        try:
            self.inner = self.inner_cls(path, **kwargs) if path else self.inner_cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"scorer {self.ref}: cannot be built with ARG {path!r} and options {kwargs}: {e}") from e

    @classmethod
    def is_groupwise(cls, options: dict[str, Any]) -> bool:
        return cls.groupwise

    def score(self, conditions: Sequence[str], outputs: Sequence[Any]) -> Tensor:
        return as_scores(self.inner.score(list(conditions), list(outputs)), len(outputs), self.ref)

    def stats(self) -> dict[str, int]:
        stats = getattr(self.inner, "stats", None)
        return stats() if callable(stats) else {}


def plugin_class(name: str) -> type:
    """The scorer class behind `python:REF`: a ClassScorer subclass around a user class, a
    FunctionScorer subclass around a function."""
    ref = name[len(PREFIX):]
    obj = import_object(ref)
    if inspect.isclass(obj):
        if not callable(getattr(obj, "score", None)):
            raise ConfigError(f"scorer {name!r}: class {obj.__name__} has no score(conditions, outputs) method")
        return type(f"Plugin_{obj.__name__}", (ClassScorer,), {
            "inner_cls": obj, "ref": name, "kinds": tuple(getattr(obj, "kinds", ALL_KINDS)),
            "groupwise": bool(getattr(obj, "groupwise", False))})
    if not callable(obj):
        raise ConfigError(f"scorer {name!r}: {ref} is a {type(obj).__name__}, not a class or function")
    return type(f"Function_{getattr(obj, '__name__', 'scorer')}", (FunctionScorer,),
                {"fn": staticmethod(obj), "ref": name})


def load_plugin(name: str, path: str, options: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """An instance of the plugin `name` built with ARG `path`, the spec's options and the
    defaults (device, batch_size) its constructor takes; an option it does not take is a ConfigError."""
    cls = plugin_class(name)
    if issubclass(cls, FunctionScorer):
        return cls(path, **{**{k: v for k, v in defaults.items() if k in ("device", "batch_size")}, **options})
    params = inspect.signature(cls.inner_cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
    unknown = sorted(set(options) - named) if not takes_any else []
    if unknown:
        raise ConfigError(f"scorer {name}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(sorted(named))}")
    kwargs = {k: v for k, v in defaults.items() if k in named or takes_any}
    return cls(path, **{**kwargs, **options})
