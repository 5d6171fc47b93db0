"""GRPO on an SD1.5 / SD2 UNet (`modality: sd_grpo`): the DDIM (η = grpo.noise_level > 0) transition
likelihood of SPO (mmalign/modalities/step.py) over the `sd` family's parts, trained on
trajectories the current policy samples every `grpo.round_steps` steps
(mmalign/modalities/grpo_source.py). Sampling pipeline, validation and export are the `sd` family's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmalign.families import sd


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(UNet, UNetStepLikelihood over the sd likelihood, None); never from a cache."""
    from mmalign.modalities.grpo_source import build_unet

    return build_unet(cfg, sd.build, trained)


def source(cfg: Any, likelihood: Any) -> Any:
    """The online GRPO rounds (`GRPOSource`)."""
    from mmalign.modalities.grpo_source import build_source

    return build_source(cfg, likelihood)


FAMILY = replace(sd.FAMILY, name="sd_grpo", summary="GRPO: DDIM (eta > 0) trajectories, online rounds (SD1.5 / SD2)",
                 build=build, source=source, cache=False)
