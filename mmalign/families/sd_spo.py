"""SPO / D3PO on an SD1.5 / SD2 UNet (`modality: sd_spo`): the step likelihood
(mmalign/modalities/step.py) over the `sd` family's parts, trained on transitions that the
current policy samples every `spo.round_steps` steps (the online source, step_sampler.py).
Sampling, validation and export are the `sd` family's (its pipeline, its UNet)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmalign.families import sd


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(UNet, StepLikelihood over the sd likelihood, None); never from a cache."""
    from mmalign.modalities.step_sampler import build_step

    return build_step(cfg, sd.build, trained)


def source(cfg: Any, likelihood: Any) -> Any:
    """The online SPO / D3PO rounds (`OnlineStepSource`)."""
    from mmalign.modalities.step_sampler import build_source

    return build_source(cfg, likelihood)


FAMILY = replace(sd.FAMILY, name="sd_spo", summary="SPO / D3PO: sampled transitions, online rounds (SD1.5 / SD2)",
                 build=build, source=source, step=True, cache=False)
