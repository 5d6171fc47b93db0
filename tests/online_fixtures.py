"""Test doubles for online rounds without a model: a one-process CPU accelerator and an
`OnlineSource` of the tiny LM online config whose text sampler is replaced by a fake
(tests/test_online.py, tests/test_online_guards.py, tests/test_online_vlm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mmalign.config import load_config
from mmalign.online import OnlineSource
from mmalign.online.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "configs/tiny/lm_online_dpo.yaml"


class Accelerator:
    """What `OnlineSource` reads of an `accelerate.Accelerator`: one process on the CPU, no autocast."""

    device, is_main_process, num_processes, process_index = torch.device("cpu"), True, 1, 0

    @staticmethod
    def autocast() -> Any:
        return torch.autocast("cpu", enabled=False)


def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampler: Callable[..., list[dict[str, Any]]],
                *overrides: str, sampler_key: str = "text", config: Path = LM) -> OnlineSource:
    """The online source of `config` writing under tmp_path, rounds of the prompts "p one", "p two"
    (2 x 2 samples, scored by word counts) unless `overrides` say otherwise; SAMPLERS[sampler_key]
    is `sampler` for the test's duration."""
    monkeypatch.setitem(SAMPLERS, sampler_key, sampler)
    cfg = load_config(config, [f"train.output_dir={tmp_path}", "online.prompt_list=[p one, p two]",
                               "online.prompts_per_round=2", "online.group_size=2",
                               "online.scorer=[text_length=words]", *overrides])
    return OnlineSource(cfg, likelihood=None, processor=None)
